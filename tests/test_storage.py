"""The SQLite settings that the durability and concurrency promises rest on, the connection a
thread keeps, and the writer lock that queues the host's writers."""

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import pusher_body

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

