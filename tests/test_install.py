"""Installed the way a user installs it: a wheel, alone, in a fresh virtualenv.

The suite's own environment has the test and dev extras, which bring packages the
package itself may forget to declare. Here the wheel is built from this checkout
and installed into a new virtualenv with nothing but its declared dependencies
(pip may take them from its local cache); then ``import celery_idem`` must work,
must not load what a RabbitMQ app does not need, and one idempotent task sent twice
through a real worker must run once, on RabbitMQ and on the Redis broker, the
second delivery returning the first one's result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_idem.testing import RedisServer
from tests.conftest import RABBITMQ_URL, rabbitmq_available
from tests.helpers import ROOT

pytestmark = pytest.mark.install

APP = textwrap.dedent(
    """
    import os
    import uuid

    import redis
    from celery import Celery

    from celery_idem import IdempotentTask

    app = Celery("userapp", broker=os.environ["USERAPP_BROKER"], backend=os.environ["USERAPP_REDIS"])
    app.conf.task_default_queue = os.environ["USERAPP_QUEUE"]
    app.conf.broker_connection_retry_on_startup = True

    @app.task(base=IdempotentTask, idempotency_key=("order_id",))
    def charge(order_id):
        redis.Redis.from_url(os.environ["USERAPP_REDIS"]).incr(f"runs:{order_id}")
        return {"order_id": order_id, "charge": uuid.uuid4().hex}
    """
)

SEND_TWICE = textwrap.dedent(
    """
    import json, os
    import redis
    from userapp import charge

    first = charge.delay(7).get(timeout=60)
    second = charge.delay(7).get(timeout=60)
    runs = int(redis.Redis.from_url(os.environ["USERAPP_REDIS"]).get("runs:7"))
    print(json.dumps({"first": first, "second": second, "runs": runs}))
    """
)

IMPORT_CHECK = textwrap.dedent(
    """
    import json, sys
    import celery_idem
    heavy = ["redis", "kombu.transport.redis", "celery_idem.broker", "celery_idem.delivery"]
    print(json.dumps({"version": celery_idem.__version__, "loaded": [m for m in heavy if m in sys.modules]}))
    """
)


def run(args: list[str], timeout: float = 600, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="module")
def user_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv holding the wheel of this checkout and its declared dependencies only."""
    where = tmp_path_factory.mktemp("install")
    wheels = where / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(ROOT)])
    (wheel,) = wheels.glob("celery_idem-*.whl")
    venv = where / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)])
    app = where / "app"
    app.mkdir()
    (app / "userapp.py").write_text(APP)
    yield venv


def user_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without this checkout on the path, as a user's shell has it."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **extra}


def test_the_installed_wheel_imports_without_loading_redis_or_kombus_redis_transport(user_env: Path) -> None:
    result = run([user_python(user_env), "-c", IMPORT_CHECK], cwd=user_env.parent / "app", env=clean_env())
    report = json.loads(result.stdout)
    assert report["loaded"] == []


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_an_installed_app_runs_a_task_sent_twice_once(user_env: Path, broker: str) -> None:
    with RedisServer() as records:
        if broker == "rabbitmq":
            if not rabbitmq_available():
                if os.environ.get("CI"):
                    pytest.fail(f"RabbitMQ is not reachable at {RABBITMQ_URL} and CI is set")
                pytest.skip(f"RabbitMQ is not reachable at {RABBITMQ_URL}")
            broker_url = RABBITMQ_URL
        else:
            broker_url = records.url.rsplit("/", 1)[0] + "/1"
        queue = f"install-{os.getpid()}-{broker}"
        env = clean_env(USERAPP_BROKER=broker_url, USERAPP_REDIS=records.url, USERAPP_QUEUE=queue)
        app_dir = user_env.parent / "app"
        log = open(app_dir / f"worker-{broker}.log", "w+")
        worker = subprocess.Popen(
            [user_python(user_env), "-m", "celery", "-A", "userapp", "worker", "-P", "solo", "-l", "INFO"],
            cwd=app_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            result = run([user_python(user_env), "-c", SEND_TWICE], cwd=app_dir, env=env, timeout=180)
        finally:
            worker.terminate()
            worker.wait(60)
            log.seek(0)
            worker_log = log.read()
            log.close()
            if broker == "rabbitmq":
                from kombu import Connection

                with Connection(RABBITMQ_URL) as connection:
                    connection.default_channel.queue_delete(queue)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["runs"] == 1, worker_log[-3000:]
        assert report["second"] == report["first"]
        if broker == "redis":
            assert "Connected to celery_idem.broker:Transport://" in worker_log
