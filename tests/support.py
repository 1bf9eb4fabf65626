"""Helpers shared by the tests (fixtures are in conftest.py; real processes in servers.py).

- ``Api``: the client and sender API through a Flask test client, with its paths in one place
  (``PATH_SETS``: the client API under /push/v1 and under the seed-era paths);
- ``assert_error``: the one check of an error answer (SPEC section 3);
- ``Gateway``: a real HTTP (or, given a TLS context, HTTPS) push gateway on 127.0.0.1,
  answering by magic pushkeys as Sygnal's tests do: ``reject...`` comes back in ``rejected``;
  ``fail-N...`` gets 503 for its first N requests, then 200; ``bad...`` gets 400 (a permanent
  failure); anything else 200; it can take ``delay`` seconds over each answer and counts the
  requests it holds at once. It speaks each API by the path: a stock Matrix gateway at
  /_matrix/push/v1/notify, a gematik gateway elsewhere (upstream-latest, or ``seed_era``), and
  checks every body it gets (``schema_errors``, ``matrix_errors``);
- the gateway APIs from their YAML (``schema_errors``, against copies of the upstream files in
  tests/spec/) and the Matrix notification as Sygnal reads it (``matrix_errors``);
- ``SocketGateway``: a misbehaving gateway on a raw socket (``trickle_body``,
  ``trickle_headers``, ``stall_after_headers``, ``never_answer``, ``trickle_tls_handshake``),
  and ``untrusted_tls_gateway``, whose certificate comes from a CA nobody trusts;
- the phone's side of the crypto (``phone_decrypt``), written again from SPEC section 4,
  independent of crypto.py;
- database peeks (``fetch``, ``stored_bytes``) and a worker driver (``drain``).
"""

import base64
import functools
import json
import os
import socket
import ssl
import struct
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import trustme
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from jsonschema import Draft202012Validator
from peewee import SqliteDatabase
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

import delivery
from models import MODELS, db

ISS = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"

#: Settings of every test app: no background worker, no rate limits, gateways on loopback,
#: no waiting between retries nor gateway pauses.
TEST_CONFIG = {
    "TESTING": True,
    "EMBEDDED_WORKER": False,
    "RATE_LIMIT_ENABLED": False,
    "ALLOW_HTTP_GATEWAYS": True,
    "ALLOW_PRIVATE_GATEWAYS": True,
    "RETRY_INITIAL_SECONDS": 0.0,
    "GATEWAY_PAUSE_INITIAL_SECONDS": 0.0,
}


# --- request bodies -------------------------------------------------------------------------


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
    """A valid ``encryption`` object of a pusher, as upstream-latest names its fields."""
    return {"method": "aes-hmac-sha256", "time_iss_created": period, "iss": iss,
            "key_identifier": key_identifier}


def bearer(token):
    """The Authorization header of a token."""
    return {"Authorization": "Bearer " + token}


# --- the API ----------------------------------------------------------------------------------


class Paths:
    """Where the client and sender endpoints are."""

    def __init__(self, pushers, pusher_set, channels, notifications, history):
        self.pushers = pushers
        self.pusher_set = pusher_set
        self.channels = channels
        self.notifications = notifications
        self.history = history

    def device(self, pushkey, encode=False):
        """The channel states path of one device; the pushkey raw or percent-encoded."""
        return f"{self.channels}/{quote(pushkey, safe='') if encode else pushkey}"


PUSH_V1 = Paths("/push/v1/pushers", "/push/v1/pushers/set", "/push/v1/channels",
                "/push/v1/notifications", "/push/v1/history")
#: The client API at the paths of the seed's fd_openapi.yaml; sending and history have no
#: seed-era alias.
SEED_ERA = Paths("/pushers/v1", "/pushers/v1/set", "/channels/v1",
                 "/push/v1/notifications", "/push/v1/history")
#: Every client API path set, by test id: a client API test runs once for each.
PATH_SETS = {"push-v1": PUSH_V1, "seed-era": SEED_ERA}


