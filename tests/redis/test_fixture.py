"""The test fixture's own redis-server: a free port taken by someone else before redis-server
binds it is picked again, so a busy machine does not fail a run at random."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.redis_server import RedisServer, ping

_CLUSTER = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")


def _occupy(port: int) -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_a_port_taken_before_redis_binds_it_is_picked_again(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "node")
    taken = server.port
    squatter = _occupy(taken)
    try:
        with server:
            assert server.port != taken and ping(server.port)
    finally:
        squatter.close()


def test_a_cluster_bus_port_taken_before_redis_binds_it_is_picked_again(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "node", extra=_CLUSTER, cluster_port=True)
    taken = server.cluster_port
    assert taken is not None
    squatter = _occupy(taken)
    try:
        with server:
            assert server.cluster_port != taken and ping(server.port)
    finally:
        squatter.close()
