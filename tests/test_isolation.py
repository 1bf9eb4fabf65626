"""One bad gateway must not stall anyone else (issue 8).

In-process workers against gateways on 127.0.0.1: outcomes are written as each request ends,
a gateway host gets at most PUSH_GATEWAY_CONCURRENCY requests at once, a failing one is paused
as a whole while its deliveries wait, a delivery that waits too long for a slot goes back
untried, and a worker starting up takes over the leases of this host's dead processes. Then
the same through real gunicorn processes: a trickling gateway next to a healthy one, and a
server killed with SIGKILL while requests to a stalling gateway are in flight.
"""

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager

import pytest
from servers import Gunicorn, call, cli, cli_token, free_port, query, wait_until
from support import (
    Gateway,
    SocketGateway,
    drain,
    fetch,
    never_answer,
    trickle_body,
    untrusted_tls_gateway,
)

import delivery
from models import Delivery, db

# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def setup(alice, service, channel):
    """alice, a service and an enabled-by-default channel."""
    channel("erp.task", default="enabled")
    return alice


@contextmanager
def running(app):
    """A worker looping in a thread, as in a server process, until the block ends."""
    worker = delivery.Worker(app)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        delivery.wake()
        thread.join(60)
        assert not thread.is_alive()


def rows(**where):
    """Delivery rows by pushkey (each pushkey here has one delivery, unless said otherwise)."""
    query = Delivery.select().order_by(Delivery.id)
    for name, value in where.items():
        query = query.where(getattr(Delivery, name) == value)
    return fetch(query)


# --- no waiting on strangers ------------------------------------------------------------------


def test_outcomes_are_written_as_each_request_ends_while_a_slow_one_is_in_flight(
        make_app, api, setup, user_token, service, register, gateway):
    bob = user_token("bob")
    slow = SocketGateway(trickle_body)  # cut off by the 3 s deadline, never by a read timeout
    try:
        register(setup, "alice-phone", url=slow.url())
        register(bob, "bob-phone", url=gateway.url())
        app = make_app(GATEWAY_CONNECT_TIMEOUT=1, GATEWAY_READ_TIMEOUT=2,
                       WORKER_POLL_SECONDS=0.1)
        with running(app):
            assert api.send(service, user="alice").status_code == 202
            wait_until(lambda: slow.accepted(), 10, "alice's request to start")
            for n in range(3):
                assert api.send(service, user="bob", payload={"n": n}).status_code == 202
                wait_until(lambda: len(rows(pushkey="bob-phone", state="delivered")) == n + 1,
                           10, "bob's notification to be delivered and written")
                [alice_row] = rows(pushkey="alice-phone")
                assert alice_row.attempts == 0 and alice_row.lease_owner  # still in flight
            wait_until(lambda: rows(pushkey="alice-phone")[0].attempts, 20,
                       "alice's request to end")
    finally:
        slow.close()
    [alice_row] = rows(pushkey="alice-phone")
    assert alice_row.state == "pending" and "deadline" in alice_row.last_error
    assert len(gateway.requests) == 3


@pytest.fixture
def stalled(setup, register):
    """A gateway that takes requests and never answers, with alice's phone-1 and phone-2."""
    gateway = SocketGateway(never_answer)
    register(setup, "phone-1", url=gateway.url())
    register(setup, "phone-2", url=gateway.url())
    yield gateway
    gateway.close()


def test_a_delivery_waiting_too_long_for_a_slot_is_handed_back_untried(
        make_app, api, service, stalled):
    # One slot; a request may take 2 s and must start while 3 s of its 4 s lease are left.
    app = make_app(GATEWAY_CONCURRENCY=1, DELIVERY_LEASE_SECONDS=4,
                   GATEWAY_CONNECT_TIMEOUT=0.5, GATEWAY_READ_TIMEOUT=1.5)
    api.send(service)
    with delivery.Worker(app) as worker:
        with app.app_context(), db.connection_context():
            assert worker.run_once() == 2
    assert stalled.accepted() == 1
    tried, waited = rows()
    assert tried.state == "pending" and tried.attempts == 1 and "timed out" in tried.last_error
    assert waited.state == "pending" and waited.attempts == 0 and waited.last_error is None
    assert waited.lease_owner is None and waited.next_attempt_at <= time.time()


