"""The push-notification service: app factory, errors, auth and the HTTP API.

Run it with ``flask --app app run`` (development) or ``gunicorn 'app:create_app()'``. The
operator commands are in ``cli.py``, delivery in ``delivery.py`` and ``gateway.py``.
"""

import json
import logging
import math
import os
import re
import secrets
import threading
import time
import uuid
from collections import Counter

from flask import Flask, current_app, g, request
from flask.views import MethodView
from flask_smorest import Api, Blueprint
from flask_smorest import abort as smorest_abort
from peewee import EXCLUDED, JOIN, IntegrityError, fn
from webargs.flaskparser import FlaskParser
from werkzeug.routing import PathConverter

import cli
import crypto
import delivery
from models import (
    Channel,
    ChannelState,
    Delivery,
    EncryptionKey,
    Notification,
    Pusher,
    Token,
    User,
    create_schema,
    db,
    delete_pusher,
    drop_unused_key,
    lock_user,
    now,
    open_database,
    sqlite_path,
    token_digest,
    transaction,
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
    "GATEWAY_CONNECT_TIMEOUT": 5.0,
    "GATEWAY_READ_TIMEOUT": 10.0,
    "GATEWAY_MAX_RESPONSE_BYTES": 65536,
    "GATEWAY_CONCURRENCY": 4,
    "GATEWAY_PAUSE_INITIAL_SECONDS": 5.0,
    "GATEWAY_PAUSE_MAX_SECONDS": 300.0,
    "WORKER_THREADS": 8,
    "WORKER_CLAIM": 200,
    "WORKER_POLL_SECONDS": 1.0,
    "DELIVERY_LEASE_SECONDS": 120.0,
}

ENCRYPTION_POLICIES = ("optional", "required", "forbidden")
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
    setup_logging()
    for name in unread:
        log.warning("%s, but no setting reads it", name)

    url = app.config["DATABASE_URL"] or sqlite_path(app.instance_path)
    db.initialize(open_database(url))
    create_schema(os.path.join(app.instance_path, ".schema.lock"))
    app.extensions["push_server_key"] = crypto.ServerKey.load(
        app.config["SERVER_KEY"], os.path.join(app.instance_path, "server.key")
    )
    app.extensions["push_rate_limiter"] = RateLimiter()

    @app.before_request
    def open_connection():
        db.connect(reuse_if_open=True)

    @app.teardown_request
    def close_connection(exc):
        if not db.is_closed():
            db.close()

    @app.get("/healthz")
    def healthz():
        """Liveness and database check."""
        db.execute_sql("SELECT 1")
        return {"status": "ok"}

    app.url_map.converters["pushkey"] = PushkeyConverter
    api = PushApi(app)
    for blueprint in (pushers_blp, channels_blp, notifications_blp, history_blp):
        api.register_blueprint(blueprint, url_prefix=PREFIX)
    api.spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    for name, constraints in SCHEMA_CONSTRAINTS.items():
        api.spec.components.schemas[name].update(constraints)

    cli.init_app(app)
    delivery.init_app(app)
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
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL="https://cdn.jsdelivr.net/npm/swagger-ui-dist/",
        # Every operation needs a bearer token: said once for the whole document.
        API_SPEC_OPTIONS={"security": [{"bearer": []}]},
    )
    known = set(app.config)
    os.makedirs(app.instance_path, mode=0o700, exist_ok=True)
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


