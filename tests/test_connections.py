"""Connection URLs: what each scheme means, what is refused and how, and Celery's fallbacks.

Nothing here needs a server: parsing never connects, and neither does building a
standalone or Sentinel client (the tests point them at a port nothing listens on).
The clients are exercised against real servers in ``test_topologies.py``.
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import redis
from celery import Celery

from celery_idem.connections import CLIENT_DEFAULTS, client_for, connection_settings, parse, redact
from celery_idem.errors import ImproperlyConfigured
from celery_idem.testing import free_port

CA = "/etc/certs/ca.pem"


def test_redis_url_names_host_port_db_and_credentials() -> None:
    target = parse("redis://user:p%40ss@cache.internal:6380/3")
    assert target.topology == "server"
    assert target.nodes == (("cache.internal", 6380),)
    assert target.db == 3
    assert not target.tls
    assert target.client_options["username"] == "user"
    assert target.client_options["password"] == "p@ss"


def test_bare_redis_url_means_localhost_6379_db_0() -> None:
    target = parse("redis://")
    assert (target.nodes, target.db) == ((("localhost", 6379),), 0)


def test_ipv6_host_is_read_inside_brackets() -> None:
    assert parse("redis://[::1]:7000/0").nodes == (("::1", 7000),)


def test_client_defaults_apply_unless_options_override_them() -> None:
    assert dict(parse("redis://h/0").client_options) == dict(CLIENT_DEFAULTS)
    options = parse("redis://h/0", {"socket_timeout": 2.5}).client_options
    assert options["socket_timeout"] == 2.5
    assert options["socket_connect_timeout"] == CLIENT_DEFAULTS["socket_connect_timeout"]


def test_rediss_url_reads_certificate_settings_from_its_query() -> None:
    target = parse(
        f"rediss://h:6380/1?ssl_cert_reqs=required&ssl_ca_certs={CA}"
        "&ssl_certfile=/c/client.crt&ssl_keyfile=/c/client.key&ssl_check_hostname=false"
    )
    assert target.tls
    assert dict(target.client_options) == {
        **CLIENT_DEFAULTS,
        "ssl_cert_reqs": ssl.CERT_REQUIRED,
        "ssl_ca_certs": CA,
        "ssl_certfile": "/c/client.crt",
        "ssl_keyfile": "/c/client.key",
        "ssl_check_hostname": False,
    }


def test_rediss_url_takes_certificate_settings_from_the_options() -> None:
    target = parse("rediss://h/0", {"ssl_cert_reqs": "CERT_REQUIRED", "ssl_ca_certs": CA})
    assert target.client_options["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert target.client_options["ssl_ca_certs"] == CA


@pytest.mark.parametrize(
    ("spelling", "mode"),
    [
        ("required", ssl.CERT_REQUIRED),
        ("optional", ssl.CERT_OPTIONAL),
        ("none", ssl.CERT_NONE),
        ("CERT_REQUIRED", ssl.CERT_REQUIRED),
        ("CERT_OPTIONAL", ssl.CERT_OPTIONAL),
        ("CERT_NONE", ssl.CERT_NONE),
        (ssl.CERT_REQUIRED, ssl.CERT_REQUIRED),
        (ssl.CERT_OPTIONAL, ssl.CERT_OPTIONAL),
        (ssl.CERT_NONE, ssl.CERT_NONE),
    ],
)
def test_ssl_cert_reqs_accepts_every_spelling_celery_accepts(spelling: Any, mode: ssl.VerifyMode) -> None:
    assert parse("rediss://h/0", {"ssl_cert_reqs": spelling}).client_options["ssl_cert_reqs"] == mode
    if isinstance(spelling, str):
        in_query = parse(f"rediss://h/0?ssl_cert_reqs={spelling}")
        assert in_query.client_options["ssl_cert_reqs"] == mode


@pytest.mark.parametrize("scheme", ["unix", "redis+socket"])
def test_unix_socket_url_names_the_path_and_db(scheme: str) -> None:
    target = parse(f"{scheme}:///run/redis/redis.sock?db=2")
    assert target.topology == "unix"
    assert (target.path, target.db, target.nodes) == ("/run/redis/redis.sock", 2, ())


def test_unix_socket_url_may_carry_a_password() -> None:
    assert parse("unix://:secret@/run/redis.sock").client_options["password"] == "secret"


def test_sentinel_url_lists_the_sentinels_and_the_primarys_db_and_password() -> None:
    target = parse(
        "sentinel://:primary-pw@s1:26379;sentinel://s2:26380;sentinel://s3/4",
        {"master_name": "records", "sentinel_kwargs": {"password": "sentinel-pw"}},
    )
    assert target.topology == "sentinel"
    assert target.nodes == (("s1", 26379), ("s2", 26380), ("s3", 26379))
    assert target.db == 4
    assert target.master_name == "records"
    assert target.client_options["password"] == "primary-pw"
    assert target.sentinel_options["password"] == "sentinel-pw"
    assert target.min_other_sentinels == 0


def test_sentinel_url_may_repeat_the_db_in_every_part_as_celery_writes_it() -> None:
    assert parse("sentinel://s1/3;sentinel://s2/3", {"master_name": "m"}).db == 3


def test_sentinels_get_the_client_defaults_unless_sentinel_kwargs_override_them() -> None:
    target = parse("sentinel://s1", {"master_name": "m", "sentinel_kwargs": {"socket_timeout": 1}})
    assert target.sentinel_options == {**CLIENT_DEFAULTS, "socket_timeout": 1}


def test_sentinel_primary_over_tls_is_asked_for_with_ssl_true() -> None:
    target = parse(
        "sentinel://s1",
        {"master_name": "m", "ssl": True, "ssl_ca_certs": CA, "sentinel_kwargs": {"ssl": True}},
    )
    assert target.tls
    assert target.client_options["ssl"] is True
    assert target.client_options["ssl_ca_certs"] == CA
    assert target.sentinel_options["ssl"] is True


def test_cluster_url_lists_the_startup_nodes() -> None:
    target = parse("redis+cluster://:pw@n1:7000,n2:7001,n3")
    assert target.topology == "cluster"
    assert target.nodes == (("n1", 7000), ("n2", 7001), ("n3", 6379))
    assert (target.db, target.tls) == (0, False)
    assert target.client_options["password"] == "pw"


def test_rediss_cluster_url_reaches_every_node_over_tls() -> None:
    target = parse(f"rediss+cluster://n1:7000,n2:7001?ssl_ca_certs={CA}")
    assert target.tls
    assert target.client_options["ssl"] is True
    assert target.client_options["ssl_ca_certs"] == CA


def test_cluster_takes_redis_cluster_arguments() -> None:
    options = parse("redis+cluster://n1:7000", {"require_full_coverage": False}).client_options
    assert options["require_full_coverage"] is False


def test_cluster_refuses_a_connection_class_its_nodes_could_not_take() -> None:
    with pytest.raises(ImproperlyConfigured, match="connection_class"):
        parse("redis+cluster://n1:7000", {"connection_class": redis.Connection})


def test_a_setting_given_alike_in_the_url_and_the_options_is_accepted() -> None:
    target = parse(f"rediss://h/0?ssl_ca_certs={CA}", {"ssl_ca_certs": CA})
    assert target.client_options["ssl_ca_certs"] == CA


def test_parsing_and_building_clients_does_not_connect() -> None:
    port = free_port()  # nothing listens there
    for url, options in [
        (f"redis://127.0.0.1:{port}/0", {}),
        (f"rediss://127.0.0.1:{port}/0", {"ssl_ca_certs": CA}),
        ("unix:///nonexistent/redis.sock", {}),
        (f"sentinel://127.0.0.1:{port}", {"master_name": "m"}),
    ]:
        parse(url, options)
        client = client_for(url, options)
        assert isinstance(client, redis.Redis)
        client.close()


def test_standalone_client_keeps_the_retry_policy_of_a_url_client() -> None:
    # The store retries a failed script once itself; the client must not add redis-py
    # 6+'s Redis(host=...) default of 3 (or, from 8, 10) retries under it.
    ours = client_for("redis://127.0.0.1:1/0").connection_pool.make_connection()
    theirs = redis.Redis.from_url("redis://127.0.0.1:1/0").connection_pool.make_connection()
    assert ours.retry._retries == theirs.retry._retries  # get_retries() is new in redis-py 6


# -- refusals ---------------------------------------------------------------------

REFUSALS: list[tuple[Any, Any, list[str]]] = [
    # (url, options, fragments the message must hold)
    (None, {}, ["idempotency_redis_url must be a URL", "redis://", "got None"]),
    ("localhost:6379", {}, ["idempotency_redis_url must be a URL"]),
    ("http://h/0", {}, ["idempotency_redis_url must be a", "sentinel://", "redis+cluster://", "'http'"]),
    ("redis://h/0", ["socket_timeout"], ["idempotency_redis_options must be a dict"]),
    ("redis://h/0", {"decode_responses": True}, ["idempotency_redis_options must not set decode_responses"]),
    ("redis://h/x", {}, ["idempotency_redis_url", "database 'x'", "a number"]),
    ("redis://h/1?db=2", {}, ["idempotency_redis_url", "database 1", "?db=", "give one"]),
    ("redis://h:port/0", {}, ["idempotency_redis_url", "bad port 'port'"]),
    ("redis://h:70000/0", {}, ["idempotency_redis_url", "bad port '70000'"]),
    ("redis://[::1/0", {}, ["idempotency_redis_url", "unclosed '['"]),
    ("redis://h1,h2/0", {}, ["idempotency_redis_url", "several hosts", "redis+cluster://", "sentinel://"]),
    ("redis://h/0?foo=1", {}, ["idempotency_redis_url", "'foo'", "idempotency_redis_options"]),
    (
        "redis://h/0?socket_timeout=soon",
        {},
        ["idempotency_redis_url", "socket_timeout='soon'", "not a number"],
    ),
    ("redis://h/0?ssl_ca_certs=/ca.pem", {}, ["ssl_ca_certs is a TLS setting", "use rediss://"]),
    ("redis://h/0", {"ssl_ca_certs": CA}, ["ssl_ca_certs is a TLS setting", "use rediss://"]),
    ("redis://h/0", {"ssl": True}, ["ssl is a TLS setting", "use rediss://"]),
    ("rediss://h/0", {"ssl": False}, ["idempotency_redis_options sets ssl=False", "uses TLS"]),
    (
        "rediss://h/0?ssl_cert_reqs=mandatory",
        {},
        ["idempotency_redis_url sets ssl_cert_reqs to 'mandatory'", "required, optional or none", "CERT_"],
    ),
    ("rediss://h/0", {"ssl_cert_reqs": 7}, ["idempotency_redis_options sets ssl_cert_reqs to 7"]),
    ("rediss://h/0?ssl_check_hostname=maybe", {}, ["ssl_check_hostname='maybe'", "true or false"]),
    (
        "redis://h/0",
        {"socket_timeut": 1},
        ["idempotency_redis_options sets 'socket_timeut'", "redis-py", "did you mean 'socket_timeout'"],
    ),
    ("redis://h/0", {"host": "other"}, ["idempotency_redis_options sets 'host'", "in the URL"]),
    ("redis://h/0", {"db": 2}, ["idempotency_redis_options sets 'db'", "URL's path"]),
    (
        "rediss://h/0",
        {"connection_class": redis.Connection},
        ["connection_class", "not a subclass", "SSLConnection"],
    ),
    ("redis://h/0", {"connection_class": dict}, ["connection_class", "not a subclass"]),
    (
        "redis://:a@h/0",
        {"password": "b"},
        ["idempotency_redis_url and idempotency_redis_options both set password", "one place"],
    ),
    ("redis://h/0", {"master_name": "m"}, ["'master_name'", "only for sentinel:// URLs"]),
    ("redis+cluster://n1:7000", {"sentinel_kwargs": {}}, ["'sentinel_kwargs'", "only for sentinel://"]),
    ("unix://h/run/redis.sock", {}, ["names a host", "unix:///path/to/redis.sock"]),
    ("unix://", {}, ["has no socket path", "unix:///path/to/redis.sock"]),
    ("redis+socket:///r.sock", {"ssl_ca_certs": CA}, ["ssl_ca_certs is a TLS setting", "unix socket"]),
    ("unix:///r.sock", {"socket_keepalive": True}, ["'socket_keepalive'", "TCP connections only", "drop it"]),
    ("unix:///r.sock?db=one", {}, ["database 'one'"]),
    (
        "sentinel://s1;sentinel://s2",
        {},
        ["idempotency_redis_options must set master_name", "sentinel monitor <master_name>"],
    ),
    ("sentinel://s1", {"master_name": ""}, ["must set master_name", "got ''"]),
    ("sentinel://s1;redis://s2", {"master_name": "m"}, ["joins 'redis://s2'", "sentinel://host:port"]),
    ("sentinel://", {"master_name": "m"}, ["without exactly one host:port"]),
    ("sentinel://s1/1;sentinel://s2/2", {"master_name": "m"}, ["two different database numbers"]),
    (
        "sentinel://:a@s1;sentinel://:b@s2",
        {"master_name": "m"},
        ["two different passwords", "sentinel_kwargs"],
    ),
    ("sentinel://s1?ssl_ca_certs=/ca", {"master_name": "m"}, ["takes none", "ssl=True", "sentinel_kwargs"]),
    (
        "sentinel://s1",
        {"master_name": "m", "ssl_ca_certs": CA},
        ["ssl_ca_certs is a TLS setting", "ssl=True"],
    ),
    ("sentinel://s1", {"master_name": "m", "sentinel_kwargs": "pw"}, ["['sentinel_kwargs'] must be a dict"]),
    (
        "sentinel://s1",
        {"master_name": "m", "sentinel_kwargs": {"pasword": "x"}},
        ["['sentinel_kwargs'] sets 'pasword'", "did you mean 'password'"],
    ),
    (
        "sentinel://s1",
        {"master_name": "m", "sentinel_kwargs": {"ssl": True, "ssl_cert_reqs": "always"}},
        ["['sentinel_kwargs'] sets ssl_cert_reqs to 'always'"],
    ),
    (
        "sentinel://s1",
        {"master_name": "m", "min_other_sentinels": -1},
        ["min_other_sentinels'] must be an int"],
    ),
    ("redis+cluster://n1:7000,n2:7001/1", {}, ["selects database 1", "only database 0", "drop the /1"]),
    ("redis+cluster://n1:7000?db=2", {}, ["selects database 2", "only database 0"]),
    ("redis+cluster:///run/redis.sock", {}, ["names no startup node", "a unix socket cannot be one"]),
    ("redis+cluster://n1:7000", {"unix_socket_path": "/r.sock"}, ["'unix_socket_path'", "unix"]),
    ("redis+cluster://n1:7000", {"ssl_ca_certs": CA}, ["ssl_ca_certs is a TLS setting", "rediss+cluster://"]),
    ("redis+cluster://n1:7000", {"startup_nodes": []}, ["'startup_nodes'", "redis+cluster:// URL"]),
    (
        "redis+cluster://n1:7000",
        {"single_connection_client": True},
        ["'single_connection_client'", "redis-py"],
    ),
]


@pytest.mark.parametrize(("url", "options", "fragments"), REFUSALS)
def test_bad_url_or_options_are_refused_saying_what_to_fix(
    url: Any, options: Any, fragments: list[str]
) -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        parse(url, options)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_client_for_refuses_what_parse_refuses() -> None:
    with pytest.raises(ImproperlyConfigured, match="master_name"):
        client_for("sentinel://127.0.0.1:1", {})


def test_refusals_never_show_a_password() -> None:
    for url, options in [
        ("http://user:hunter2@h/0", {}),
        ("redis://:hunter2@h/x", {}),
        ("redis://:hunter2@h/0", {"password": "hunter3"}),
        ("sentinel://:hunter2@s1;sentinel://s2", {}),
        ("sentinel://s1?password=hunter2", {"master_name": "m"}),
        ("redis://h/0?password=hunter2", {}),
    ]:
        with pytest.raises(ImproperlyConfigured) as info:
            parse(url, options)
        assert "hunter" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://:secret@h/0", "redis://***@h/0"),
        ("rediss://user:secret@h/0", "rediss://user:***@h/0"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("unix://:secret@/run/redis.sock?db=1", "unix://***@/run/redis.sock?db=1"),
        (
            "sentinel://:a@s1:26379;sentinel://u:b@s2:26379/0",
            "sentinel://***@s1:26379;sentinel://u:***@s2:26379/0",
        ),
        ("redis+cluster://:secret@n1:7000,n2:7001", "redis+cluster://***@n1:7000,n2:7001"),
        (
            "rediss://h/0?ssl_password=secret&ssl_ca_certs=/ca",
            "rediss://h/0?ssl_password=***&ssl_ca_certs=/ca",
        ),
    ],
)
def test_redact_masks_every_password(url: str, shown: str) -> None:
    assert redact(url) == shown


# -- Celery's settings ------------------------------------------------------------


def app_with(**conf: Any) -> Celery:
    app = Celery("c", set_as_current=False)
    app.conf.update(conf)
    return app


def test_explicit_url_and_options_are_used_as_given() -> None:
    app = app_with(result_backend="redis://backend/1", broker_url="redis://broker/2")
    assert connection_settings(app, "redis://records/3", {"socket_timeout": 1}) == (
        "redis://records/3",
        {"socket_timeout": 1},
    )


def test_result_backend_comes_before_the_broker() -> None:
    app = app_with(result_backend="redis://backend/1", broker_url="redis://broker/2")
    assert connection_settings(app) == ("redis://backend/1", {})


def test_broker_is_used_when_the_result_backend_is_not_redis() -> None:
    app = app_with(result_backend="rpc://", broker_url="redis://broker/2")
    assert connection_settings(app) == ("redis://broker/2", {})


def test_localhost_is_the_last_fallback() -> None:
    app = app_with(result_backend="db+sqlite:///results.db", broker_url="amqp://guest@rabbit//")
    assert connection_settings(app) == ("redis://localhost:6379/0", {})


def test_result_backend_tls_settings_are_reused() -> None:
    app = app_with(
        result_backend="rediss://backend:6380/1",
        redis_backend_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": CA},
    )
    url, options = connection_settings(app, None, {"socket_timeout": 3})
    assert url == "rediss://backend:6380/1"
    assert options == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": CA, "socket_timeout": 3}


def test_result_backend_redis_url_with_use_ssl_is_reached_over_tls_as_celery_does() -> None:
    app = app_with(result_backend="redis://backend/1", redis_backend_use_ssl={"ssl_cert_reqs": "none"})
    url, options = connection_settings(app)
    assert url == "rediss://backend/1"
    assert parse(url, options).client_options["ssl_cert_reqs"] == ssl.CERT_NONE


def test_certificate_settings_in_the_backend_url_win_over_use_ssl_as_in_celery() -> None:
    app = app_with(
        result_backend="rediss://backend/1?ssl_cert_reqs=required",
        redis_backend_use_ssl={"ssl_cert_reqs": "none", "ssl_ca_certs": CA},
    )
    url, options = connection_settings(app)
    assert options == {"ssl_ca_certs": CA}
    assert parse(url, options).client_options["ssl_cert_reqs"] == ssl.CERT_REQUIRED


def test_result_backend_sentinel_transport_options_are_reused() -> None:
    app = app_with(
        result_backend="sentinel://s1:26379;sentinel://s2:26379/1",
        result_backend_transport_options={
            "master_name": "records",
            "sentinel_kwargs": {"password": "sentinel-pw"},
            "visibility_timeout": 3600,
        },
    )
    url, options = connection_settings(app)
    assert url == "sentinel://s1:26379;sentinel://s2:26379/1"
    assert options == {"master_name": "records", "sentinel_kwargs": {"password": "sentinel-pw"}}
    assert parse(url, options).db == 1


def test_result_backend_sentinel_with_use_ssl_reaches_the_primary_over_tls() -> None:
    app = app_with(
        result_backend="sentinel://s1:26379",
        redis_backend_use_ssl={"ssl_cert_reqs": "required", "ssl_ca_certs": CA},
        result_backend_transport_options={"master_name": "records"},
    )
    url, options = connection_settings(app)
    assert parse(url, options).tls


def test_result_backend_credential_settings_are_reused_when_the_url_has_none() -> None:
    app = app_with(result_backend="redis://backend/1", redis_username="app", redis_password="pw")
    assert connection_settings(app) == ("redis://backend/1", {"username": "app", "password": "pw"})
    app = app_with(result_backend="redis://:url-pw@backend/1", redis_password="pw")
    assert connection_settings(app) == ("redis://:url-pw@backend/1", {})


def test_result_backend_socket_url_is_reused() -> None:
    app = app_with(result_backend="redis+socket:///run/redis.sock?db=2")
    url, options = connection_settings(app)
    assert parse(url, options).path == "/run/redis.sock"


def test_broker_tls_and_sentinel_settings_are_reused() -> None:
    app = app_with(
        broker_url="redis://broker/0", broker_use_ssl={"ssl_cert_reqs": "required", "ssl_ca_certs": CA}
    )
    assert connection_settings(app) == (
        "rediss://broker/0",
        {"ssl_cert_reqs": "required", "ssl_ca_certs": CA},
    )
    app = app_with(
        broker_url="sentinel://s1:26379;sentinel://s2:26379",
        broker_transport_options={"master_name": "broker", "min_other_sentinels": 1},
    )
    assert connection_settings(app) == (
        "sentinel://s1:26379;sentinel://s2:26379",
        {"master_name": "broker", "min_other_sentinels": 1},
    )


def test_broker_failover_list_gives_its_first_server() -> None:
    assert connection_settings(app_with(broker_url="redis://b1/0;redis://b2/0"))[0] == "redis://b1/0"
    assert connection_settings(app_with(broker_url=["redis://b1/0", "redis://b2/0"]))[0] == "redis://b1/0"
    sentinels = app_with(
        broker_url=["sentinel://s1", "sentinel://s2"], broker_transport_options={"master_name": "m"}
    )
    assert connection_settings(sentinels)[0] == "sentinel://s1;sentinel://s2"


def test_unusable_result_backend_is_refused_naming_where_it_came_from() -> None:
    app = app_with(result_backend="sentinel://s1:26379", result_backend_transport_options={})
    with pytest.raises(ImproperlyConfigured) as info:
        connection_settings(app)
    message = str(info.value)
    assert "idempotency_redis_url is not set" in message
    assert "result_backend" in message
    assert "master_name" in message
    assert "result_backend_transport_options" in message


def test_explicit_url_is_checked_too() -> None:
    with pytest.raises(ImproperlyConfigured, match="idempotency_redis_url must be a"):
        connection_settings(app_with(), "memcached://h", {})


def test_a_connection_class_of_ones_own_is_taken_if_it_subclasses_the_schemes() -> None:
    class Counting(redis.Connection):
        pass

    client = client_for("redis://127.0.0.1:1/0", {"connection_class": Counting})
    assert client.connection_pool.connection_class is Counting
