"""Sending (SPEC sections 2, 4, 5): sender API, sealing, gateway shapes, retries, history.

Every delivery here goes over real HTTP to the loopback ``Gateway`` of support.py, and encrypted
ones are opened with the phone's side of the crypto there, independent of crypto.py.
"""

import logging
import threading
import time

import pytest
from support import (ISS, Api, drain, encryption, envelope, fetch, phone_decrypt, phone_key,
                     stored_bytes, this_month)

import delivery
import models
from gateway import address_allowed
from models import ChannelState, Delivery, EncryptionKey, Notification, Pusher, db, purge_history

NOTIFY = "/_matrix/push/v1/notify"


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def worker(app):
    """A delivery worker on the test app, driven round by round."""
    w = delivery.Worker(app)
    yield w
    w.close()


def delivery_states():
    """The state of every delivery, oldest first."""
    return [d.state for d in fetch(Delivery.select().order_by(Delivery.id))]


def deliver_all(app):
    """Drain with a fresh worker on ``app``; return every delivery row afterwards."""
    with delivery.Worker(app) as w:
        drain(app, w)
        with app.app_context():
            db.connect(reuse_if_open=True)
            return list(Delivery.select().order_by(Delivery.id))


@pytest.fixture
def setup(alice, service, channel, register, gateway):
    """alice, a service, an enabled-by-default channel and a gateway."""
    channel("erp.task", default="enabled")
    return alice


# --- sender API ------------------------------------------------------------------------------


def test_encrypted_notification_decrypts_on_the_phone_after_ratcheting(
        app, api, setup, service, register, gateway, worker):
    initial = this_month(-2)
    register(setup, "phone-1", url=gateway.url(),
             encryption=encryption("kid-1", ISS, initial))
    response = api.send(service, payload={"task": "42", "text": "Grüße"}, prio="low",
                    counts={"unread": 3})
    assert response.status_code == 202
    created = response.get_json()
    assert created["deliveries"] == 1

    drain(app, worker)

    [note] = gateway.notifications()  # a Matrix gateway: the envelope is the content
    assert set(note) == {"event_id", "prio", "counts", "content", "devices"}
    assert note["event_id"] == created["notification_id"]
    assert note["prio"] == "low" and note["counts"] == {"unread": 3}
    sealed = note["content"]
    assert set(sealed) == {"ciphertext", "time_message_encrypted", "key_identifier", "identifier"}
    assert sealed["time_message_encrypted"] == this_month()
    assert sealed["key_identifier"] == "kid-1"
    assert sealed["identifier"] == created["notification_id"]
    assert phone_decrypt(ISS, initial, sealed) == {"task": "42", "text": "Grüße"}
    [device] = note["devices"]
    assert device["pushkey"] == "phone-1" and device["app_id"] == "com.example.app"
    assert device["data"] == {} and device["tweaks"] == {}
    assert isinstance(device["pushkey_ts"], int)


def test_ratchet_stores_only_the_current_generation(app, api, setup, service, register,
                                                     gateway, worker):
    initial = this_month(-2)
    register(setup, "phone-1", url=gateway.url(), encryption=encryption("kid-1", ISS, initial))
    api.send(service)
    drain(app, worker)
    with app.app_context():
        db.connect(reuse_if_open=True)
        key = EncryptionKey.get(EncryptionKey.key_identifier == "kid-1")
        assert key.period == this_month()
        stored = app.extensions["push_server_key"].open_generation("kid-1", key.period,
                                                                   key.sealed)
    assert stored.aes_key == phone_key(ISS, initial, this_month())
    raw = stored_bytes(app)
    assert bytes.fromhex(ISS) not in raw and ISS.encode() not in raw
    assert stored.aes_key not in raw and stored.secret not in raw


def test_each_message_gets_a_fresh_nonce(app, api, setup, service, register, gateway,
                                          worker):
    register(setup, "phone-1", url=gateway.url(), encryption=encryption())
    api.send(service)
    api.send(service)
    drain(app, worker)
    first, second = map(envelope, gateway.notifications())
    assert first["ciphertext"][:16] != second["ciphertext"][:16]
    assert phone_decrypt(ISS, "2024-11", first) == phone_decrypt(ISS, "2024-11", second)


