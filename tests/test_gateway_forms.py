"""What each gateway URL gets (SPEC section 5), over real HTTP to loopback gateways
(support.Gateway) that check every body they get: the gematik forms against the upstream YAML
itself, the Matrix form as Sygnal reads it. A stock Matrix gateway passes on only the Matrix
fields; the phone opens the envelope it passes on. A seed-era gateway gets the seed-era shape
on /notify, and the worker remembers that it is one.
"""

import json
import os

import pytest
import yaml
from support import (GATEWAY_YAML, ISS, MATRIX_FIELDS, drain, encryption, envelope, fetch,
                     gematik_errors, matrix_errors, phone_decrypt)

import delivery
from gateway import GatewayMemory, Request
from models import Delivery

SHARED_SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "spec")
ENVELOPE = {"ciphertext", "time_message_encrypted", "key_identifier", "identifier"}
PAYLOAD = {"task": "secret-task-42"}


@pytest.fixture
def worker(app):
    """A delivery worker on the test app, driven round by round."""
    w = delivery.Worker(app)
    yield w
    w.close()


@pytest.fixture
def setup(alice, channel):
    """alice and an enabled-by-default channel."""
    channel("erp.task.activate", default="enabled")
    return alice


def send(api, service):
    """Send PAYLOAD on the channel with counts; return the notification id."""
    response = api.send(service, channel="erp.task.activate", payload=PAYLOAD,
                        counts={"unread": 2})
    assert response.status_code == 202, response.get_json()
    return response.get_json()["notification_id"]


def states():
    """(state, attempts) of every delivery, oldest first."""
    return [(d.state, d.attempts) for d in fetch(Delivery.select().order_by(Delivery.id))]


# --- the YAML and the checks -------------------------------------------------------------------


@pytest.mark.parametrize("era, folder", [("latest", "upstream-latest"), ("seed", "upstream")])
@pytest.mark.skipif(not os.path.exists(SHARED_SPEC), reason="no ../shared beside the checkout")
def test_the_gateway_yaml_copies_match_the_shared_files(era, folder):
    with open(os.path.join(SHARED_SPEC, folder, "push_gateway_openapi.yaml")) as f:
        shared = yaml.safe_load(f)
    with open(GATEWAY_YAML[era]) as f:
        assert yaml.safe_load(f) == shared


def test_the_body_checks_refuse_what_the_apis_refuse():
    """The checks the gateways make can fail: shapes of the old contract are refused."""
    device = {"app_id": "a", "pushkey": "p"}
    sealed = {"ciphertext": "A" * 1404, "time_message_encrypted": "2024-11",
              "key_identifier": "k", "identifier": "n", "prio": "high"}
    item = {"id": "1", "notification": {**sealed, "devices": [device]}}  # devices, not device
    assert gematik_errors("/push/v1/notifyEncrypted/batch", {"notifications": [item]})
    item["notification"] = {**sealed, "device": device}
    assert gematik_errors("/push/v1/notifyEncrypted/batch", {"notifications": [item]}) == []
    # a current gateway's /notify: a plain notification needs prio
    assert gematik_errors("/push/v1/notify", {"notification": {"devices": [device]}})
    assert gematik_errors("/push/v1/notify", {"notification": {**sealed, "devices": [1]}},
                          seed_era=True)
    assert matrix_errors({"notification": {"devices": []}})
    assert matrix_errors({"notification": {"content": "x", "devices": [device]}})


# --- what each URL gets ------------------------------------------------------------------------