def setup_logging():
    """Log to stderr at INFO (unless the host set up logging), pushkeys redacted, no SQL."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # peewee's DEBUG lines carry query parameters (pushkeys, token digests): keep them out.
    logging.getLogger("peewee").setLevel(logging.INFO)
    for name in ("werkzeug", "gunicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactPushkeys) for f in logger.filters):
            logger.addFilter(RedactPushkeys())


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
        config["GATEWAY_ALLOWLIST"] = [p.strip() for p in allowlist.split(",") if p.strip()]
    request_time = config["GATEWAY_CONNECT_TIMEOUT"] + config["GATEWAY_READ_TIMEOUT"]
    if config["DELIVERY_LEASE_SECONDS"] <= request_time:
        raise RuntimeError("PUSH_DELIVERY_LEASE_SECONDS must exceed PUSH_GATEWAY_CONNECT_TIMEOUT"
                           " + PUSH_GATEWAY_READ_TIMEOUT: a worker sends nothing it might still"
                           " be sending when its lease runs out")
    if config["ENCRYPTION"] not in ENCRYPTION_POLICIES:
        raise RuntimeError(f"PUSH_ENCRYPTION must be one of {', '.join(ENCRYPTION_POLICIES)}")


class RedactPushkeys(logging.Filter):
    """Shortens pushkeys in access-log request lines (they sit in some URL paths)."""

    PATTERN = re.compile(r"(/channels/|/history/device/)([^\s?\"]{6})[^\s?\"]*")

    def filter(self, record):
        message = record.getMessage()
        if "/channels/" in message or "/history/device/" in message:
            record.msg, record.args = self.PATTERN.sub(r"\1\2…", message), ()
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


class JSONBodyParser(FlaskParser):
    """Reads any request body as JSON (whatever its Content-Type) and maps errors to errcodes."""

    # What handle_error answers, and so what flask-smorest documents (not webargs' 422).
    DEFAULT_VALIDATION_STATUS = 400

    def _raw_load_json(self, req):
        data = req.get_data(cache=True)
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


class RateLimiter:
    """A per-token budget per fixed one-minute window, per process (a guard, not a quota)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.windows = {}

    def check(self, key, per_minute):
        """Return the milliseconds to wait, or 0 when the request may go ahead."""
        current = time.monotonic()
        with self.lock:
            start, count = self.windows.get(key, (current, 0))
            if current - start >= 60:
                start, count = current, 0
            if count >= per_minute:
                return int((start + 60 - current) * 1000) + 1
            self.windows[key] = (start, count + 1)
            if len(self.windows) > 100_000:
                self.windows = {k: v for k, v in self.windows.items() if current - v[0] < 60}
            return 0


def authenticate(kind):
    """The user or service behind the bearer token; aborts with 401/403/429 otherwise."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        abort(401, "M_MISSING_TOKEN", "Missing access token")
    digest = token_digest(token)
    row = Token.get_or_none((Token.digest == digest) & Token.revoked_at.is_null())
    if row is None:
        abort(401, "M_UNKNOWN_TOKEN", "Unknown or revoked access token")
    owner_id = row.user_id if kind == "user" else row.service_id
    if owner_id is None:
        abort(403, "M_FORBIDDEN", f"This endpoint needs a {kind} token")
    if current_app.config["RATE_LIMIT_ENABLED"]:
        limit = current_app.config[
            "RATE_LIMIT_PER_MINUTE" if kind == "user" else "SERVICE_RATE_LIMIT_PER_MINUTE"]
        wait_ms = current_app.extensions["push_rate_limiter"].check(digest, limit)
        if wait_ms:
            abort(429, "M_LIMIT_EXCEEDED", "Too many requests", retry_after_ms=wait_ms)
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


def pusher_out(pusher):
    """A pusher as the client sees it: never the iss or a key."""
    out = {
        "pushkey": pusher.pushkey,
        "kind": pusher.kind,
        "app_id": pusher.app_id,
        "app_display_name": pusher.app_display_name,
        "device_display_name": pusher.device_display_name,
        "lang": pusher.lang,
        "data": json.loads(pusher.data),
        "pushkey_ts": pusher.pushkey_ts,
    }
    if pusher.profile_tag is not None:
        out["profile_tag"] = pusher.profile_tag
    if pusher.encryption_key_id is not None:
        out["encryption"] = {"method": "aes-hmac-sha256",
                             "key_identifier": pusher.encryption_key.key_identifier}
    return out


def register_key(encryption):
    """The stored key for this key_identifier; made from the iss on first sight.

    A known key_identifier with a different iss is refused; with the same iss, the ratchet
    stays where it is.
    """
    server_key = current_app.extensions["push_server_key"]
    iss = bytes.fromhex(encryption["iss"])
    fingerprint = server_key.iss_fingerprint(iss)
    key_identifier = encryption["key_identifier"]
    key = EncryptionKey.get_or_none(EncryptionKey.key_identifier == key_identifier)
    if key is not None:
        if not secrets.compare_digest(key.iss_fingerprint, fingerprint):
            abort(400, "M_INVALID_PARAM", "key_identifier is already in use with a different iss")
        return key
    generation = crypto.first_generation(iss, encryption["initial_key_period"])
    return EncryptionKey.create(
        key_identifier=key_identifier,
        iss_fingerprint=fingerprint,
        period=generation.period,
        sealed=server_key.seal_generation(key_identifier, generation),
    )


@pushers_blp.route("/pushers")
class Pushers(MethodView):
    @pushers_blp.response(200, PushersSchema)
    @pushers_blp.errors()
    def get(self):
        """List the caller's pushers, oldest first."""
        user_id = g.user_id
        pushers = (Pusher.select(Pusher, EncryptionKey)
                   .join(EncryptionKey, JOIN.LEFT_OUTER)
                   .where(Pusher.user == user_id)
                   .order_by(Pusher.created_at, Pusher.id))
        return {"pushers": [pusher_out(p) for p in pushers]}