def test_a_stopping_worker_writes_what_is_under_way_and_hands_back_the_rest(
        make_app, api, service, stalled):
    app = make_app(GATEWAY_CONCURRENCY=1, GATEWAY_CONNECT_TIMEOUT=0.5,
                   GATEWAY_READ_TIMEOUT=1.5, WORKER_POLL_SECONDS=0.1)
    api.send(service)
    with running(app):
        wait_until(lambda: stalled.accepted(), 10, "the first request to start")
    # running() returned: the worker has stopped
    assert stalled.accepted() == 1
    tried, waited = rows()
    assert (tried.attempts, tried.lease_owner, tried.state) == (1, None, "pending")
    assert (waited.attempts, waited.lease_owner, waited.state) == (0, None, "pending")


# --- fairness between gateways ----------------------------------------------------------------


def test_a_gateway_host_never_gets_more_than_its_slots_while_others_are_served(
        make_app, api, setup, user_token, service, register, gateway):
    bob = user_token("bob")
    slow = Gateway()
    slow.delay = 0.5
    try:
        for i in range(6):
            register(setup, f"slow-{i}", url=slow.url())
            register(bob, f"fast-{i}", url=gateway.url())
        app = make_app(WORKER_THREADS=8, GATEWAY_CONCURRENCY=2)
        api.send(service, user="alice")
        api.send(service, user="bob")
        with delivery.Worker(app) as worker:
            drain(app, worker)
        assert slow.most_active == 2
    finally:
        slow.close()
    assert len(slow.requests) == 6 and len(gateway.requests) == 6
    finished = {row.pushkey: row.finished_at for row in rows(state="delivered")}
    assert len(finished) == 12
    # bob's gateway was served at once, not after alice's slow one had used every thread
    assert max(finished[f"fast-{i}"] for i in range(6)) < max(
        finished[f"slow-{i}"] for i in range(6)) - 0.5


def test_work_held_for_a_slow_gateway_is_bounded(make_app, api, setup, service, register):
    slow = Gateway()
    slow.delay = 3.0  # each request holds its one slot for 3 s: slow, by the worker's measure
    try:
        for i in range(50):
            register(setup, f"phone-{i}", url=slow.url())
        app = make_app(GATEWAY_CONCURRENCY=1, WORKER_CLAIM=2, WORKER_POLL_SECONDS=0.1)
        api.send(service)
        with running(app):
            wait_until(lambda: slow.requests, 10, "the first request")
            time.sleep(3)  # the gateway counts as slow after 1 s: the worker claims past it
            leased = len([row for row in rows() if row.lease_owner])
    finally:
        slow.close()
    # claimed past the slow gateway, but no more than HELD_CLAIMS claims' worth held waiting
    assert 2 < leased <= delivery.HELD_CLAIMS * 2 + 2


def test_a_failing_gateway_is_paused_and_its_deliveries_wait_for_it(
        make_app, api, setup, service, register, gateway):
    for i in range(6):
        register(setup, f"phone-{i}", url=gateway.url())
    app = make_app(GATEWAY_PAUSE_INITIAL_SECONDS=1, GATEWAY_PAUSE_MAX_SECONDS=1,
                   WORKER_POLL_SECONDS=0.1)  # retries themselves are immediate (TEST_CONFIG)
    gateway.status_override = 503
    with running(app):
        api.send(service, payload={"n": 1})
        wait_until(lambda: gateway.requests, 10, "the first requests")
        time.sleep(1)
        api.send(service, payload={"n": 2})  # new deliveries wait for the pause too
        time.sleep(2)
        failing = len(gateway.requests)
        waiting = rows()
        gateway.status_override = None  # the gateway is back
        wait_until(lambda: len(rows(state="delivered")) == 12, 30, "everything delivered")
    # about 3 s of a failing gateway: the first requests, then one per pause (0.5-1 s)
    assert 1 <= failing <= 12
    assert {row.state for row in waiting} == {"pending"}
    assert sum(row.attempts for row in waiting) == failing
    assert len(gateway.notifications()) == failing + 12