def test_generation_ahead_of_the_clock_is_used_as_is(app, api, setup, service, register,
                                                      gateway, worker):
    ahead = this_month(3)
    register(setup, "phone-1", url=gateway.url(), encryption=encryption("kid-1", ISS, ahead))
    api.send(service)
    drain(app, worker)
    [sealed] = map(envelope, gateway.notifications())
    assert sealed["time_message_encrypted"] == ahead
    assert phone_decrypt(ISS, ahead, sealed) == {"task": "42"}


def test_plain_notification_carries_content_and_device_data_without_url(api,
        app, client, setup, service, register, gateway, worker):
    client.post("/push/v1/pushers/set", headers=setup, json={
        "kind": "http", "app_id": "com.example.app", "pushkey": "phone-1",
        "app_display_name": "A", "device_display_name": "D", "lang": "en",
        "data": {"url": gateway.url(), "custom": "keep-me"}})
    created = api.send(service, counts={"unread": 1}).get_json()
    drain(app, worker)
    [(path, body)] = gateway.requests
    assert path == NOTIFY
    note = body["notification"]
    assert note["event_id"] == created["notification_id"]
    assert note["type"] == "erp.task" and note["prio"] == "high"
    assert note["content"] == {"task": "42"} and note["counts"] == {"unread": 1}
    assert note["devices"][0]["data"] == {"custom": "keep-me"}


def test_event_id_only_format_sends_no_content(api, app, client, setup, service, gateway, worker):
    client.post("/push/v1/pushers/set", headers=setup, json={
        "kind": "http", "app_id": "com.example.app", "pushkey": "phone-1",
        "app_display_name": "A", "device_display_name": "D", "lang": "en",
        "data": {"url": gateway.url("/push/v1/notify"), "format": "event_id_only"}})
    api.send(service)
    drain(app, worker)
    [(path, body)] = gateway.requests
    assert path == "/push/v1/notify"
    assert "content" not in body["notification"]
    assert body["notification"]["devices"][0]["data"] == {"format": "event_id_only"}


def test_only_devices_that_want_the_channel_get_it(api, app, client, alice, service, channel,
                                                    register, gateway, worker):
    channel("on-by-default", default="enabled")
    channel("off-by-default", default="disabled")
    for key in ("default", "opted-in", "opted-out"):
        register(alice, key, url=gateway.url())
    client.post("/push/v1/channels/opted-in", headers=alice,
                json={"channels": [{"name": "off-by-default", "value": "enabled"}]})
    client.post("/push/v1/channels/opted-out", headers=alice,
                json={"channels": [{"name": "on-by-default", "value": "disabled"}]})

    on = api.send(service, channel="on-by-default").get_json()
    off = api.send(service, channel="off-by-default").get_json()
    assert on["deliveries"] == 2 and off["deliveries"] == 1
    drain(app, worker)
    got = {(n["type"], n["devices"][0]["pushkey"]) for n in gateway.notifications()}
    assert got == {("on-by-default", "default"), ("on-by-default", "opted-in"),
                   ("off-by-default", "opted-in")}


def test_sender_validation(api, client, alice, service, channel):
    channel("erp.task", default="enabled")
    assert api.send(service, channel="nope").get_json()["errcode"] == "M_INVALID_PARAM"
    big = api.send(service, payload={"x": "a" * 1011})
    assert big.status_code == 413 and big.get_json()["errcode"] == "M_TOO_LARGE"
    fits = api.send(service, payload={"x": "a" * 1010})  # exactly 1018 bytes of JSON
    assert fits.status_code == 202
    unknown_user = api.send(service, user="nobody")
    assert unknown_user.status_code == 202 and unknown_user.get_json()["deliveries"] == 0
    assert api.send(alice).status_code == 403
    assert api.send(service, prio="urgent").get_json()["errcode"] == "M_INVALID_PARAM"
    assert api.send(service, counts={"unread": "1"}).get_json()["errcode"] == "M_BAD_JSON"
    missing = client.post("/push/v1/notifications", json={"channel": "erp.task"},
                          headers=service).get_json()
    assert missing == {"errcode": "M_MISSING_PARAM",
                       "error": "Missing parameters: user_id, payload"}


def test_identifier_makes_sending_idempotent_per_service(app, api, runner, setup, service,
                                                          register, gateway):
    register(setup, "phone-1", url=gateway.url())
    first = api.send(service, identifier="evt-1").get_json()
    again = api.send(service, identifier="evt-1", payload={"other": 1}).get_json()
    assert again == first
    other_service = {"Authorization": "Bearer " + runner.invoke(
        args=["services", "create", "billing"]).output.strip().splitlines()[-1]}
    third = api.send(other_service, identifier="evt-1").get_json()
    assert third["notification_id"] != first["notification_id"]
    with app.app_context():
        db.connect(reuse_if_open=True)
        assert Delivery.select().count() == 2
        assert Notification.select().count() == 2


