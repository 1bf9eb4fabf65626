"""The schema of the first release (commit d7db622), frozen for the upgrade tests.

Its model definitions, copied as they were, bound to the app's database proxy. Never change
this file: it stands for databases that exist out there.
"""

import time

from peewee import (
    BigIntegerField,
    BlobField,
    CharField,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

from models import db


def now():
    return int(time.time())


class BaseModel(Model):
    class Meta:
        database = db


class User(BaseModel):
    """An app user; owns pushers and receives notifications."""

    name = CharField(max_length=255, unique=True)
    created_at = BigIntegerField(default=now)


class Service(BaseModel):
    """An operator backend allowed to send notifications."""

    name = CharField(max_length=255, unique=True)
    created_at = BigIntegerField(default=now)


class Token(BaseModel):
    """A bearer token of a user or a service, stored as a digest."""

    digest = CharField(max_length=64, unique=True)
    user = ForeignKeyField(User, null=True, backref="tokens", on_delete="CASCADE")
    service = ForeignKeyField(Service, null=True, backref="tokens", on_delete="CASCADE")
    created_at = BigIntegerField(default=now)
    revoked_at = BigIntegerField(null=True)


class Channel(BaseModel):
    """A notification channel of the operator's catalogue."""

    id = CharField(max_length=255, primary_key=True)
    description = TextField(default="")
    default_status = CharField(max_length=8, default="disabled")


class EncryptionKey(BaseModel):
    """The youngest key generation of one key_identifier, encrypted under the server key.

    The iss is never stored; ``iss_fingerprint`` (an HMAC under the server key) tells whether a
    later registration brings the same iss.
    """

    key_identifier = CharField(max_length=128, unique=True)
    iss_fingerprint = CharField(max_length=64)
    period = CharField(max_length=7)
    sealed = BlobField()


class Pusher(BaseModel):
    """One registration of a device for a user (SPEC section 1)."""

    user = ForeignKeyField(User, backref="pushers", on_delete="CASCADE")
    app_id = CharField(max_length=64)
    pushkey = CharField(max_length=512)
    kind = CharField(max_length=16)
    app_display_name = CharField(max_length=255)
    device_display_name = CharField(max_length=255)
    profile_tag = CharField(max_length=255, null=True)
    lang = CharField(max_length=32)
    data = TextField()
    pushkey_ts = BigIntegerField()
    encryption_key = ForeignKeyField(EncryptionKey, null=True, on_delete="SET NULL")
    created_at = DoubleField(default=time.time)

    class Meta:
        indexes = ((("user", "app_id", "pushkey"), True), (("app_id", "pushkey"), False))


class ChannelState(BaseModel):
    """An explicit channel state of a device, i.e. of (user, pushkey)."""

    user = ForeignKeyField(User, on_delete="CASCADE")
    pushkey = CharField(max_length=512)
    channel = ForeignKeyField(Channel, on_delete="CASCADE")
    status = CharField(max_length=8)

    class Meta:
        indexes = ((("user", "pushkey", "channel"), True),)


class Notification(BaseModel):
    """One event sent by a service for a user on a channel; kept as history."""

    id = CharField(max_length=32, primary_key=True)
    service = ForeignKeyField(Service, null=True, on_delete="SET NULL")
    identifier = CharField(max_length=255, null=True)
    user = ForeignKeyField(User, null=True, on_delete="CASCADE")
    channel = CharField(max_length=255)
    payload = TextField()
    prio = CharField(max_length=4)
    counts = TextField(null=True)
    created_at = DoubleField(index=True)

    class Meta:
        indexes = ((("service", "identifier"), True),)


class Delivery(BaseModel):
    """One notification to one pusher: queued, then delivered or failed for good."""

    notification = ForeignKeyField(Notification, backref="deliveries", on_delete="CASCADE")
    pusher = ForeignKeyField(Pusher, null=True, on_delete="SET NULL")
    user = ForeignKeyField(User, on_delete="CASCADE")
    pushkey = CharField(max_length=512)
    state = CharField(max_length=9, default="pending")
    attempts = IntegerField(default=0)
    next_attempt_at = DoubleField()
    lease_owner = CharField(max_length=64, null=True)
    lease_until = DoubleField(null=True)
    last_error = TextField(null=True)
    finished_at = DoubleField(null=True)
    created_at = DoubleField()

    class Meta:
        indexes = ((("state", "next_attempt_at"), False), (("user", "pushkey"), False))


MODELS = [User, Service, Token, Channel, EncryptionKey, Pusher, ChannelState, Notification,
          Delivery]