def test_certificate_failures_are_retried_and_pause_the_gateway(
        make_app, api, setup, service, register):
    bad_tls = untrusted_tls_gateway()
    try:
        for i in range(3):
            register(setup, f"phone-{i}", url=bad_tls.url(scheme="https"))
        app = make_app(GATEWAY_PAUSE_INITIAL_SECONDS=1, GATEWAY_PAUSE_MAX_SECONDS=1,
                       WORKER_POLL_SECONDS=0.1)
        with running(app):
            api.send(service)
            wait_until(lambda: bad_tls.accepted(), 10, "the first TLS handshake")
            time.sleep(3)
        handshakes = bad_tls.accepted()
    finally:
        bad_tls.close()
    tried = [row for row in rows() if row.attempts]
    assert tried and {row.state for row in rows()} == {"pending"}
    assert all(row.last_error.startswith("CertificateFailure: ") for row in tried)
    assert all("certificate verify failed" in row.last_error for row in tried)
    assert handshakes <= 10  # not one per delivery and retry: one per pause


# --- leases of dead processes -----------------------------------------------------------------


def exited_pid():
    """The pid of a process that has run and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_lease_owner_names_this_host_process_and_its_start_time(app, monkeypatch):
    with delivery.Worker(app) as worker:
        host, pid, start, _ = worker.owner.rsplit(":", 3)
    assert (host, int(pid)) == (delivery.this_host(), os.getpid())
    assert start == delivery.process_start(os.getpid()) and start.isdigit()
    monkeypatch.setattr("socket.gethostname", lambda: "node-" + "x" * 60 + "-a")
    long_a = delivery.this_host()
    monkeypatch.setattr("socket.gethostname", lambda: "node-" + "x" * 60 + "-b")
    assert len(long_a) == 24 and long_a != delivery.this_host()
    assert len(delivery.lease_owner()) <= Delivery.lease_owner.max_length


def test_a_zombie_counts_as_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        wait_until(lambda: delivery.process_start(child.pid) is None, 10,
                   "the child to exit (a zombie until reaped)")
        assert os.path.exists(f"/proc/{child.pid}")  # still there, but dead
    finally:
        child.wait()


def test_starting_releases_the_leases_of_this_hosts_dead_processes_only(
        app, api, setup, service, register, gateway):
    host, me = delivery.this_host(), os.getpid()
    born = delivery.process_start(me)
    owners = {
        "alive": f"{host}:{me}:{born}:a1a1a1a1",
        "dead": f"{host}:{exited_pid()}:{born}:b2b2b2b2",
        "pid-reused": f"{host}:{me}:{int(born) + 1}:c3c3c3c3",
        "other-host": f"elsewhere:{exited_pid()}:{born}:d4d4d4d4",
        "old-format": f"{host}:{exited_pid()}:e5e5e5e5",
    }
    for pushkey in owners:
        register(setup, pushkey, url=gateway.url())
    api.send(service)
    held_until = time.time() + 600
    with app.app_context(), db.connection_context():
        for pushkey, owner in owners.items():
            (Delivery.update(lease_owner=owner, lease_until=held_until)
             .where(Delivery.pushkey == pushkey).execute())
        assert {owner for owner in owners.values() if delivery.owner_is_dead(owner, host)} == {
            owners["dead"], owners["pid-reused"]}
        assert delivery.release_dead_leases() == 2
    leases = {row.pushkey: row.lease_owner for row in rows()}
    assert leases == {**owners, "dead": None, "pid-reused": None}


# --- through gunicorn -------------------------------------------------------------------------


def gunicorn_env(server_env, instance, **settings):
    return server_env(instance, EMBEDDED_WORKER=True, ALLOW_PRIVATE_GATEWAYS=True,
                      ALLOW_HTTP_GATEWAYS=True, RATE_LIMIT_ENABLED=False, **settings)


def register_over_http(port, token, pushkey, url):
    body = {"kind": "http", "app_id": "com.example.app", "pushkey": pushkey,
            "app_display_name": "App", "device_display_name": "Phone", "lang": "en",
            "data": {"url": url}}
    assert call(port, "POST", "/push/v1/pushers/set", body, token) == (200, {})


def notify(port, token, user_id, n=0):
    status, answer = call(port, "POST", "/push/v1/notifications",
                          {"user_id": user_id, "channel": "C", "payload": {"n": n}}, token)
    assert status == 202, answer
    return answer["notification_id"]


def leasing_pids(env):
    """The pids of the processes that hold a lease right now."""
    owners = query(env, "SELECT lease_owner FROM delivery WHERE lease_until > %s",
                   (time.time(),))
    return {int(owner.split(":")[1]) for (owner,) in owners}


def test_a_trickling_gateway_does_not_hold_up_another_users_notifications(tmp_path, server_env):
    instance = tmp_path / "instance"
    env = gunicorn_env(server_env, instance, GATEWAY_CONNECT_TIMEOUT=1, GATEWAY_READ_TIMEOUT=2)
    slow = SocketGateway(trickle_body)  # 200, then a byte every 0.2 s for 2000 s
    fast = Gateway()
    latencies = []
    try:
        with Gunicorn(env, workers=2, log_dir=tmp_path) as server:
            cli(env, "channels", "add", "C", "--default", "enabled")
            service = cli_token(env, "services", "create", "erp")
            mallory = cli_token(env, "users", "create", "mallory")
            bob = cli_token(env, "users", "create", "bob")
            for i in range(4):
                register_over_http(server.port, mallory, f"slow-{i}", slow.url())
            register_over_http(server.port, bob, "bob-phone", fast.url())
            for n in range(10):  # until every worker process has some of mallory's in flight
                notify(server.port, service, "mallory", n)
                time.sleep(0.5)
                if leasing_pids(env) >= set(server.worker_pids()):
                    break
            sent = []
            for n in range(10):
                started = time.monotonic()
                sent.append(notify(server.port, service, "bob", n))
                wait_until(lambda: len(fast.notifications()) == n + 1, 60,
                           f"bob's notification {n}")
                latencies.append(time.monotonic() - started)
                time.sleep(0.3)
            time.sleep(3)  # time enough for a second copy of anything to turn up
            received = Counter(note["event_id"] for note in fast.notifications())
            log = server.log()
            mallorys = query(env, "SELECT state, attempts, last_error FROM delivery"
                                  " WHERE pushkey LIKE %s", ("slow-%",))
    finally:
        slow.close()
        fast.close()
    print(f"\nbob's notification latencies (s): {', '.join(f'{t:.2f}' for t in latencies)}")
    assert received == Counter({nid: 1 for nid in sent})
    assert max(latencies) < 10
    # mallory's deliveries were cut off at the deadline and wait for a retry
    assert {state for state, _, _ in mallorys} == {"pending"}
    tried = [error for _, attempts, error in mallorys if attempts]
    assert tried and all(error.startswith("DeadlineExceeded: no complete answer within the "
                                          "3 s deadline") for error in tried)
    assert "Traceback" not in log


def test_a_server_killed_mid_send_resends_at_once_after_a_restart(tmp_path, server_env):
    instance = tmp_path / "instance"
    env = gunicorn_env(server_env, instance)  # the default 120 s lease and 5 + 10 s timeouts
    port = free_port()
    stalled = SocketGateway(never_answer, port=port)
    gateway = None
    try:
        with Gunicorn(env, workers=2, log_dir=tmp_path, name="before") as server:
            cli(env, "channels", "add", "C", "--default", "enabled")
            service = cli_token(env, "services", "create", "erp")
            alice = cli_token(env, "users", "create", "alice")
            for i in range(3):
                register_over_http(server.port, alice, f"phone-{i}",
                                   f"http://127.0.0.1:{port}/_matrix/push/v1/notify")
            sent = [notify(server.port, service, "alice", n) for n in range(2)]
            wait_until(lambda: stalled.accepted() >= 4, 30, "requests to be in flight")
            server.kill()
        stalled.close()
        gateway = Gateway(port=port)
        killed = time.monotonic()
        with Gunicorn(env, workers=2, log_dir=tmp_path, name="after"):
            wait_until(lambda: len(gateway.notifications()) >= 6, 60,
                       "the deliveries in flight at the kill to be sent again")
            resent_after = time.monotonic() - killed
            time.sleep(2)
            received = Counter((note["event_id"], note["devices"][0]["pushkey"])
                               for note in gateway.notifications())
    finally:
        stalled.close()
        if gateway:
            gateway.close()
    print(f"\nresent {resent_after:.1f} s after the kill (lease: 120 s)")
    assert received == Counter({(nid, f"phone-{i}"): 1 for nid in sent for i in range(3)})
