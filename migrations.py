"""Schema versions: the named steps that bring a database of any earlier release up to date,
and the move of a whole installation to another database (``copy_to``).

A database records which steps it has had in the ``schemamigration`` table; its version is
the last of them. ``upgrade`` runs when every server process starts (under a file lock in the
instance folder, and on PostgreSQL an advisory lock too, for servers on several hosts) and as
``flask --app app db upgrade``; a second run changes nothing.

- A new, empty database gets every table as ``models.py`` defines it and is marked as having
  had every step.
- A database of the first release (tables, but no ``schemamigration``) or a later one gets the
  steps it lacks, in the order of ``STEPS``, each in its own transaction with the row that
  records it, so a step that fails leaves the database as it was before that step.

To change the schema:

1. change the models in ``models.py`` (what a new database gets);
2. append ``("a_unique_name", function)`` to ``STEPS``. The function gets a
   ``playhouse.migrate`` migrator for the database and makes the same change to an existing
   one: ``migrate(migrator.add_column("pusher", "note", TextField(null=True)))``. A step that
   creates a table defines the table as it is at that step (never the current model, which
   later steps may change). Never edit or reorder a step that has been released;
3. ``tests/test_migrations.py`` builds a first-release database, upgrades it, and checks it
   ends with exactly the tables, columns and indexes of a new one, on SQLite and PostgreSQL.

A model added to ``models.MODELS`` without a step still gets its table: every upgrade ends by
creating the tables that do not exist yet. Nothing else changes an existing table but a step
(not even an index added to a model), so the test above finds a change that lacks its step.
"""

import fcntl
import time

from peewee import CharField, DoubleField, Model, PostgresqlDatabase, TextField
from playhouse.migrate import SchemaMigrator, migrate

from models import DUE_INDEX, MODELS, db, open_database, transaction

#: The file lock in the instance folder that lets one process at a time upgrade.
LOCK_FILE = ".schema.lock"
#: An arbitrary, fixed key for PostgreSQL's advisory lock: one upgrade at a time.
ADVISORY_LOCK = 7_246_120_001


class SchemaMigration(Model):
    """One step a database has had, and when."""

    name = CharField(max_length=255, primary_key=True)
    applied_at = DoubleField()

    class Meta:
        database = db


# --- the steps, oldest first ------------------------------------------------------------------


def add_audit_trail(migrator):
    """The audit trail of pusher registrations, updates and removals."""

    class AuditEvent(Model):
        created_at = DoubleField()
        user = CharField(max_length=255)
        app_id = CharField(max_length=64)
        pushkey_prefix = CharField(max_length=8)
        action = CharField(max_length=10)
        reason = TextField()

        class Meta:
            database = migrator.database
            table_name = "auditevent"

    AuditEvent.create_table()
    migrate(migrator.add_index("auditevent", ("created_at",)),
            migrator.add_index("auditevent", ("user", "created_at")))


def index_for_growth(migrator):
    """Indexes whose cost stays flat as delivered history piles up (models.Delivery): the
    claim reads a partial index of pending rows, a device's history reads (user, pushkey,
    created_at) newest first. Indexes that a longer one begins with go: every insert and
    every purge paid for them."""
    migrate(migrator.drop_index("delivery", "delivery_state_next_attempt_at"),
            migrator.drop_index("delivery", "delivery_user_id_pushkey"),
            migrator.drop_index("delivery", "delivery_user_id"),
            migrator.drop_index("notification", "notification_service_id"),
            migrator.add_index("delivery", ("next_attempt_at", "lease_until"), **DUE_INDEX),
            migrator.add_index("delivery", ("user_id", "pushkey", "created_at")))


STEPS = [
    ("0001_audit_trail", add_audit_trail),
    ("0002_index_for_growth", index_for_growth),
]


# --- applying them ----------------------------------------------------------------------------


