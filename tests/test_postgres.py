"""What only PostgreSQL has: column types, ``FOR UPDATE SKIP LOCKED`` claims, racing requests.

Everything else (client API, sending, delivery, CLI, robustness) runs on PostgreSQL as the
whole suite does with ``--engine postgresql`` (``make test-postgres``). These tests use the
session's throwaway cluster (conftest ``postgres``; skipped where no server can run, under
``make test``) and a database of their own each.
"""

import os
import signal
import subprocess
import threading
import time
from collections import Counter

from servers import BIN, ROOT, push_env, query, wait_until

from support import Api, cli_token, encryption, pusher_body

import delivery
from models import Delivery, Notification, db

NOTIFY = "/_matrix/push/v1/notify"


# --- helpers ---------------------------------------------------------------------------------


def tokens(app, *users, services=("erp",)):
    """Authorization headers for new users and services, made with the operator CLI."""
    runner = app.test_cli_runner()
    out = {name: {"Authorization": "Bearer " + cli_token(runner, "users", "create", name)}
           for name in users}
    for name in services:
        out[name] = {"Authorization": "Bearer " + cli_token(runner, "services", "create", name)}
    return out


def add_channel(app, channel_id, default):
    result = app.test_cli_runner().invoke(
        args=["channels", "add", channel_id, "--default", default])
    assert result.exit_code == 0, result.output


def in_db(app, query):
    """Run ``query()`` against the app's database from the test."""
    with app.app_context():
        db.connect(reuse_if_open=True)
        try:
            return query()
        finally:
            db.close()


def recording(gateway):
    """Wrap the gateway to keep every answer with its request: [(path, body, status, reply)]."""
    answered = []
    answer = gateway.answer

    def record(path, body, size=0):
        status, reply = answer(path, body, size)
        with gateway.lock:
            answered.append((path, body, status, reply))
        return status, reply

    gateway.answer = record
    return answered


def accepted(answered):
    """Counter of (notification id, pushkey) the gateway accepted (2xx, batch item ok)."""
    out = Counter()
    for path, body, status, reply in answered:
        if not 200 <= status < 300:
            continue
        if "notifications" in body:
            ok = {r["id"] for r in reply["results"] if r["status"] in ("success", "partial")}
            items = [item["notification"] for item in body["notifications"] if item["id"] in ok]
        else:
            items = [body["notification"]]
        for note in items:
            devices = [note["device"]] if "device" in note else note["devices"]
            for device in devices:
                out[(note.get("event_id") or note["identifier"], device["pushkey"])] += 1
    return out


# --- the schema ------------------------------------------------------------------------------