@pushers_blp.route("/pushers/set")
class PusherSet(MethodView):
    @pushers_blp.arguments(PusherSetSchema)
    @pushers_blp.response(200, EmptySchema)
    @pushers_blp.errors(400, 413)
    def post(self, body):
        """Create, update (kind "http") or delete (kind null) one pusher of the caller."""
        user_id = g.user_id
        match = ((Pusher.user == user_id) & (Pusher.app_id == body["app_id"])
                 & (Pusher.pushkey == body["pushkey"]))
        if body["kind"] is None:
            with transaction():
                for pusher in Pusher.select().where(match):
                    delete_pusher(pusher)
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
        # On PostgreSQL two requests can still both find "no such row" and both insert (the
        # user's row lock serializes one user, not a key_identifier shared across users): the
        # loser gets IntegrityError, and a second try then sees the winner's row.
        for attempt in (1, 2):
            try:
                with transaction():
                    lock_user(user_id)
                    save_pusher(user_id, body, values, encryption)
                return {}
            except IntegrityError:
                if attempt == 2:
                    raise


def save_pusher(user_id, body, values, encryption):
    """The write half of POST /pushers/set, inside the caller's transaction."""
    match = ((Pusher.user == user_id) & (Pusher.app_id == body["app_id"])
             & (Pusher.pushkey == body["pushkey"]))
    values["encryption_key"] = register_key(encryption) if encryption else None
    pusher = Pusher.get_or_none(match)
    if pusher is None:
        limit = current_app.config["MAX_PUSHERS_PER_USER"]
        if Pusher.select().where(Pusher.user == user_id).count() >= limit:
            abort(403, "M_RESOURCE_LIMIT_EXCEEDED", f"A user may have at most {limit} pushers")
        Pusher.create(user=user_id, app_id=body["app_id"], pushkey=body["pushkey"], **values)
    else:
        old_key = pusher.encryption_key_id
        Pusher.update(values).where(Pusher.id == pusher.id).execute()
        if old_key is not None and old_key != getattr(values["encryption_key"], "id", None):
            drop_unused_key(old_key)
    if not body["append"]:
        others = Pusher.select().where(
            (Pusher.app_id == body["app_id"]) & (Pusher.pushkey == body["pushkey"])
            & (Pusher.user != user_id))
        for other in others:
            delete_pusher(other)


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
    exists = Pusher.select().where((Pusher.user == user_id) & (Pusher.pushkey == pushkey)).exists()
    if not exists:
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
        """Every catalogue channel with this device's state: enabled, disabled or not_set."""
        user_id = g.user_id
        own_device_or_404(user_id, pushkey)
        states = dict(
            ChannelState.select(ChannelState.channel, ChannelState.status)
            .where((ChannelState.user == user_id) & (ChannelState.pushkey == pushkey))
            .tuples()
        )
        channels = Channel.select(Channel.id).order_by(Channel.id).tuples()
        return {"channels": [{"id": cid, "status": states.get(cid, "not_set")}
                             for (cid,) in channels]}

    @channels_blp.arguments(ChannelsUpdateSchema)
    @channels_blp.response(200, EmptySchema)
    @channels_blp.errors(400, 404, 413)
    def post(self, body, pushkey):
        """Change some channel states of this device; all or nothing."""
        user_id = g.user_id
        changes = body["channels"]
        names = [change["name"] for change in changes]
        duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
        if duplicates:
            abort(400, "M_INVALID_PARAM", f"Channel named more than once: {', '.join(duplicates)}")
        with transaction():
            own_device_or_404(user_id, pushkey)
            known = {cid for (cid,) in Channel.select(Channel.id).where(Channel.id.in_(names))
                     .tuples()} if names else set()
            unknown = [n for n in names if n not in known]
            if unknown:
                abort(400, "M_INVALID_PARAM", f"Unknown channel: {', '.join(unknown)}")
            device = (ChannelState.user == user_id) & (ChannelState.pushkey == pushkey)
            cleared = [c["name"] for c in changes if c["value"] == "not_set"]
            if cleared:
                ChannelState.delete().where(device & ChannelState.channel.in_(cleared)).execute()
            rows = [{"user": user_id, "pushkey": pushkey, "channel": c["name"],
                     "status": c["value"]} for c in changes if c["value"] != "not_set"]
            if rows:
                (ChannelState.insert_many(rows)
                 .on_conflict(conflict_target=[ChannelState.user, ChannelState.pushkey,
                                               ChannelState.channel],
                              update={ChannelState.status: EXCLUDED.status})
                 .execute())
        return {}


