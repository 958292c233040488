"""`ReplicaPool` against the suite's real gateway: requests spread over every healthy replica, a failing one is skipped
and retried after its back-off, and a request the replica refuses as such is reported, not blamed on the replica.

The second "replica" is a plain TCP forwarder to the same gateway on a port of its own (real sockets, real HTTP):
closed, it is a replica that is down; opened, one that came back."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from dws_testing import free_port
from trainer_helpers import TOKEN
from trainer_space.remote import ReplicaPool, RolloutRequestError

pytestmark = pytest.mark.slow
PROMPT = [104, 105, 258]


class Forwarder:
    """Accepts on 127.0.0.1:port and pipes each connection to target_port, both ways, until closed."""

    def __init__(self, port: int, target_port: int) -> None:
        self.target = target_port
        self.sock = socket.create_server(("127.0.0.1", port))
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def test_failing_replica_is_skipped_then_retried(services):
    gw = services["gw"]
    b_port = free_port()
    b_url = f"http://127.0.0.1:{b_port}"
    pool = ReplicaPool([gw.url, b_url], token=TOKEN, retry_after_s=2.0)
    fwd = None
    try:
        out = [pool.complete(PROMPT, 2, max_tokens=4, temperature=1.0) for _ in range(6)]
        assert [len(g) for g in out] == [2] * 6  # every request answered although B is down
        a, b = pool.replicas
        assert b.failures >= 1 and not b.healthy and "ConnectError" in (b.last_error or "")
        assert a.requests == 6 and b.requests == 0
        failures = b.failures
        # Inside the back-off window B is not even tried.
        pool.complete(PROMPT, 1, max_tokens=4, temperature=1.0)
        assert b.failures == failures and a.requests == 7
        fwd = Forwarder(b_port, gw.port)
        time.sleep(2.2)  # back-off over: B is retried, answers, and takes its share again
        out = [pool.complete(PROMPT, 1, max_tokens=4, temperature=1.0) for _ in range(6)]
        assert all(c.replica in (gw.url, b_url) for g in out for c in g)
        assert b.requests >= 2 and b.healthy and b.last_error is None, pool.replicas
        assert a.requests >= 9
        assert all(c.model_version is not None for g in out for c in g)
    finally:
        pool.close()
        if fwd is not None:
            fwd.close()


def test_request_refused_by_replica_is_not_a_replica_failure(services):
    pool = ReplicaPool([services["gw"].url], token=TOKEN)
    try:
        with pytest.raises(RolloutRequestError, match="HTTP 400"):
            pool.complete(PROMPT * 400, 1, max_tokens=4, temperature=1.0)  # 1200 tokens > max-model-len 1024
        r = pool.replicas[0]
        assert r.failures == 0 and r.healthy and r.down_until == 0
    finally:
        pool.close()