# --- delivery outcomes -----------------------------------------------------------------------


def test_503s_are_retried_and_delivered_exactly_once(app, api, setup, service, register,
                                                      gateway, worker):
    register(setup, "fail-3-phone", url=gateway.url())
    created = api.send(service).get_json()
    drain(app, worker)
    assert len(gateway.requests) == 4
    with app.app_context():
        db.connect(reuse_if_open=True)
        row = Delivery.get(Delivery.notification == created["notification_id"])
    assert row.state == "delivered" and row.attempts == 4


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap():
    config = {"RETRY_INITIAL_SECONDS": 1, "RETRY_MAX_SECONDS": 5}
    assert [delivery.retry_delay(config, n, None) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    assert delivery.retry_delay(config, 1, "3") == 3  # Retry-After is honoured, within the cap
    assert delivery.retry_delay(config, 1, "100") == 5


def test_retry_is_scheduled_in_the_future(make_app, alice, service, channel, register,
                                          gateway):
    app = make_app(RETRY_INITIAL_SECONDS=30)
    channel("erp.task", default="enabled")
    register(alice, "fail-1-phone", url=gateway.url())
    client = app.test_client()
    Api(client).send(service)
    with delivery.Worker(app) as w:
        with app.app_context():
            db.connect(reuse_if_open=True)
            before = time.time()
            assert w.run_once() == 1
            assert w.run_once() == 0  # not due yet
            row = Delivery.get()
        assert row.state == "pending" and row.attempts == 1
        assert row.next_attempt_at >= before + 30 and row.lease_owner is None
        assert "503" in row.last_error


def test_delivery_gives_up_after_the_configured_time(make_app, alice, service, channel,
                                                     register, gateway):
    app = make_app(RETRY_GIVE_UP_SECONDS=0)
    channel("erp.task", default="enabled")
    register(alice, "fail-5-phone", url=gateway.url())
    Api(app.test_client()).send(service)
    [row] = deliver_all(app)
    assert row.state == "failed" and row.last_error.startswith("gave up")
    assert len(gateway.requests) == 1


def test_other_4xx_fails_for_good_with_the_reason(app, api, setup, service, register,
                                                   gateway, worker):
    register(setup, "bad-phone", url=gateway.url())
    api.send(service)
    drain(app, worker)
    drain(app, worker)
    assert len(gateway.requests) == 1
    [row] = fetch(Delivery.select())
    assert row.state == "failed" and "400" in row.last_error and row.attempts == 1


def test_redirects_are_not_followed(app, api, setup, service, register, gateway, worker):
    register(setup, "phone-1", url=gateway.url())
    gateway.status_override = 307
    api.send(service)
    drain(app, worker)
    assert len(gateway.requests) == 1
    assert delivery_states() == ["failed"]


def test_rejected_pushkey_removes_its_pusher_and_channel_states(api,
        app, client, setup, service, register, gateway, worker, caplog):
    register(setup, "reject-this-key", url=gateway.url())
    register(setup, "phone-ok", url=gateway.url())
    client.post("/push/v1/channels/reject-this-key", headers=setup,
                json={"channels": [{"name": "erp.task", "value": "enabled"}]})
    caplog.set_level(logging.DEBUG)
    api.send(service)
    drain(app, worker)
    keys = [p["pushkey"] for p in client.get("/push/v1/pushers", headers=setup).get_json()[
        "pushers"]]
    assert keys == ["phone-ok"]
    with app.app_context():
        db.connect(reuse_if_open=True)
        assert ChannelState.select().count() == 0
        assert {d.state for d in Delivery.select()} == {"delivered"}
    assert "removed" in caplog.text and "reject-this-key" not in caplog.text


def test_private_gateways_are_refused_unless_allowed(make_app, alice, service, channel,
                                                     register, gateway):
    app = make_app(ALLOW_PRIVATE_GATEWAYS=False)
    channel("erp.task", default="enabled")
    register(alice, "phone-1", url=gateway.url())
    register(alice, "phone-2", url=f"http://localhost:{gateway.port}{NOTIFY}")
    Api(app.test_client()).send(service)
    rows = deliver_all(app)
    assert gateway.requests == []
    assert [r.state for r in rows] == ["failed", "failed"]
    assert all("non-public" in r.last_error for r in rows)


def test_address_check_covers_private_ranges():
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                    "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "0.0.0.0"):
        assert not address_allowed(address), address
    assert address_allowed("8.8.8.8") and address_allowed("2606:4700::1")


def test_gateway_url_rules_are_checked_again_at_send_time(make_app, alice, service, channel,
                                                          register, gateway):
    channel("erp.task", default="enabled")
    register(alice, "phone-1", url=gateway.url())  # http allowed at registration
    app = make_app(ALLOW_HTTP_GATEWAYS=False)  # then the operator turns it off
    Api(app.test_client()).send(service)
    [row] = deliver_all(app)
    assert gateway.requests == [] and row.state == "failed" and "https" in row.last_error


def test_delivery_to_a_removed_pusher_fails_without_sending(api, app, client, setup, service,
                                                             register, gateway, worker):
    register(setup, "phone-1", url=gateway.url())
    api.send(service)
    client.post("/push/v1/pushers/set", headers=setup,
                json={"kind": None, "app_id": "com.example.app", "pushkey": "phone-1"})
    drain(app, worker)
    assert gateway.requests == []
    assert delivery_states() == ["failed"]


# --- batch gateways --------------------------------------------------------------------------


def test_batch_gateways_get_up_to_100_per_request(app, api, setup, service,
                                                  register, gateway, worker):
    base = gateway.url("/push/v1/")
    app.config["MAX_PUSHERS_PER_USER"] = 500
    for i in range(120):
        register(setup, f"enc-{i:03d}", url=base, encryption=encryption(f"kid-{i}"))
    for i in range(3):
        register(setup, f"plain-{i}", url=base)
    created = api.send(service).get_json()
    assert created["deliveries"] == 123
    drain(app, worker)

    paths = [path for path, _ in gateway.requests]
    assert sorted(paths) == ["/push/v1/notify/batch"] + ["/push/v1/notifyEncrypted/batch"] * 2
    sizes = sorted(len(body["notifications"]) for _, body in gateway.requests)
    assert sizes == [3, 20, 100]
    for path, body in gateway.requests:
        ids = [item["id"] for item in body["notifications"]]
        assert len(set(ids)) == len(ids)
        for item in body["notifications"]:
            note = item["notification"]
            if path.endswith("notifyEncrypted/batch"):
                assert "devices" not in note and note["device"]["pushkey"].startswith("enc-")
                assert phone_decrypt(ISS, "2024-11", note) == {"task": "42"}
            else:
                assert note["devices"][0]["pushkey"].startswith("plain-")
                assert note["content"] == {"task": "42"}
    assert set(delivery_states()) == {"delivered"}


def test_a_base_without_its_trailing_slash_gets_the_endpoint_after_a_slash(
        app, api, setup, service, register, gateway, worker):
    # The concept's registration examples write the base as .../push/v1; it is the same
    # gateway as .../push/v1/, so both kinds of pusher share one batch per endpoint.
    bare, slashed = gateway.url("/tenant/push/v1"), gateway.url("/tenant/push/v1/")
    register(setup, "plain-bare", url=bare)
    register(setup, "plain-slashed", url=slashed)
    register(setup, "enc-bare", url=bare, encryption=encryption("kid-1"))
    assert api.send(service).get_json()["deliveries"] == 3
    drain(app, worker)

    requests = {path: body for path, body in gateway.requests}
    assert sorted(requests) == ["/tenant/push/v1/notify/batch",
                                "/tenant/push/v1/notifyEncrypted/batch"]
    plain = requests["/tenant/push/v1/notify/batch"]["notifications"]
    assert sorted(item["notification"]["devices"][0]["pushkey"] for item in plain) == [
        "plain-bare", "plain-slashed"]
    [sealed] = requests["/tenant/push/v1/notifyEncrypted/batch"]["notifications"]
    assert sealed["notification"]["device"]["pushkey"] == "enc-bare"
    assert phone_decrypt(ISS, "2024-11", sealed["notification"]) == {"task": "42"}
    assert set(delivery_states()) == {"delivered"}


def test_batch_item_results_are_honoured(app, api, setup, service, register, gateway,
                                         worker):
    base = gateway.url("/push/v1/")
    register(setup, "ok-phone", url=base)
    register(setup, "reject-phone", url=base)
    register(setup, "bad-phone", url=base)
    api.send(service)
    drain(app, worker)
    assert len(gateway.requests) == 1
    with app.app_context():
        db.connect(reuse_if_open=True)
        states = {d.pushkey: d.state for d in Delivery.select()}
        remaining = {p.pushkey for p in Pusher.select()}
    assert states == {"ok-phone": "delivered", "reject-phone": "delivered",
                      "bad-phone": "failed"}
    assert remaining == {"ok-phone", "bad-phone"}


def test_batch_503_is_retried(app, api, setup, service, register, gateway, worker):
    register(setup, "fail-2-phone", url=gateway.url("/push/v1/"))
    api.send(service)
    drain(app, worker)
    assert len(gateway.requests) == 3
    assert delivery_states() == ["delivered"]


# --- scale and workers -----------------------------------------------------------------------


def test_one_notification_fans_out_to_1000_devices_each_with_its_own_key(
        make_app, alice, service, channel, gateway):
    app = make_app(MAX_PUSHERS_PER_USER=1000)
    client = app.test_client()
    channel("erp.task", default="enabled")
    secrets_by_key = {}
    for i in range(1000):
        iss = f"{i:064x}"
        secrets_by_key[f"device-{i}"] = iss
        body = {"kind": "http", "app_id": "com.example.app", "pushkey": f"device-{i}",
                "app_display_name": "A", "device_display_name": "D", "lang": "en",
                "data": {"url": gateway.url()},
                "encryption": encryption(f"kid-{i}", iss, this_month(-1))}
        assert client.post("/push/v1/pushers/set", json=body, headers=alice).status_code == 200
    created = Api(client).send(service, payload={"fan": "out"}).get_json()
    assert created["deliveries"] == 1000
    deliver_all(app)
    notes = gateway.notifications()
    assert len(notes) == 1000
    seen = set()
    for note in notes:
        pushkey = note["devices"][0]["pushkey"]
        seen.add(pushkey)
        sealed = envelope(note)
        assert sealed["key_identifier"] == "kid-" + pushkey.split("-")[1]
        assert phone_decrypt(secrets_by_key[pushkey], this_month(-1), sealed) == {"fan": "out"}
    assert len(seen) == 1000


def test_concurrent_workers_never_claim_the_same_delivery(app, api, setup, service,
                                                           register, gateway):
    for i in range(40):
        register(setup, f"phone-{i}", url=gateway.url())
    for _ in range(10):
        api.send(service)
    app.config["WORKER_CLAIM"] = 7
    workers = [delivery.Worker(app) for _ in range(4)]
    claimed = [[] for _ in workers]

    def claim_all(index):
        with app.app_context():
            db.connect(reuse_if_open=True)
            while True:
                ids = workers[index].claim()
                if not ids:
                    break
                claimed[index].extend(ids)
            db.close()

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in workers:
        w.close()
    everything = [i for ids in claimed for i in ids]
    assert len(everything) == 400 and len(set(everything)) == 400


def test_a_lapsed_lease_is_claimed_again(app, api, setup, service, register, gateway):
    register(setup, "phone-1", url=gateway.url())
    api.send(service)
    app.config["DELIVERY_LEASE_SECONDS"] = -1  # a worker that died holding it
    dead, alive = delivery.Worker(app), delivery.Worker(app)
    try:
        with app.app_context():
            db.connect(reuse_if_open=True)
            assert len(dead.claim()) == 1
            app.config["DELIVERY_LEASE_SECONDS"] = 120
            assert alive.run_once() == 1
            assert Delivery.get().state == "delivered"
    finally:
        dead.close()
        alive.close()
    assert len(gateway.requests) == 1


def test_embedded_worker_delivers_without_help(make_app, alice, service, channel, register,
                                               gateway):
    app = make_app(EMBEDDED_WORKER=True, WORKER_POLL_SECONDS=0.1)
    try:
        channel("erp.task", default="enabled")
        register(alice, "phone-1", url=gateway.url())
        assert Api(app.test_client()).send(service).status_code == 202
        deadline = time.time() + 20
        while not gateway.requests and time.time() < deadline:
            time.sleep(0.05)
    finally:
        delivery.stop_embedded()
    assert len(gateway.requests) == 1


# --- history ---------------------------------------------------------------------------------


def test_history_is_visible_only_to_its_user(api, app, client, user_token, setup, service,
                                             register, gateway):
    bob = user_token("bob")
    register(setup, "alice-phone", url=gateway.url())
    register(bob, "bob-phone", url=gateway.url())
    first = api.send(service, payload={"n": 1}).get_json()["notification_id"]
    time.sleep(0.01)
    second = api.send(service, payload={"n": 2}).get_json()["notification_id"]
    for_bob = api.send(service, user="bob", payload={"n": 3}).get_json()["notification_id"]

    assert client.get(f"/push/v1/history/{first}", headers=setup).get_json() == {
        "identifier": first, "payload": {"n": 1}}
    denied = client.get(f"/push/v1/history/{first}", headers=bob)
    assert denied.status_code == 404 and denied.get_json()["errcode"] == "M_NOT_FOUND"
    assert client.get(f"/push/v1/history/{for_bob}", headers=setup).status_code == 404

    messages = client.get("/push/v1/history/device/alice-phone", headers=setup).get_json()
    assert messages == {"messages": [{"identifier": second, "payload": {"n": 2}},
                                     {"identifier": first, "payload": {"n": 1}}]}
    assert client.get("/push/v1/history/device/alice-phone", headers=bob).status_code == 404
    assert client.get("/push/v1/history/device/bob-phone", headers=bob).get_json()[
        "messages"] == [{"identifier": for_bob, "payload": {"n": 3}}]


def test_device_history_takes_pushkeys_with_slashes(api, client, setup, service, register,
                                                    gateway):
    register(setup, "a/b+c=", url=gateway.url())
    created = api.send(service).get_json()["notification_id"]
    for path in ("a/b+c=", "a%2Fb%2Bc%3D"):
        got = client.get(f"/push/v1/history/device/{path}", headers=setup).get_json()
        assert [m["identifier"] for m in got["messages"]] == [created]


def test_device_history_is_the_newest_limit_once_each(make_api, setup, service, register,
                                                      gateway):
    """Newest first, at most HISTORY_LIMIT, and a notification that reached the device through
    two of its pushers (two apps, one pushkey) once."""
    api = make_api(HISTORY_LIMIT=3)
    register(setup, "phone-1", url=gateway.url(), app_id="com.example.one")
    register(setup, "phone-1", url=gateway.url(), app_id="com.example.two")
    sent = []
    for n in range(5):
        response = api.send(service, payload={"n": n})
        assert response.get_json()["deliveries"] == 2
        sent.append(response.get_json()["notification_id"])
    got = api.client.get("/push/v1/history/device/phone-1", headers=setup).get_json()
    assert got == {"messages": [{"identifier": sent[n], "payload": {"n": n}}
                                for n in (4, 3, 2)]}


def test_notification_ids_begin_with_their_time(api, setup, service, register, gateway):
    """32 hex digits, the first 12 the milliseconds of their creation: later ones sort later."""
    register(setup, "phone-1", url=gateway.url())
    before = int(time.time() * 1000)
    ids = [api.send(service, payload={"n": n}).get_json()["notification_id"] for n in range(8)]
    after = int(time.time() * 1000)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert all(before <= int(i[:12], 16) <= after for i in ids)
    assert sorted(ids) == ids


def test_old_notifications_are_purged(api, app, client, setup, service, register, gateway, worker):
    register(setup, "phone-1", url=gateway.url())
    old = api.send(service).get_json()["notification_id"]
    new = api.send(service).get_json()["notification_id"]
    drain(app, worker)
    with app.app_context():
        db.connect(reuse_if_open=True)
        Notification.update(created_at=time.time() - 31 * 86400).where(
            Notification.id == old).execute()
        assert purge_history(app.config["HISTORY_DAYS"]) == 1
    assert client.get(f"/push/v1/history/{old}", headers=setup).status_code == 404
    assert client.get(f"/push/v1/history/{new}", headers=setup).status_code == 200


def test_the_purge_goes_oldest_first_in_batches_and_keeps_what_is_still_to_send(
        api, app, setup, service, register, gateway, worker, monkeypatch):
    register(setup, "phone-1", url=gateway.url())
    old = [api.send(service, payload={"n": n}).get_json()["notification_id"] for n in range(5)]
    new = api.send(service, payload={"n": "new"}).get_json()["notification_id"]
    drain(app, worker)
    waiting = api.send(service, payload={"n": "waiting"}).get_json()["notification_id"]
    statements = []
    monkeypatch.setattr(models, "PURGE_BATCH", 2)
    with app.app_context():
        db.connect(reuse_if_open=True)
        for age, notification_id in enumerate([waiting, *old]):  # the waiting one the oldest
            Notification.update(created_at=time.time() - (40 - age) * 86400).where(
                Notification.id == notification_id).execute()
        db.obj.query_hooks.append(lambda event: statements.append(event.sql))
        try:
            assert purge_history(app.config["HISTORY_DAYS"]) == 5
        finally:
            db.obj.query_hooks.clear()
        left = [n.id for n in Notification.select().order_by(Notification.created_at)]
    assert left == [waiting, new]
    # Two at a time, each batch (of two, two, then one) in a transaction of its own.
    assert len([sql for sql in statements if sql.startswith("DELETE FROM notification")]) == 3


def test_deliveries_command_reports_counts(app, api, runner, setup, service, register,
                                           gateway, worker):
    register(setup, "phone-1", url=gateway.url())
    register(setup, "bad-phone", url=gateway.url())
    api.send(service)
    api.send(service, user="alice")
    out = runner.invoke(args=["deliveries"]).output
    assert "pending\t4" in out
    drain(app, worker)
    out = runner.invoke(args=["deliveries"]).output
    assert "pending\t0" in out and "delivered\t2" in out and "failed\t2" in out


# --- one bad row never stalls the queue -------------------------------------------------------


def test_a_key_that_no_longer_opens_fails_alone(make_app, alice, service, channel, register,
                                                gateway):
    channel("erp.task", default="enabled")
    register(alice, "phone-enc", url=gateway.url(), encryption=encryption())
    register(alice, "phone-plain", url=gateway.url())
    Api(make_app().test_client()).send(service)
    app = make_app(SERVER_KEY="22" * 32)  # the operator lost or changed the server key
    rows = {row.pushkey: row for row in deliver_all(app)}
    assert rows["phone-plain"].state == "delivered"
    assert rows["phone-enc"].state == "failed" and "server key" in rows["phone-enc"].last_error
    assert [n["devices"][0]["pushkey"] for n in gateway.notifications()] == ["phone-plain"]


def test_a_corrupt_row_fails_alone(app, api, setup, service, register, gateway):
    register(setup, "phone-broken", url=gateway.url())
    register(setup, "phone-ok", url=gateway.url())
    api.send(service)
    with app.app_context(), db.connection_context():
        Pusher.update(data="{not json").where(Pusher.pushkey == "phone-broken").execute()
    rows = {row.pushkey: row for row in deliver_all(app)}
    assert rows["phone-ok"].state == "delivered"
    assert rows["phone-broken"].state == "failed"
    assert "could not build" in rows["phone-broken"].last_error


def test_deeply_nested_payloads_are_refused(api, setup, service):
    def nested(depth):
        value = 1
        for _ in range(depth):
            value = {"a": value}
        return value

    assert api.send(service, payload=nested(32)).status_code == 202
    deep = api.send(service, payload=nested(33))
    assert deep.status_code == 400 and deep.get_json()["errcode"] == "M_INVALID_PARAM"


def test_a_round_hands_back_what_its_lease_might_not_cover(make_app, alice, service, channel,
                                                           register, gateway):
    channel("erp.task", default="enabled")
    register(alice, "phone-1", url=gateway.url())
    app = make_app()
    Api(app.test_client()).send(service)
    # As if the round had already spent its lease on slow gateways: less is left of it than
    # one request may take.
    app.config.update(DELIVERY_LEASE_SECONDS=10, GATEWAY_CONNECT_TIMEOUT=5,
                      GATEWAY_READ_TIMEOUT=6)
    with delivery.Worker(app) as w:
        with app.app_context(), db.connection_context():
            assert w.run_once() == 1
            row = Delivery.get()
    assert gateway.requests == []
    assert row.state == "pending" and row.attempts == 0 and row.lease_owner is None
    assert row.next_attempt_at <= time.time()


def test_a_lease_shorter_than_a_request_is_refused_at_start(make_app):
    with pytest.raises(RuntimeError, match="PUSH_DELIVERY_LEASE_SECONDS"):
        make_app(DELIVERY_LEASE_SECONDS=10, GATEWAY_CONNECT_TIMEOUT=5, GATEWAY_READ_TIMEOUT=5)
