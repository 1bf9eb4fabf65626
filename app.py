"""The push-notification service: app factory, errors, auth and the HTTP API.

Run it with ``flask --app app run`` (development) or ``gunicorn 'app:create_app()'``. The
operator commands are in ``cli.py``, delivery in ``delivery.py`` and ``gateway.py``, schema
upgrades in ``migrations.py``, ``/metrics`` in ``metrics.py`` and ``/docs`` in ``docs.py``.
"""

import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import time
from collections import Counter
from datetime import datetime, timezone

import flask
from flask import Flask, current_app, g, request
from flask.views import MethodView
from flask_smorest import Api, Blueprint
from flask_smorest import abort as smorest_abort
from peewee import IntegrityError, SqliteDatabase
from webargs.flaskparser import FlaskParser
from werkzeug.routing import PathConverter

import cli
import crypto
import delivery
import docs
import metrics
import migrations
from gateway import log_safe, tls_context
from models import (
    DEVICE_CHANNELS,
    DEVICE_EXISTS,
    DEVICE_HISTORY,
    KEY_BY_IDENTIFIER,
    KNOWN_CHANNELS,
    OTHER_OWNERS,
    PUSHER_OF,
    PUSHERS_OF,
    SET_CHANNEL_STATES,
    TOKEN_OWNER,
    UPDATE_PUSHER,
    Channel,
    EncryptionKey,
    Notification,
    NotQueued,
    Pusher,
    audit,
    db,
    delete_pusher,
    drop_unused_key,
    lock_user,
    marks,
    now,
    open_database,
    queue_notification,
    rate_counters,
    rows,
    run,
    sqlite_path,
    token_digest,
    transaction,
    use_connection,
    user_name,
)
from schemas import (
    SCHEMA_CONSTRAINTS,
    ChannelsSchema,
    ChannelsUpdateSchema,
    EmptySchema,
    ErrorSchema,
    MessageSchema,
    MessagesSchema,
    NotificationCreatedSchema,
    NotificationRequestSchema,
    PushersSchema,
    PusherSetSchema,
    classify,
    compact_json,
)

log = logging.getLogger("push")

#: Every setting, with its default. Environment variables carry the prefix ``PUSH_``;
#: ``instance/config.py`` and test mappings use the bare names.
DEFAULTS = {
    "DATABASE_URL": None,  # None: push.sqlite3 in the instance folder
    "SERVER_KEY": None,  # hex or base64 of 32 bytes; None: instance/server.key
    "ALLOW_HTTP_GATEWAYS": False,
    "ALLOW_PRIVATE_GATEWAYS": False,
    "GATEWAY_ALLOWLIST": "",
    "ENCRYPTION": "optional",
    "RETRY_INITIAL_SECONDS": 1.0,
    "RETRY_MAX_SECONDS": 3600.0,
    "RETRY_GIVE_UP_SECONDS": 86400.0,
    "HISTORY_DAYS": 30.0,
    "HISTORY_LIMIT": 1000,
    "EMBEDDED_WORKER": True,
    "MAX_BODY_BYTES": 65536,
    "MAX_PUSHERS_PER_USER": 50,
    "RATE_LIMIT_ENABLED": True,
    "RATE_LIMIT_PER_MINUTE": 600,
    "SERVICE_RATE_LIMIT_PER_MINUTE": 6000,
    "AUTH_FAILURES_PER_MINUTE": 30,
    "TRUSTED_PROXIES": "",
    "GATEWAY_CONNECT_TIMEOUT": 5.0,
    "GATEWAY_READ_TIMEOUT": 10.0,
    "GATEWAY_MAX_RESPONSE_BYTES": 65536,
    "GATEWAY_MAX_BATCH_BYTES": 262144,  # upstream: a gateway must take at least 256 KiB
    "GATEWAY_CLIENT_CERT": None,  # PEM file presented to every gateway (mutual TLS)
    "GATEWAY_CLIENT_KEY": None,  # PEM file; None: the key is in GATEWAY_CLIENT_CERT
    "GATEWAY_CA_BUNDLE": None,  # PEM file trusted for gateways beside the system CAs
    "GATEWAY_CONCURRENCY": 4,
    "GATEWAY_PAUSE_INITIAL_SECONDS": 5.0,
    "GATEWAY_PAUSE_MAX_SECONDS": 300.0,
    "WORKER_THREADS": 8,
    "WORKER_CLAIM": 200,
    "WORKER_POLL_SECONDS": 1.0,
    "DELIVERY_LEASE_SECONDS": 120.0,
    "METRICS_TOKEN": None,  # None: /metrics needs no token
    "AUDIT_DAYS": 90.0,
    "LOG_FORMAT": "text",
}

