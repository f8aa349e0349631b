"""Clients from ``client_for`` against real servers: TLS, unix socket, Sentinel, Cluster.

Each topology is started once for the module (a cluster is six processes, a Sentinel
group five); tests that fail one over run last in their group and leave it serving.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest
import redis
import redis.cluster
from redis.exceptions import MovedError, NoScriptError, RedisClusterException

from celery_idem.connections import client_for
from celery_idem.testing import RedisCluster, RedisSentinelGroup, RedisServer

COUNTER = "return redis.call('INCR', KEYS[1])"
COUNTER_SHA = hashlib.sha1(COUNTER.encode()).hexdigest()


@pytest.fixture(scope="module")
def tls_server() -> Iterator[RedisServer]:
    with RedisServer(tls=True) as server:
        yield server


@pytest.fixture(scope="module")
def socket_server() -> Iterator[RedisServer]:
    with RedisServer(unixsocket=True) as server:
        yield server


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as running:
        yield running


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[RedisSentinelGroup]:
    with RedisSentinelGroup() as group:
        yield group


@pytest.fixture
def cluster_client(cluster: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    client = client_for(cluster.url)
    assert isinstance(client, redis.cluster.RedisCluster)
    yield client
    client.close()


# -- TLS ----------------------------------------------------------------------------


def test_tls_client_verifies_the_server_against_the_ca(tls_server: RedisServer) -> None:
    assert tls_server.tls_files is not None
    assert tls_server.url.startswith("rediss://")
    client = client_for(tls_server.url, {**tls_server.tls_files.client_options(), "ssl_check_hostname": True})
    try:
        assert client.set("tls:k", b"v")
        assert client.get("tls:k") == b"v"
    finally:
        client.close()


def test_tls_certificates_may_be_given_in_the_url(tls_server: RedisServer) -> None:
    files = tls_server.tls_files
    assert files is not None
    url = (
        f"{tls_server.url}?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs={files.ca_cert}"
        f"&ssl_certfile={files.client_cert}&ssl_keyfile={files.client_key}"
    )
    client = client_for(url)
    try:
        assert client.ping()
    finally:
        client.close()


def test_tls_client_without_the_ca_refuses_the_server(tls_server: RedisServer) -> None:
    files = tls_server.tls_files
    assert files is not None
    client = client_for(
        tls_server.url,
        {"ssl_cert_reqs": "required", "ssl_certfile": files.client_cert, "ssl_keyfile": files.client_key},
    )
    try:
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            client.ping()
    finally:
        client.close()


def test_tls_server_refuses_a_client_without_a_certificate(tls_server: RedisServer) -> None:
    assert tls_server.tls_files is not None
    client = client_for(tls_server.url, {"ssl_ca_certs": tls_server.tls_files.ca_cert})
    try:
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        client.close()


# -- unix socket ------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["unix", "redis+socket"])
def test_unix_socket_url_reaches_the_server(socket_server: RedisServer, scheme: str) -> None:
    assert socket_server.socket_path is not None
    client = client_for(f"{scheme}://{socket_server.socket_path}?db=1")
    try:
        client.set(f"sock:{scheme}", b"v")
        assert client.connection_pool.connection_kwargs["path"] == socket_server.socket_path
    finally:
        client.close()
    with socket_server.client(db=1) as tcp:
        assert tcp.get(f"sock:{scheme}") == b"v"


# -- Sentinel ---------------------------------------------------------------------


def test_sentinel_client_reads_and_writes_through_the_primary(sentinel_group: RedisSentinelGroup) -> None:
    client = client_for(sentinel_group.url, {"master_name": sentinel_group.master_name})
    try:
        assert client.set("sentinel:k", b"v")
        assert client.get("sentinel:k") == b"v"
    finally:
        client.close()
    with sentinel_group.primary.client() as primary:
        assert primary.get("sentinel:k") == b"v"


def test_sentinel_client_writes_to_the_new_primary_after_a_failover(
    sentinel_group: RedisSentinelGroup,
) -> None:
    client = client_for(sentinel_group.url, {"master_name": sentinel_group.master_name})
    try:
        client.set("sentinel:before", b"1")
        client.script_load(COUNTER)
        old = sentinel_group.primary.port
        new = sentinel_group.failover()
        assert new != old
        client.set("sentinel:after", b"2")  # the same client object
        with pytest.raises(NoScriptError):  # Redis does not replicate its script cache
            client.evalsha(COUNTER_SHA, 1, "sentinel:counter")
    finally:
        client.close()
    assert sentinel_group.primary.port == new
    with sentinel_group.primary.client() as primary:
        assert primary.info("replication")["role"] == "master"
        assert primary.get("sentinel:before") == b"1"
        assert primary.get("sentinel:after") == b"2"


# -- Cluster ----------------------------------------------------------------------


def test_cluster_url_gives_a_cluster_client_of_every_node(
    cluster: RedisCluster, cluster_client: redis.cluster.RedisCluster
) -> None:
    assert cluster.url.startswith("redis+cluster://")
    assert {node.port for node in cluster_client.get_nodes()} == set(cluster.ports)


def test_cluster_runs_a_script_on_a_hash_tagged_key(cluster_client: redis.cluster.RedisCluster) -> None:
    assert cluster_client.eval(COUNTER, 1, "idem:{one}") == 1
    assert cluster_client.eval(COUNTER, 1, "idem:{one}") == 2


def test_cluster_script_may_touch_two_keys_sharing_a_hash_tag(
    cluster_client: redis.cluster.RedisCluster,
) -> None:
    both = "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return 1"
    assert cluster_client.keyslot("idem:{two}") == cluster_client.keyslot("idem:{two}:result")
    assert cluster_client.eval(both, 2, "idem:{two}", "idem:{two}:result", "x") == 1
    assert cluster_client.mget(["idem:{two}", "idem:{two}:result"]) == [b"x", b"x"]
    # Without the shared tag the keys land in different slots: the client refuses the script.
    assert cluster_client.keyslot("idem:{two}") != cluster_client.keyslot("idem:{three}")
    with pytest.raises(RedisClusterException, match="same key slot"):
        cluster_client.eval(both, 2, "idem:{two}", "idem:{three}", "x")


def test_cluster_pipeline_sends_evalsha_only_through_execute_command(
    cluster_client: redis.cluster.RedisCluster,
) -> None:
    keys = [f"idem:{{pipe{i}}}" for i in range(6)]  # spread over the three primaries
    assert len({cluster_client.get_node_from_key(key).name for key in keys}) > 1
    with pytest.raises(RedisClusterException, match="blocked"):
        cluster_client.pipeline().evalsha(COUNTER_SHA, 1, keys[0])

    cluster_client.execute_command("SCRIPT", "FLUSH", target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    pipe = cluster_client.pipeline()
    for key in keys:
        pipe.execute_command("EVALSHA", COUNTER_SHA, 1, key)
    assert all(isinstance(reply, NoScriptError) for reply in pipe.execute(raise_on_error=False))

    cluster_client.script_load(COUNTER)  # on every primary
    for key in keys:
        pipe.execute_command("EVALSHA", COUNTER_SHA, 1, key)
    assert pipe.execute(raise_on_error=False) == [1] * len(keys)


def test_raw_connection_to_a_keys_node_runs_evalsha_and_another_node_answers_moved(
    cluster_client: redis.cluster.RedisCluster,
) -> None:
    key = "idem:{raw}"
    cluster_client.script_load(COUNTER)
    owner = cluster_client.get_node_from_key(key)
    connection = cluster_client.get_redis_connection(owner).connection_pool.make_connection()
    other = next(node for node in cluster_client.get_primaries() if node.name != owner.name)
    elsewhere = cluster_client.get_redis_connection(other).connection_pool.make_connection()
    try:
        connection.send_command("EVALSHA", COUNTER_SHA, 1, key)
        assert connection.read_response() == 1
        elsewhere.send_command("EVALSHA", COUNTER_SHA, 1, key)
        with pytest.raises(MovedError) as moved:
            elsewhere.read_response()
        assert (moved.value.port, moved.value.slot_id) == (owner.port, cluster_client.keyslot(key))
    finally:
        connection.disconnect()
        elsewhere.disconnect()


def test_cluster_client_follows_a_failover_of_the_keys_primary(
    cluster: RedisCluster, cluster_client: redis.cluster.RedisCluster
) -> None:
    key = "idem:{failover}"
    cluster_client.script_load(COUNTER)
    assert cluster_client.evalsha(COUNTER_SHA, 1, key) == 1
    old = cluster.primary_port(key)
    new = cluster.failover(key)
    assert new != old
    assert cluster.primary_port(key) == new
    # The same client's pipeline follows the MOVED reply to the new primary, which has
    # the key but not the script: Redis does not replicate its script cache.
    pipe = cluster_client.pipeline()
    pipe.execute_command("EVALSHA", COUNTER_SHA, 1, key)
    (reply,) = pipe.execute(raise_on_error=False)
    assert isinstance(reply, NoScriptError)
    assert cluster_client.get_node_from_key(key).port == new
    assert cluster_client.eval(COUNTER, 1, key) == 2


# -- failed starts ----------------------------------------------------------------


def test_a_server_that_cannot_start_reports_its_log() -> None:
    server = RedisServer(args=["--no-such-directive", "yes"])
    try:
        with pytest.raises(RuntimeError, match="did not start") as info:
            server.start()
        assert "no-such-directive" in str(info.value)
        assert server.process is None
    finally:
        server.close()


def test_a_cluster_that_cannot_be_created_says_why_and_stops_its_nodes() -> None:
    cluster = RedisCluster(primaries=2)  # redis-cli needs at least three primaries
    with pytest.raises(RuntimeError, match="cluster create failed") as info:
        cluster.start()
    assert "3 master" in str(info.value) or "at least 3" in str(info.value)
    assert f"on port {cluster.ports[0]}" in str(info.value)  # the nodes' logs
    assert all(node.process is None for node in cluster.nodes)
    assert not any(os.path.exists(node.directory) for node in cluster.nodes)
