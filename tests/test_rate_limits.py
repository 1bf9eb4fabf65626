"""Rate limits (SPEC section 3, 429): per user and per service whichever token they use, failed
authentications per client address, X-Forwarded-For believed only from PUSH_TRUSTED_PROXIES,
and every count shared by all server processes (real gunicorn with four workers)."""

import gc
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from servers import Gunicorn, call, push_env
from servers import cli_token as server_cli_token
from support import assert_error, bearer, cli_token

from models import db

PUSHERS = "/push/v1/pushers"
UNKNOWN = {"Authorization": "Bearer pu_not-a-token"}


def failures(client, count, address, forwarded=None):
    """``count`` requests with an unknown token from ``address``; their statuses."""
    headers = dict(UNKNOWN)
    statuses = []
    for n in range(count):
        if forwarded is not None:
            headers["X-Forwarded-For"] = forwarded(n) if callable(forwarded) else forwarded
        response = client.get(PUSHERS, headers=headers, environ_base={"REMOTE_ADDR": address})
        statuses.append(response.status_code)
    return statuses


@pytest.fixture
def limited(make_app):
    """A factory: the test client of an app with rate limits on (3 failures a minute)."""

    def make(**overrides):
        return make_app(RATE_LIMIT_ENABLED=True, AUTH_FAILURES_PER_MINUTE=3,
                        **overrides).test_client()

    return make


# --- in one process -------------------------------------------------------------------------


