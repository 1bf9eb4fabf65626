"""Slow clients against the shipped gunicorn configuration (gunicorn.conf.py, two workers):
connections that send their headers or their body a byte at a time hold a thread each, and
/healthz keeps answering while they hang on. (With sync workers, as before, two such clients
took both processes for gunicorn's 30 s timeout.)"""

import socket
import threading
import time

import pytest
from servers import HOST, Gunicorn, call, cli_token

SLOW_HEADERS = 3
SLOW_BODIES = 3
WATCH_SECONDS = 8


class Trickle:
    """Connections that each send a request's start at once and then one more byte every
    half second, never finishing, until closed."""

    def __init__(self, port, starts):
        self.sockets = []
        for start in starts:
            sock = socket.create_connection((HOST, port), timeout=10)
            sock.sendall(start)
            self.sockets.append(sock)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.feed, daemon=True)
        self.thread.start()

    def feed(self):
        while not self.stop.wait(0.5):
            for sock in self.sockets:
                sock.sendall(b"a")

    def unanswered(self):
        """How many connections are still open with no answer from the server yet."""
        waiting = 0
        for sock in self.sockets:
            sock.setblocking(False)
            try:
                sock.recv(1)  # an answer, or b"" for a closed connection
            except BlockingIOError:
                waiting += 1
            finally:
                sock.setblocking(True)
        return waiting

    def close(self):
        self.stop.set()
        self.thread.join(timeout=10)
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def server(tmp_path, server_env):
    env = server_env(tmp_path / "instance", RATE_LIMIT_ENABLED=False)
    token = cli_token(env, "users", "create", "alice")
    with Gunicorn(env, workers=2, log_dir=tmp_path) as server:
        yield server, token


def test_healthz_keeps_answering_while_slow_clients_hang_on(server):
    server, token = server
    slow_header = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    slow_body = (f"POST /push/v1/pushers/set HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: 10000\r\n\r\n{{").encode()
    slow = Trickle(server.port, [slow_header] * SLOW_HEADERS + [slow_body] * SLOW_BODIES)
    try:
        time.sleep(1)  # every slow connection is in a worker's hands now
        answers = []
        deadline = time.monotonic() + WATCH_SECONDS
        while time.monotonic() < deadline:
            # The timeout is an upper bound for a check on a shared machine, far below the
            # 30 s a blocked sync worker would have taken.
            answers.append(call(server.port, "GET", "/healthz", timeout=10))
            time.sleep(0.5)
        assert answers and all(a == (200, {"status": "ok"}) for a in answers), answers
        assert slow.unanswered() == SLOW_HEADERS + SLOW_BODIES  # they were hanging on all along
    finally:
        slow.close()
