"""The app on a real PostgreSQL server: client API, sending and delivery, concurrent workers.

A throwaway cluster is started for this module (initdb + pg_ctl in a temporary folder,
listening on 127.0.0.1 on a free port and on a unix socket in that folder) and stopped with
``pg_ctl stop -m immediate`` afterwards. Every test gets a database of its own. Without the
server binaries (``initdb``, ``pg_ctl`` on PATH or under /usr/lib/postgresql/*/bin) or without
psycopg2 the module is skipped. initdb refuses to run as root, so as root the server runs as
the ``postgres`` system user (``runuser``).
"""

import os
import threading
import time
from collections import Counter

from support import ISS, Api, cli_token, drain, encryption, phone_decrypt, pusher_body, this_month

import delivery
from models import ChannelState, Delivery, EncryptionKey, Notification, Pusher, db, purge_history

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

    def record(path, body):
        status, reply = answer(path, body)
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


# --- (a) the client API ----------------------------------------------------------------------


def test_client_api(pg_app):
    app, client = pg_app, pg_app.test_client()
    api = Api(client)
    auth = tokens(app, "alice", "bob")
    alice, bob = auth["alice"], auth["bob"]
    add_channel(app, "erp.task", "enabled")
    add_channel(app, "erp.news", "disabled")

    # register: plain and encrypted (a pushkey with / + =, as base64 ones have)
    api.register(alice, "pk-plain", profile_tag="tag-1")
    api.register(alice, "a/b+c=", encryption=encryption("kid-1"))
    listed = client.get("/push/v1/pushers", headers=alice).get_json()["pushers"]
    assert [p["pushkey"] for p in listed] == ["pk-plain", "a/b+c="]
    assert listed[0]["profile_tag"] == "tag-1" and "encryption" not in listed[0]
    assert listed[0]["data"] == {"url": "https://gw.example/_matrix/push/v1/notify"}
    assert isinstance(listed[0]["pushkey_ts"], int)
    assert listed[1]["encryption"] == {"method": "aes-hmac-sha256", "key_identifier": "kid-1"}
    assert ISS not in str(listed)
    assert api.pushkeys(bob) == []

    # the stored key generation is bytea on PostgreSQL; it opens with the server key
    key = in_db(app, lambda: EncryptionKey.get(EncryptionKey.key_identifier == "kid-1"))
    generation = app.extensions["push_server_key"].open_generation("kid-1", key.period,
                                                                   bytes(key.sealed))
    assert generation.period == "2024-11"

    # the same key_identifier with another iss is refused
    other_iss = pusher_body("pk-x", encryption=encryption("kid-1", iss="ff" * 32))
    refused = client.post("/push/v1/pushers/set", json=other_iss, headers=alice)
    assert refused.status_code == 400 and refused.get_json()["errcode"] == "M_INVALID_PARAM"

    # channels: catalogue, then a device's states; set, overwrite (upsert), clear
    catalogue = client.get("/push/v1/channels", headers=alice).get_json()["channels"]
    assert catalogue == [{"id": "erp.news", "status": "disabled"},
                         {"id": "erp.task", "status": "enabled"}]
    assert api.channels(alice, "pk-plain") == {"erp.news": "not_set",
                                                          "erp.task": "not_set"}
    assert api.set_channels(alice, "pk-plain", ("erp.news", "enabled"),
                            ("erp.task", "disabled")).status_code == 200
    assert api.channels(alice, "pk-plain") == {"erp.news": "enabled",
                                                          "erp.task": "disabled"}
    # ON CONFLICT DO UPDATE
    assert api.set_channels(alice, "pk-plain", ("erp.news", "disabled")).status_code == 200
    assert api.set_channels(alice, "pk-plain", ("erp.task", "not_set")).status_code == 200
    assert api.channels(alice, "pk-plain") == {"erp.news": "disabled",
                                                          "erp.task": "not_set"}
    assert api.set_channels(alice, "a%2Fb%2Bc%3D", ("erp.task", "enabled")).status_code == 200
    assert api.channels(alice, "a/b+c=")["erp.task"] == "enabled"
    unknown = client.post("/push/v1/channels/pk-plain", headers=alice,
                          json={"channels": [{"name": "erp.task", "value": "enabled"},
                                             {"name": "nope", "value": "enabled"}]})
    assert unknown.status_code == 400
    assert api.channels(alice, "pk-plain")["erp.task"] == "not_set"  # all or nothing
    assert client.get("/push/v1/channels/pk-plain", headers=bob).status_code == 404

    # upsert: same (app_id, pushkey) updates in place; dropping encryption drops the key
    api.register(alice, "pk-plain", device_display_name="Renamed")
    api.register(alice, "a/b+c=")
    listed = client.get("/push/v1/pushers", headers=alice).get_json()["pushers"]
    assert [(p["pushkey"], p["device_display_name"]) for p in listed] == [
        ("pk-plain", "Renamed"), ("a/b+c=", "Phone")]
    assert "profile_tag" not in listed[0] and "encryption" not in listed[1]
    assert in_db(app, lambda: EncryptionKey.select().count()) == 0

    # append false (the default) takes the pushkey away from other users, with their states;
    # append true leaves them alone
    api.register(bob, "shared", encryption=encryption("kid-bob"))
    assert api.set_channels(bob, "shared", ("erp.news", "enabled")).status_code == 200
    api.register(alice, "shared", append=True)
    assert api.pushkeys(bob) == ["shared"]
    assert api.channels(bob, "shared")["erp.news"] == "enabled"
    api.register(alice, "shared", append=False)
    assert api.pushkeys(bob) == []
    assert api.pushkeys(alice) == ["pk-plain", "a/b+c=", "shared"]
    assert in_db(app, lambda: ChannelState.select().where(
        ChannelState.pushkey == "shared").count()) == 0
    assert in_db(app, lambda: EncryptionKey.select().count()) == 0

    # kind null deletes; the device's channel states go with its last pusher
    api.register(alice, "pk-plain", app_id="com.example.other")
    api.unregister(alice, "pk-plain", app_id="com.example.app")
    assert api.channels(alice, "pk-plain")["erp.news"] == "disabled"  # one left
    api.unregister(alice, "pk-plain", app_id="com.example.other")
    assert api.pushkeys(alice) == ["a/b+c=", "shared"]
    assert client.get("/push/v1/channels/pk-plain", headers=alice).status_code == 404
    assert in_db(app, lambda: ChannelState.select().where(
        ChannelState.pushkey == "pk-plain").count()) == 0
    # deleting what is not there is fine
    api.unregister(alice, "pk-plain", app_id="com.example.app")

    # the operator deletes a user with everything of theirs
    result = app.test_cli_runner().invoke(args=["users", "delete", "alice"])
    assert result.exit_code == 0, result.output
    assert in_db(app, lambda: (Pusher.select().count(), ChannelState.select().count())) == (0, 0)
    assert client.get("/push/v1/pushers", headers=alice).status_code == 401
    assert client.get("/healthz").get_json() == {"status": "ok"}


