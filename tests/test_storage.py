"""The SQLite settings that the durability and concurrency promises rest on, the connection a
thread keeps, and the writer lock that queues the host's writers."""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import pusher_body

import delivery
import models
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


def test_a_thread_keeps_its_connection_between_requests(api, alice):
    """No connect (and no PRAGMAs) per request: the thread's connection serves the next one."""
    api.register(alice, "phone-1")
    first = db.connection()
    assert api.pushkeys(alice) == ["phone-1"]
    assert db.connection() is first
    assert pragma("synchronous") == 2  # and it is still the durable one


def hold_writer_lock():
    """Another process, holding the database's writer lock until its stdin closes."""
    path = db.obj.database + models.WRITER_LOCK_SUFFIX
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; lock = open(sys.argv[1], 'a');"
         " fcntl.flock(lock, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
         path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_writers_wait_for_the_writer_lock_and_readers_do_not(api, alice):
    """Every write transaction of the host queues on one fcntl lock beside the database (not
    in SQLite's sleeping busy handler); reads never take it."""
    api.register(alice, "phone-1")
    holder = hold_writer_lock()
    try:
        with ThreadPoolExecutor(1) as pool:
            write = pool.submit(api.set_pusher, alice, pusher_body("phone-2"))
            time.sleep(0.5)  # long enough for an unqueued write to finish many times over
            assert not write.done()
            assert api.pushkeys(alice) == ["phone-1"]  # a read answers meanwhile
            holder.stdin.close()  # the other process lets go
            assert write.result(timeout=30).status_code == 200
    finally:
        if not holder.stdin.closed:
            holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert api.pushkeys(alice) == ["phone-1", "phone-2"]


def plan(sql, params=()):
    """SQLite's plan of a statement: its steps, as EXPLAIN QUERY PLAN words them."""
    return [row[3] for row in db.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()]


def test_claims_and_device_histories_read_no_delivered_history(app):
    """Delivered rows pile up for HISTORY_DAYS; the claim reads the partial index of pending
    ones, and a device's history its newest deliveries in index order, up to its limit (no
    sorting or grouping of everything the device ever got)."""
    worker = delivery.Worker(app)
    claimed = []
    try:
        with app.app_context():
            db.connect(reuse_if_open=True)
            db.obj.query_hooks.append(claimed.append)
            try:
                worker.claim()
            finally:
                db.obj.query_hooks.remove(claimed.append)
            [claim] = [event for event in claimed if event.sql.startswith("SELECT")]
            assert any("USING INDEX delivery_due" in step for step in plan(claim.sql,
                                                                            claim.params))
            history = plan(models.DEVICE_HISTORY, (1, "phone-1", 1000))
            assert any("USING INDEX delivery_user_id_pushkey_created_at" in step
                       for step in history)
            assert not any("GROUP BY" in step for step in history)
            purge = plan(models.PURGEABLE, (0.0, 1.0, 100))
            assert any("USING INDEX notification_created_at" in step for step in purge)
    finally:
        worker.close()