class Api:
    """The client and sender API through a Flask test client.

    Methods that return parsed data assert the answer was a success; methods named like the
    request (``set_pusher``, ``set_channels``, ``send``) return the response itself.
    """

    def __init__(self, client, paths=PUSH_V1):
        self.client = client
        self.paths = paths

    def pushers(self, headers):
        """The caller's pushers (GET /pushers)."""
        response = self.client.get(self.paths.pushers, headers=headers)
        assert response.status_code == 200, response.get_json()
        return response.get_json()["pushers"]

    def pushkeys(self, headers):
        """The pushkeys of the caller's pushers, oldest first."""
        return [p["pushkey"] for p in self.pushers(headers)]

    def set_pusher(self, headers, body):
        """POST /pushers/set with ``body``; the response."""
        return self.client.post(self.paths.pusher_set, json=body, headers=headers)

    def register(self, headers, pushkey="pk1", **extra):
        """Register a pusher (``pusher_body`` with ``extra``) and assert it worked."""
        response = self.set_pusher(headers, pusher_body(pushkey, **extra))
        assert response.status_code == 200, response.get_json()
        return pushkey

    def unregister(self, headers, pushkey="pk1", app_id="com.example.app"):
        """Delete a pusher (kind null) and assert it worked."""
        body = {"kind": None, "app_id": app_id, "pushkey": pushkey}
        response = self.set_pusher(headers, body)
        assert response.status_code == 200, response.get_json()

    def channels(self, headers, pushkey, encode=False):
        """{channel id: state} of one device (GET /channels/<pushkey>)."""
        response = self.client.get(self.paths.device(pushkey, encode), headers=headers)
        assert response.status_code == 200, response.get_json()
        return {c["id"]: c["status"] for c in response.get_json()["channels"]}

    def set_channels(self, headers, pushkey, *entries, encode=False):
        """POST {"channels": [...]}; each entry a (name, value) pair or a ready dict."""
        items = [e if isinstance(e, dict) else {"name": e[0], "value": e[1]} for e in entries]
        return self.client.post(self.paths.device(pushkey, encode), headers=headers,
                                json={"channels": items})

    def send(self, headers, user="alice", channel="erp.task", payload=None, **extra):
        """POST /notifications as a service; ``payload`` defaults to {"task": "42"}."""
        body = {"user_id": user, "channel": channel,
                "payload": payload if payload is not None else {"task": "42"}, **extra}
        return self.client.post(self.paths.notifications, json=body, headers=headers)


def assert_error(response, status, errcode):
    """The response is a JSON error body with this status and errcode, never HTML; returns
    its ``error`` text.

    The body is exactly ``{"errcode", "error"}``, with ``retry_after_ms`` beside them on a 429.
    """
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert b"<html" not in response.get_data().lower()
    body = response.get_json()
    assert body["errcode"] == errcode, body
    extra = {"retry_after_ms"} if status == 429 else set()
    assert set(body) == {"errcode", "error", *extra}, body
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


def cli_token(runner, *args):
    """Run a CLI command that prints a token on its last line; return the token."""
    result = runner.invoke(args=list(args))
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


# --- the database -----------------------------------------------------------------------------


