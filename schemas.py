"""Request and response schemas (marshmallow 4) and the mapping of their errors to errcodes.

Types are strict: a JSON string is a string, a boolean a boolean, an integer an integer.
Unknown top-level keys are dropped (clients send extras); missing fields, wrong types and bad
values each map to their own errcode (SPEC section 3).
"""

import ipaddress
import json
import re
from urllib.parse import unquote, urlsplit

from flask import current_app
from marshmallow import (
    EXCLUDE,
    Schema,
    ValidationError,
    fields,
    validate,
    validates,
    validates_schema,
)

REQUIRED_MESSAGE = fields.Field.default_error_messages["required"]
STATUSES = ("enabled", "disabled", "not_set")
GATEWAY_PATHS = ("/_matrix/push/v1/notify", "/push/v1/notify", "/push/v1/", "/push/v1")
MAX_DATA_BYTES = 4096
# ASCII digits only, years 2000..2999 (an older start would make the first send ratchet
# through thousands of months); matched in full (FullRegexp), since "$" alone would let a
# trailing newline through.
PERIOD = re.compile(r"^2[0-9]{3}-(0[1-9]|1[0-2])$")
HEX256 = re.compile(r"^[0-9a-fA-F]{64}$")
# Gateway URLs: the characters RFC 3986 lets a URL hold (anything else must be
# percent-encoded), a DNS label (letters, digits, inner hyphens: RFC 1123), and what
# normalising a URL needs (RFC 3986 section 6.2.2).
URL_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")
BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
UNRESERVED = re.compile(r"[A-Za-z0-9\-._~]")
DEFAULT_PORTS = {"http": 80, "https": 443}


def compact_json(value):
    """The compact UTF-8 JSON of a value, as stored and as sealed."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class Text(fields.String):
    """A string without NUL characters: PostgreSQL text cannot hold one (psycopg2 raises)."""

    default_error_messages = {"nul": "Must not contain NUL characters."}

    def __init__(self, **kwargs):
        kwargs["metadata"] = {"pattern": "^[^\\u0000]*$", **kwargs.get("metadata", {})}
        super().__init__(**kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in value:
            raise self.make_error("nul")
        return value


class FullRegexp(validate.Regexp):
    """A Regexp that must match the whole string ("$" with re.match lets a final newline by)."""

    def __call__(self, value):
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


MAX_DEPTH = 32


def json_depth(value):
    """How deeply objects and arrays nest in a JSON value (a scalar is 0)."""
    depth, level = 0, [value]
    while level := [node for node in level if isinstance(node, (dict, list))]:
        depth += 1
        level = [child for node in level
                 for child in (node.values() if isinstance(node, dict) else node)]
    return depth


class BoundedDict(fields.Dict):
    """A JSON object nested at most MAX_DEPTH deep (deeper ones strain every encoder on the way
    to the phone)."""

    default_error_messages = {"depth": f"Must nest at most {MAX_DEPTH} levels deep."}

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if json_depth(value) > MAX_DEPTH:
            raise self.make_error("depth")
        return value


class StrictBoolean(fields.Boolean):
    """A boolean that accepts only JSON true and false."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class StrictInteger(fields.Integer):
    """An integer that accepts only JSON integers (not booleans, floats or strings)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


def utf8_length(low, high):
    """A validator for a string's length in UTF-8 bytes."""

    def check(value):
        size = len(value.encode())
        if not low <= size <= high:
            raise ValidationError(f"Length must be between {low} and {high} bytes.")

    return check


# Messages that mean "this has the wrong JSON type": mapped to M_BAD_JSON, not M_INVALID_PARAM.
TYPE_MESSAGES = {
    fields.Field.default_error_messages["null"],
    fields.String.default_error_messages["invalid"],
    fields.Boolean.default_error_messages["invalid"],
    fields.Integer.default_error_messages["invalid"],
    fields.Mapping.default_error_messages["invalid"],
    fields.List.default_error_messages["invalid"],
    fields.Nested.default_error_messages["type"],
    Schema.error_messages.get("type", "Invalid input type."),
}


def classify(messages):
    """Turn marshmallow's error messages into (errcode, human text)."""
    found = {"missing": [], "type": [], "invalid": []}

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, path if key == "_schema" else path + [str(key)])
        elif isinstance(node, list):
            for message in node:
                walk(message, path)
        else:
            name = ".".join(path) or "body"
            if node == REQUIRED_MESSAGE:
                if name not in found["missing"]:
                    found["missing"].append(name)
            elif node in TYPE_MESSAGES:
                found["type"].append(f"{name}: {node}")
            else:
                found["invalid"].append(f"{name}: {node}")

    walk(messages, [])
    if found["type"]:
        return "M_BAD_JSON", "Wrong type: " + "; ".join(found["type"])
    if found["missing"]:
        return "M_MISSING_PARAM", "Missing parameters: " + ", ".join(found["missing"])
    return "M_INVALID_PARAM", "Invalid parameter: " + "; ".join(found["invalid"])