@pytest.mark.parametrize("path, encrypted, endpoint", [
    ("/push/v1/", False, "/push/v1/notify/batch"),
    ("/push/v1", False, "/push/v1/notify/batch"),
    ("/push/v1/", True, "/push/v1/notifyEncrypted/batch"),
    ("/push/v1", True, "/push/v1/notifyEncrypted/batch"),
    ("/push/v1/notify", False, "/push/v1/notify"),
    ("/push/v1/notify", True, "/push/v1/notifyEncrypted/batch"),
    ("/tenant/push/v1/notify?key=a%2Bb", True, "/tenant/push/v1/notifyEncrypted/batch?key=a%2Bb"),
    ("/tenant/push/v1?key=a", False, "/tenant/push/v1/notify/batch?key=a"),
    ("/_matrix/push/v1/notify", False, "/_matrix/push/v1/notify"),
    ("/_matrix/push/v1/notify", True, "/_matrix/push/v1/notify"),
])
def test_each_url_form_gets_its_endpoint_and_a_body_its_api_takes(
        app, api, setup, service, gateway, worker, path, encrypted, endpoint):
    extra = {"encryption": encryption()} if encrypted else {}
    api.register(setup, "phone-1", url=gateway.url(path), **extra)
    notification_id = send(api, service)
    drain(app, worker)

    [(got, body)] = gateway.requests
    assert got == endpoint
    [note] = gateway.notifications()
    if "/_matrix/" in endpoint:
        assert matrix_errors(body) == []
    else:
        assert gematik_errors(got.split("?")[0], body) == []
    if encrypted:
        assert phone_decrypt(ISS, "2024-11", envelope(note)) == PAYLOAD
        assert envelope(note)["identifier"] == notification_id
    else:
        assert note["event_id"] == notification_id and note["content"] == PAYLOAD
    assert states() == [("delivered", 1)]


@pytest.mark.parametrize("path", ["/push/v1/", "/push/v1/notify", "/_matrix/push/v1/notify"])
def test_plain_notifications_name_the_event_and_the_channel_in_every_form(
        app, api, setup, service, gateway, worker, path):
    api.register(setup, "phone-1", url=gateway.url(path))
    notification_id = send(api, service)
    drain(app, worker)
    [note] = gateway.notifications()
    # The gematik gateway builds an Apple push only when both event_id and room_id are there.
    assert note == {"event_id": notification_id, "room_id": "erp.task.activate",
                    "type": "erp.task.activate", "prio": "high", "counts": {"unread": 2},
                    "content": PAYLOAD, "devices": [note["devices"][0]]}
    assert note["devices"][0]["pushkey"] == "phone-1"


def test_encrypted_notifications_never_go_to_a_current_gateways_notify(
        app, api, setup, service, gateway, worker):
    for i in range(3):
        api.register(setup, f"phone-{i}", url=gateway.url("/push/v1/notify"),
                     encryption=encryption(f"kid-{i}"))
    api.register(setup, "plain", url=gateway.url("/push/v1/notify"))
    send(api, service)
    drain(app, worker)
    by_path = {}
    for path, body in gateway.requests:
        by_path.setdefault(path, []).append(body)
    assert sorted(by_path) == ["/push/v1/notify", "/push/v1/notifyEncrypted/batch"]
    [plain] = by_path["/push/v1/notify"]
    assert "ciphertext" not in json.dumps(plain) and plain["notification"]["content"] == PAYLOAD
    [batch] = by_path["/push/v1/notifyEncrypted/batch"]  # the three in one batch
    items = [item["notification"] for item in batch["notifications"]]
    assert sorted(n["device"]["pushkey"] for n in items) == ["phone-0", "phone-1", "phone-2"]
    assert all(phone_decrypt(ISS, "2024-11", n) == PAYLOAD for n in items)
    assert {state for state, _ in states()} == {"delivered"}


def test_a_stock_matrix_gateway_passes_the_envelope_on_and_the_phone_opens_it(
        app, api, setup, service, gateway, worker):
    api.register(setup, "phone-1", url=gateway.url(), encryption=encryption())
    notification_id = send(api, service)
    drain(app, worker)

    [passed_on] = gateway.forwarded  # only the Matrix fields: what reaches the phone
    assert set(passed_on) <= set(MATRIX_FIELDS)
    assert set(passed_on["content"]) == ENVELOPE
    assert phone_decrypt(ISS, "2024-11", passed_on["content"]) == PAYLOAD
    assert passed_on["content"]["identifier"] == passed_on["event_id"] == notification_id
    assert passed_on["prio"] == "high" and passed_on["counts"] == {"unread": 2}
    [(_, body)] = gateway.requests
    assert set(body["notification"]) == set(passed_on)  # nothing was left behind


