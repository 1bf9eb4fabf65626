"""The SQLite settings that the durability and concurrency promises rest on."""

import pytest

from models import db

pytestmark = pytest.mark.sqlite_only


def pragma(name):
    return db.execute_sql(f"PRAGMA {name}").fetchone()[0]


def test_sqlite_is_durable_and_ready_for_several_writers(app):
    with app.app_context(), db.connection_context():
        assert pragma("journal_mode") == "wal"  # readers never wait for the writer
        assert pragma("synchronous") == 2  # FULL: an acknowledged write survives a power cut
        assert pragma("foreign_keys") == 1  # deletes cascade to channel states and deliveries
        assert pragma("busy_timeout") >= 5000  # writers queue instead of failing at once


def test_the_database_lives_in_the_instance_folder(app):
    assert db.obj.database == app.instance_path + "/push.sqlite3"