def test_unknown_tokens_from_one_address_are_limited_and_another_address_is_not(limited):
    client = limited()
    assert failures(client, 3, "203.0.113.5") == [401, 401, 401]
    response = client.get(PUSHERS, headers=UNKNOWN, environ_base={"REMOTE_ADDR": "203.0.113.5"})
    assert_error(response, 429, "M_LIMIT_EXCEEDED")
    wait_ms = response.get_json()["retry_after_ms"]
    assert 0 < wait_ms <= 60_000
    assert int(response.headers["Retry-After"]) == -(-wait_ms // 1000)
    assert failures(client, 1, "203.0.113.6") == [401]


def test_a_valid_token_still_works_from_an_address_that_failed(limited, alice):
    """Many users can share one address (a NAT, a proxy): one broken client there must not
    lock them all out. The limit is on guessing, and a guess is answered 429."""
    client = limited()
    assert failures(client, 5, "203.0.113.5") == [401, 401, 401, 429, 429]
    response = client.get(PUSHERS, headers=alice, environ_base={"REMOTE_ADDR": "203.0.113.5"})
    assert response.status_code == 200


def test_requests_without_a_token_are_no_failed_guesses(limited):
    client = limited()
    for _ in range(5):
        response = client.get(PUSHERS, environ_base={"REMOTE_ADDR": "203.0.113.5"})
        assert_error(response, 401, "M_MISSING_TOKEN")
    assert failures(client, 1, "203.0.113.5") == [401]


def test_forwarded_for_from_an_untrusted_peer_is_ignored(limited):
    client = limited(TRUSTED_PROXIES="10.0.0.0/8")
    statuses = failures(client, 5, "203.0.113.5", forwarded=lambda n: f"198.51.100.{n}")
    assert statuses == [401, 401, 401, 429, 429]


def test_forwarded_for_from_a_trusted_proxy_names_the_client(limited):
    client = limited(TRUSTED_PROXIES="10.0.0.0/8, 192.0.2.1")
    assert failures(client, 4, "10.0.0.2", forwarded="198.51.100.7") == [401, 401, 401, 429]
    assert failures(client, 1, "10.0.0.2", forwarded="198.51.100.8") == [401]
    # Behind two trusted proxies: the right-most address that is not one of them. What the
    # client itself put further left is its own word and does not count.
    assert failures(client, 1, "192.0.2.1", forwarded="1.2.3.4, 198.51.100.7, 10.0.0.3") == [429]
    assert failures(client, 1, "10.0.0.2", forwarded="198.51.100.7, 198.51.100.9") == [401]


def test_ipv6_clients_count_by_their_64(limited):
    client = limited()
    assert failures(client, 2, "2001:db8:1:2::1") == [401, 401]
    assert failures(client, 2, "2001:db8:1:2:ffff::9") == [401, 429]
    assert failures(client, 1, "2001:db8:1:3::1") == [401]


def test_limits_are_shared_by_apps_on_one_instance_folder(make_app, alice):
    """Two apps, two connections to the counters: as two processes would have."""
    apps = [make_app(RATE_LIMIT_ENABLED=True, RATE_LIMIT_PER_MINUTE=4) for _ in range(2)]
    statuses = [apps[n % 2].test_client().get(PUSHERS, headers=alice).status_code
                for n in range(6)]
    assert statuses == [200, 200, 200, 200, 429, 429]


def test_rate_limits_off_turn_off_the_failure_limit_too(make_app, tmp_path):
    client = make_app(RATE_LIMIT_ENABLED=False, AUTH_FAILURES_PER_MINUTE=1).test_client()
    assert failures(client, 5, "203.0.113.5") == [401] * 5
    assert not os.path.exists(tmp_path / "instance" / "ratelimit.sqlite3")


@pytest.mark.sqlite_only  # the counters file beside an SQLite database
def test_the_counters_file_is_private(limited, tmp_path):
    failures(limited(), 1, "203.0.113.5")
    for name in ("ratelimit.sqlite3", "ratelimit.sqlite3-wal", "ratelimit.sqlite3.lock"):
        assert os.stat(tmp_path / "instance" / name).st_mode & 0o777 == 0o600, name


@pytest.mark.sqlite_only  # the counters file beside an SQLite database
def test_a_damaged_counters_file_is_started_afresh(limited, tmp_path, caplog):
    """Written without fsync, the file may not survive a power cut whole; its counts are worth
    nothing then, and must not fail every request."""
    failures(limited(), 1, "203.0.113.5")
    gc.collect()  # that app is gone: its connection closed, the WAL folded into the file
    path = tmp_path / "instance" / "ratelimit.sqlite3"
    assert not os.path.exists(f"{path}-wal")
    with open(path, "r+b") as f:
        f.write(b"\xff" * 4096)
    client = limited()
    assert failures(client, 4, "203.0.113.5") == [401, 401, 401, 429]
    assert "rate-limit counters" in caplog.text and "damaged" in caplog.text


def test_rate_limits_on_postgresql_live_in_an_unlogged_table(make_app, pg_url, tmp_path):
    app = make_app(DATABASE_URL=pg_url, RATE_LIMIT_ENABLED=True, RATE_LIMIT_PER_MINUTE=2,
                   AUTH_FAILURES_PER_MINUTE=2)
    try:
        alice = bearer(cli_token(app.test_cli_runner(), "users", "create", "alice"))
        client = app.test_client()
        assert [client.get(PUSHERS, headers=alice).status_code for _ in range(3)] == [
            200, 200, 429]
        assert failures(client, 3, "203.0.113.5") == [401, 401, 429]
        with db.connection_context():
            persistence = db.execute_sql(
                "SELECT relpersistence FROM pg_class WHERE relname = 'rate_limit'").fetchone()
        assert persistence == ("u",)  # UNLOGGED: no WAL, no fsync for a count
        assert not os.path.exists(tmp_path / "instance" / "ratelimit.sqlite3")
    finally:
        if not db.is_closed():
            db.close()


# --- across gunicorn processes --------------------------------------------------------------

ACCESS_LINE = re.compile(r"^access pid=<(\d+)> status=(\d+) request=GET (\S+) ", re.MULTILINE)


@pytest.fixture(scope="module")
def server(tmp_path_factory, new_database):
    """Four workers with small limits, 127.0.0.1 as the trusted proxy, and an access log
    that names the process behind every answer."""
    folder = tmp_path_factory.mktemp("limits")
    env = push_env(folder / "instance", **new_database(), EMBEDDED_WORKER=False,
                   RATE_LIMIT_ENABLED=True,
                   RATE_LIMIT_PER_MINUTE=10, AUTH_FAILURES_PER_MINUTE=6,
                   TRUSTED_PROXIES="127.0.0.1")
    args = ["--access-logfile", "-",
            "--access-logformat", "access pid=%(p)s status=%(s)s request=%(r)s "]
    with Gunicorn(env, workers=4, log_dir=folder, args=args) as server:
        server.env = env
        yield server


def answered_by(server, marker):
    """{pid: [status, ...]} of the requests whose query string holds ``marker``."""
    found = {}
    for pid, status, target in ACCESS_LINE.findall(server.log()):
        if marker in target:
            found.setdefault(pid, []).append(int(status))
    return found


def test_a_users_limit_holds_across_processes_and_tokens(server):
    first = server_cli_token(server.env, "users", "create", "carol")
    second = server_cli_token(server.env, "users", "token", "carol")
    marker = uuid.uuid4().hex
    statuses = [call(server.port, "GET", f"{PUSHERS}?probe={marker}",
                     token=(first, second)[n % 2])[0] for n in range(24)]
    assert statuses.count(200) == 10 and statuses.count(429) == 14, statuses
    processes = answered_by(server, marker)
    assert len(processes) >= 2, processes  # the budget was shared, not per process


def test_failed_authentication_is_limited_per_address_across_processes(server):
    marker = uuid.uuid4().hex

    def guess(source):
        return call(server.port, "GET", f"{PUSHERS}?probe={marker}", token="pu_guess",
                    source=source)[0]

    # Four at a time, so that more than one worker answers (one at a time, the worker that
    # answered the last one may well take them all).
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: guess("127.0.0.2"), range(12)))
    assert sorted(statuses) == [401] * 6 + [429] * 6, statuses
    assert guess("127.0.0.3") == 401  # another address has its own budget
    assert len(answered_by(server, marker)) >= 2


def test_forwarded_for_is_believed_only_from_a_trusted_proxy(server):
    def guess(source, forwarded):
        return call(server.port, "GET", PUSHERS, token="pu_guess", source=source,
                    headers={"X-Forwarded-For": forwarded})[0]

    # An untrusted peer that makes up a new address for every request: counted as itself.
    statuses = [guess("127.0.0.4", f"198.51.100.{n}") for n in range(8)]
    assert statuses == [401] * 6 + [429] * 2, statuses
    # The trusted proxy: the address it forwards is the client.
    statuses = [guess("127.0.0.1", "198.51.100.7") for _ in range(8)]
    assert statuses == [401] * 6 + [429] * 2, statuses
    assert guess("127.0.0.1", "198.51.100.8") == 401
