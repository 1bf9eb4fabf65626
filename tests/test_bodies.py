"""Request bodies as real clients frame them (SPEC section 3), over raw sockets against both
real servers, werkzeug's development server and gunicorn: Flask's test client does not frame
chunked bodies the way a client on the wire does.

A body over PUSH_MAX_BODY_BYTES is 413 M_TOO_LARGE however it is framed and nothing of it is
applied; a chunked body the server cannot de-chunk is 400 M_NOT_JSON (there is no JSON
document at all, so not M_BAD_JSON, which says the JSON has the wrong shape).
"""

import json
import threading

import pytest
from servers import Gunicorn, call, exchange, parse_response, push_env
from servers import cli_token as server_cli_token
from support import TEST_CONFIG, cli_token, pusher_body
from werkzeug.serving import make_server

from app import create_app

LIMIT = 1000
SET = "/push/v1/pushers/set"


@pytest.fixture(scope="module")
def gunicorn_server(tmp_path_factory, new_database):
    """(port, user token) of gunicorn with the shipped configuration."""
    folder = tmp_path_factory.mktemp("gunicorn")
    env = push_env(folder / "instance", **new_database(), RATE_LIMIT_ENABLED=False,
                   EMBEDDED_WORKER=False, ALLOW_HTTP_GATEWAYS=True, MAX_BODY_BYTES=LIMIT)
    token = server_cli_token(env, "users", "create", "alice")
    with Gunicorn(env, workers=2, log_dir=folder) as server:
        yield server.port, token, server


@pytest.fixture(scope="module")
def werkzeug_server(tmp_path_factory):
    """(port, user token) of werkzeug's development server (``flask run``) in a thread."""
    folder = tmp_path_factory.mktemp("werkzeug")
    app = create_app({**TEST_CONFIG, "MAX_BODY_BYTES": LIMIT},
                     instance_path=str(folder / "instance"))
    token = cli_token(app.test_cli_runner(), "users", "create", "alice")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port, token, None
    server.shutdown()
    server.server_close()


@pytest.fixture(params=["werkzeug", "gunicorn"])
def server(request):
    """Each test runs against both servers; the user's pushers are emptied afterwards."""
    port, token, process = request.getfixturevalue(f"{request.param}_server")
    yield port, token
    for pusher in call(port, "GET", "/push/v1/pushers", token=token)[1]["pushers"]:
        call(port, "POST", SET, {"kind": None, "app_id": pusher["app_id"],
                                 "pushkey": pusher["pushkey"]}, token=token)
    if process is not None:
        assert "Traceback" not in process.log(), process.log()


def post(token, body, framing, extra_headers=""):
    """The bytes of POST /pushers/set with ``body`` framed as asked."""
    head = (f"POST {SET} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\n{extra_headers}")
    if framing == "content-length":
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    return f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + body


def chunked(body, size=300):
    """``body`` in chunks of ``size`` bytes, properly terminated."""
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                   for i in range(0, len(body), size))
    return out + b"0\r\n\r\n"


def padded(size):
    """A valid pusher body of exactly ``size`` bytes: spaces after the JSON object, which a
    body cut at the limit would still parse as."""
    body = json.dumps(pusher_body("padded", url="https://gw.example/push/v1/notify")).encode()
    return body + b" " * (size - len(body))


def pushkeys(port, token):
    return [p["pushkey"] for p in call(port, "GET", "/push/v1/pushers", token=token)[1]["pushers"]]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_at_the_limit_is_accepted(server, framing):
    port, token = server
    body = padded(LIMIT)
    payload = chunked(body) if framing == "chunked" else body
    status, _, answer, _ = parse_response(exchange(port, post(token, payload, framing,
                                                              "Connection: close\r\n")))
    assert (status, answer) == (200, {})
    assert pushkeys(port, token) == ["padded"]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_over_the_limit_is_413_and_nothing_is_applied(server, framing):
    port, token = server
    body = padded(LIMIT + 1)
    payload = chunked(body) if framing == "chunked" else body
    status, headers, answer, _ = parse_response(exchange(port, post(token, payload, framing,
                                                                    "Connection: close\r\n")))
    assert status == 413 and answer["errcode"] == "M_TOO_LARGE", answer
    assert headers["content-type"] == "application/json"
    assert pushkeys(port, token) == []


def test_a_much_larger_chunked_body_is_413_too(server):
    port, token = server
    payload = chunked(padded(20 * LIMIT), size=4096)
    # Not until the server closes: werkzeug's development server waits for the client to go.
    raw = exchange(port, post(token, payload, "chunked", "Connection: close\r\n"),
                   until_close=False)
    status, _, answer, _ = parse_response(raw)
    assert status == 413 and answer["errcode"] == "M_TOO_LARGE", answer
    assert pushkeys(port, token) == []


@pytest.mark.parametrize("broken", [
    b"zz\r\n{}\r\n0\r\n\r\n",  # a chunk size that is not hex
    b"5\r\n{}\r\n0\r\n\r\n",  # a chunk shorter than its size, then no terminator
    b"-2\r\n{}\r\n0\r\n\r\n",
    b"2\r\n{}XX0\r\n\r\n",  # no CRLF after the chunk
])
def test_a_broken_chunked_body_is_400_not_json_and_the_connection_closes(server, broken):
    port, token = server
    # a second, valid request right behind the broken one: it must not be read as one
    behind = post(token, json.dumps(pusher_body("behind")).encode(), "content-length")
    raw = exchange(port, post(token, broken, "chunked") + behind, timeout=30)
    status, headers, answer, rest = parse_response(raw)
    assert status == 400 and answer["errcode"] == "M_NOT_JSON", answer
    assert headers["content-type"] == "application/json"
    assert rest == b""  # one answer, then the server closed the connection
    assert pushkeys(port, token) == []
