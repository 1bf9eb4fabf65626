"""The gateway HTTP client (gateway.GatewayClient): what it sends and how it fails."""

import socket
import threading

import pytest
import urllib3

from gateway import USER_AGENT, GatewayClient

CONFIG = {"ALLOW_PRIVATE_GATEWAYS": True, "GATEWAY_CONNECT_TIMEOUT": 1.0,
          "GATEWAY_READ_TIMEOUT": 0.5, "GATEWAY_MAX_RESPONSE_BYTES": 65536}


class StallingGateway:
    """Answers every request with a status line and headers promising a body, sends one byte
    of it and then says nothing more (until the test ends)."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.done = threading.Event()
        self.connections = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while not self.done.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(connection)
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 100\r\n\r\n{")

    def close(self):
        self.done.set()
        self.server.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def stalling():
    gateway = StallingGateway()
    yield gateway
    gateway.close()


def test_a_gateway_stalling_mid_answer_raises_the_read_timeout_and_frees_the_connection(
        stalling):
    client = GatewayClient(CONFIG, pool_size=2)
    url = f"http://127.0.0.1:{stalling.port}/_matrix/push/v1/notify"
    try:
        with pytest.raises(urllib3.exceptions.ReadTimeoutError):
            client.post(url, {"notification": {}})
        pool = client.pools.connection_from_url(url)
        assert pool.pool.qsize() == 2  # the connection went back to the pool...
        # ...closed: the next request connects again instead of reading the rest of the last
        with pytest.raises(urllib3.exceptions.ReadTimeoutError):
            client.post(url, {"notification": {}})
        assert len(stalling.connections) == 2
    finally:
        client.close()


def test_gateway_requests_carry_our_user_agent_and_json_content_type(gateway):
    client = GatewayClient(CONFIG, pool_size=1)
    try:
        status, answer, _ = client.post(gateway.url(), {"notification": {"devices": []}})
    finally:
        client.close()
    assert (status, answer) == (200, {"rejected": []})
    [headers] = gateway.headers
    assert headers["User-Agent"] == USER_AGENT
    assert not headers["User-Agent"].startswith("python-urllib3")
    assert headers["Content-Type"] == "application/json"