ENCRYPTION_POLICIES = ("optional", "required", "forbidden")
LOG_FORMATS = ("text", "json")
PREFIX = "/push/v1"


def create_app(test_config=None, instance_path=None):
    """Build the app: config, database, schema, API and CLI.

    The instance folder (database, server key, config.py) is ``instance/`` beside this file,
    or ``PUSH_INSTANCE_PATH``, or ``instance_path``.
    """
    instance_path = instance_path or os.environ.get("PUSH_INSTANCE_PATH") or None
    if instance_path:
        instance_path = os.path.abspath(instance_path)
    app = Flask(__name__, instance_relative_config=True, instance_path=instance_path)
    # "//" in a path is a 404 like any unknown path, not a 308 redirect with an HTML body
    # (set before any rule is added: rules take the map's setting when they are bound).
    app.url_map.merge_slashes = False
    unread = configure(app, test_config)
    setup_logging(app)
    tls_context(app.config)  # a TLS file that cannot be used stops the start, not a send
    for name in unread:
        log.warning("%s, but no setting reads it", name)

    url = app.config["DATABASE_URL"] or sqlite_path(app.instance_path)
    lock_path = os.path.join(app.instance_path, migrations.LOCK_FILE)
    with private_files():
        db.initialize(open_database(url))
        # Every process brings the schema up to date at start (a second run changes nothing).
        app.extensions["push_schema_steps_applied"] = migrations.upgrade(lock_path)
        app.extensions["push_server_key"] = crypto.ServerKey.load(
            app.config["SERVER_KEY"], os.path.join(app.instance_path, "server.key")
        )
        if app.config["RATE_LIMIT_ENABLED"]:
            app.extensions["push_rate_limits"] = RateLimits(app.config,
                                                            rate_counters(url, lock_path))
    warn_if_readable(app.instance_path, "the instance folder")
    if isinstance(db.obj, SqliteDatabase):
        warn_if_readable(db.obj.database, "the database")

    # Each thread keeps its connection from request to request (models.use_connection).
    app.before_request(use_connection)

    @app.after_request
    def no_sniffing_no_caching(response):
        # Answers are JSON meant for one caller: never rendered as something else, never
        # kept by a cache on the way.
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/healthz")
    def healthz():
        """Liveness and database check."""
        db.execute_sql("SELECT 1")
        return {"status": "ok"}

    app.url_map.converters["pushkey"] = PushkeyConverter
    api = PushApi(app)
    for blueprint in (pushers_blp, channels_blp, notifications_blp, history_blp):
        api.register_blueprint(blueprint, url_prefix=PREFIX)
    app.register_blueprint(seed_era_blp)  # through Flask, not the Api: left out of the docs
    api.spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    for name, constraints in SCHEMA_CONSTRAINTS.items():
        api.spec.components.schemas[name].update(constraints)

    cli.init_app(app)
    docs.init_app(app)
    delivery.init_app(app)
    metrics.init_app(app)
    return app


#: Settings read from the environment by name rather than through app.config.
ENVIRONMENT_ONLY = {"INSTANCE_PATH"}


def configure(app, test_config):
    """Defaults, then ``instance/config.py``, then ``PUSH_*`` variables, then ``test_config``.

    Returns what was set that no setting reads, to be reported at start (a typo must not
    pass silently, as in Sygnal's config check).
    """
    app.config.from_mapping(DEFAULTS)
    app.config.update(
        API_TITLE="Push notification service",
        API_VERSION="1.0.0",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",  # /docs is served by docs.py, not flask-smorest
        # Every operation needs a bearer token: said once for the whole document.
        API_SPEC_OPTIONS={"security": [{"bearer": []}]},
    )
    known = set(app.config)
    os.makedirs(app.instance_path, mode=0o700, exist_ok=True)  # when we make it, it is ours
    app.config.from_pyfile("config.py", silent=True)
    from_file = set(app.config) - known
    app.config.from_prefixed_env(prefix="PUSH")
    if test_config:
        app.config.from_mapping(test_config)
    normalize_config(app.config)
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_BODY_BYTES"]
    unread = [f"instance/config.py sets {key}" + (f" (write {key[5:]})" if key.startswith(
        "PUSH_") else "") for key in sorted(from_file)]
    unread += [f"environment variable {key} is set" for key in sorted(os.environ)
               if key.startswith("PUSH_") and key[5:] not in known | ENVIRONMENT_ONLY]
    return unread