def stored_bytes(app):
    """Everything the app keeps: every byte of every file in the instance folder (SQLite
    database, WAL, lock files, key) and, on PostgreSQL, every row of every table."""
    data = b""
    for name in os.listdir(app.instance_path):
        path = os.path.join(app.instance_path, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data += f.read()
    if not isinstance(db.obj, SqliteDatabase):
        with app.app_context(), db.connection_context():
            for model in MODELS:
                for row in model.select().tuples():
                    data += b"".join(bytes(v) if isinstance(v, (bytes, memoryview))
                                     else str(v).encode() for v in row)
    return data


def fetch(query):
    """Run a peewee query on its own connection; return the rows as a list."""
    with db.connection_context():
        return list(query)


def drain(app, worker, rounds=50):
    """Run worker rounds until nothing is pending (retries are immediate in tests)."""
    with app.app_context():
        db.connect(reuse_if_open=True)
        try:
            for _ in range(rounds):
                if not worker.run_once() and delivery.stats()["pending"] == 0:
                    return
            raise AssertionError(f"still pending after {rounds} rounds: {delivery.stats()}")
        finally:
            db.close()


# --- the phone's side, from SPEC section 4 ----------------------------------------------------


def months(start, end):
    """Every "YYYY-MM" from start to end inclusive."""
    year, month = map(int, start.split("-"))
    out = []
    while f"{year:04d}-{month:02d}" <= end:
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out


def phone_key(iss_hex, initial_period, period):
    """The AES key a phone derives for ``period``, ratcheting from its iss."""
    ikm = bytes.fromhex(iss_hex)
    for month in months(initial_period, period):
        okm = HKDF(hashes.SHA256(), 64, salt=None, info=month.encode()).derive(ikm)
        ikm, key = okm[:32], okm[32:]
    return key


def envelope(notification):
    """The sealed envelope a notification carries, or None for a plain one: its own fields in
    the gematik forms, its ``content`` in the Matrix form."""
    for part in (notification, notification.get("content")):
        if isinstance(part, dict) and "ciphertext" in part:
            return part
    return None


def phone_decrypt(iss_hex, initial_period, notification):
    """What the app does with a sealed envelope (``envelope``): returns the payload object."""
    assert len(notification["ciphertext"]) == 1404
    raw = base64.b64decode(notification["ciphertext"])
    key = phone_key(iss_hex, initial_period, notification["time_message_encrypted"])
    block = AESGCM(key).decrypt(raw[:12], raw[12:], None)
    assert len(block) == 1024 and block[:4] == b"PNM1"
    (padding,) = struct.unpack(">H", block[4:6])
    assert block[6:6 + padding] == b" " * padding
    return json.loads(block[6 + padding:])


def this_month(offset=0):
    """The UTC month ``offset`` months from now, as "YYYY-MM"."""
    today = datetime.now(timezone.utc)
    index = today.year * 12 + today.month - 1 + offset
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


# --- the gateway APIs -------------------------------------------------------------------------

SPEC_DIR = os.path.join(os.path.dirname(__file__), "spec")
#: Copies of ../shared/spec/<era>/push_gateway_openapi.yaml, kept in the repo so the tests do
#: not depend on what sits beside the checkout; test_gateway_forms checks they are current.
GATEWAY_YAML = {"latest": os.path.join(SPEC_DIR, "upstream-latest", "push_gateway_openapi.yaml"),
                "seed": os.path.join(SPEC_DIR, "upstream", "push_gateway_openapi.yaml")}
GEMATIK_ENDPOINTS = ("/notifyEncrypted/batch", "/notify/batch", "/notify")


@functools.cache
def gateway_validator(era, pointer):
    """A validator for the schema at JSON pointer ``pointer`` of the ``era`` gateway YAML; its
    $refs resolve in the file itself (OpenAPI 3.1 schemas are JSON Schema 2020-12)."""
    with open(GATEWAY_YAML[era]) as f:
        document = yaml.safe_load(f)
    uri = f"urn:push-gateway-api:{era}"
    registry = Registry().with_resource(uri, Resource.from_contents(
        document, default_specification=DRAFT202012))
    return Draft202012Validator({"$ref": f"{uri}#{pointer}"}, registry=registry)


def request_schema(path):
    """The JSON pointer of the request body schema of the gematik endpoint ``path`` ends in."""
    endpoint = next(e for e in GEMATIK_ENDPOINTS if path.endswith(e))
    return f"/paths/{endpoint.replace('/', '~1')}/post/requestBody/content/application~1json/schema"


def schema_errors(era, pointer, body):
    """Why ``body`` does not fit the schema at ``pointer`` of the ``era`` YAML ([] if it does)."""
    return [f"{'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
            for e in gateway_validator(era, pointer).iter_errors(body)]


def gematik_errors(path, body, seed_era=False):
    """Why a body POSTed to gematik endpoint ``path`` does not fit its API's YAML.

    The seed's /notify takes oneOf an encrypted and a plain notification, but neither schema
    forbids the other's fields, so every body fits both and oneOf refuses them all: a seed-era
    body is checked against the one it says it is (by its ciphertext), as such a gateway tells
    them apart.
    """
    if not seed_era:
        return schema_errors("latest", request_schema(path), body)
    note = body.get("notification") if isinstance(body, dict) else None
    kind = "Encrypted" if isinstance(note, dict) and "ciphertext" in note else "Plain"
    return schema_errors("seed", f"/components/schemas/{kind}Notification", body)


#: The fields of a Matrix push notification (Matrix push gateway API): all a stock Matrix
#: gateway knows, and so all it can pass on.
MATRIX_FIELDS = ("event_id", "room_id", "type", "sender", "content", "counts", "prio", "devices")


def matrix_errors(body):
    """Why ``body`` is not a Matrix push notification request as Sygnal reads one: an object
    in ``notification`` with a non-empty list of devices (each with string ``app_id`` and
    ``pushkey``, integer ``pushkey_ts``, object ``data`` and ``tweaks``), integer counts, and
    the types the Matrix push gateway API gives the other fields."""
    note = body.get("notification") if isinstance(body, dict) else None
    if not isinstance(note, dict):
        return ["expecting object in 'notification' key"]
    errors = []
    devices = note.get("devices")
    if not isinstance(devices, list) or not devices:
        errors.append("devices: expecting a non-empty list")
    for device in devices if isinstance(devices, list) else []:
        errors += [f"device: {key} is not {kind.__name__}" for key, kind, required in (
            ("app_id", str, True), ("pushkey", str, True), ("pushkey_ts", int, False),
            ("data", dict, False), ("tweaks", dict, False))
            if (required or key in device) and not isinstance(device.get(key), kind)]
    counts = note.get("counts", {})
    if not isinstance(counts, dict) or not all(isinstance(v, int) for v in counts.values()):
        errors.append("counts: expecting an object of integers")
    errors += [f"{key} is not a string" for key in ("event_id", "room_id", "type", "sender")
               if key in note and not isinstance(note[key], str)]
    if "content" in note and not isinstance(note["content"], dict):
        errors.append("content is not an object")
    if note.get("prio", "high") not in ("high", "low"):
        errors.append("prio is neither high nor low")
    return errors


# --- a push gateway ---------------------------------------------------------------------------


class Gateway:
    """A push gateway on 127.0.0.1 in a thread, recording every request it gets.

    It speaks each API by the path. At /_matrix/push/v1/notify it is a stock Matrix gateway:
    it reads the body as Sygnal does and passes on only the Matrix fields (``forwarded``: what
    reaches the phone). Elsewhere it is a gematik gateway of upstream-latest, checking every
    body against that YAML, or with ``seed_era`` one of the seed era: no batch endpoints
    (404, or ``missing_status``), /notify bodies checked against the seed's YAML. A body that
    does not fit gets 400 "Invalid data format" and its reasons are kept in ``invalid`` (the
    ``gateway`` fixture fails a test that leaves any). Bodies over ``max_bytes`` get 413;
    batches of more than ``max_items`` get 400 "Batch size exceeds maximum limit", naming
    ``max_batch_size`` when ``tell_max_items``. With ``tls`` (a server-side ssl.SSLContext) it
    serves https.
    """

    def __init__(self, port=0, tls=None, seed_era=False, missing_status=404):
        self.requests = []  # (path, body)
        self.sizes = []  # the body size of each request as received, in the same order
        self.headers = []  # the headers of each request, in order of arrival
        self.forwarded = []  # what a Matrix gateway passes on of each notification
        self.invalid = []  # (path, reasons) of bodies that did not fit the API
        self.lock = threading.Lock()
        self.failures = {}
        self.status_override = None
        self.seed_era = seed_era
        self.missing_status = missing_status  # a seed-era gateway's answer on batch endpoints
        self.max_bytes = None
        self.max_items = None
        self.tell_max_items = False
        self.delay = 0.0  # seconds to hold each request before answering
        self.active = 0  # requests held right now
        self.most_active = 0  # the most ever held at once
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with gateway.lock:
                    gateway.headers.append(dict(self.headers))
                    gateway.active += 1
                    gateway.most_active = max(gateway.most_active, gateway.active)
                try:
                    time.sleep(gateway.delay)
                    status, answer = gateway.answer(self.path, json.loads(raw), len(raw))
                finally:
                    with gateway.lock:
                        gateway.active -= 1
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:  # the handshake happens in accept(): one that fails is dropped
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path="/_matrix/push/v1/notify"):
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

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

    def refusal(self, path, body, size):
        """(status, answer) of a gateway that will not take this request, or None."""
        if self.seed_era and path.endswith("/batch"):
            return self.missing_status, {"error": "Not found"}
        if self.max_bytes is not None and size > self.max_bytes:
            return 413, {"error": "Batch request payload is too large."}
        matrix = path.endswith("/_matrix/push/v1/notify")
        errors = matrix_errors(body) if matrix else gematik_errors(path, body, self.seed_era)
        if errors:
            self.invalid.append((path, errors))
            return 400, {"error": "Invalid data format"}
        items = body.get("notifications")
        if self.max_items is not None and isinstance(items, list) and len(items) > self.max_items:
            answer = {"error": "Batch size exceeds maximum limit"}
            if self.tell_max_items:
                answer["details"] = {"max_batch_size": self.max_items}
            return 400, answer
        return None

    def answer(self, path, body, size=0):
        with self.lock:
            self.requests.append((path, body))
            self.sizes.append(size)
            if self.status_override is not None:
                return self.status_override, {"error": "forced"}
            path = path.split("?")[0]
            refusal = self.refusal(path, body, size)
            if refusal is not None:
                return refusal
            return self.batch_answer(body) if path.endswith("/batch") else self.single_answer(
                path, body["notification"])

    def batch_answer(self, body):
        """A batch endpoint's answer: a result per item, by the magic pushkeys."""
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
        summary = {"total": len(results), **{key: sum(r["status"] == status for r in results)
                   for key, status in (("successful", "success"), ("failed", "failed"),
                                       ("partial", "partial"))}}
        return 200, {"results": results, "summary": summary}

    def single_answer(self, path, note):
        """A single notification's answer, by the magic pushkeys; a Matrix gateway passes on
        the Matrix fields of one it takes."""
        verdicts = [self.verdict(d["pushkey"]) for d in note["devices"]]
        if "retry" in verdicts:
            return 503, {"error": "try later"}
        if "bad" in verdicts:
            return 400, {"error": "bad pushkey"}
        if path.endswith("/_matrix/push/v1/notify"):
            self.forwarded.append({k: note[k] for k in MATRIX_FIELDS if k in note})
        return 200, {"rejected": [d["pushkey"] for d, v in zip(note["devices"], verdicts)
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


# --- gateways that misbehave ------------------------------------------------------------------

#: Seconds between two bytes of a trickling gateway: shorter than any read timeout in the tests,
#: so only a deadline on the whole request ends it.
TRICKLE_INTERVAL = 0.2


def trickle(connection, done, data):
    """Send ``data`` a byte at a time, TRICKLE_INTERVAL apart, until it is out or ``done``."""
    for i in range(len(data)):
        if done.wait(TRICKLE_INTERVAL):
            return
        connection.sendall(data[i:i + 1])


def trickle_body(connection, done):
    """200 and headers at once, then a long body a byte at a time."""
    connection.recv(65536)
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 10000\r\n\r\n")
    trickle(connection, done, b'{"rejected": []' + b" " * 9984 + b"}")


def trickle_headers(connection, done):
    """The status line, then a header without end, a byte at a time."""
    connection.recv(65536)
    connection.sendall(b"HTTP/1.1 200 OK\r\n")
    trickle(connection, done, b"X-Slow: " + b"a" * 10000)


def stall_after_headers(connection, done):
    """200 and headers promising a body, one byte of it, then silence."""
    connection.recv(65536)
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100\r\n\r\n{")
    done.wait()


def never_answer(connection, done):
    """Takes the request and says nothing."""
    connection.recv(65536)
    done.wait()


def trickle_tls_handshake(connection, done):
    """Reads a TLS ClientHello and answers with a 16 KiB handshake record, a byte at a time."""
    connection.recv(65536)
    trickle(connection, done, b"\x16\x03\x03\x40\x00" + b"\x00" * 16384)


class SocketGateway:
    """A gateway on 127.0.0.1 that does ``behave(connection, done)`` with each connection, in
    a thread per connection, until ``close``; it keeps every connection it accepted."""

    def __init__(self, behave, port=0):
        self.behave = behave
        self.server = socket.create_server(("127.0.0.1", port), backlog=64)
        self.port = self.server.getsockname()[1]
        self.done = threading.Event()
        self.connections = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve, daemon=True).start()

    def url(self, path="/_matrix/push/v1/notify", scheme="http"):
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def serve(self):
        while not self.done.is_set():
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                self.connections.append(connection)
            threading.Thread(target=self.handle, args=(connection,), daemon=True).start()

    def handle(self, connection):
        try:
            self.behave(connection, self.done)
        except OSError:  # the client gave up, or the test closed us
            pass

    def accepted(self):
        """How many connections it has accepted."""
        with self.lock:
            return len(self.connections)

    def close(self):
        self.done.set()
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept(): close alone does not
        except OSError:
            pass
        self.server.close()
        with self.lock:
            for connection in self.connections:
                connection.close()


def untrusted_tls_gateway():
    """A TLS gateway on 127.0.0.1 whose certificate comes from a CA nobody trusts."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(context)

    def serve(connection, done):
        try:
            with context.wrap_socket(connection, server_side=True) as tls:
                tls.recv(65536)
        except ssl.SSLError:  # the client refuses our certificate and hangs up
            pass

    return SocketGateway(serve)
