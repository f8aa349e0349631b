"""Redis connection URLs: checked when the options are read, turned into redis-py clients.

``idempotency_redis_url`` names where the records live, in one of four topologies:

- one server over TCP, ``redis://[[user]:password@]host[:port][/db]``, or over TLS,
  ``rediss://...``, with certificate settings in the query
  (``?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem``) or in
  ``idempotency_redis_options``;
- one server on a unix socket, ``unix://[[user]:password@]/path/to.sock[?db=N]``, also
  spelled ``redis+socket://`` as Celery's result backend accepts it;
- the primary of a Sentinel group,
  ``sentinel://[[user]:password@]host[:port];sentinel://host[:port][/db]``: one URL per
  sentinel joined by ``;``; the credentials and the db are the primary's, and
  ``master_name`` (required), ``sentinel_kwargs`` (the sentinels' own password or TLS)
  and ``min_other_sentinels`` come from the options, as for Celery's ``SentinelBackend``;
- a Redis Cluster, ``redis+cluster://[[user]:password@]host:port,host:port`` or
  ``rediss+cluster://...``: startup nodes joined by ``,``, database 0 only.

:func:`parse` checks a URL and its options without connecting, so a mistake stops the
worker at start with a message naming the option and what to change; :func:`client_for`
builds the client. Only a cluster client connects when it is built (redis-py reads the
slot map in its constructor); the others connect on their first command.

Unless the options say otherwise, every connection (to a server, a primary, a sentinel
or a cluster node) gives up connecting after 5 s and waiting for a reply after 10 s, so
an unreachable Redis fails a delivery instead of hanging a worker slot.
"""

from __future__ import annotations

import functools
import inspect
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Literal, Union
from urllib.parse import parse_qsl, unquote

from .errors import ImproperlyConfigured

if TYPE_CHECKING:
    import redis
    import redis.cluster
    from celery import Celery

    #: A client :func:`client_for` returns.
    Client = Union[redis.Redis, redis.cluster.RedisCluster]

__all__ = [
    "CLIENT_DEFAULTS",
    "SCHEMES",
    "Target",
    "client_for",
    "connection_settings",
    "parse",
    "redact",
]


#: Every URL scheme :func:`parse` accepts.
SCHEMES = ("redis", "rediss", "unix", "redis+socket", "sentinel", "redis+cluster", "rediss+cluster")

#: Connection settings used unless the options say otherwise.
CLIENT_DEFAULTS: Mapping[str, Any] = MappingProxyType({"socket_connect_timeout": 5, "socket_timeout": 10})

Topology = Literal["server", "unix", "sentinel", "cluster"]

_URL = "idempotency_redis_url"
_OPTIONS = "idempotency_redis_options"
_FALLBACK_URL = "redis://localhost:6379/0"

