"""Database models (peewee) and the few queries that several parts of the app share.

Times are unix seconds (integers, or floats where sub-second scheduling matters) so the same
schema works on SQLite and PostgreSQL. On PostgreSQL the floats must be DOUBLE PRECISION
(``DoubleField``): peewee's ``FloatField`` becomes REAL there, whose 24-bit mantissa rounds a
unix time to 128 seconds. The integers are BIGINT so they outlive 2038.

A model here is what a new database gets; an existing database gets the same change through a
step in ``migrations.py``.
"""

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import secrets
import select
import sqlite3
import threading
import time
import weakref

from peewee import (
    BigIntegerField,
    BlobField,
    CharField,
    DatabaseProxy,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    IntegrityError,
    Model,
    SQL,
    SqliteDatabase,
    TextField,
)
from playhouse.db_url import connect

import crypto

log = logging.getLogger("push")
db = DatabaseProxy()

# synchronous=full, not the usual "normal": in WAL mode "normal" may lose the last commits
# on a power cut, and a 200/202 from us promises the write is on disk.
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "foreign_keys": 1,
    "busy_timeout": 30000,
    "synchronous": "full",
}


def now():
    """Current unix time in whole seconds."""
    return int(time.time())


def token_digest(token):
    """How a bearer token is stored: its SHA-256, never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


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


def new_token(prefix, **owner):
    """Create a random token for a user or service; returns it (shown once, stored hashed)."""
    token = prefix + secrets.token_urlsafe(32)
    Token.create(digest=token_digest(token), **owner)
    return token


def revoke_tokens(owner_field, owner):
    """Revoke every live token of one user or service; return how many."""
    return (Token.update(revoked_at=now())
            .where((owner_field == owner) & Token.revoked_at.is_null())
            .execute())


def live_tokens(owner):
    """How many unrevoked tokens a user or service has."""
    return owner.tokens.where(Token.revoked_at.is_null()).count()


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
    """One event sent by a service for a user on a channel; kept as history.

    Its ``id`` begins with its creation time (``new_notification_id``), so new rows go at the
    end of the id index rather than anywhere in it. ``service`` needs no index of its own:
    the unique (service, identifier) index begins with it.
    """

    id = CharField(max_length=32, primary_key=True)
    service = ForeignKeyField(Service, null=True, on_delete="SET NULL", index=False)
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
    """One notification to one pusher: queued, then delivered or failed for good.

    Delivered and failed rows stay as history (``HISTORY_DAYS``), so the indexes are chosen
    so that no request or claim reads more of them as they pile up: the due deliveries have
    a partial index of their own (``delivery_due``: pending rows only), a device's history is
    read newest first from (user, pushkey, created_at), and ``created_at`` is its
    notification's. ``user`` needs no index of its own: that one begins with it.
    """

    notification = ForeignKeyField(Notification, backref="deliveries", on_delete="CASCADE")
    pusher = ForeignKeyField(Pusher, null=True, on_delete="SET NULL")
    user = ForeignKeyField(User, on_delete="CASCADE", index=False)
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
        indexes = ((("user", "pushkey", "created_at"), False),)


#: The claim's index: the pending rows only, in the order they fall due.
DUE_INDEX = {"name": "delivery_due", "where": SQL("state = 'pending'")}
Delivery.add_index(Delivery.next_attempt_at, Delivery.lease_until, **DUE_INDEX)


class AuditEvent(BaseModel):
    """One change to a pusher: when, whose, which app and device, what and why.

    ``user`` is the user's name, not a reference, so the trail outlives the user; a pushkey
    is kept only as a short prefix (``pushkey_prefix``), enough to match a device's logs.
    """

    created_at = DoubleField(index=True)
    user = CharField(max_length=255)
    app_id = CharField(max_length=64)
    pushkey_prefix = CharField(max_length=8)
    action = CharField(max_length=10)  # registered, updated or removed
    reason = TextField()

    class Meta:
        indexes = ((("user", "created_at"), False),)


MODELS = [User, Service, Token, Channel, EncryptionKey, Pusher, ChannelState, Notification,
          Delivery, AuditEvent]


# --- the hot statements, in SQL ---------------------------------------------------------------
#
# peewee builds a query's SQL anew each time it runs it, which for the short statements of a
# request costs several times what SQLite takes to run them (about 0.2 ms of CPU for a lookup
# by key, 0.5 ms for a join). The statements every request of the API runs are written out
# here once instead, with "?" for a parameter on either engine. The names are peewee's: a
# model's table is its name in lower case, a foreign key's column its name with "_id".

TOKEN_OWNER = "SELECT user_id, service_id FROM token WHERE digest = ? AND revoked_at IS NULL"
USER_NAME = 'SELECT name FROM "user" WHERE id = ?'
USER_ID = 'SELECT id FROM "user" WHERE name = ?'
LOCK_USER = 'SELECT id FROM "user" WHERE id = ? FOR UPDATE'  # PostgreSQL only
PUSHERS_OF = ("SELECT p.pushkey, p.kind, p.app_id, p.app_display_name, p.device_display_name,"
              " p.lang, p.data, p.pushkey_ts, p.profile_tag, k.key_identifier FROM pusher p"
              " LEFT JOIN encryptionkey k ON k.id = p.encryption_key_id"
              " WHERE p.user_id = ? ORDER BY p.created_at, p.id")
PUSHER_OF = ("SELECT id, encryption_key_id FROM pusher"
             " WHERE user_id = ? AND app_id = ? AND pushkey = ?")
UPDATE_PUSHER = ("UPDATE pusher SET kind = ?, app_display_name = ?, device_display_name = ?,"
                 " profile_tag = ?, lang = ?, data = ?, pushkey_ts = ?, encryption_key_id = ?"
                 " WHERE id = ?")
OTHER_OWNERS = "SELECT 1 FROM pusher WHERE app_id = ? AND pushkey = ? AND user_id <> ? LIMIT 1"
DEVICE_EXISTS = "SELECT 1 FROM pusher WHERE user_id = ? AND pushkey = ? LIMIT 1"
KEY_BY_IDENTIFIER = "SELECT id, iss_fingerprint FROM encryptionkey WHERE key_identifier = ?"
ADD_AUDIT_EVENT = ('INSERT INTO auditevent (created_at, "user", app_id, pushkey_prefix, action,'
                   " reason) VALUES (?, ?, ?, ?, ?, ?)")
DEVICE_CHANNELS = ("SELECT c.id, COALESCE(s.status, c.default_status) FROM channel c"
                   " LEFT JOIN channelstate s"
                   " ON s.channel_id = c.id AND s.user_id = ? AND s.pushkey = ? ORDER BY c.id")
CHANNEL_DEFAULT = "SELECT default_status FROM channel WHERE id = ?"
KNOWN_CHANNELS = "SELECT id FROM channel WHERE id IN ({})"
SET_CHANNEL_STATES = ("INSERT INTO channelstate (user_id, pushkey, channel_id, status) VALUES {}"
                      " ON CONFLICT (user_id, pushkey, channel_id)"
                      " DO UPDATE SET status = excluded.status")
# A device's notifications, newest first: the newest LIMIT of its deliveries, read backwards
# from the (user, pushkey, created_at) index, so no more than those are read however long the
# history is. A user's pushers with one pushkey (several apps) each got a delivery of the same
# notification, with the same created_at: DISTINCT makes them one message.
DEVICE_HISTORY = ("SELECT n.id, n.payload FROM (SELECT DISTINCT d.created_at, d.notification_id"
                  " FROM delivery d WHERE d.user_id = ? AND d.pushkey = ?"
                  " ORDER BY d.created_at DESC, d.notification_id DESC LIMIT ?) h"
                  " JOIN notification n ON n.id = h.notification_id"
                  " ORDER BY h.created_at DESC, h.notification_id DESC")
# The purge (purge_history): the oldest notifications created between two times with no
# delivery pending, then their deliveries and themselves.
PURGEABLE = ("SELECT n.id, n.created_at FROM notification n"
             " WHERE n.created_at >= ? AND n.created_at < ? AND NOT EXISTS (SELECT 1"
             " FROM delivery d WHERE d.notification_id = n.id AND d.state = 'pending')"
             " ORDER BY n.created_at LIMIT ?")
PURGE_DELIVERIES = "DELETE FROM delivery WHERE notification_id IN ({})"
PURGE_NOTIFICATIONS = "DELETE FROM notification WHERE id IN ({})"
#: Notifications the purge deletes per transaction: 15-25 ms of the writer lock with 10^6
#: deliveries stored (bench/scale.py).
PURGE_BATCH = 100
NOTIFICATION_BY_IDENTIFIER = "SELECT id FROM notification WHERE service_id = ? AND identifier = ?"
ADD_NOTIFICATION = ("INSERT INTO notification (id, service_id, identifier, user_id, channel,"
                    " payload, prio, counts, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
# A device gets a channel when its own state is "enabled", or it has none and the channel's
# default (the second parameter) is "enabled"; not_set counts as disabled.
RECIPIENTS = ("SELECT p.id, p.pushkey FROM pusher p LEFT JOIN channelstate s"
              " ON s.user_id = p.user_id AND s.pushkey = p.pushkey AND s.channel_id = ?"
              " WHERE p.user_id = ? AND COALESCE(s.status, ?) = 'enabled' ORDER BY p.id")
ADD_DELIVERIES = ("INSERT INTO delivery (notification_id, pusher_id, user_id, pushkey, state,"
                  " attempts, next_attempt_at, created_at) VALUES {}")


def run(statement, *params):
    """Run one statement written with "?" placeholders; return its cursor."""
    return db.execute_sql(placeholders(statement, db.obj.param), params)


def rows(statement, *params):
    """Every row of a query written with "?" placeholders, as tuples.

    Read to the end, so that SQLite ends the statement's read transaction at once (a
    connection kept open must not keep reading an old snapshot).
    """
    return run(statement, *params).fetchall()


@functools.lru_cache(maxsize=256)
def placeholders(statement, param):
    """``statement`` with the driver's placeholder for "?" (psycopg2's is "%s")."""
    return statement if param == "?" else statement.replace("?", param)


def marks(count, row="?"):
    """``count`` comma-separated copies of ``row``: the placeholders of an IN list or VALUES."""
    return ", ".join([row] * count)


#: Rows or ids per statement where a list goes into one (SQLite allows 32,766 parameters;
#: shorter statements plan faster).
CHUNK = 500


def chunks(items):
    """``items`` (a list) in slices of at most CHUNK, for one statement each."""
    for start in range(0, len(items), CHUNK):
        yield items[start:start + CHUNK]


def open_database(url):
    """A peewee database for ``url``; SQLite gets WAL, foreign keys and a busy timeout."""
    if url.startswith("sqlite:"):
        path = url.split(":///", 1)[1] if ":///" in url else url[len("sqlite:"):]
        return SqliteDatabase(path, pragmas=SQLITE_PRAGMAS, check_same_thread=False)
    return connect(url)


def use_connection():
    """Give this thread a working connection, kept open for its next requests.

    A connection opened and closed per request cost a sixth of a request's time (on SQLite,
    four PRAGMAs per connect and, whenever it was the last one open, a checkpoint; on
    PostgreSQL a new server process). Each thread keeps its own (peewee's state is per
    thread), opened in the thread that uses it, so never before gunicorn forks. One that no
    longer works (PostgreSQL restarted) is replaced.
    """
    if not db.is_closed() and not connection_works():
        db.close()
    if db.is_closed():
        db.connect()


def connection_works():
    """Whether this thread's open connection still works. A SQLite one always does.

    A PostgreSQL server that ends a connection (a restart, ``pg_terminate_backend``) sends
    its last words and closes it; an idle connection of ours has nothing else to read (we do
    not LISTEN), so one with something to read is done for. Looking costs a poll of its
    socket, not a round trip (``SELECT 1`` before every request cost a seventh of a short
    read's time).
    """
    if isinstance(db.obj, SqliteDatabase):
        return True
    if not db.is_connection_usable():  # known broken, or a failed transaction left open
        return False
    poller = select.poll()
    poller.register(db.connection().fileno(), select.POLLIN)
    return not poller.poll(0)


@contextlib.contextmanager
def transaction():
    """A write transaction; IMMEDIATE on SQLite so a read-then-write never hits "locked", and
    begun only when this thread holds the host's writer lock (``writer_lock``)."""
    if not isinstance(db.obj, SqliteDatabase):
        with db.atomic():
            yield
    elif db.in_transaction():  # nested: a savepoint inside the transaction that holds the lock
        with db.atomic():
            yield
    else:
        with writer_lock(db.obj.database), db.atomic("IMMEDIATE"):
            yield


#: The writer lock of a SQLite database is a file beside it, named like this.
WRITER_LOCK_SUFFIX = "-writer.lock"
_lock_files = threading.local()  # this thread's WriterLockFile


@contextlib.contextmanager
def writer_lock(database_path):
    """Hold the writer lock of the SQLite database at ``database_path``: an fcntl lock on the
    file beside it, taken by every write transaction of every process of the host.

    SQLite lets one writer in at a time and makes the others wait in its busy handler, which
    sleeps 1, 2, 5 ... 100 ms between tries: under load a writer sleeps on long after the lock
    is free, and the unlucky wait seconds. Queued on an fcntl lock instead, every writer wakes
    the moment the one before it is done. Each thread locks through a descriptor of its own,
    so the kernel queues the threads of a process too.
    """
    lock_file = getattr(_lock_files, "file", None)
    if lock_file is None or lock_file.key != (os.getpid(), database_path):
        lock_file = _lock_files.file = WriterLockFile(database_path)
    fcntl.flock(lock_file.fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(lock_file.fd, fcntl.LOCK_UN)


class WriterLockFile:
    """A thread's descriptor of a database's writer lock file, closed with the thread.

    A forked child opens its own: a descriptor inherited across a fork shares its lock with
    the parent's.
    """

    def __init__(self, database_path):
        self.key = (os.getpid(), database_path)
        self.fd = os.open(database_path + WRITER_LOCK_SUFFIX, os.O_RDWR | os.O_CREAT, 0o600)

    def __del__(self):
        os.close(self.fd)


def lock_user(user_id):
    """Serialize one user's writes on PostgreSQL; SQLite's IMMEDIATE already does."""
    if not isinstance(db.obj, SqliteDatabase):
        rows(LOCK_USER, user_id)


def pushkey_prefix(pushkey):
    """What the audit trail keeps of a pushkey: at most 6 characters, at most half of it."""
    return pushkey[:min(6, len(pushkey) // 2)]


def user_name(user_id):
    """The name of a user, by id."""
    found = rows(USER_NAME, user_id)
    return found[0][0] if found else None


def audit(name, app_id, pushkey, action, reason):
    """Add a change to user ``name``'s pusher to the audit trail (inside the caller's
    transaction)."""
    run(ADD_AUDIT_EVENT, time.time(), name, app_id, pushkey_prefix(pushkey), action, reason)


def delete_pusher(pusher, reason):
    """Remove one pusher, saying why in the audit trail; the device's channel states go with
    its last pusher."""
    audit(user_name(pusher.user_id), pusher.app_id, pusher.pushkey, "removed", reason)
    pusher.delete_instance()
    remaining = Pusher.select().where(
        (Pusher.user == pusher.user_id) & (Pusher.pushkey == pusher.pushkey)
    ).exists()
    if not remaining:
        ChannelState.delete().where(
            (ChannelState.user == pusher.user_id) & (ChannelState.pushkey == pusher.pushkey)
        ).execute()
    if pusher.encryption_key_id is not None:
        drop_unused_key(pusher.encryption_key_id)


def drop_unused_key(key_id):
    """Delete a key generation no pusher refers to any more."""
    if not Pusher.select().where(Pusher.encryption_key == key_id).exists():
        EncryptionKey.delete().where(EncryptionKey.id == key_id).execute()


class NotQueued(Exception):
    """A notification that cannot be queued; ``status`` and ``errcode`` say why over HTTP."""

    def __init__(self, status, errcode, message):
        super().__init__(message)
        self.status, self.errcode = status, errcode


def queue_notification(service_id, user_name, channel_id, payload, prio, counts=None,
                       identifier=None):
    """Store a notification (``payload``: compact JSON bytes) and one delivery per device that
    gets its channel, in one transaction (the sender API and ``flask send``).

    Returns (notification id, deliveries, whether it is new): a repeated ``identifier`` of
    the same service returns the first notification and queues nothing. Raises NotQueued.
    """
    if len(payload) > crypto.MAX_PAYLOAD_BYTES:
        raise NotQueued(413, "M_TOO_LARGE", f"payload is {len(payload)} bytes of JSON;"
                                            f" at most {crypto.MAX_PAYLOAD_BYTES} fit")
    channel = rows(CHANNEL_DEFAULT, channel_id)
    if not channel:
        raise NotQueued(400, "M_INVALID_PARAM", f"Unknown channel: {channel_id}")
    try:
        with transaction():
            earlier = rows(NOTIFICATION_BY_IDENTIFIER, service_id, identifier) if (
                identifier is not None) else None
            if earlier:
                return earlier[0][0], deliveries_of(earlier[0][0]), False
            user = rows(USER_ID, user_name)
            user_id = user[0][0] if user else None
            created_at = time.time()
            notification_id = new_notification_id()
            run(ADD_NOTIFICATION, notification_id, service_id, identifier, user_id, channel_id,
                payload.decode(), prio, json.dumps(counts) if counts is not None else None,
                created_at)
            devices = [] if user_id is None else rows(RECIPIENTS, channel_id, user_id,
                                                       channel[0][0])
            for batch in chunks(devices):
                run(ADD_DELIVERIES.format(marks(len(batch), "(?, ?, ?, ?, 'pending', 0, ?, ?)")),
                    *[value for pusher_id, pushkey in batch for value in (
                        notification_id, pusher_id, user_id, pushkey, created_at, created_at)])
    except IntegrityError:
        # The same identifier raced in from another process; answer with the winner.
        earlier = Notification.get((Notification.service == service_id)
                                   & (Notification.identifier == identifier))
        return earlier.id, deliveries_of(earlier.id), False
    return notification_id, len(devices), True


def new_notification_id():
    """A new notification's id: 32 hex digits, the creation time in milliseconds (12), then
    80 random bits.

    Time first, so that new rows go at the end of the indexes on notification ids (of the
    notifications and of their deliveries) and the purge takes from their start: a random id
    (a uuid4) sends every insert and delete to a page anywhere in indexes as large as the
    history.
    """
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def deliveries_of(notification_id):
    """How many deliveries a stored notification has."""
    return Delivery.select().where(Delivery.notification == notification_id).count()


def purge_history(days):
    """Delete notifications older than ``days`` that have nothing left to send; return how many.

    Oldest first, from the created_at index, ``PURGE_BATCH`` at a time, each batch in a
    transaction of its own: the host's other writes wait for one batch at most, never for a
    whole backlog. A batch begins where the one before it ended, so notifications kept for
    their pending deliveries are passed over once.
    """
    cutoff = time.time() - days * 86400
    removed, since = 0, float("-inf")
    while True:
        with transaction():
            batch = rows(PURGEABLE, since, cutoff, PURGE_BATCH)
            ids = [notification_id for notification_id, _ in batch]
            if ids:
                run(PURGE_DELIVERIES.format(marks(len(ids))), *ids)
                run(PURGE_NOTIFICATIONS.format(marks(len(ids))), *ids)
        removed += len(ids)
        if len(batch) < PURGE_BATCH:
            break
        since = batch[-1][1]
    if removed:
        log.info("purged %d notifications older than %s days", removed, days)
    return removed


def purge_audit(days):
    """Delete audit events older than ``days``; return how many."""
    cutoff = time.time() - days * 86400
    with transaction():
        removed = AuditEvent.delete().where(AuditEvent.created_at < cutoff).execute()
    if removed:
        log.info("purged %d audit events older than %s days", removed, days)
    return removed


def sqlite_path(instance_path):
    """The default database URL: a file in the instance folder."""
    return "sqlite:///" + os.path.join(instance_path, "push.sqlite3")


# --- rate-limit counters --------------------------------------------------------------------

# One row per key (a user, a service, a client address): when its one-minute window started
# and the hits in it. One statement counts a hit and returns the window; a hit a minute or
# more after the start opens a new window. (Both SET expressions see the row as it was.)
COUNT_HIT = ("INSERT INTO rate_limit (key, started, hits) VALUES ({0}, {0}, 1)"
             " ON CONFLICT (key) DO UPDATE SET"
             " hits = CASE WHEN rate_limit.started > excluded.started - 60"
             " THEN rate_limit.hits + 1 ELSE 1 END,"
             " started = CASE WHEN rate_limit.started > excluded.started - 60"
             " THEN rate_limit.started ELSE excluded.started END"
             " RETURNING hits, started")
PURGE_HITS = "DELETE FROM rate_limit WHERE started <= {0} - 60"


def rate_counters(url, lock_path):
    """Where rate-limit counts live, so that every process sees the same ones: an UNLOGGED
    table on PostgreSQL, else a small SQLite file beside the schema lock. Set up once under
    that lock."""
    path = os.path.join(os.path.dirname(lock_path), "ratelimit.sqlite3")
    counters = PostgresCounters() if url.startswith("postgres") else SqliteCounters(path)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if isinstance(counters, SqliteCounters):
                remove_if_damaged(path)
            counters.setup()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return counters


def remove_if_damaged(path):
    """Remove a counters file that a power cut damaged (written without fsync, it can be): its
    counts are worth nothing, and a damaged file would fail every request."""
    try:
        with contextlib.closing(sqlite3.connect(path)) as connection:
            healthy = connection.execute("PRAGMA quick_check").fetchone() == ("ok",)
    except sqlite3.DatabaseError:
        healthy = False
    if not healthy:
        log.warning("rate-limit counters in %s are damaged; starting afresh", path)
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + suffix)


class PostgresCounters:
    """Counters in an UNLOGGED table of the app's database: shared by every host, and written
    without WAL, so no hit waits for a disk."""

    def setup(self):
        """Create the table if it is missing."""
        with db.connection_context():
            db.execute_sql("CREATE UNLOGGED TABLE IF NOT EXISTS rate_limit (key TEXT PRIMARY KEY,"
                           " started DOUBLE PRECISION NOT NULL, hits INTEGER NOT NULL)")

    def hit(self, key, now):
        """Count one hit on ``key`` at ``now``; return (hits in its window, window start)."""
        return db.execute_sql(COUNT_HIT.format("%s"), (key, now)).fetchone()

    def purge(self, now):
        """Forget windows that are over at ``now``."""
        db.execute_sql(PURGE_HITS.format("%s"), (now,))


class SqliteCounters:
    """Counters in a small SQLite file of their own, shared by the processes of one host.

    A count lost in a crash costs nothing, so the file is written without fsync
    (synchronous=OFF; WAL, which a crashed process cannot corrupt). Each statement runs under
    an fcntl lock: waiting processes queue in the kernel and wake the moment it is free,
    where SQLite's busy handler would sleep for milliseconds at a time.
    """

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()  # the threads of a process share one connection
        self.pid = None
        self.connection = self.lock_fd = None

    def setup(self):
        """Create the table if it is missing."""
        self.run("CREATE TABLE IF NOT EXISTS rate_limit (key TEXT PRIMARY KEY,"
                 " started REAL NOT NULL, hits INTEGER NOT NULL) WITHOUT ROWID")

    def hit(self, key, now):
        """Count one hit on ``key`` at ``now``; return (hits in its window, window start)."""
        return self.run(COUNT_HIT.format("?"), (key, now))

    def purge(self, now):
        """Forget windows that are over at ``now``."""
        self.run(PURGE_HITS.format("?"), (now,))

    def run(self, sql, params=()):
        """One statement under the file lock; its first row."""
        with self.lock:
            if self.pid != os.getpid():  # a connection never crosses a fork
                self.open()
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
            try:
                return self.connection.execute(sql, params).fetchone()
            finally:
                fcntl.flock(self.lock_fd, fcntl.LOCK_UN)

    def open(self):
        """This process's connection and lock file descriptor, closed with this object. Made
        under the file lock too: switching to WAL needs a lock of SQLite's own."""
        self.pid = os.getpid()
        self.lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        try:
            self.connection = sqlite3.connect(self.path, isolation_level=None,
                                              check_same_thread=False)
            self.connection.execute("PRAGMA journal_mode=wal")
            self.connection.execute("PRAGMA synchronous=off")
        finally:
            fcntl.flock(self.lock_fd, fcntl.LOCK_UN)
        weakref.finalize(self, close_counters, self.pid, self.connection, self.lock_fd)


def close_counters(pid, connection, lock_fd):
    """Close a SqliteCounters connection in the process that opened it (a forked child must
    not close its parent's SQLite connection: that could checkpoint or remove its WAL)."""
    if os.getpid() == pid:
        connection.close()
        os.close(lock_fd)