class ClientSchema(Schema):
    class Meta:
        unknown = EXCLUDE


class EncryptionSchema(ClientSchema):
    """A pusher's ``encryption``, with the field names of upstream-latest's fd_openapi.yaml."""

    method = fields.String(
        required=True, validate=validate.OneOf(["aes-hmac-sha256"]),
        metadata={"description": "The encryption method; only aes-hmac-sha256 (AES-GCM with a "
                                 "key derived by HKDF)"},
    )
    time_iss_created = fields.String(
        validate=FullRegexp(PERIOD, error="Must be YYYY-MM."),
        metadata={"description": "The first period (YYYY-MM) the key chain is generated for"},
    )
    initial_key_period = fields.String(
        load_only=True,
        validate=FullRegexp(PERIOD, error="Must be YYYY-MM."),
        metadata={"description": "Seed-era name of time_iss_created, accepted as its alias",
                  "deprecated": True},
    )
    iss = fields.String(
        required=True,
        load_only=True,
        validate=FullRegexp(HEX256, error="Must be 64 hex characters."),
        metadata={"description": "The 256-bit initial shared secret, hex; never returned or "
                                 "stored"},
    )
    key_identifier = Text(
        required=True, validate=validate.Length(1, 128),
        metadata={"description": "Names the key (and this service) on the phone; random, never "
                                 "reused for another iss (a UUID is recommended)"},
    )

    @validates_schema
    def period_given(self, data, **kwargs):
        """time_iss_created, or its seed-era alias initial_key_period (the two must agree)."""
        alias = data.pop("initial_key_period", None)
        period = data.setdefault("time_iss_created", alias)
        if period is None:
            raise ValidationError(REQUIRED_MESSAGE, "time_iss_created")
        if alias is not None and alias != period:
            raise ValidationError("Must equal time_iss_created when both are given.",
                                  "initial_key_period")


CONDITIONAL = ("app_display_name", "device_display_name", "lang", "data")

# OpenAPI text of PusherSetSchema.data (the checks themselves are in validate_data).
DATA_DOC = {
    "description": f"At most {MAX_DATA_BYTES} bytes of JSON. url: the push gateway, https (plain "
                   "http only where the operator allows it), path ending in "
                   "/_matrix/push/v1/notify (a Matrix gateway), /push/v1/notify (gematik, single) "
                   "or /push/v1/ or /push/v1 (a gematik base; the endpoint is appended); the "
                   "operator may restrict gateways to an allow-list.",
    "required": ["url"],
    "properties": {
        "url": {"type": "string",
                "pattern": r"^https://[^/?#@\[\]\s:\\]+(/[^?#\s]*)?"
                           r"/(_matrix/push/v1/notify|push/v1/notify|push/v1/?)$"},
        "format": {"type": "string"},
    },
}


class PusherSetSchema(ClientSchema):
    """Body of POST /pushers/set."""

    kind = fields.String(required=True, allow_none=True,
                         metadata={"description": '"http", or null to delete',
                                   "enum": ["http", None]})
    app_id = Text(required=True, validate=validate.Length(1, 64))
    pushkey = Text(required=True, validate=utf8_length(1, 512),
                   metadata={"minLength": 1, "maxLength": 512,
                             "description": "1..512 bytes of UTF-8"})
    app_display_name = Text(validate=validate.Length(max=255))
    device_display_name = Text(validate=validate.Length(max=255))
    profile_tag = Text(allow_none=True, validate=validate.Length(max=255))
    lang = Text(validate=validate.Length(max=32))
    data = BoundedDict(keys=fields.String(), metadata=DATA_DOC)
    append = StrictBoolean(load_default=False)
    encryption = fields.Nested(EncryptionSchema)

    @validates("data")
    def validate_data(self, value, **kwargs):
        """data: bounded size, with a gateway URL we are willing to call."""
        # Errors as {"url": [...]} so that they read "data.url: ..." (a field name given to
        # ValidationError is dropped inside a @validates hook).
        if len(compact_json(value)) > MAX_DATA_BYTES:
            raise ValidationError(f"Must be at most {MAX_DATA_BYTES} bytes of JSON.")
        if "url" not in value:
            raise ValidationError({"url": [REQUIRED_MESSAGE]})
        if not isinstance(value["url"], str):
            raise ValidationError({"url": [fields.String.default_error_messages["invalid"]]})
        if "format" in value and not isinstance(value["format"], str):
            raise ValidationError({"format": [fields.String.default_error_messages["invalid"]]})
        try:
            check_gateway_url(value["url"])
        except ValidationError as error:
            raise ValidationError({"url": error.messages}) from error

    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def required_unless_deleting(self, data, original_data, **kwargs):
        """With a non-null kind the pusher's details are required too.

        Runs even when other fields failed, so that every missing field is named at once; it
        looks at the original body, since a field that failed validation is absent from data.
        """
        if data.get("kind") is None or not isinstance(original_data, dict):
            return
        if data["kind"] != "http":
            raise ValidationError('Only "http" is supported.', "kind")
        missing = {name: [REQUIRED_MESSAGE] for name in CONDITIONAL if name not in original_data}
        if missing:
            raise ValidationError(missing)