_TOPOLOGIES: Mapping[str, tuple[Topology, bool]] = {
    "redis": ("server", False),
    "rediss": ("server", True),
    "unix": ("unix", False),
    "redis+socket": ("unix", False),
    "sentinel": ("sentinel", False),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_DEFAULT_PORTS: Mapping[Topology, int] = {"server": 6379, "sentinel": 26379, "cluster": 6379}

_CERT_REQS: Mapping[str, ssl.VerifyMode] = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
    "cert_required": ssl.CERT_REQUIRED,
    "cert_optional": ssl.CERT_OPTIONAL,
    "cert_none": ssl.CERT_NONE,
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

#: Options given by the URL or chosen from its scheme, never in the options.
_FROM_URL = {
    "host": "the host goes in the URL",
    "port": "the port goes in the URL",
    "path": "the socket path goes in a unix:// URL",
    "unix_socket_path": "the socket path goes in a unix:// URL",
    "db": "the database number goes in the URL's path (or ?db= for a socket)",
    "connection_pool": "celery_idem builds the pool from the URL",
    "connection_pool_class": "celery_idem builds the pool from the URL",
    "startup_nodes": "the startup nodes go in the redis+cluster:// URL",
    "url": "the URL goes in idempotency_redis_url",
    "sentinel_manager": "celery_idem builds the Sentinel client from the URL",
    "service_name": "the primary's name is the master_name option",
}
_SENTINEL_ONLY = ("master_name", "sentinel_kwargs", "min_other_sentinels")


@dataclass(frozen=True)
class Target:
    """What a URL and its options say: where the records live and how to reach them."""

    #: ``server``, ``unix``, ``sentinel`` or ``cluster``.
    topology: Topology
    #: The URL with its passwords masked, for messages and logs.
    url: str
    #: ``(host, port)`` of the server, of each sentinel, or of each cluster startup node.
    nodes: tuple[tuple[str, int], ...]
    #: The socket of a ``unix`` target.
    path: str | None
    #: The database number (always 0 for a cluster).
    db: int
    #: Whether the server, primary or cluster nodes are reached over TLS.
    tls: bool
    #: Keyword arguments of each connection to the server, primary or cluster nodes:
    #: the defaults, the options, credentials and TLS settings from the URL.
    client_options: Mapping[str, Any]
    #: The name the sentinels know the primary by.
    master_name: str | None = None
    #: Keyword arguments of each connection to a sentinel (``sentinel_kwargs``).
    sentinel_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    #: How many other sentinels a sentinel must see to be believed.
    min_other_sentinels: int = 0


def parse(url: Any, options: Any = None) -> Target:
    """Check ``url`` and ``options`` and say what they describe, without connecting.

    ``options`` are keyword arguments of redis-py's connections (and, for a cluster,
    of ``RedisCluster``), checked against the installed redis-py. Raises
    :class:`~celery_idem.errors.ImproperlyConfigured` naming ``idempotency_redis_url``
    or ``idempotency_redis_options`` and what to change.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ImproperlyConfigured(f"{_URL} must be a URL ({_schemes_text()}); got {_shown(url)}")
    options = _options_dict(options)
    scheme = url.partition("://")[0].lower()
    if scheme not in _TOPOLOGIES:
        raise ImproperlyConfigured(
            f"{_URL} must be a {_schemes_text()} URL; got {_shown(url)} (scheme {scheme!r})"
        )
    topology, tls = _TOPOLOGIES[scheme]
    if options.get("decode_responses"):
        raise ImproperlyConfigured(
            f"{_OPTIONS} must not set decode_responses: records hold encoded results as bytes"
        )
    if topology != "sentinel":
        for name in _SENTINEL_ONLY:
            if name in options:
                raise ImproperlyConfigured(
                    f"{_OPTIONS} sets {name!r}, which is only for sentinel:// URLs; {_URL} is {redact(url)!r}"
                )
    if topology == "sentinel":
        return _parse_sentinel(url, options)
    if topology == "cluster":
        return _parse_cluster(url, scheme, tls, options)
    return _parse_server(url, scheme, topology, tls, options)


def client_for(url: Any, options: Any = None) -> Client:
    """A redis-py client for the records at ``url``: ``Redis``, or ``RedisCluster`` for a cluster.

    A ``sentinel://`` URL gives the primary's client (``Sentinel.master_for``): it asks
    the sentinels for the primary's address whenever it opens a connection, so after a
    failover its next connection goes to the new primary. Raises
    :class:`~celery_idem.errors.ImproperlyConfigured` as :func:`parse` does.
    """
    import redis
    import redis.cluster
    import redis.sentinel

    target = parse(url, options)
    kwargs = dict(target.client_options)
    if target.topology == "cluster":
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in target.nodes]  # type: ignore[no-untyped-call]
        return redis.cluster.RedisCluster(startup_nodes=nodes, **kwargs)
    if target.topology == "sentinel":
        sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(target.nodes),
            min_other_sentinels=target.min_other_sentinels,
            sentinel_kwargs=dict(target.sentinel_options),
            db=target.db,
            **kwargs,
        )
        client: redis.Redis = sentinel.master_for(target.master_name)  # type: ignore[no-untyped-call]
        return client
    # A pool built like Redis.from_url builds it, so the connections' retry policy is
    # the one redis-py gives URL clients, whatever its version gives Redis(host=...).
    if target.topology == "unix":
        connection_class = kwargs.pop("connection_class", redis.UnixDomainSocketConnection)
        pool = redis.ConnectionPool(
            connection_class=connection_class, path=target.path, db=target.db, **kwargs
        )
    else:
        host, port = target.nodes[0]
        connection_class = kwargs.pop(
            "connection_class", redis.SSLConnection if target.tls else redis.Connection
        )
        pool = redis.ConnectionPool(
            connection_class=connection_class, host=host, port=port, db=target.db, **kwargs
        )
    return redis.Redis(connection_pool=pool)


def redact(url: Any) -> str:
    """``url`` with every password masked (each sentinel's, and ``password`` query values)."""
    if not isinstance(url, str):
        return repr(url)
    return ";".join(_redact_one(part) for part in url.split(";"))


def connection_settings(
    app: Celery, url: str | None = None, options: Mapping[str, Any] | None = None, check: bool = True
) -> tuple[str, dict[str, Any]]:
    """The URL and options of the records' Redis for ``app``, as ``(url, options)``.

    The first of these that applies is used:

    1. ``url`` (the ``idempotency_redis_url`` option), with ``options``
       (``idempotency_redis_options``) as they are;
    2. the app's ``result_backend``, when it is Celery's Redis or Sentinel backend
       (``redis://``, ``rediss://``, ``redis+socket://``, ``sentinel://``), with the
       settings that backend connects with: ``redis_backend_use_ssl`` (which, as in
       Celery, also turns a ``redis://`` URL into TLS), ``redis_username`` and
       ``redis_password`` when the URL has no credentials, and the ``master_name``,
       ``sentinel_kwargs`` and ``min_other_sentinels`` of
       ``result_backend_transport_options``;
    3. the app's ``broker_url``, when it is a Redis URL of the same forms, with
       ``broker_use_ssl`` and ``broker_transport_options`` read the same way (of a
       list or ``;``-separated failover list of ``redis://`` URLs, the first);
    4. ``redis://localhost:6379/0``.

    In 2 and 3, ``options`` are laid over the settings found, and a setting also in
    the URL's query is left to the URL, as Celery leaves it. The result is checked
    with :func:`parse` (unless ``check`` is False: checking loads redis-py); a
    backend or broker that cannot be used raises
    :class:`~celery_idem.errors.ImproperlyConfigured` saying so.
    """
    explicit = _options_dict(options)
    if url:
        if check:
            parse(url, explicit)
        return url, explicit
    conf = app.conf
    sources = (
        ("result_backend", "redis_backend_use_ssl", "result_backend_transport_options", True),
        ("broker_url", "broker_use_ssl", "broker_transport_options", False),
    )
    for url_setting, ssl_setting, transport_setting, credentials in sources:
        candidate = _redis_url_of(conf.get(url_setting))
        if candidate is None:
            continue
        found, derived = _settings_of(
            candidate,
            conf.get(ssl_setting),
            conf.get(transport_setting) or {},
            (conf.get("redis_username"), conf.get("redis_password")) if credentials else (None, None),
        )
        merged = {**derived, **explicit}
        try:
            if check:
                parse(found, merged)
        except ImproperlyConfigured as exc:
            raise ImproperlyConfigured(
                f"{_URL} is not set, so the records would go to the Redis of {url_setting} "
                f"({redact(found)}), which celery_idem cannot use: {exc} "
                f"(set {_URL}, or fix {url_setting}, {ssl_setting} or {transport_setting})"
            ) from exc
        return found, merged
    return _FALLBACK_URL, explicit


def _options_dict(options: Any) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ImproperlyConfigured(
            f"{_OPTIONS} must be a dict of redis-py connection arguments; got {options!r}"
        )
    return dict(options)


# -- the four topologies ----------------------------------------------------------


def _parse_server(url: str, scheme: str, topology: Topology, tls: bool, options: dict[str, Any]) -> Target:
    import redis

    options = dict(options)
    netloc, path, query = _split(url)
    username, password, hosts = _credentials(netloc, url)
    settings = _query(query, url, tls=tls)
    if topology == "unix":
        if hosts:
            raise ImproperlyConfigured(
                f"{_URL} {redact(url)!r} names a host; a {scheme}:// URL names a socket path "
                f"({scheme}:///path/to/redis.sock)"
            )
        if not path or path == "/":
            raise ImproperlyConfigured(
                f"{_URL} {redact(url)!r} has no socket path; write {scheme}:///path/to/redis.sock"
            )
        db = _db(settings.pop("db", None), url)
        nodes: tuple[tuple[str, int], ...] = ()
        socket_path: str | None = unquote(path)
        connection_class: type = redis.UnixDomainSocketConnection
    else:
        if "," in hosts:
            raise ImproperlyConfigured(
                f"{_URL} {redact(url)!r} names several hosts; for a cluster write "
                f"{'rediss' if tls else 'redis'}+cluster://, for Sentinel sentinel:// URLs joined by ';'"
            )
        db = _db_of_path(path, settings.pop("db", None), url)
        nodes = (_host_port(hosts or "localhost", url, _DEFAULT_PORTS["server"]),)
        socket_path = None
        connection_class = redis.SSLConnection if tls else redis.Connection
    allowed = _init_parameters(connection_class, redis.ConnectionPool)
    # A connection class of one's own (one that counts round trips, say) must be the
    # scheme's own class or a subclass of it.
    custom = options.pop("connection_class", None)
    if custom is not None and not (isinstance(custom, type) and issubclass(custom, connection_class)):
        raise ImproperlyConfigured(
            f"{_OPTIONS} sets connection_class={custom!r}, which is not a subclass of "
            f"{connection_class.__module__}.{connection_class.__qualname__}, the class {_URL}'s "
            f"{scheme}:// scheme needs"
        )
    client_options = _client_options(
        options, settings, username, password, url, allowed, topology=topology, tls=tls
    )
    if custom is not None:
        client_options["connection_class"] = custom
    return Target(
        topology=topology,
        url=redact(url),
        nodes=nodes,
        path=socket_path,
        db=db,
        tls=tls,
        client_options=MappingProxyType(client_options),
    )


def _parse_sentinel(url: str, options: dict[str, Any]) -> Target:
    import redis
    import redis.sentinel

    nodes = []
    username = password = None
    db = None
    for part in url.split(";"):
        part = part.strip()
        if not part:
            continue
        if part.partition("://")[0].lower() != "sentinel":
            raise ImproperlyConfigured(
                f"{_URL} {redact(url)!r} joins {redact(part)!r} to sentinel:// URLs; write every "
                f"sentinel as sentinel://host:port, joined by ';'"
            )
        netloc, path, query = _split(part)
        if query:
            raise ImproperlyConfigured(
                f"{_URL} {redact(url)!r} has a query; a sentinel:// URL takes none: give "
                f"the primary's connection settings (and TLS, with ssl=True) in {_OPTIONS}, and the "
                f"sentinels' in its sentinel_kwargs"
            )
        part_username, part_password, hosts = _credentials(netloc, url)
        if not hosts or "," in hosts:
            raise ImproperlyConfigured(
                f"{_URL} {redact(url)!r} has a sentinel URL without exactly one host:port; "
                f"write sentinel://host1:26379;sentinel://host2:26379/0"
            )
        nodes.append(_host_port(hosts, url, _DEFAULT_PORTS["sentinel"]))
        username = _same(username, part_username, "username", url)
        password = _same(password, part_password, "password", url)
        if path not in ("", "/"):
            db = _same(db, _db_of_path(path, None, url), "database number", url)
    if not nodes:
        raise ImproperlyConfigured(f"{_URL} {redact(url)!r} names no sentinel")

    master_name = options.pop("master_name", None)
    if not isinstance(master_name, str) or not master_name:
        raise ImproperlyConfigured(
            f"{_URL} is a sentinel:// URL, so {_OPTIONS} must set master_name to the name the "
            f"sentinels monitor the primary under (sentinel monitor <master_name> ...); "
            f"got {master_name!r}"
        )
    sentinel_kwargs = options.pop("sentinel_kwargs", None) or {}
    if not isinstance(sentinel_kwargs, Mapping):
        raise ImproperlyConfigured(
            f"{_OPTIONS}['sentinel_kwargs'] must be a dict of redis-py client arguments for the "
            f"sentinels (their password, TLS); got {sentinel_kwargs!r}"
        )
    min_other = options.pop("min_other_sentinels", 0)
    if isinstance(min_other, bool) or not isinstance(min_other, int) or min_other < 0:
        raise ImproperlyConfigured(
            f"{_OPTIONS}['min_other_sentinels'] must be an int of at least 0; got {min_other!r}"
        )
    tls = bool(options.get("ssl"))
    allowed = _init_parameters(
        redis.sentinel.SentinelManagedSSLConnection if tls else redis.sentinel.SentinelManagedConnection,
        redis.sentinel.SentinelConnectionPool,
        redis.ConnectionPool,
    ) | {"check_connection"}
    client_options = _client_options(
        options, {}, username, password, url, allowed, topology="sentinel", tls=tls
    )
    sentinel_options = _sentinel_options(sentinel_kwargs)
    return Target(
        topology="sentinel",
        url=redact(url),
        nodes=tuple(nodes),
        path=None,
        db=db or 0,
        tls=tls,
        client_options=MappingProxyType(client_options),
        master_name=master_name,
        sentinel_options=MappingProxyType(sentinel_options),
        min_other_sentinels=min_other,
    )


def _parse_cluster(url: str, scheme: str, tls: bool, options: dict[str, Any]) -> Target:
    import redis
    import redis.cluster

    netloc, path, query = _split(url)
    username, password, hosts = _credentials(netloc, url)
    if not hosts:
        raise ImproperlyConfigured(
            f"{_URL} {redact(url)!r} names no startup node; cluster nodes are reached over TCP "
            f"(a unix socket cannot be one): write {scheme}://host1:7000,host2:7001"
        )
    settings = _query(query, url, tls=tls)
    db = _db_of_path(path, settings.pop("db", None), url)
    if db != 0:
        raise ImproperlyConfigured(
            f"{_URL} {redact(url)!r} selects database {db}; a Redis Cluster has only database 0: "
            f"drop the /{db}"
        )
    for name in ("path", "unix_socket_path"):
        if name in options:
            raise ImproperlyConfigured(
                f"{_OPTIONS} sets {name!r}; cluster nodes are reached over TCP, a unix socket cannot be one"
            )
    if "connection_class" in options:
        # RedisCluster hands it to each node's Redis(), which takes no such argument: the
        # cluster would fail to connect with a TypeError.
        raise ImproperlyConfigured(
            f"{_OPTIONS} sets 'connection_class', which redis-py's RedisCluster cannot pass to its "
            f"nodes; a {scheme}:// URL uses redis-py's own (SSL) connection class"
        )
    nodes = tuple(_host_port(h.strip(), url, _DEFAULT_PORTS["cluster"]) for h in hosts.split(","))
    # RedisCluster passes on to its nodes only the arguments it knows; any other would be
    # dropped without a word, so it is refused here.
    node_keys = set(redis.cluster.REDIS_ALLOWED_KEYS) - set(redis.cluster.KWARGS_DISABLED_KEYS)
    allowed = frozenset(node_keys | _init_parameters(redis.cluster.RedisCluster))
    client_options = _client_options(
        options, settings, username, password, url, allowed, topology="cluster", tls=tls
    )
    return Target(
        topology="cluster",
        url=redact(url),
        nodes=nodes,
        path=None,
        db=0,
        tls=tls,
        client_options=MappingProxyType(client_options),
    )


# -- pieces ---------------------------------------------------------------------------


def _client_options(
    options: Mapping[str, Any],
    url_settings: Mapping[str, Any],
    username: str | None,
    password: str | None,
    url: str,
    allowed: Iterable[str],
    *,
    topology: Topology,
    tls: bool,
) -> dict[str, Any]:
    """The defaults, then the options, then what the URL says; a setting given twice must agree."""
    import redis

    options = dict(options)
    if "ssl" in options and bool(options.pop("ssl")) != tls:
        if not tls:
            raise ImproperlyConfigured(_no_tls_message("ssl", topology, url))
        raise ImproperlyConfigured(
            f"{_OPTIONS} sets ssl=False, but {_URL} {redact(url)!r} uses TLS: drop ssl=False, "
            f"or use a URL without TLS"
        )
    allowed = set(allowed) - set(_FROM_URL)
    for name in options:
        if name in _FROM_URL:
            raise ImproperlyConfigured(f"{_OPTIONS} sets {name!r}: {_FROM_URL[name]} ({_URL})")
        if name.startswith("ssl_") and not tls:
            raise ImproperlyConfigured(_no_tls_message(name, topology, url))
        if topology == "unix" and name in _tcp_only():
            raise ImproperlyConfigured(
                f"{_OPTIONS} sets {name!r}, which applies to TCP connections only; {_URL} is a "
                f"unix socket: drop it"
            )
        if name not in allowed:
            raise ImproperlyConfigured(
                f"{_OPTIONS} sets {name!r}, which redis-py {redis.__version__} does not accept for "
                f"a {url.partition('://')[0]}:// URL{_close_match(name, allowed)}"
            )
    for name in url_settings:
        if name not in allowed:  # redis-py too old for it
            raise ImproperlyConfigured(
                f"{_URL} {redact(url)!r} sets {name}, which redis-py {redis.__version__} does not "
                f"accept for a {url.partition('://')[0]}:// URL"
            )
    merged: dict[str, Any] = {**CLIENT_DEFAULTS, **options}
    if "ssl_cert_reqs" in merged:
        merged["ssl_cert_reqs"] = _cert_reqs(merged["ssl_cert_reqs"], _OPTIONS)
    from_url: dict[str, Any] = dict(url_settings)
    if username is not None:
        from_url["username"] = username
    if password is not None:
        from_url["password"] = password
    for name, value in from_url.items():
        if name in options and merged[name] != value:
            shown = "***" if "password" in name else repr(options[name])
            raise ImproperlyConfigured(
                f"{_URL} and {_OPTIONS} both set {name}, differently ({_OPTIONS} says {shown}); "
                f"give it in one place"
            )
        merged[name] = value
    if tls and topology in ("sentinel", "cluster"):
        merged["ssl"] = True  # their pools pick the TLS connection class from this flag
    return merged


def _sentinel_options(sentinel_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    import redis

    allowed = _init_parameters(redis.Redis, redis.SSLConnection, redis.ConnectionPool) - set(_FROM_URL)
    for name in sentinel_kwargs:
        if name not in allowed:
            raise ImproperlyConfigured(
                f"{_OPTIONS}['sentinel_kwargs'] sets {name!r}, which redis-py {redis.__version__} "
                f"does not accept for a connection to a sentinel{_close_match(name, allowed)}"
            )
    merged = {**CLIENT_DEFAULTS, **sentinel_kwargs}
    if "ssl_cert_reqs" in merged:
        merged["ssl_cert_reqs"] = _cert_reqs(merged["ssl_cert_reqs"], f"{_OPTIONS}['sentinel_kwargs']")
    return merged


def _no_tls_message(name: str, topology: Topology, url: str) -> str:
    if topology == "sentinel":
        fix = f"add ssl=True to {_OPTIONS} to reach the primary over TLS"
    else:
        scheme = url.partition("://")[0]
        fix = f"use {'rediss+cluster' if topology == 'cluster' else 'rediss'}:// instead of {scheme}://"
        if topology == "unix":
            fix = f"a unix socket is not reached over TLS: drop {name}"
    return f"{name} is a TLS setting, but {_URL} {redact(url)!r} does not use TLS: {fix}"


def _split(url: str) -> tuple[str, str, str]:
    """``(netloc, path, query)`` of ``scheme://netloc/path?query``, hosts left unparsed.

    As for redis-py, a ``/``, ``?`` or ``#`` in a password must be percent-encoded.
    """
    rest = url.partition("://")[2].partition("#")[0]
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    return netloc, slash + path, query


def _credentials(netloc: str, url: str) -> tuple[str | None, str | None, str]:
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None, unquote(password) if colon else None, hosts)


def _host_port(text: str, url: str, default_port: int) -> tuple[str, int]:
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ImproperlyConfigured(f"{_URL} {redact(url)!r} has an unclosed '[' in {text!r}")
        host, port_text = text[1:end], text[end + 1 :].removeprefix(":")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    if not host:
        raise ImproperlyConfigured(f"{_URL} {redact(url)!r} has a node without a host: {text!r}")
    if not port_text:
        return unquote(host), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ImproperlyConfigured(f"{_URL} {redact(url)!r} has a bad port {port_text!r} in {text!r}")
    return unquote(host), int(port_text)


def _db_of_path(path: str, query_db: Any, url: str) -> int:
    text = path.strip("/")
    if not text:
        return _db(query_db, url)
    db = _db(text, url)
    if query_db is not None and _db(query_db, url) != db:
        raise ImproperlyConfigured(
            f"{_URL} {redact(url)!r} selects database {db} in its path and {query_db} in ?db=; give one"
        )
    return db


def _db(value: Any, url: str) -> int:
    if value is None:
        return 0
    text = str(value)
    if not text.isdigit():
        raise ImproperlyConfigured(
            f"{_URL} {redact(url)!r} selects database {text!r}; a database is a number (/0, /1, ...)"
        )
    return int(text)


def _same(seen: Any, value: Any, what: str, url: str) -> Any:
    if value is None:
        return seen
    if seen is not None and seen != value:
        raise ImproperlyConfigured(
            f"{_URL} {redact(url)!r} gives two different {what}s for the primary; give it once "
            f"(it applies to the primary, not to the sentinels: theirs go in sentinel_kwargs)"
        )
    return value


#: Query parameters a URL may carry, with how each value is read.
_QUERY: Mapping[str, Callable[[str], Any]] = {
    "db": str,
    "socket_timeout": float,
    "socket_connect_timeout": float,
    "health_check_interval": int,
    "max_connections": int,
    "client_name": str,
}
_TLS_QUERY: Mapping[str, Callable[[str], Any]] = {
    "ssl_cert_reqs": str,
    "ssl_ca_certs": str,
    "ssl_ca_path": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": str,
}


def _query(query: str, url: str, tls: bool) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for name, text in parse_qsl(query, keep_blank_values=True):
        if name in _TLS_QUERY:
            if not tls:
                raise ImproperlyConfigured(_no_tls_message(name, "server", url))
            if name == "ssl_cert_reqs":
                settings[name] = _cert_reqs(text, _URL)
            elif name == "ssl_check_hostname":
                settings[name] = _flag(text, name, url)
            else:
                settings[name] = text
        elif name in _QUERY:
            try:
                settings[name] = _QUERY[name](text)
            except ValueError:
                raise ImproperlyConfigured(
                    f"{_URL} {redact(url)!r} sets {name}={text!r}, which is not a number"
                ) from None
        else:
            known = [*_QUERY, *(_TLS_QUERY if tls else ())]
            raise ImproperlyConfigured(
                f"{_URL} {redact(url)!r} has the query parameter {name!r}, which celery_idem does not "
                f"read from a URL (it reads {', '.join(known)}){_close_match(name, known)}; give "
                f"other redis-py connection arguments in {_OPTIONS}"
            )
    return settings


def _flag(text: str, name: str, url: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ImproperlyConfigured(f"{_URL} {redact(url)!r} sets {name}={text!r}; write true or false")


def _cert_reqs(value: Any, where: str) -> ssl.VerifyMode:
    """``ssl_cert_reqs`` in any spelling Celery's result backend accepts, as an ``ssl`` constant."""
    if isinstance(value, ssl.VerifyMode):
        return value
    if isinstance(value, str) and value.lower() in _CERT_REQS:
        return _CERT_REQS[value.lower()]
    raise ImproperlyConfigured(
        f"{where} sets ssl_cert_reqs to {value!r}; write required, optional or none "
        f"(or CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE, or the ssl module's constants)"
    )


def _init_parameters(*classes: type) -> frozenset[str]:
    """Keyword arguments the constructors of ``classes`` and their bases take, by name."""
    names: set[str] = set()
    for cls in classes:
        for klass in cls.__mro__:
            init = vars(klass).get("__init__")
            if init is None or klass is object:
                continue
            try:
                signature = inspect.signature(init)
            except (TypeError, ValueError):  # pragma: no cover - a constructor written in C
                continue
            names.update(
                p.name
                for p in signature.parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            )
    names.discard("self")
    return frozenset(names)


@functools.cache
def _tcp_only() -> frozenset[str]:
    """Connection arguments a TCP connection takes and a unix socket's does not."""
    import redis

    return _init_parameters(redis.Connection) - _init_parameters(redis.UnixDomainSocketConnection)


def _close_match(name: str, known: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _shown(url: Any) -> str:
    return repr(redact(url)) if isinstance(url, str) else repr(url)


def _schemes_text() -> str:
    return ", ".join(f"{s}://" for s in SCHEMES[:-1]) + f" or {SCHEMES[-1]}://"


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, qmark, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.partition(":")[0]
        rest = f"{user + ':' if user else ''}***@{hosts}{slash}{path}"
    if qmark:
        pairs = []
        for pair in query.split("&"):
            name, eq, _value = pair.partition("=")
            pairs.append(f"{name}=***" if eq and "password" in name.lower() else pair)
        query = "&".join(pairs)
    return f"{scheme}{sep}{rest}{qmark}{query}"


# -- Celery's settings ----------------------------------------------------------------

_REUSABLE = ("redis", "rediss", "redis+socket", "sentinel")


def _redis_url_of(setting: Any) -> str | None:
    """The Redis URL in a ``result_backend`` or ``broker_url`` value, or None."""
    if isinstance(setting, (list, tuple)):
        parts = [str(v) for v in setting if isinstance(v, str)]
        if parts and all(p.lower().startswith("sentinel://") for p in parts):
            return ";".join(parts)
        setting = parts[0] if parts else None
    if not isinstance(setting, str):
        return None
    value = setting.strip()
    scheme = value.partition("://")[0].lower()
    if scheme not in _REUSABLE:
        return None
    if scheme != "sentinel":
        value = value.split(";")[0].strip()  # kombu's failover list: the first server
    return value


def _settings_of(
    url: str,
    use_ssl: Any,
    transport_options: Mapping[str, Any],
    credentials: tuple[Any, Any],
) -> tuple[str, dict[str, Any]]:
    scheme = url.partition("://")[0].lower()
    options: dict[str, Any] = {}
    if use_ssl:
        if isinstance(use_ssl, Mapping):
            options.update(use_ssl)
        if scheme == "redis":
            url = "rediss" + url[len("redis") :]
        elif scheme == "sentinel":
            options["ssl"] = True
    if scheme == "sentinel":
        for name in _SENTINEL_ONLY:
            if transport_options.get(name) is not None:
                options[name] = transport_options[name]
    username, password = credentials
    netloc = _split(url.split(";")[0])[0]
    has_credentials = "@" in netloc
    if not has_credentials:
        if username:
            options["username"] = username
        if password:
            options["password"] = password
    in_query = {name for part in url.split(";") for name, _ in parse_qsl(_split(part)[2])}
    return url, {name: value for name, value in options.items() if name not in in_query}