# --- (b) sending and delivery ----------------------------------------------------------------


def test_sending_and_delivery(pg_app, gateway):
    app, client = pg_app, pg_app.test_client()
    api = Api(client)
    auth = tokens(app, "alice", services=("erp", "crm"))
    alice, erp, crm = auth["alice"], auth["erp"], auth["crm"]
    add_channel(app, "erp.task", "enabled")
    add_channel(app, "erp.news", "disabled")
    answered = recording(gateway)

    initial = this_month(-2)  # the worker ratchets two months and stores the new generation
    api.register(alice, "phone-plain", url=gateway.url())
    api.register(alice, "phone-enc", url=gateway.url(),
                                          encryption=encryption("kid-1", ISS, initial))
    api.register(alice, "fail-2-phone", url=gateway.url())
    api.register(alice, "reject-phone", url=gateway.url())
    api.register(alice, "batch-enc", url=gateway.url("/push/v1/"),
                                          encryption=encryption("kid-2", ISS, initial))
    api.register(alice, "batch-plain", url=gateway.url("/push/v1/"))
    api.register(alice, "muted", url=gateway.url())
    assert api.set_channels(alice, "reject-phone", ("erp.task", "enabled"),
                            ("erp.news", "enabled")).status_code == 200
    assert api.set_channels(alice, "muted", ("erp.task", "disabled")).status_code == 200
    receivers = {"phone-plain", "phone-enc", "fail-2-phone", "reject-phone", "batch-enc",
                 "batch-plain"}

    # an identifier makes a send idempotent (per service)
    first = api.send(erp, identifier="task-1", payload={"task": "1", "text": "Grüße"})
    again = api.send(erp, identifier="task-1", payload={"task": "1", "text": "Grüße"})
    assert first.status_code == again.status_code == 202
    assert first.get_json() == again.get_json()
    assert first.get_json()["deliveries"] == len(receivers)
    other = api.send(crm, identifier="task-1", payload={"task": "2"}).get_json()
    plain = api.send(erp, payload={"task": "3"}, prio="low", counts={"unread": 2}).get_json()
    nobody = api.send(erp, user="nobody").get_json()
    assert nobody["deliveries"] == 0
    ids = [first.get_json()["notification_id"], other["notification_id"],
           plain["notification_id"]]
    assert len(set(ids)) == 3
    assert in_db(app, lambda: Notification.select().count()) == 4
    assert in_db(app, lambda: Delivery.select().where(Delivery.state == "pending").count()) == 18

    worker = delivery.Worker(app)
    try:
        drain(app, worker)
        rounds_after = len(gateway.requests)
        drain(app, worker)  # nothing left: no more requests
        assert len(gateway.requests) == rounds_after
    finally:
        worker.close()

    # every delivery delivered, each accepted by the gateway exactly once
    rows = in_db(app, lambda: list(Delivery.select()))
    assert len(rows) == 18
    assert {r.state for r in rows} == {"delivered"}
    assert all(r.lease_owner is None and r.finished_at for r in rows)
    expected = Counter({(n, pk): 1 for n in ids for pk in receivers})
    assert accepted(answered) == expected
    retried = [r for r in rows if r.pushkey == "fail-2-phone"]
    assert sum(r.attempts for r in retried) == 3 + 2  # two 503s were absorbed by retries
    assert all(r.attempts == 1 for r in rows if r.pushkey != "fail-2-phone")
    assert not any(pk == "muted" for _, pk in accepted(answered))

    # the rejected pushkey lost its pusher and its channel states; the rest stay
    assert set(api.pushkeys(alice)) == receivers - {"reject-phone"} | {"muted"}
    assert in_db(app, lambda: ChannelState.select().where(
        ChannelState.pushkey == "reject-phone").count()) == 0

    # encrypted deliveries decrypt on the phone after the ratchet; the key row moved on
    notes = gateway.notifications()
    sealed = [n for n in notes if "ciphertext" in n]
    assert sealed and all(n["time_message_encrypted"] == this_month() for n in sealed)
    by_id = {n["identifier"]: phone_decrypt(ISS, initial, n) for n in sealed}
    assert by_id[ids[0]] == {"task": "1", "text": "Grüße"} and by_id[ids[2]] == {"task": "3"}
    periods = in_db(app, lambda: {k.key_identifier: k.period for k in EncryptionKey.select()})
    assert periods == {"kid-1": this_month(), "kid-2": this_month()}
    plain_notes = [n for n in notes if n.get("event_id") == ids[2]]
    assert all(n["prio"] == "low" and n["counts"] == {"unread": 2} and n["content"] ==
               {"task": "3"} and n["type"] == "erp.task" for n in plain_notes)

    # history on PostgreSQL: newest first, only the caller's
    messages = client.get("/push/v1/history/device/phone-plain", headers=alice).get_json()
    assert [m["identifier"] for m in messages["messages"]] == [ids[2], ids[1], ids[0]]
    assert client.get(f"/push/v1/history/{ids[0]}", headers=alice).get_json() == {
        "identifier": ids[0], "payload": {"task": "1", "text": "Grüße"}}
    assert client.get(f"/push/v1/history/{nobody['notification_id']}",
                      headers=alice).status_code == 404

    out = app.test_cli_runner().invoke(args=["deliveries"]).output
    assert "pending\t0" in out and "delivered\t18" in out and "failed\t0" in out

    # purge: old notifications with nothing pending go, with their deliveries
    def purge():
        Notification.update(created_at=time.time() - 31 * 86400).where(
            Notification.id == ids[0]).execute()
        return purge_history(app.config["HISTORY_DAYS"]), Delivery.select().count()

    assert in_db(app, purge) == (1, 12)
    assert client.get(f"/push/v1/history/{ids[0]}", headers=alice).status_code == 404