def upgrade(lock_path):
    """Bring the database up to date; return the names of the steps applied."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with db.connection_context():
                return apply_missing_steps()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def exclusive():
    """Inside a transaction: wait until no other host upgrades this PostgreSQL database."""
    if isinstance(db.obj, PostgresqlDatabase):
        db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK,))


def apply_missing_steps():
    """Create a new database whole, or apply the steps an existing one lacks."""
    with transaction():
        exclusive()
        if not set(db.get_tables()) & {model._meta.table_name for model in MODELS}:
            db.create_tables([*MODELS, SchemaMigration])
            SchemaMigration.insert_many(
                [{"name": name, "applied_at": time.time()} for name, _ in STEPS]).execute()
            return []
        SchemaMigration.create_table(safe=True)
    applied = []
    for name, step in STEPS:
        with transaction():
            exclusive()
            if SchemaMigration.get_or_none(SchemaMigration.name == name) is None:
                step(SchemaMigrator.from_database(db.obj))
                SchemaMigration.create(name=name, applied_at=time.time())
                applied.append(name)
    with transaction():
        exclusive()
        existing = set(db.get_tables())
        db.create_tables([m for m in MODELS if m._meta.table_name not in existing])
    return applied


def applied_steps():
    """The names of the steps this database has had, in the order they were applied."""
    return [name for (name,) in SchemaMigration.select(SchemaMigration.name)
            .order_by(SchemaMigration.applied_at, SchemaMigration.name).tuples()]


# --- moving house -----------------------------------------------------------------------------

#: Rows read from the source and written to the target at a time.
COPY_BATCH = 1000


class TargetNotEmpty(Exception):
    """The target database already holds data of this service."""


def copy_to(url):
    """Copy every table of this installation (the current database) into the empty database at
    ``url``; return {table: rows copied}.

    The target gets the current schema and the same schema steps; rows keep their ids (so
    tokens, keys and pending deliveries carry over as they are), and PostgreSQL sequences are
    moved past them. The source is read in one transaction (a consistent snapshot) and the
    target written in one: a copy that fails leaves the target as it was. Rate-limit counters
    are not copied (they start afresh).
    """
    target = open_database(url)
    tables = [*MODELS, SchemaMigration]
    with db.connection_context(), target.connection_context(), db.atomic():
        if isinstance(db.obj, PostgresqlDatabase):
            db.execute_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        reads = {model: model.select().order_by(*sort_key(model)).sql() for model in tables}
        with target.bind_ctx(tables), target.atomic():
            existing = set(target.get_tables())
            filled = [m._meta.table_name for m in MODELS
                      if m._meta.table_name in existing and m.select().exists()]
            if filled:
                raise TargetNotEmpty(f"the target already holds data: {', '.join(filled)}")
            target.create_tables(tables)
            SchemaMigration.delete().execute()  # a server started on it recorded its steps
            copied = {model._meta.table_name: copy_rows(model, *reads[model]) for model in tables}
            if isinstance(target, PostgresqlDatabase):
                move_sequences(target, MODELS)
    target.close()
    return copied


def sort_key(model):
    """The order rows are copied in: by primary key, so parents precede their children."""
    return [model._meta.primary_key] if model._meta.primary_key else []


def copy_rows(model, sql, params):
    """Insert into ``model`` (bound to the target) every row of the source query; the count."""
    fields = model._meta.sorted_fields
    cursor = db.execute_sql(sql, params)
    count = 0
    while rows := cursor.fetchmany(COPY_BATCH):
        model.insert_many([tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                           for row in rows], fields=fields).execute()
        count += len(rows)
    return count


def move_sequences(target, models):
    """Set each serial id's sequence past the largest copied id, so new rows get fresh ids."""
    for model in models:
        key = model._meta.primary_key
        if getattr(key, "field_type", None) != "AUTO":
            continue
        table = model._meta.table_name
        target.execute_sql(
            f"SELECT setval(pg_get_serial_sequence('{table}', '{key.column_name}'),"
            f" COALESCE((SELECT MAX({key.column_name}) FROM \"{table}\"), 0) + 1, false)")
