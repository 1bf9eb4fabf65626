"""The files of the instance folder are the owner's alone: the database with its WAL, its
writer lock and the other lock files are created 0600 whatever the umask, the folder 0700 when
we make it, and the operator is warned at start about a folder, database or server key others
can read."""

import logging
import os

import pytest

from models import Channel, db


@pytest.fixture
def common_umask():
    """The usual umask (022: new files 0644), whatever the test runner's is."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path):
    return os.stat(path).st_mode & 0o777


def warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.sqlite_only  # the SQLite files
def test_database_wal_and_lock_files_are_created_0600(make_app, common_umask, tmp_path):
    app = make_app()
    instance = tmp_path / "instance"
    assert mode(instance) == 0o700
    with app.app_context(), db.connection_context():
        Channel.create(id="erp.task")  # a write: the WAL and shared-memory files exist now
        names = ["push.sqlite3", "push.sqlite3-wal", "push.sqlite3-shm",
                 "push.sqlite3-writer.lock", ".schema.lock", "server.key"]
        assert {name: mode(instance / name) for name in names} == dict.fromkeys(names, 0o600)
        assert sorted(os.listdir(instance)) == sorted(names)


def test_a_private_instance_warns_about_nothing(make_app, common_umask, caplog):
    with caplog.at_level(logging.WARNING):
        make_app()
        make_app()  # and again, on the files the first start made
    assert warnings(caplog) == []


@pytest.mark.sqlite_only  # the SQLite files
def test_readable_folder_database_and_server_key_are_warned_about(make_app, common_umask,
                                                                  tmp_path, caplog):
    make_app()
    instance = tmp_path / "instance"
    for path, readable in ((instance, 0o755), (instance / "push.sqlite3", 0o644),
                           (instance / "server.key", 0o640)):
        os.chmod(path, readable)
    with caplog.at_level(logging.WARNING):
        make_app()
    assert sorted(warnings(caplog)) == sorted([
        f"the instance folder {instance} can be read by group or others (mode 755):"
        " chmod go-rwx it",
        f"the database {instance}/push.sqlite3 can be read by group or others (mode 644):"
        " chmod go-rwx it",
        f"the server key {instance}/server.key can be read by group or others (mode 640):"
        " chmod 600 it",
    ])
    # Warned about, not changed: the operator may have reasons (a backup user's group).
    assert mode(instance) == 0o755 and mode(instance / "push.sqlite3") == 0o644


@pytest.mark.sqlite_only  # the SQLite files
def test_a_folder_we_did_not_make_keeps_its_mode(make_app, common_umask, tmp_path, caplog):
    instance = tmp_path / "instance"
    instance.mkdir(mode=0o711)  # others may pass through, not list
    os.chmod(instance, 0o711)
    with caplog.at_level(logging.WARNING):
        make_app()
    assert mode(instance) == 0o711
    assert warnings(caplog) == []