def test_failures_and_removed_pushers(pg_app, gateway):
    app, client = pg_app, pg_app.test_client()
    api = Api(client)
    auth = tokens(app, "alice")
    alice, erp = auth["alice"], auth["erp"]
    add_channel(app, "erp.task", "enabled")
    api.register(alice, "bad-phone", url=gateway.url())
    api.register(alice, "gone-phone", url=gateway.url())
    api.register(alice, "bad-batch", url=gateway.url("/push/v1/"))
    api.send(erp)
    api.unregister(alice, "gone-phone", app_id="com.example.app")
    worker = delivery.Worker(app)
    try:
        drain(app, worker)
    finally:
        worker.close()
    rows = in_db(app, lambda: {d.pushkey: d for d in Delivery.select()})
    assert {k: d.state for k, d in rows.items()} == {
        "bad-phone": "failed", "gone-phone": "failed", "bad-batch": "failed"}
    assert "400" in rows["bad-phone"].last_error
    assert rows["gone-phone"].pusher_id is None  # ON DELETE SET NULL
    assert rows["bad-batch"].last_error.startswith("gateway:")
    assert sorted(path for path, _ in gateway.requests) == [NOTIFY, "/push/v1/notify/batch"]


# --- (c) concurrent workers: FOR UPDATE SKIP LOCKED ----------------------------------------


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
