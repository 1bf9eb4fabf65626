"""Shared fixtures: a fresh app on a temporary instance folder, and a real HTTP push gateway.

The gateway answers by magic pushkeys, as Sygnal's tests do:
- ``reject...``: the pushkey comes back in ``rejected``;
- ``fail-N...``: the first N requests for it get 503, then 200;
- ``bad...``: 400 (a permanent failure);
- anything else: 200 with ``rejected: []``.
"""

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from app import create_app  # noqa: E402

TEST_CONFIG = {
    "TESTING": True,
    "EMBEDDED_WORKER": False,
    "RATE_LIMIT_ENABLED": False,
    "ALLOW_HTTP_GATEWAYS": True,
    "ALLOW_PRIVATE_GATEWAYS": True,
    "RETRY_INITIAL_SECONDS": 0.0,
}

ISS = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"


@pytest.fixture
def make_app(tmp_path):
    """Factory for apps on this test's instance folder, with config overrides."""

    def make(**overrides):
        return create_app({**TEST_CONFIG, **overrides}, instance_path=str(tmp_path / "instance"))

    return make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def instance_bytes(app):
    """Every byte of every file in the instance folder (database, WAL, lock files, key)."""
    data = b""
    for name in os.listdir(app.instance_path):
        path = os.path.join(app.instance_path, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data += f.read()
    return data


def fetch(query):
    """Run a peewee query on its own connection; return the rows as a list."""
    from models import db
    with db.connection_context():
        return list(query)


def send_notification(client, headers, user="alice", channel="erp.task", payload=None, **extra):
    """POST /push/v1/notifications as a service; ``payload`` defaults to {"task": "42"}."""
    body = {"user_id": user, "channel": channel,
            "payload": payload if payload is not None else {"task": "42"}, **extra}
    return client.post("/push/v1/notifications", json=body, headers=headers)


def drain(app, worker, rounds=50):
    """Run worker rounds until nothing is pending (retries are immediate in tests)."""
    import delivery
    from models import db
    with app.app_context():
        db.connect(reuse_if_open=True)
        try:
            for _ in range(rounds):
                if not worker.run_once() and delivery.stats()["pending"] == 0:
                    return
            raise AssertionError(f"still pending after {rounds} rounds: {delivery.stats()}")
        finally:
            db.close()


def cli_token(runner, *args):
    """Run a CLI command that prints a token on its last line; return the token."""
    result = runner.invoke(args=list(args))
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


@pytest.fixture
def user_token(runner):
    """A factory: create a user, return the Authorization header of its token."""

    def make(name="alice"):
        return {"Authorization": "Bearer " + cli_token(runner, "users", "create", name)}

    return make


@pytest.fixture
def alice(user_token):
    return user_token("alice")


@pytest.fixture
def service(runner):
    return {"Authorization": "Bearer " + cli_token(runner, "services", "create", "erp")}


@pytest.fixture
def channel(runner):
    """A factory: add a catalogue channel."""

    def add(channel_id, default="disabled"):
        result = runner.invoke(args=["channels", "add", channel_id, "--default", default])
        assert result.exit_code == 0, result.output
        return channel_id

    return add


def pusher_body(pushkey="pk1", url="https://gw.example/_matrix/push/v1/notify", **extra):
    """A valid POST /pushers/set body."""
    body = {
        "kind": "http",
        "app_id": "com.example.app",
        "pushkey": pushkey,
        "app_display_name": "Example",
        "device_display_name": "Phone",
        "lang": "en",
        "data": {"url": url},
    }
    body.update(extra)
    return body


def encryption(key_identifier="key-1", iss=ISS, period="2024-11"):
    return {"method": "aes-hmac-sha256", "initial_key_period": period, "iss": iss,
            "key_identifier": key_identifier}


@pytest.fixture
def register(client):
    """A factory: register a pusher and assert it worked."""

    def reg(headers, pushkey="pk1", **extra):
        response = client.post("/push/v1/pushers/set", json=pusher_body(pushkey, **extra),
                               headers=headers)
        assert response.status_code == 200, response.get_json()
        return pushkey

    return reg


class Gateway:
    """A push gateway on 127.0.0.1 in a thread, recording every request it gets."""

    def __init__(self, port=0):
        self.requests = []  # (path, body)
        self.lock = threading.Lock()
        self.failures = {}
        self.status_override = None
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                status, answer = gateway.answer(self.path, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path="/_matrix/push/v1/notify"):
        return f"http://127.0.0.1:{self.port}{path}"

    def verdict(self, pushkey):
        """What this gateway says of one pushkey: 'ok', 'reject', 'retry' or 'bad'."""
        if pushkey.startswith("reject"):
            return "reject"
        if pushkey.startswith("bad"):
            return "bad"
        if pushkey.startswith("fail-"):
            left = self.failures.setdefault(pushkey, int(pushkey.split("-")[1]))
            if left > 0:
                self.failures[pushkey] = left - 1
                return "retry"
        return "ok"

    def answer(self, path, body):
        with self.lock:
            self.requests.append((path, body))
            if self.status_override is not None:
                return self.status_override, {"error": "forced"}
            if path.endswith("/batch"):
                results = []
                for item in body["notifications"]:
                    n = item["notification"]
                    devices = [n["device"]] if "device" in n else n["devices"]
                    verdicts = [self.verdict(d["pushkey"]) for d in devices]
                    rejected = [d["pushkey"] for d, v in zip(devices, verdicts) if v == "reject"]
                    status = ("failed" if "bad" in verdicts or "retry" in verdicts
                              else "partial" if rejected else "success")
                    result = {"id": item["id"], "status": status, "rejected": rejected}
                    if status == "failed":
                        result["error"] = "retry" if "retry" in verdicts else "bad pushkey"
                    results.append(result)
                if any(r["status"] == "failed" and r["error"] == "retry" for r in results):
                    return 503, {"error": "try later"}
                return 200, {"results": results, "summary": {"total": len(results)}}
            devices = body["notification"]["devices"]
            verdicts = [self.verdict(d["pushkey"]) for d in devices]
            if "retry" in verdicts:
                return 503, {"error": "try later"}
            if "bad" in verdicts:
                return 400, {"error": "bad pushkey"}
            return 200, {"rejected": [d["pushkey"] for d, v in zip(devices, verdicts)
                                      if v == "reject"]}

    def notifications(self):
        """Every notification object received, flattened out of batches."""
        with self.lock:
            out = []
            for path, body in self.requests:
                if "notifications" in body:
                    out.extend(item["notification"] for item in body["notifications"])
                else:
                    out.append(body["notification"])
            return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway():
    gw = Gateway()
    yield gw
    gw.close()
