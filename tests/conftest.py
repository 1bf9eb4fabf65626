"""Fixtures: a fresh app on a temporary instance folder per test, its clients, users, a
service, channels, a real HTTP push gateway on 127.0.0.1 and a throwaway PostgreSQL server.

The whole suite runs on one database engine, chosen with ``--engine``: ``sqlite`` (the
default: a file in each test's instance folder) or ``postgresql`` (``make test-postgres``: a
throwaway cluster for the session and a fresh database for each test). Tests of what only one
engine has are marked ``sqlite_only``; tests/test_postgres.py holds PostgreSQL's own.

Helpers that are not fixtures live in support.py (in-process) and servers.py (processes).

A module marked ``client_api`` runs each test that uses the client API paths (the ``paths``
fixture, directly or through ``api``, ``make_api`` or ``register``) once per path set of
``support.PATH_SETS``: under /push/v1 and under the seed-era paths.
"""

import itertools
import os
import shutil
import tempfile

import pytest
from peewee import SqliteDatabase
from servers import Cluster, Unavailable, push_env, server_binaries
from support import PATH_SETS, PUSH_V1, TEST_CONFIG, Api, Gateway, bearer, cli_token

from app import create_app
from metrics import FOLDER_VARIABLE as METRICS_FOLDER
from models import db

_saved_environment = {}


ENGINES = ("sqlite", "postgresql")


def pytest_addoption(parser):
    parser.addoption("--engine", choices=ENGINES, default="sqlite",
                     help="database engine the whole suite runs on (default: sqlite)")


def pytest_configure(config):
    """The suite never inherits the developer's shell: no PUSH_* variable reaches an app (an
    exported PUSH_DATABASE_URL must never point the tests at a real database). The apps of
    this process count their metrics in a folder of the session's own (metrics.py)."""
    for key in [k for k in os.environ if k.startswith("PUSH_") or k == METRICS_FOLDER]:
        _saved_environment[key] = os.environ.pop(key)
    config.addinivalue_line("markers", "sqlite_only: tests of what only the SQLite engine has")
    config.addinivalue_line("markers", "client_api: run the module's tests that use the client"
                                       " API paths once per path set (/push/v1, seed-era)")
    config.engine_tests = {}  # database engine -> ids of the tests whose app ran on it
    os.environ[METRICS_FOLDER] = tempfile.mkdtemp(prefix="push-test-metrics-")


def pytest_generate_tests(metafunc):
    """In a ``client_api`` module, every test that uses ``paths`` runs once per path set."""
    if "paths" in metafunc.fixturenames and metafunc.definition.get_closest_marker("client_api"):
        metafunc.parametrize("paths", list(PATH_SETS.values()), ids=list(PATH_SETS),
                             indirect=True)


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.pop(METRICS_FOLDER), ignore_errors=True)
    os.environ.update(_saved_environment)


def pytest_report_header(config):
    return f"database engine: {config.getoption('engine')}"


def pytest_collection_modifyitems(config, items):
    if config.getoption("engine") != "sqlite":
        skip = pytest.mark.skip(reason="SQLite only")
        for item in items:
            if "sqlite_only" in item.keywords:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, config):
    """Say how many tests really ran an app on each engine (not skipped for want of one)."""
    counts = ", ".join(f"{engine} {len(ids)}"
                       for engine, ids in sorted(config.engine_tests.items()))
    terminalreporter.write_line(f"tests that ran an app, by database engine: {counts or 'none'}")


@pytest.fixture(scope="session")
def new_database(request):
    """Factory: the settings that put an app or server processes on a database of their own on
    the engine of this run ({} on SQLite: the instance folder's file). Session-scoped, so that
    module-scoped fixtures can use it too."""
    if request.config.getoption("engine") == "sqlite":
        return dict
    postgres = request.getfixturevalue("postgres")
    return lambda: {"DATABASE_URL": postgres.create_database(f"push_test_{next(_databases)}")}


@pytest.fixture
def database_settings(new_database):
    """The settings that put an app or a server process on this test's database."""
    return new_database()


@pytest.fixture
def make_app(request, tmp_path, database_settings):
    """Factory for apps on this test's instance folder and database, with config overrides."""

    def make(**overrides):
        settings = {**TEST_CONFIG, **database_settings, **overrides}
        app = create_app(settings, instance_path=str(tmp_path / "instance"))
        engine = "sqlite" if isinstance(db.obj, SqliteDatabase) else "postgresql"
        request.config.engine_tests.setdefault(engine, set()).add(request.node.nodeid)
        return app

    yield make
    close_db()


@pytest.fixture
def server_env(database_settings):
    """Factory: the environment of a server or CLI process on ``instance_path`` and this
    test's database, with these settings (``servers.push_env``)."""

    def make(instance_path, **settings):
        return push_env(instance_path, **{**database_settings, **settings})

    return make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def paths(request):
    """Where the client API is (support.Paths): /push/v1, or each path set in turn."""
    return getattr(request, "param", PUSH_V1)


@pytest.fixture
def api(client, paths):
    """The client and sender API of the test app (support.Api)."""
    return Api(client, paths)


@pytest.fixture
def make_api(make_app, paths):
    """A factory: the API (support.Api) of a new app with config overrides."""

    def make(**overrides):
        return Api(make_app(**overrides).test_client(), paths)

    return make


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
def make_gateway():
    """A factory: loopback push gateways (support.Gateway, with its arguments), closed after
    the test, which fails if any body one of them got did not fit its API."""
    gateways = []

    def make(**kwargs):
        gateways.append(Gateway(**kwargs))
        return gateways[-1]

    yield make
    for gw in gateways:
        gw.close()
    assert [gw.invalid for gw in gateways if gw.invalid] == []


@pytest.fixture
def gateway(make_gateway):
    """A loopback push gateway (support.Gateway), checking every body against its API."""
    return make_gateway()


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_unavailable(request, reason):
    """Skip a PostgreSQL test where no server can run, but fail the PostgreSQL suite."""
    if request.config.getoption("engine") == "postgresql":
        pytest.fail(f"--engine postgresql, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres(request):
    """A throwaway PostgreSQL server for the session; the test skips where none can run."""
    bindir = server_binaries()
    if bindir is None:
        postgres_unavailable(request, "no PostgreSQL server binaries (initdb and pg_ctl not on "
                                      "PATH nor under /usr/lib/postgresql/*/bin)")
    try:
        import psycopg2  # noqa: F401
        cluster = Cluster(bindir)
    except (ImportError, Unavailable) as e:
        postgres_unavailable(request, str(e))
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