# --- sending --------------------------------------------------------------------------------

notifications_blp = PushBlueprint("notifications", __name__, token="service",
                                  description="Send notifications (service token)")


def recipients(user_id, channel):
    """The user's pushers whose device gets ``channel`` (explicit state, else the default)."""
    state = ChannelState.alias()
    on = ((state.user == Pusher.user) & (state.pushkey == Pusher.pushkey)
          & (state.channel == channel.id))
    wanted = state.status == "enabled"
    if channel.default_status == "enabled":
        wanted = wanted | state.status.is_null()
    return (Pusher.select(Pusher.id, Pusher.pushkey)
            .join(state, JOIN.LEFT_OUTER, on=on)
            .where((Pusher.user == user_id) & wanted)
            .order_by(Pusher.id))


@notifications_blp.route("/notifications")
class Notifications(MethodView):
    @notifications_blp.arguments(NotificationRequestSchema)
    @notifications_blp.response(202, NotificationCreatedSchema)
    @notifications_blp.errors(400, 413)
    def post(self, body):
        """Queue one notification for every subscribed device of a user."""
        service_id = g.service_id
        payload = compact_json(body["payload"])
        if len(payload) > crypto.MAX_PAYLOAD_BYTES:
            abort(413, "M_TOO_LARGE", f"payload is {len(payload)} bytes of JSON;"
                                      f" at most {crypto.MAX_PAYLOAD_BYTES} fit")
        channel = Channel.get_or_none(Channel.id == body["channel"])
        if channel is None:
            abort(400, "M_INVALID_PARAM", f"Unknown channel: {body['channel']}")
        identifier = body.get("identifier")
        try:
            with transaction():
                if identifier is not None:
                    earlier = Notification.get_or_none((Notification.service == service_id)
                                                       & (Notification.identifier == identifier))
                    if earlier is not None:
                        return created(earlier.id)
                user = User.get_or_none(User.name == body["user_id"])
                created_at = time.time()
                notification = Notification.create(
                    id=uuid.uuid4().hex, service=service_id, identifier=identifier,
                    user=user, channel=channel.id, payload=payload.decode(), prio=body["prio"],
                    counts=json.dumps(body["counts"]) if "counts" in body else None,
                    created_at=created_at,
                )
                rows = [] if user is None else [
                    {"notification": notification.id, "pusher": p.id, "user": user.id,
                     "pushkey": p.pushkey, "next_attempt_at": created_at,
                     "created_at": created_at}
                    for p in recipients(user.id, channel)
                ]
                for start in range(0, len(rows), 500):
                    Delivery.insert_many(rows[start:start + 500]).execute()
        except IntegrityError:
            # The same identifier raced in from another process; answer with the winner.
            earlier = Notification.get((Notification.service == service_id)
                                       & (Notification.identifier == identifier))
            return created(earlier.id)
        if rows:
            delivery.wake()
        return {"notification_id": notification.id, "deliveries": len(rows)}


def created(notification_id):
    """The 202 body of an already stored notification."""
    count = Delivery.select().where(Delivery.notification == notification_id).count()
    return {"notification_id": notification_id, "deliveries": count}


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
        notifications = (Notification.select(Notification.id, Notification.payload)
                         .join(Delivery)
                         .where((Delivery.user == user_id) & (Delivery.pushkey == pushkey))
                         .group_by(Notification.id, Notification.payload)
                         .order_by(fn.MAX(Notification.created_at).desc(), Notification.id.desc())
                         .limit(current_app.config["HISTORY_LIMIT"]))
        messages = [message_out(n) for n in notifications]
        if not messages:
            own_device_or_404(user_id, pushkey)
        return {"messages": messages}
