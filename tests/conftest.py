"""Fixtures: a fresh app on a temporary instance folder per test, its clients, users, a
service, channels, a real HTTP push gateway on 127.0.0.1 and a throwaway PostgreSQL server.

Helpers that are not fixtures live in support.py (in-process) and servers.py (processes).
"""

import itertools
import os
import shutil
import tempfile

import pytest
from servers import Cluster, Unavailable, server_binaries
from support import TEST_CONFIG, Api, Gateway, bearer, cli_token

from app import create_app
from metrics import FOLDER_VARIABLE as METRICS_FOLDER
from models import db

_saved_environment = {}


def pytest_configure(config):
    """The suite never inherits the developer's shell: no PUSH_* variable reaches an app (an
    exported PUSH_DATABASE_URL must never point the tests at a real database). The apps of
    this process count their metrics in a folder of the session's own (metrics.py)."""
    for key in [k for k in os.environ if k.startswith("PUSH_") or k == METRICS_FOLDER]:
        _saved_environment[key] = os.environ.pop(key)
    os.environ[METRICS_FOLDER] = tempfile.mkdtemp(prefix="push-test-metrics-")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.pop(METRICS_FOLDER), ignore_errors=True)
    os.environ.update(_saved_environment)


@pytest.fixture
def make_app(tmp_path):
    """Factory for apps on this test's instance folder, with config overrides."""

    def make(**overrides):
        return create_app({**TEST_CONFIG, **overrides}, instance_path=str(tmp_path / "instance"))

    return make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def api(client):
    """The client and sender API of the test app (support.Api)."""
    return Api(client)


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def user_token(runner):
    """A factory: create a user, return the Authorization header of its token."""

    def make(name="alice"):
        return bearer(cli_token(runner, "users", "create", name))

    return make


@pytest.fixture
def alice(user_token):
    return user_token("alice")


@pytest.fixture
def service(runner):
    return bearer(cli_token(runner, "services", "create", "erp"))


@pytest.fixture
def channel(runner):
    """A factory: add a catalogue channel."""

    def add(channel_id, default="disabled"):
        result = runner.invoke(args=["channels", "add", channel_id, "--default", default])
        assert result.exit_code == 0, result.output
        return channel_id

    return add


@pytest.fixture
def register(api):
    """A factory: register a pusher and assert it worked (``Api.register``)."""
    return api.register


@pytest.fixture
def gateway():
    gw = Gateway()
    yield gw
    gw.close()


# --- PostgreSQL -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server for the session; the test skips where none can run."""
    bindir = server_binaries()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb and pg_ctl not on PATH "
                    "nor under /usr/lib/postgresql/*/bin)")
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (psycopg2-binary)")
    try:
        cluster = Cluster(bindir)
    except Unavailable as e:
        pytest.skip(str(e))
    try:
        cluster.start()
        yield cluster
    finally:
        close_db()
        cluster.stop()


_databases = itertools.count(1)


@pytest.fixture
def pg_url(postgres):
    """A fresh, empty PostgreSQL database for this test."""
    return postgres.create_database(f"push_test_{next(_databases)}")


@pytest.fixture
def pg_app(make_app, pg_url):
    """The app on this test's PostgreSQL database (tables made by create_app)."""
    app = make_app(DATABASE_URL=pg_url)
    assert type(db.obj).__name__ == "PostgresqlDatabase"
    yield app
    close_db()


def close_db():
    """Close the app's connection, if one is open (PostgreSQL tests end with this)."""
    if db.obj is not None and not db.is_closed():
        db.close()