def test_an_encrypted_matrix_notification_shows_neither_payload_nor_channel(
        app, api, setup, service, gateway, worker):
    api.register(setup, "phone-1", url=gateway.url(), encryption=encryption())
    send(api, service)
    drain(app, worker)
    [(_, body)] = gateway.requests
    raw = json.dumps(body)
    assert "secret-task-42" not in raw and "erp.task" not in raw
    assert "type" not in body["notification"] and "room_id" not in body["notification"]


# --- a gateway of the seed-era API -------------------------------------------------------------


@pytest.mark.parametrize("missing_status", [404, 405])
def test_a_seed_era_gateway_gets_the_seed_era_shape_on_notify_and_that_is_remembered(
        app, api, setup, service, make_gateway, worker, missing_status):
    old = make_gateway(seed_era=True, missing_status=missing_status)
    api.register(setup, "phone-1", url=old.url("/push/v1/notify"), encryption=encryption())
    first = send(api, service)
    drain(app, worker)

    assert [path for path, _ in old.requests] == ["/push/v1/notifyEncrypted/batch",
                                                  "/push/v1/notify"]
    body = old.requests[1][1]
    assert gematik_errors("/push/v1/notify", body, seed_era=True) == []
    note = body["notification"]
    assert set(note) == ENVELOPE | {"prio", "counts", "devices"}
    assert note["identifier"] == first and note["devices"][0]["pushkey"] == "phone-1"
    assert phone_decrypt(ISS, "2024-11", note) == PAYLOAD
    assert states() == [("delivered", 1)]

    send(api, service)  # the worker remembers: straight to /notify
    drain(app, worker)
    assert [path for path, _ in old.requests[2:]] == ["/push/v1/notify"]
    assert states() == [("delivered", 1), ("delivered", 1)]


def test_on_a_seed_era_gateway_only_notify_urls_fall_back(app, api, setup, service,
                                                         make_gateway, worker):
    """A base URL is of the upstream-latest API: its gateway lacking the batch endpoint is a
    permanent failure, while a /notify pusher in the same batch falls back."""
    old = make_gateway(seed_era=True)
    api.register(setup, "single", url=old.url("/push/v1/notify"), encryption=encryption("k1"))
    api.register(setup, "base", url=old.url("/push/v1/"), encryption=encryption("k2"))
    api.register(setup, "plain", url=old.url("/push/v1/notify"))
    send(api, service)
    drain(app, worker)

    rows = {d.pushkey: d for d in fetch(Delivery.select())}
    assert rows["single"].state == rows["plain"].state == "delivered"
    assert rows["base"].state == "failed" and "404" in rows["base"].last_error
    [batch] = [body for path, body in old.requests if path.endswith("/batch")]
    assert len(batch["notifications"]) == 2  # one batch for both encrypted pushers
    notify = [body["notification"] for path, body in old.requests if path == "/push/v1/notify"]
    assert sorted(n["devices"][0]["pushkey"] for n in notify) == ["plain", "single"]


def test_what_a_worker_learned_of_a_gateway_lapses():
    sealed = Request("https://gw.example/push/v1/notifyEncrypted/batch", {}, batch=True,
                     seed_era=Request("https://gw.example/push/v1/notify", {}))
    remembering, forgetting = GatewayMemory(), GatewayMemory(seconds=0)
    for memory in (remembering, forgetting):
        assert memory.as_known(sealed) is sealed
        memory.learn_seed_era(sealed.url)
        memory.learn_batch_limit(sealed.url, 50)
    assert remembering.as_known(sealed) is sealed.seed_era
    assert remembering.batch_limit(sealed.url) == 50
    assert forgetting.as_known(sealed) is sealed  # tried afresh: it may have been upgraded
    assert forgetting.batch_limit(sealed.url) == 100