def check_gateway_url(url):
    """Raise ValidationError unless ``url`` is a push gateway URL the operator allows.

    Refused: what could never be requested as written (characters a URL may not hold, a host
    that is not a DNS name or an IP address), credentials, fragments and dot segments, which
    a gateway resolves and a prefix comparison does not (``/tenant-a/../tenant-b/``). The
    allow-list is compared with the normalised URL (``normalise_url``).
    """
    config = current_app.config
    error = lambda text: ValidationError(text, "url")  # noqa: E731
    if not URL_CHARACTERS.fullmatch(url) or BAD_PERCENT.search(url):
        raise error("Must be a URL as it goes on the wire: RFC 3986 characters only;"
                    " percent-encode spaces, control characters and non-ASCII.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise error("Not a valid URL.")
    schemes = ("https", "http") if config["ALLOW_HTTP_GATEWAYS"] else ("https",)
    if parts.scheme not in schemes:
        raise error("Must be an https URL." if parts.scheme != "https" else "Not a valid URL.")
    if not parts.hostname or "@" in parts.netloc or "#" in url:
        raise error("Must be an absolute URL with a host and no credentials or fragment.")
    if not valid_host(parts) or port == 0:
        raise error("The host must be a DNS name (an internationalised one in its xn-- form)"
                    " or an IP address.")
    if has_dot_segment(parts.path):
        raise error("The path must not hold . or .. segments.")
    if not parts.path.endswith(GATEWAY_PATHS):
        raise error("Path must end in /_matrix/push/v1/notify, /push/v1/notify, /push/v1/ or"
                    " /push/v1.")
    allowlist = config["GATEWAY_ALLOWLIST"]
    if allowlist and not any(allowed_by(normalise_url(urlsplit(prefix)), normalise_url(parts))
                             for prefix in allowlist):
        raise error("This gateway is not on the server's allow-list.")



def valid_host(parts):
    """Whether the host of a split URL is a DNS name or an IP address we can connect to.

    An internationalised name is taken in its ASCII (``xn--``) form only, and must decode as
    IDNA. A name whose last label is all digits must be a dotted-quad IPv4 address: forms
    such as ``2130706433`` or ``0x7f.1`` reach an address that nobody reading them expects.
    """
    host = parts.hostname
    if "[" in parts.netloc:  # an IPv6 literal (urlsplit checked the brackets)
        try:
            return ipaddress.IPv6Address(host).scope_id is None
        except ValueError:
            return False  # an IPvFuture literal, or garbage
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if len(name) > 253 or not all(DNS_LABEL.fullmatch(label) for label in labels):
        return False
    if labels[-1].isdigit():
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return False
    try:
        name.encode("ascii").decode("idna")
    except UnicodeError:
        return False
    return True


def has_dot_segment(path):
    """Whether a URL path holds a ``.`` or ``..`` segment, also percent-encoded (``%2e``) or
    behind an encoded slash (``..%2f``), which some servers decode before resolving."""
    return any(segment in (".", "..") for segment in re.split(r"[/\\]", unquote(path)))


def normalise_url(parts):
    """A split URL in the form the allow-list is compared in: scheme and host in lower case,
    no default port, percent-escapes in upper case and unreserved characters decoded
    (RFC 3986 section 6.2.2)."""
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    port = parts.port
    if port is not None and port != DEFAULT_PORTS.get(parts.scheme):
        host += f":{port}"
    url = f"{parts.scheme}://{host}{normalise_escapes(parts.path)}"
    return url + f"?{normalise_escapes(parts.query)}" if parts.query else url



def normalise_escapes(text):
    """Percent-escapes in upper case; escaped unreserved characters decoded."""

    def one(match):
        char = chr(int(match.group()[1:], 16))
        return char if UNRESERVED.fullmatch(char) else match.group().upper()

    return re.sub(r"%[0-9A-Fa-f]{2}", one, text)


def allowed_by(prefix, url):
    """Whether ``url`` falls under an allow-list prefix, at a boundary: ``https://gw.example``
    allows ``https://gw.example/...`` but not ``https://gw.example.evil.com/...``."""
    if not url.startswith(prefix):
        return False
    rest = url[len(prefix):]
    return not rest or prefix.endswith("/") or rest[0] in "/?"


class EncryptionOutSchema(Schema):
    method = fields.String()
    key_identifier = fields.String()


class PusherSchema(Schema):
    """A pusher as GET /pushers shows it: no iss, no key."""

    pushkey = fields.String()
    kind = fields.String()
    app_id = fields.String()
    app_display_name = fields.String()
    device_display_name = fields.String()
    profile_tag = fields.String()
    lang = fields.String()
    data = fields.Dict()
    pushkey_ts = fields.Integer()
    encryption = fields.Nested(EncryptionOutSchema)


class PushersSchema(Schema):
    pushers = fields.List(fields.Nested(PusherSchema))


class ChannelStatusSchema(Schema):
    id = fields.String()
    status = fields.String(validate=validate.OneOf(STATUSES))


class ChannelsSchema(Schema):
    channels = fields.List(fields.Nested(ChannelStatusSchema))


class ChannelChangeSchema(ClientSchema):
    """One change: ``{"name", "value"}`` (upstream) or ``{"id", "status"}`` (upstream-latest)."""

    name = Text(validate=validate.Length(1, 255))
    value = fields.String(validate=validate.OneOf(STATUSES))
    id = Text(load_only=True, validate=validate.Length(1, 255))
    status = fields.String(load_only=True, validate=validate.OneOf(STATUSES))

    @validates_schema
    def one_form(self, data, **kwargs):
        """Fold the id/status form into name/value."""
        data.setdefault("name", data.pop("id", None))
        data.setdefault("value", data.pop("status", None))
        missing = {k: [REQUIRED_MESSAGE] for k in ("name", "value") if data[k] is None}
        if missing:
            raise ValidationError(missing)


# For the OpenAPI document: what the schema-level hooks check and marshmallow cannot express
# (added to these components by create_app).
SCHEMA_CONSTRAINTS = {
    # EncryptionSchema.period_given
    "Encryption": {"anyOf": [{"required": ["time_iss_created"]},
                             {"required": ["initial_key_period"]}]},
    # PusherSetSchema.required_unless_deleting: kind null, or the pusher's details
    "PusherSet": {"anyOf": [{"properties": {"kind": {"type": "string", "nullable": True,
                                                     "enum": [None]}}},
                            {"required": list(CONDITIONAL)}]},
    # ChannelChangeSchema.one_form: name (or id) and value (or status)
    "ChannelChange": {"allOf": [{"anyOf": [{"required": ["name"]}, {"required": ["id"]}]},
                                {"anyOf": [{"required": ["value"]}, {"required": ["status"]}]}]},
}


class ChannelsUpdateSchema(ClientSchema):
    """Body of POST /channels/<pushkey>."""

    channels = fields.List(fields.Nested(ChannelChangeSchema), required=True)


class EmptySchema(Schema):
    """An empty JSON object."""


class NotificationRequestSchema(ClientSchema):
    """Body of POST /notifications (sender API)."""

    user_id = Text(required=True, validate=validate.Length(1, 255))
    channel = Text(required=True, validate=validate.Length(1, 255))
    payload = BoundedDict(required=True, keys=fields.String())
    prio = fields.String(load_default="high", validate=validate.OneOf(["high", "low"]))
    counts = fields.Dict(keys=fields.String(), values=StrictInteger())
    identifier = Text(validate=validate.Length(1, 255))


class NotificationCreatedSchema(Schema):
    notification_id = fields.String()
    deliveries = fields.Integer()


class MessageSchema(Schema):
    identifier = fields.String()
    payload = fields.Dict()


class MessagesSchema(Schema):
    messages = fields.List(fields.Nested(MessageSchema))


class ErrorSchema(Schema):
    errcode = fields.String(required=True)
    error = fields.String()
    retry_after_ms = fields.Integer()
