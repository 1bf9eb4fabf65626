"""The gateway HTTP client (gateway.GatewayClient): what it sends and how it fails.

The misbehaving gateways are raw sockets on 127.0.0.1 (support.SocketGateway); the client's
read timeout is longer than the gap between two bytes of a trickling one, so only the deadline
on the whole request (connect + read timeout) can end those.
"""

import os
import resource
import threading

import pytest
from support import (
    SocketGateway,
    never_answer,
    stall_after_headers,
    trickle_body,
    trickle_headers,
    trickle_tls_handshake,
    untrusted_tls_gateway,
)

from gateway import USER_AGENT, CertificateFailure, DeadlineExceeded, GatewayClient

CONFIG = {"ALLOW_PRIVATE_GATEWAYS": True, "GATEWAY_CONNECT_TIMEOUT": 1.0,
          "GATEWAY_READ_TIMEOUT": 0.5, "GATEWAY_MAX_RESPONSE_BYTES": 65536,
          "GATEWAY_CA_BUNDLE": None, "GATEWAY_CLIENT_CERT": None, "GATEWAY_CLIENT_KEY": None}
#: A Matrix notification the loopback Gateway takes.
NOTIFICATION = {"notification": {"devices": [{"app_id": "com.example.app", "pushkey": "pk"}]}}


@pytest.fixture
def client():
    client = GatewayClient(CONFIG, pool_size=2)
    yield client
    client.close()


@pytest.fixture
def misbehaving(request):
    """A SocketGateway doing what the test's parameter says."""
    gateway = SocketGateway(request.param)
    yield gateway
    gateway.close()


@pytest.mark.parametrize("misbehaving", [trickle_body, trickle_headers], indirect=True,
                         ids=["trickled-body", "trickled-headers"])
def test_a_trickling_gateway_is_cut_off_at_the_deadline(client, misbehaving):
    url = misbehaving.url()
    with pytest.raises(DeadlineExceeded, match="1.5 s deadline"):
        client.post(url, {"notification": {}})
    # the connection is closed, not kept for the next request
    with pytest.raises(DeadlineExceeded):
        client.post(url, {"notification": {}})
    assert misbehaving.accepted() == 2
    assert client.idle_connections(url) == 0  # neither connection is kept for another request


@pytest.mark.parametrize("misbehaving, scheme", [
    (stall_after_headers, "http"), (never_answer, "http"), (trickle_tls_handshake, "https"),
], indirect=["misbehaving"], ids=["stalls-after-headers", "never-answers", "slow-tls-handshake"])
def test_a_stalling_gateway_ends_within_the_deadline_and_its_connection_is_dropped(
        client, misbehaving, scheme):
    # A timeout of its own ends each of these before the deadline does (the read timeout, or
    # for a TLS handshake, which Python bounds as a whole, the connect timeout).
    url = misbehaving.url(scheme=scheme)
    for _ in range(2):
        with pytest.raises((TimeoutError, DeadlineExceeded)):
            client.post(url, {"notification": {}})
    assert misbehaving.accepted() == 2
    assert client.idle_connections(url) == 0


def test_a_deadline_cuts_off_only_its_own_request(client, gateway):
    slow = SocketGateway(trickle_body)
    errors = []

    def post_slowly():
        try:
            client.post(slow.url(), {"notification": {}})
        except Exception as e:
            errors.append(e)

    try:
        thread = threading.Thread(target=post_slowly)
        thread.start()
        answers = [client.post(gateway.url(), NOTIFICATION) for _ in range(5)]
        thread.join(30)
    finally:
        slow.close()
    assert [type(e) for e in errors] == [DeadlineExceeded]
    assert [(status, answer) for status, answer, _ in answers] == [(200, {"rejected": []})] * 5


def test_an_untrusted_certificate_is_a_certificate_failure(client):
    tls_gateway = untrusted_tls_gateway()
    try:
        with pytest.raises(CertificateFailure, match="certificate verify failed"):
            client.post(tls_gateway.url(scheme="https"), {"notification": {}})
    finally:
        tls_gateway.close()


def test_gateway_requests_carry_our_user_agent_and_json_content_type(gateway):
    client = GatewayClient(CONFIG, pool_size=1)
    try:
        status, answer, _ = client.post(gateway.url(), NOTIFICATION)
    finally:
        client.close()
    assert (status, answer) == (200, {"rejected": []})
    [headers] = gateway.headers
    assert headers["User-Agent"] == USER_AGENT
    assert not headers["User-Agent"].startswith("python-urllib3")
    assert headers["Content-Type"] == "application/json"