@contextlib.contextmanager
def private_files():
    """Files created inside are readable by their owner only (0600): the database (SQLite gives
    its -wal and -shm files the database's mode), lock files, the server key."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def warn_if_readable(path, what):
    """Warn at start when ``path`` can be read by group or others."""
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0
    if mode & 0o044:
        log.warning("%s %s can be read by group or others (mode %03o): chmod go-rwx it",
                    what, path, mode)


def setup_logging(app):
    """Log to stderr at INFO (unless the host set up logging), no SQL; with PUSH_LOG_FORMAT
    "json", one JSON object per line (``JsonFormatter``). Lines that carry a request's path are
    escaped and have pushkeys shortened."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if app.config["LOG_FORMAT"] == "json":
            root.handlers[0].setFormatter(JsonFormatter())
    # peewee's DEBUG lines carry query parameters (pushkeys, token digests): keep them out.
    logging.getLogger("peewee").setLevel(logging.INFO)
    # Flask's own logger writes "Exception on <path>" for a 500.
    for logger in (logging.getLogger("werkzeug"), logging.getLogger("gunicorn.access"),
                   app.logger):
        if not any(isinstance(f, RequestLogFilter) for f in logger.filters):
            logger.addFilter(RequestLogFilter())


def normalize_config(config):
    """Coerce settings given as strings (environment, config files) to their default's type."""
    for key, default in DEFAULTS.items():
        value = config.get(key)
        if value is None or isinstance(default, str) or default is None:
            continue
        try:
            if isinstance(default, bool):
                if isinstance(value, str):
                    if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(value)
                    value = value.strip().lower() in ("true", "1", "yes")
                config[key] = bool(value)
            else:
                config[key] = type(default)(value)
        except (TypeError, ValueError):
            raise RuntimeError(f"PUSH_{key}: cannot read {value!r} as {type(default).__name__}")
    allowlist = config["GATEWAY_ALLOWLIST"]
    if isinstance(allowlist, str):
        config["GATEWAY_ALLOWLIST"] = allowlist = [p.strip() for p in allowlist.split(",")
                                                   if p.strip()]
    for prefix in allowlist:
        if not re.match(r"https?://[^/?#]", prefix):
            raise RuntimeError(f"PUSH_GATEWAY_ALLOWLIST: {prefix!r} is not an http(s) URL prefix")
    config["TRUSTED_PROXIES"] = trusted_networks(config["TRUSTED_PROXIES"])
    request_time = config["GATEWAY_CONNECT_TIMEOUT"] + config["GATEWAY_READ_TIMEOUT"]
    if config["DELIVERY_LEASE_SECONDS"] <= request_time:
        raise RuntimeError("PUSH_DELIVERY_LEASE_SECONDS must exceed PUSH_GATEWAY_CONNECT_TIMEOUT"
                           " + PUSH_GATEWAY_READ_TIMEOUT: a worker sends nothing it might still"
                           " be sending when its lease runs out")
    if config["LOG_FORMAT"] not in LOG_FORMATS:
        raise RuntimeError(f"PUSH_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
    if config["ENCRYPTION"] not in ENCRYPTION_POLICIES:
        raise RuntimeError(f"PUSH_ENCRYPTION must be one of {', '.join(ENCRYPTION_POLICIES)}")


def trusted_networks(value):
    """PUSH_TRUSTED_PROXIES (comma-separated addresses or networks) as a tuple of networks."""
    if not isinstance(value, str):
        return tuple(value)
    try:
        return tuple(ipaddress.ip_network(item.strip(), strict=False)
                     for item in value.split(",") if item.strip())
    except ValueError as e:
        raise RuntimeError(f"PUSH_TRUSTED_PROXIES: {e}")


class JsonFormatter(logging.Formatter):
    """A log record as one line of JSON: time (UTC), level, logger, message, and the
    exception's traceback when there is one."""

    def format(self, record):
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


class RequestLogFilter(logging.Filter):
    """For log lines that carry a request's path (access logs, Flask's "Exception on"):
    control characters escaped, so a request cannot forge a line, and pushkeys (they sit in
    some paths) shortened."""

    PATTERN = re.compile(r"(/channels/(?:v1/)?|/history/device/)([^\s?\"]{6})[^\s?\"]*")

    def filter(self, record):
        message = log_safe(record.getMessage())
        if "/channels/" in message or "/history/device/" in message:
            message = self.PATTERN.sub(r"\1\2…", message)
        record.msg, record.args = message, ()
        return True


# --- errors -------------------------------------------------------------------------------

DEFAULT_ERRORS = {
    400: ("M_BAD_JSON", "Bad request"),
    401: ("M_MISSING_TOKEN", "Missing access token"),
    403: ("M_FORBIDDEN", "Forbidden"),
    404: ("M_UNRECOGNIZED", "Unrecognized request"),
    405: ("M_UNRECOGNIZED", "Method not allowed"),
    413: ("M_TOO_LARGE", "Request body too large"),
    429: ("M_LIMIT_EXCEEDED", "Too many requests"),
}


def abort(status, errcode, message, **extra):
    """Stop the request with a ``{"errcode", "error"}`` body."""
    smorest_abort(status, errcode=errcode, message=message, **extra)


class PushApi(Api):
    """The Api that renders every HTTP error as ``{"errcode", "error"}``."""

    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error):
        """One JSON error body for aborts, routing errors, 413s and unexpected 500s."""
        data = getattr(error, "data", None) or {}
        errcode, message = DEFAULT_ERRORS.get(error.code, ("M_UNKNOWN", "Internal server error"))
        body = {"errcode": data.get("errcode", errcode), "error": data.get("message", message)}
        headers = dict(data.get("headers") or {})
        if "retry_after_ms" in data:
            body["retry_after_ms"] = data["retry_after_ms"]
            headers["Retry-After"] = str(max(1, -(-data["retry_after_ms"] // 1000)))
        if error.code == 405 and getattr(error, "valid_methods", None):
            headers["Allow"] = ", ".join(error.valid_methods)
        return body, error.code, headers


def reject_json_constant(name):
    """json.loads hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


def finite_float(text):
    """json.loads hook: a number too large for a float (1e400) would come back out as
    Infinity, which is not JSON: refuse it."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def has_lone_surrogate(text, value):
    """Whether the parsed ``value`` holds a lone UTF-16 surrogate (from a ``\\ud800`` escape):
    such a string is not Unicode text and cannot be encoded to UTF-8 (or stored)."""
    if not LONE_SURROGATE_ESCAPE.search(text):
        return False  # the fast path: no escape that could make one
    try:
        compact_json(value)
    except UnicodeEncodeError:
        return True
    return False


#: On answers that leave part of a body unread: where the next request starts is unknown.
CLOSE = {"Connection": "close"}


def read_body(req, limit):
    """The whole request body, however it is framed (Content-Length or chunked).

    More than ``limit`` bytes: 413 M_TOO_LARGE, before anything is parsed. Werkzeug's own
    limit would cut a chunked body at the limit without a word, so we read one byte past it
    from the server's de-chunked stream ourselves. A body the server cannot de-chunk is 400
    M_NOT_JSON: there is no JSON document at all, let alone one of the wrong shape.
    """
    if req.content_length is not None and req.content_length > limit:
        abort(413, "M_TOO_LARGE", f"The request body is larger than {limit} bytes")
    # A server that frames the body itself (chunked; gunicorn always) says so with
    # wsgi.input_terminated; otherwise werkzeug's stream stops at the Content-Length.
    terminated = req.environ.get("wsgi.input_terminated")
    stream = req.environ["wsgi.input"] if terminated else req.stream
    data = bytearray()
    try:
        while len(data) <= limit:
            chunk = stream.read(limit + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except Exception:  # the server's own error for broken framing: OSError, gunicorn's
        # ParseException subclasses, werkzeug's ClientDisconnected
        abort(400, "M_NOT_JSON", "The request body could not be read: broken chunked"
                                 " encoding or cut short", headers=CLOSE)
    if len(data) > limit:
        abort(413, "M_TOO_LARGE", f"The request body is larger than {limit} bytes",
              headers=CLOSE)
    return bytes(data)


class JSONBodyParser(FlaskParser):
    """Reads any request body as JSON (whatever its Content-Type) and maps errors to errcodes."""

    # What handle_error answers, and so what flask-smorest documents (not webargs' 422).
    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req):
        data = read_body(req, current_app.config["MAX_BODY_BYTES"])
        if not data.strip():
            abort(400, "M_NOT_JSON", "The request body must be a JSON object")
        try:
            text = data.decode()
            value = json.loads(text, parse_constant=reject_json_constant, parse_float=finite_float)
            bad_text = has_lone_surrogate(text, value)
        except (ValueError, RecursionError):
            # ValueError covers bad JSON, bad UTF-8, NaN/Infinity and numbers past a float's
            # range (not JSON, and they would come back out as invalid JSON) and integers too
            # long to convert; RecursionError deeply nested arrays. None may become a 500.
            abort(400, "M_NOT_JSON", "The request body is not valid JSON")
        if bad_text:
            abort(400, "M_NOT_JSON", "The request body holds a lone UTF-16 surrogate escape")
        return value

    def handle_error(self, error, req, schema, *, error_status_code, error_headers):
        messages = error.messages
        if isinstance(messages, dict) and set(messages) == {"json"}:
            messages = messages["json"]  # webargs files body errors under the location name
        errcode, message = classify(messages)
        abort(400, errcode, message)


class PushBlueprint(Blueprint):
    """A blueprint whose every view needs a ``token`` ("user" or "service"), checked before
    the body is read, and whose bodies are read by ``JSONBodyParser``."""

    ARGUMENTS_PARSER = JSONBodyParser()
    #: What any view of a blueprint with a token can answer: no token, wrong token, too fast.
    AUTH_ERRORS = (401, 403, 429)

    def __init__(self, *args, token, **kwargs):
        super().__init__(*args, **kwargs)
        self.before_request(lambda: authenticate_first(token))

    def errors(self, *statuses):
        """Decorator: document a view's error responses (and the auth ones) in the real shape."""

        def decorate(func):
            for status in sorted({*statuses, *self.AUTH_ERRORS}, reverse=True):
                func = self.alt_response(status, schema=ErrorSchema, description="Error")(func)
            return func

        return decorate


# --- auth -----------------------------------------------------------------------------------


class RateLimits:
    """Per-minute budgets, shared by every process (the counters are ``models.rate_counters``):
    requests per user and per service, whichever of their tokens they use, and failed
    authentications per client address. A key's window opens with its first request and lasts
    a minute: a guard, not a quota."""

    def __init__(self, config, counters):
        self.config = config
        self.counters = counters
        self.last_purge = 0.0

    def check(self, key, per_minute):
        """Count one request on ``key``; 429 when it is over ``per_minute`` in its window."""
        current = time.time()
        if current - self.last_purge >= 60:  # once a minute per process: drop closed windows
            self.last_purge = current
            self.counters.purge(current)
        hits, started = self.counters.hit(key, current)
        if hits > per_minute:
            wait_ms = int((started + 60 - current) * 1000) + 1
            abort(429, "M_LIMIT_EXCEEDED", "Too many requests", retry_after_ms=wait_ms)

    def check_owner(self, user_id, service_id):
        """Count a request of the user or service a valid token belongs to."""
        if user_id is not None:
            self.check(f"user:{user_id}", self.config["RATE_LIMIT_PER_MINUTE"])
        else:
            self.check(f"service:{service_id}", self.config["SERVICE_RATE_LIMIT_PER_MINUTE"])

    def check_failure(self, req):
        """Count a failed authentication of the request's client address."""
        address = client_address(req, self.config["TRUSTED_PROXIES"])
        self.check(f"address:{address}", self.config["AUTH_FAILURES_PER_MINUTE"])


def client_address(req, trusted):
    """Where a request comes from, as a rate-limit key: the peer address, or, when the peer is
    a trusted proxy, the right-most X-Forwarded-For address that is not one. IPv6 clients
    count by /64 (one host commonly holds a whole /64)."""
    address = parse_address(req.remote_addr)
    if address is None:
        return log_safe(req.remote_addr)  # not an IP peer (a unix socket): one bucket
    if any(address in network for network in trusted):
        hops = ",".join(req.headers.getlist("X-Forwarded-For")).split(",")
        for hop in reversed([hop.strip() for hop in hops if hop.strip()]):
            forwarded = parse_address(hop)
            if forwarded is None:
                break  # not an address: what lies further left is anybody's word
            address = forwarded
            if not any(address in network for network in trusted):
                break
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def parse_address(text):
    """An IP address (IPv4-mapped IPv6 as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


def authenticate(kind):
    """The user or service behind the bearer token; aborts with 401/403/429 otherwise.

    Every request with a valid token counts against its user's or service's budget; every
    unknown token against its client address's budget of failures.
    """
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        abort(401, "M_MISSING_TOKEN", "Missing access token")
    limits = current_app.extensions.get("push_rate_limits")  # None: limits are off
    found = rows(TOKEN_OWNER, token_digest(token))
    if not found:
        if limits:
            limits.check_failure(request)
        abort(401, "M_UNKNOWN_TOKEN", "Unknown or revoked access token")
    user_id, service_id = found[0]
    if limits:
        limits.check_owner(user_id, service_id)
    owner_id = user_id if kind == "user" else service_id
    if owner_id is None:
        abort(403, "M_FORBIDDEN", f"This endpoint needs a {kind} token")
    return owner_id


def authenticate_first(kind):
    """before_request hook: check the token (g.user_id or g.service_id) before any body is read.

    So a caller without a valid token learns nothing from validation errors, and every
    request, well-formed or not, counts against the rate limit.
    """
    if request.method != "OPTIONS":
        setattr(g, f"{kind}_id", authenticate(kind))


# --- pushers --------------------------------------------------------------------------------

pushers_blp = PushBlueprint("pushers", __name__, token="user",
                            description="Register devices (pushers)")


def pusher_out(row):
    """A pusher (a row of models.PUSHERS_OF) as the client sees it: never the iss or a key."""
    (pushkey, kind, app_id, app_display_name, device_display_name, lang, data, pushkey_ts,
     profile_tag, key_identifier) = row
    out = {
        "pushkey": pushkey,
        "kind": kind,
        "app_id": app_id,
        "app_display_name": app_display_name,
        "device_display_name": device_display_name,
        "lang": lang,
        "data": json.loads(data),
        "pushkey_ts": pushkey_ts,
    }
    if profile_tag is not None:
        out["profile_tag"] = profile_tag
    if key_identifier is not None:
        out["encryption"] = {"method": "aes-hmac-sha256", "key_identifier": key_identifier}
    return out


def json_response(body):
    """``body`` as the JSON answer flask-smorest would make of it, without the schema's dump.

    For views whose answer is already of their documented shape: flask-smorest passes a
    Response through untouched (the schema then only documents it), and marshmallow's dump
    of a list of pushers cost more than building it.
    """
    return current_app.json.response(body)


def register_key(encryption, fingerprint):
    """The id of the stored key for this key_identifier; made from the iss on first sight.

    A known key_identifier with a different iss (``fingerprint``: the iss's fingerprint) is
    refused; with the same iss, the ratchet stays where it is.
    """
    key_identifier = encryption["key_identifier"]
    found = rows(KEY_BY_IDENTIFIER, key_identifier)
    if found:
        key_id, stored_fingerprint = found[0]
        if not secrets.compare_digest(stored_fingerprint, fingerprint):
            abort(400, "M_INVALID_PARAM", "key_identifier is already in use with a different iss")
        return key_id
    server_key = current_app.extensions["push_server_key"]
    generation = crypto.first_generation(bytes.fromhex(encryption["iss"]),
                                         encryption["time_iss_created"])
    return EncryptionKey.create(
        key_identifier=key_identifier,
        iss_fingerprint=fingerprint,
        period=generation.period,
        sealed=server_key.seal_generation(key_identifier, generation),
    ).id


@pushers_blp.route("/pushers")
class Pushers(MethodView):
    @pushers_blp.response(200, PushersSchema)
    @pushers_blp.errors()
    def get(self):
        """List the caller's pushers, oldest first."""
        return json_response({"pushers": [pusher_out(row) for row in rows(PUSHERS_OF, g.user_id)]})


@pushers_blp.route("/pushers/set")
class PusherSet(MethodView):
    @pushers_blp.arguments(PusherSetSchema())
    @pushers_blp.response(200, EmptySchema)
    @pushers_blp.errors(400, 413)
    def post(self, body):
        """Create, update (kind "http") or delete (kind null) one pusher of the caller."""
        user_id = g.user_id
        if body["kind"] is None:
            match = ((Pusher.user == user_id) & (Pusher.app_id == body["app_id"])
                     & (Pusher.pushkey == body["pushkey"]))
            with transaction():
                for pusher in Pusher.select().where(match):
                    delete_pusher(pusher, "removed by its user")
            return {}

        encryption = body.get("encryption")
        policy = current_app.config["ENCRYPTION"]
        if policy == "required" and not encryption:
            abort(400, "M_MISSING_PARAM", "Missing parameters: encryption")
        if policy == "forbidden" and encryption:
            abort(400, "M_INVALID_PARAM", "This server does not accept encryption")

        values = {
            "kind": body["kind"],
            "app_display_name": body["app_display_name"],
            "device_display_name": body["device_display_name"],
            "profile_tag": body.get("profile_tag"),
            "lang": body["lang"],
            "data": compact_json(body["data"]).decode(),
            "pushkey_ts": now(),
        }
        # What needs no lock is read or worked out before the transaction, which holds the
        # one writer lock: every other write of the host waits while it is open.
        fingerprint = current_app.extensions["push_server_key"].iss_fingerprint(
            bytes.fromhex(encryption["iss"])) if encryption else None
        name = user_name(user_id)
        # On PostgreSQL two requests can still both find "no such row" and both insert (the
        # user's row lock serializes one user, not a key_identifier shared across users): the
        # loser gets IntegrityError, and a second try then sees the winner's row.
        for attempt in (1, 2):
            try:
                with transaction():
                    lock_user(user_id)
                    save_pusher(user_id, name, body, values, encryption, fingerprint)
                return {}
            except IntegrityError:
                if attempt == 2:
                    raise


def save_pusher(user_id, name, body, values, encryption, fingerprint):
    """The write half of POST /pushers/set, inside the caller's transaction (``name``: the
    user's, for the audit trail)."""
    app_id, pushkey = body["app_id"], body["pushkey"]
    key_id = register_key(encryption, fingerprint) if encryption else None
    found = rows(PUSHER_OF, user_id, app_id, pushkey)
    if not found:
        limit = current_app.config["MAX_PUSHERS_PER_USER"]
        if Pusher.select().where(Pusher.user == user_id).count() >= limit:
            abort(403, "M_RESOURCE_LIMIT_EXCEEDED", f"A user may have at most {limit} pushers")
        Pusher.create(user=user_id, app_id=app_id, pushkey=pushkey, encryption_key=key_id,
                      **values)
        audit(name, app_id, pushkey, "registered", "registered by its user")
    else:
        pusher_id, old_key = found[0]
        run(UPDATE_PUSHER, values["kind"], values["app_display_name"],
            values["device_display_name"], values["profile_tag"], values["lang"],
            values["data"], values["pushkey_ts"], key_id, pusher_id)
        if old_key is not None and old_key != key_id:
            drop_unused_key(old_key)
        audit(name, app_id, pushkey, "updated", "updated by its user")
    if not body["append"] and rows(OTHER_OWNERS, app_id, pushkey, user_id):
        others = Pusher.select().where((Pusher.app_id == app_id) & (Pusher.pushkey == pushkey)
                                       & (Pusher.user != user_id))
        for other in others:
            delete_pusher(other, f"taken over by user {name} (append: false)")


# --- channels -------------------------------------------------------------------------------

channels_blp = PushBlueprint("channels", __name__, token="user",
                             description="Pick notification channels")


class PushkeyConverter(PathConverter):
    """A pushkey in a URL: like ``path``, but it may also start with a slash (base64 can)."""

    regex = ".+"
    part_isolating = False  # Werkzeug would infer True from a regex without "/"



def not_found_if_nul(value, message):
    """404 for a path value with a NUL: nothing stored can hold one, and PostgreSQL would
    refuse the query (psycopg2 raises ValueError: a 500)."""
    if "\x00" in value:
        abort(404, "M_NOT_FOUND", message)


def own_device_or_404(user_id, pushkey):
    """404 unless the caller has a pusher with this pushkey."""
    not_found_if_nul(pushkey, "No pusher with this pushkey")
    if not rows(DEVICE_EXISTS, user_id, pushkey):
        abort(404, "M_NOT_FOUND", "No pusher with this pushkey")


@channels_blp.route("/channels")
class Channels(MethodView):
    @channels_blp.response(200, ChannelsSchema)
    @channels_blp.errors()
    def get(self):
        """The channel catalogue with each channel's default status."""
        channels = Channel.select().order_by(Channel.id)
        return {"channels": [{"id": c.id, "status": c.default_status} for c in channels]}


@channels_blp.route("/channels/<pushkey:pushkey>", merge_slashes=False)
class DeviceChannels(MethodView):
    @channels_blp.response(200, ChannelsSchema)
    @channels_blp.errors(404)
    def get(self, pushkey):
        """Every catalogue channel with the state in effect for this device.

        The device's own state (enabled, disabled or not_set), else the channel's default.
        """
        user_id = g.user_id
        own_device_or_404(user_id, pushkey)
        return json_response({"channels": [{"id": channel_id, "status": status} for
                                           channel_id, status in rows(DEVICE_CHANNELS, user_id,
                                                                      pushkey)]})

    @channels_blp.arguments(ChannelsUpdateSchema())
    @channels_blp.response(200, EmptySchema)
    @channels_blp.errors(400, 404, 413)
    def post(self, body, pushkey):
        """Change some channel states of this device; all or nothing.

        Channels not named stay as they are. not_set is stored like the other two and counts
        as disabled (an unset channel is treated as disabled, as upstream says); only a channel
        the device never set follows the channel's default.
        """
        user_id = g.user_id
        changes = body["channels"]
        names = [change["name"] for change in changes]
        duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
        if duplicates:
            abort(400, "M_INVALID_PARAM", f"Channel named more than once: {', '.join(duplicates)}")
        with transaction():
            own_device_or_404(user_id, pushkey)
            known = {cid for (cid,) in rows(KNOWN_CHANNELS.format(marks(len(names))), *names)
                     } if names else set()
            unknown = [n for n in names if n not in known]
            if unknown:
                abort(400, "M_INVALID_PARAM", f"Unknown channel: {', '.join(unknown)}")
            if changes:
                run(SET_CHANNEL_STATES.format(marks(len(changes), "(?, ?, ?, ?)")),
                    *[value for c in changes for value in (user_id, pushkey, c["name"],
                                                           c["value"])])
        return {}


# --- sending --------------------------------------------------------------------------------

notifications_blp = PushBlueprint("notifications", __name__, token="service",
                                  description="Send notifications (service token)")


@notifications_blp.route("/notifications")
class Notifications(MethodView):
    @notifications_blp.arguments(NotificationRequestSchema())
    @notifications_blp.response(202, NotificationCreatedSchema)
    @notifications_blp.errors(400, 413)
    def post(self, body):
        """Queue one notification for every subscribed device of a user."""
        try:
            notification_id, deliveries, new = queue_notification(
                g.service_id, body["user_id"], body["channel"], compact_json(body["payload"]),
                body["prio"], body.get("counts"), body.get("identifier"))
        except NotQueued as e:
            abort(e.status, e.errcode, str(e))
        if new:
            metrics.notification_accepted()
        if new and deliveries:
            delivery.wake()
        return {"notification_id": notification_id, "deliveries": deliveries}


# --- history --------------------------------------------------------------------------------

history_blp = PushBlueprint("history", __name__, token="user",
                            description="Notifications sent to the caller")


def message_out(notification):
    return {"identifier": notification.id, "payload": json.loads(notification.payload)}


@history_blp.route("/history/<string:notification_id>")
class HistoryItem(MethodView):
    @history_blp.response(200, MessageSchema)
    @history_blp.errors(404)
    def get(self, notification_id):
        """One notification sent to the caller."""
        user_id = g.user_id
        not_found_if_nul(notification_id, "No such notification")
        notification = Notification.get_or_none((Notification.id == notification_id)
                                                 & (Notification.user == user_id))
        if notification is None:
            abort(404, "M_NOT_FOUND", "No such notification")
        return message_out(notification)


@history_blp.route("/history/device/<pushkey:pushkey>", merge_slashes=False)
class DeviceHistory(MethodView):
    @history_blp.response(200, MessagesSchema)
    @history_blp.errors(404)
    def get(self, pushkey):
        """Notifications addressed to one of the caller's devices, newest first."""
        user_id = g.user_id
        not_found_if_nul(pushkey, "No pusher with this pushkey")
        messages = [{"identifier": notification_id, "payload": json.loads(payload)}
                    for notification_id, payload in rows(
                        DEVICE_HISTORY, user_id, pushkey, current_app.config["HISTORY_LIMIT"])]
        if not messages:
            own_device_or_404(user_id, pushkey)
        return json_response({"messages": messages})


# --- seed-era paths ---------------------------------------------------------------------------

#: The client API under the paths of the seed's fd_openapi.yaml, which real clients (the
#: E-Rezept server and apps) still call: the same views, so the same behaviour, auth and errors.
SEED_ERA_ROUTES = (
    ("/pushers/v1", Pushers),
    ("/pushers/v1/set", PusherSet),
    ("/channels/v1", Channels),
    ("/channels/v1/<pushkey:pushkey>", DeviceChannels),
)

# A plain Flask blueprint: flask-smorest documents only what goes through its Api, and the
# OpenAPI document describes each operation once, under /push/v1 (the seed's own YAML
# describes these paths for the clients that use them).
seed_era_blp = flask.Blueprint("seed_era", __name__)
seed_era_blp.before_request(lambda: authenticate_first("user"))
for rule, view in SEED_ERA_ROUTES:
    seed_era_blp.add_url_rule(rule, view_func=view.as_view(view.__name__), merge_slashes=False)