def test_times_are_stored_exactly(pg_app):
    """Unix times need DOUBLE PRECISION / BIGINT: REAL would round them to 128 seconds."""

    def columns():
        cursor = db.execute_sql(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'public' AND (column_name LIKE '%%_at' "
            "OR column_name LIKE '%%_until' OR column_name = 'pushkey_ts')")
        return {(t, c): kind for t, c, kind in cursor.fetchall()}

    types = in_db(pg_app, columns)
    assert types and set(types.values()) <= {"double precision", "bigint"}, types
    assert types[("delivery", "next_attempt_at")] == "double precision"
    assert types[("pusher", "pushkey_ts")] == "bigint"

    queue(pg_app, count_pushers=1, count_notifications=1)
    exact = 1_750_000_000.123456

    def round_trip():
        Delivery.update(next_attempt_at=exact, lease_until=exact + 0.5).execute()
        row = Delivery.get()
        return row.next_attempt_at, row.lease_until

    assert in_db(pg_app, round_trip) == (exact, exact + 0.5)


# --- concurrent workers: FOR UPDATE SKIP LOCKED ----------------------------------------


def queue(app, count_pushers=40, count_notifications=10, url=None):
    client = app.test_client()
    api = Api(client)
    auth = tokens(app, "alice")
    add_channel(app, "erp.task", "enabled")
    for i in range(count_pushers):
        api.register(auth["alice"], f"phone-{i:02d}", url=url or "https://gw.example" + NOTIFY)
    for _ in range(count_notifications):
        assert api.send(auth["erp"]).status_code == 202
    return count_pushers * count_notifications


def test_concurrent_claims_never_overlap(pg_app):
    total = queue(pg_app)
    pg_app.config["WORKER_CLAIM"] = 7
    workers = [delivery.Worker(pg_app) for _ in range(6)]
    claimed = [[] for _ in workers]
    start = threading.Barrier(len(workers))
    errors = []

    def claim_all(index):
        try:
            with pg_app.app_context():
                db.connect(reuse_if_open=True)
                start.wait()
                while ids := workers[index].claim():
                    claimed[index].extend(ids)
                db.close()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for w in workers:
        w.close()
    assert not errors, errors
    everything = [i for ids in claimed for i in ids]
    assert len(everything) == total and len(set(everything)) == total
    assert sum(1 for ids in claimed if ids) >= 2  # they really did run side by side
    owners = in_db(pg_app, lambda: Counter(d.lease_owner for d in Delivery.select()))
    assert sorted(owners.values()) == sorted(len(ids) for ids in claimed if ids)


def test_claim_skips_rows_locked_by_another_transaction(pg_app):
    """A claim running while another transaction holds row locks neither waits nor takes them."""
    queue(pg_app, count_pushers=5, count_notifications=2)
    locked, release, ready = [], threading.Event(), threading.Event()

    def hold_locks():
        with pg_app.app_context():
            db.connect(reuse_if_open=True)
            with db.atomic():
                query = (Delivery.select(Delivery.id).order_by(Delivery.id).limit(4)
                         .for_update())
                locked.extend(d.id for d in query)
                ready.set()
                release.wait(30)
            db.close()

    holder = threading.Thread(target=hold_locks)
    holder.start()
    try:
        assert ready.wait(30)
        got = []
        worker = delivery.Worker(pg_app)

        def claim():
            with pg_app.app_context():
                db.connect(reuse_if_open=True)
                got.extend(worker.claim())
                db.close()

        claimer = threading.Thread(target=claim)
        claimer.start()
        claimer.join(10)
        assert not claimer.is_alive(), "claim blocked on rows locked by another transaction"
        worker.close()
    finally:
        release.set()
        holder.join(30)
    assert len(locked) == 4 and len(got) == 6 and not set(got) & set(locked)


def test_concurrent_workers_deliver_each_exactly_once(pg_app, gateway):
    total = queue(pg_app, count_pushers=30, count_notifications=10, url=gateway.url())
    answered = recording(gateway)
    pg_app.config["WORKER_CLAIM"] = 13
    workers = [delivery.Worker(pg_app) for _ in range(4)]
    start = threading.Barrier(len(workers))
    errors = []

    def work(w):
        try:
            with pg_app.app_context():
                db.connect(reuse_if_open=True)
                start.wait()
                deadline = time.time() + 60
                while time.time() < deadline:
                    if not w.run_once():
                        if delivery.stats()["pending"] == 0:
                            break
                        time.sleep(0.01)  # the rest is leased to the others
                db.close()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    for w in workers:
        w.close()
    assert not errors, errors
    counts = accepted(answered)
    assert len(counts) == total and set(counts.values()) == {1}
    assert len(answered) == total
    states = in_db(pg_app, lambda: Counter(d.state for d in Delivery.select()))
    assert states == {"delivered": total}


def test_two_worker_processes_share_one_queue_and_survive_a_killed_one(pg_app, pg_url,
                                                                       gateway, tmp_path):
    # Several hosts, one queue: 2,000 deliveries, two `flask worker` processes, one killed
    # outright midway. Each delivery arrives; twice only if it was in flight at the kill.
    pg_app.config["MAX_PUSHERS_PER_USER"] = 200
    total = queue(pg_app, count_pushers=200, count_notifications=10, url=gateway.url())
    assert total == 2000
    gateway.delay = 0.005  # so that the killed worker has requests in flight
    env = push_env(pg_app.instance_path, DATABASE_URL=pg_url, ALLOW_HTTP_GATEWAYS=True,
                   ALLOW_PRIVATE_GATEWAYS=True, WORKER_POLL_SECONDS=0.1,
                   GATEWAY_CONNECT_TIMEOUT=1, GATEWAY_READ_TIMEOUT=2,
                   DELIVERY_LEASE_SECONDS=5)
    logs = [open(tmp_path / f"worker-{i}.log", "w") for i in range(2)]
    workers = [subprocess.Popen([os.path.join(BIN, "flask"), "--app", "app", "worker"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
               for log in logs]
    try:
        wait_until(lambda: len(gateway.requests) >= 600, 120, "a third of the deliveries")
        victim = workers[0]
        victim.kill()
        victim.wait(30)
        in_flight = {(n, pushkey) for n, pushkey in query(
            env, "SELECT notification_id, pushkey FROM delivery WHERE state = 'pending'"
                 " AND lease_owner LIKE %s", (f"%:{victim.pid}:%",))}
        wait_until(lambda: not query(env, "SELECT id FROM delivery WHERE state = 'pending'"),
                   120, "the surviving worker to finish the queue")
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGINT)
                worker.wait(30)
        for log in logs:
            log.close()
    seen = Counter((n["event_id"], n["devices"][0]["pushkey"]) for n in gateway.notifications())
    assert len(seen) == total
    twice = {pair for pair, count in seen.items() if count > 1}
    assert twice <= in_flight, twice - in_flight
    assert all(count <= 2 for count in seen.values())
    states = in_db(pg_app, lambda: Counter(d.state for d in Delivery.select()))
    assert states == {"delivered": total}


# --- racing requests -------------------------------------------------------------------------


def race(app, requests):
    """Fire ``requests`` (callables taking a test client) at once; return their statuses."""
    barrier = threading.Barrier(len(requests))
    results = [None] * len(requests)

    def go(index):
        client = app.test_client()
        barrier.wait()
        try:
            results[index] = requests[index](client)
        except Exception as e:  # TESTING propagates what would be a 500
            results[index] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_racing_sends_with_one_identifier_store_one_notification(pg_app):
    queue(pg_app, count_pushers=3, count_notifications=0)
    erp = tokens(pg_app, services=("erp",))["erp"]

    def post(client):
        response = Api(client).send(erp, identifier="same-event")
        return response.status_code, response.get_json()

    for _ in range(3):
        results = race(pg_app, [post] * 8)
        assert {status for status, _ in results} == {202}, results
        assert len({body["notification_id"] for _, body in results}) == 1
        assert {body["deliveries"] for _, body in results} == {3}
    assert in_db(pg_app, lambda: (Notification.select().count(), Delivery.select().count())) \
        == (1, 3)


def test_racing_registrations_of_one_pusher_all_succeed(pg_app):
    alice = tokens(pg_app, "alice", services=())["alice"]

    def same_pusher(round_):
        return lambda client: client.post("/push/v1/pushers/set", headers=alice,
                                          json=pusher_body(f"pk-{round_}")).status_code

    def same_key(round_, i):
        body = pusher_body(f"pk-{round_}-{i}", encryption=encryption(f"kid-{round_}"))
        return lambda client: client.post("/push/v1/pushers/set", headers=alice,
                                          json=body).status_code

    for round_ in range(5):
        assert race(pg_app, [same_pusher(round_)] * 8) == [200] * 8
        assert race(pg_app, [same_key(round_, i) for i in range(8)]) == [200] * 8


def test_leases_of_this_hosts_dead_processes_are_released(pg_app):
    queue(pg_app, count_pushers=3, count_notifications=1)
    host, me = delivery.this_host(), os.getpid()
    born = delivery.process_start(me)
    owners = [f"{host}:{me}:{born}:a1a1a1a1",  # alive: this very process
              f"{host}:{me}:{int(born) + 1}:b2b2b2b2",  # our pid, another start: dead
              f"other_host%:{me}:{int(born) + 1}:c3c3c3c3"]  # another host

    def lease_and_release():
        for row, owner in zip(Delivery.select().order_by(Delivery.id), owners):
            (Delivery.update(lease_owner=owner, lease_until=time.time() + 600)
             .where(Delivery.id == row.id).execute())
        released = delivery.release_dead_leases()
        return released, [d.lease_owner for d in Delivery.select().order_by(Delivery.id)]

    assert in_db(pg_app, lease_and_release) == (1, [owners[0], None, owners[2]])


def test_a_connection_the_server_dropped_is_replaced_before_the_next_request(pg_app, pg_url,
                                                                             tmp_path):
    """Threads keep their connection; after the server has dropped it (a restart), the next
    request gets a new one instead of an error. (pg_terminate_backend waits, up to 5 s, until
    the backend is gone, as a restart is over before requests reach the new server.)"""
    alice = tokens(pg_app, "alice", services=())["alice"]
    client = pg_app.test_client()
    assert client.get("/push/v1/pushers", headers=alice).status_code == 200
    kept = db.connection()
    dropped = query(push_env(tmp_path, DATABASE_URL=pg_url),
                    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()")
    assert dropped == [(True,)]
    assert client.get("/push/v1/pushers", headers=alice).status_code == 200
    assert db.connection() is not kept