# --- connections kept and dropped -------------------------------------------------------------

OK = b'{"rejected":[]}'


def read_request(connection, buffer=b""):
    """One request (head and Content-Length body) from ``connection``; returns what was read
    after it, or None when the client closed the connection."""
    while b"\r\n\r\n" not in buffer:
        data = connection.recv(65536)
        if not data:
            return None
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(rest) < length:
        rest += connection.recv(65536)
    return rest[length:]


def answer_then(extra_headers=b"", body=OK, close_after=False):
    """A gateway behaviour: answer each request on the connection with 200 and ``body``
    (and ``extra_headers``); with ``close_after``, close the connection after one answer."""

    def behave(connection, done):
        buffer = b""
        while (buffer := read_request(connection, buffer)) is not None:
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                               + extra_headers
                               + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            if close_after:
                connection.close()
                return

    return behave


@pytest.mark.parametrize("misbehaving", [answer_then()], indirect=True, ids=["keep-alive"])
def test_one_connection_carries_request_after_request(client, misbehaving):
    url = misbehaving.url()
    answers = [client.post(url, NOTIFICATION)[:2] for _ in range(5)]
    assert answers == [(200, {"rejected": []})] * 5
    assert misbehaving.accepted() == 1
    assert client.idle_connections(url) == 1


@pytest.mark.parametrize("misbehaving", [answer_then(close_after=True)], indirect=True,
                         ids=["closes-when-idle"])
def test_a_kept_connection_the_gateway_closed_is_replaced_not_failed(client, misbehaving):
    url = misbehaving.url()
    for _ in range(3):
        assert client.post(url, NOTIFICATION)[:2] == (200, {"rejected": []})
        # the gateway's FIN arrives while the connection waits, kept, for the next request
        wait_until_closed_by_peer(misbehaving)
    assert misbehaving.accepted() == 3


def wait_until_closed_by_peer(gateway):
    """Until the gateway has closed its side of every connection it accepted."""
    for _ in range(200):
        with gateway.lock:
            if all(c.fileno() == -1 for c in gateway.connections):
                return
        threading.Event().wait(0.01)
    raise AssertionError("the gateway kept a connection open")


@pytest.mark.parametrize("misbehaving, answer, kept", [
    (answer_then(b"Connection: close\r\n"), {"rejected": []}, 0),
    (answer_then(body=b" " * 70000), None, 0),  # longer than the client reads
    (answer_then(body=b" " * 100), None, 1),  # not JSON, but complete
], indirect=["misbehaving"], ids=["connection-close", "answer-too-long", "answer-fits"])
def test_only_a_complete_answer_that_may_be_followed_leaves_its_connection_kept(
        client, misbehaving, answer, kept):
    url = misbehaving.url()
    assert client.post(url, NOTIFICATION)[:2] == (200, answer)
    assert client.idle_connections(url) == kept
    assert client.post(url, NOTIFICATION)[:2] == (200, answer)
    assert misbehaving.accepted() == 2 - kept


@pytest.mark.parametrize("misbehaving", [answer_then()], indirect=True, ids=["keep-alive"])
def test_a_kept_connection_numbered_above_1024_is_checked_and_used_again(client, misbehaving):
    """A busy server process holds many descriptors; select() cannot watch one above 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the descriptor limit ({hard}) is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        url = misbehaving.url()
        answers = [client.post(url, NOTIFICATION)[:2] for _ in range(3)]
        [kept] = client.idle[next(iter(client.idle))]
        assert kept.sock.fileno() > 1024
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert answers == [(200, {"rejected": []})] * 3
    assert misbehaving.accepted() == 1


def answer_413_before_the_body(connection, done):
    """Reads the request's head only, answers 413 and closes (unread data: a reset)."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += connection.recv(65536)
    body = b'{"error": "Payload Too Large"}'
    connection.sendall(b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
    done.wait(0.2)
    connection.close()


@pytest.mark.parametrize("misbehaving", [answer_413_before_the_body], indirect=True,
                         ids=["413-before-the-body"])
def test_an_answer_sent_before_the_whole_body_was_taken_is_read(client, misbehaving):
    """Our send fails (the gateway reset the connection), yet its 413 is what counts: that
    is what makes a worker cut a batch smaller instead of retrying it as it was."""
    url = misbehaving.url()
    big = {"notification": {"devices": [{"pushkey": "a" * 8_000_000}]}}
    status, answer, _ = client.post(url, big)
    assert (status, answer) == (413, {"error": "Payload Too Large"})
    assert client.idle_connections(url) == 0
