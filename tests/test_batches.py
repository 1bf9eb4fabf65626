"""Batches by size (SPEC section 5): a batch body stays within PUSH_GATEWAY_MAX_BATCH_BYTES as
sent and at most 100 items; a gateway that refuses a batch for its size (413, or 400 "Batch
size exceeds maximum limit" with or without details.max_batch_size) gets the same items again
in smaller batches, under the worker's rules (slots, leases), and every one is delivered; only
a single notification refused as too large fails, for good and saying so.
"""

import time

import pytest
from support import ISS, drain, encryption, fetch, phone_decrypt

import delivery
from gateway import GatewayMemory, Job, Request, encode, group_into_jobs
from models import Delivery, db

BASE = "/push/v1/"
ENDPOINT = "/push/v1/notifyEncrypted/batch"


@pytest.fixture
def crowd(app, alice, channel):
    """A factory: ``n`` encrypted pushers of alice at the gateway base ``url``, each with
    ``pad`` bytes of pusher data; then a notification for all of them."""
    app.config["MAX_PUSHERS_PER_USER"] = 500
    channel("erp.task", default="enabled")

    def make(api, service, url, n, pad=0):
        for i in range(n):
            data = {"pad": "x" * pad} if pad else {}
            api.register(alice, f"phone-{i:03d}", url=url, encryption=encryption(f"kid-{i}"),
                         data={"url": url, **data})
        response = api.send(service)
        assert response.get_json()["deliveries"] == n
    return make


def item_counts(gateway):
    """The number of items of each batch request the gateway got, in order."""
    return [len(body["notifications"]) for _, body in gateway.requests]


def delivered_once(n):
    """What ``states`` is once ``n`` deliveries each went through in one attempt."""
    return [("delivered", 1)] * n


def states():
    return [(d.state, d.attempts) for d in fetch(Delivery.select().order_by(Delivery.id))]


def test_a_batch_body_as_sent_stays_within_the_byte_limit(app, api, service, gateway, crowd):
    """The issue's case: 100 encrypted items with 4 KiB of pusher data each are ~550 KB."""
    crowd(api, service, gateway.url(BASE), 100, pad=4000)
    with delivery.Worker(app) as worker:
        drain(app, worker)
    assert max(gateway.sizes) <= 262144
    assert sum(item_counts(gateway)) == 100 and len(gateway.requests) == 3
    assert states() == delivered_once(100)
    notes = gateway.notifications()
    assert all(phone_decrypt(ISS, "2024-11", n) == {"task": "42"} for n in notes)


def test_batches_are_cut_where_the_next_item_would_not_fit():
    """group_into_jobs counts bytes exactly as the client encodes the body."""
    items = [(Delivery(id=i), Request("https://gw.example" + ENDPOINT, {"x": "y" * (i * 7)},
                                      batch=True)) for i in range(60)]
    limit = 2000
    jobs = group_into_jobs(items, limit, GatewayMemory())
    assert [d for job in jobs for d, _ in job.items] == [d for d, _ in items]
    for job, following in zip(jobs, jobs[1:]):
        assert len(encode(job.body())) <= limit
        fuller = Job(job.url, True, job.items + following.items[:1])
        assert len(encode(fuller.body())) > limit
    assert len(jobs) > 3


def test_at_most_100_items_however_small(app, api, service, gateway, crowd):
    crowd(api, service, gateway.url(BASE), 130)
    with delivery.Worker(app) as worker:
        drain(app, worker)
    assert sorted(item_counts(gateway)) == [30, 100]


def test_a_gateway_answering_413_gets_every_item_in_halves_and_then_halves_at_once(
        app, api, service, gateway, crowd):
    gateway.max_bytes = 120000  # 100 sealed items are ~180 KB, 50 fit
    crowd(api, service, gateway.url(BASE), 100)
    with delivery.Worker(app) as worker:
        drain(app, worker)
        assert item_counts(gateway) == [100, 50, 50]
        assert states() == delivered_once(100)  # no attempt lost to the 413

        api.send(service)  # the worker remembers what the gateway took
        drain(app, worker)
        assert item_counts(gateway)[3:] == [50, 50]


@pytest.mark.parametrize("tell, expected", [
    (True, [100, 30, 30, 30, 10]),
    (False, [100, 50, 50, 25, 25, 25, 25]),
], ids=["max_batch_size", "no-details"])
def test_a_gateway_answering_batch_size_exceeds_maximum_limit_gets_every_item(
        make_app, api, service, gateway, crowd, tell, expected):
    app = make_app(GATEWAY_CONCURRENCY=1)
    gateway.max_items, gateway.tell_max_items = 30, tell
    gateway.delay = 0.05
    crowd(api, service, gateway.url(BASE), 100)
    with delivery.Worker(app) as worker:
        drain(app, worker)
    assert sorted(item_counts(gateway), reverse=True) == expected
    assert item_counts(gateway)[0] == 100
    assert gateway.most_active == 1  # the smaller batches waited for the gateway's one slot
    assert states() == delivered_once(100)


def test_a_single_notification_too_large_even_alone_fails_for_good_saying_so(
        app, api, service, gateway, crowd):
    gateway.max_bytes = 1000  # less than one sealed item
    crowd(api, service, gateway.url(BASE), 2)
    with delivery.Worker(app) as worker:
        drain(app, worker)
        drain(app, worker)
    assert item_counts(gateway) == [2, 1, 1]
    rows = fetch(Delivery.select())
    assert [(r.state, r.attempts) for r in rows] == [("failed", 1)] * 2
    assert all("413 (too large even alone)" in r.last_error for r in rows)


def test_smaller_batches_start_only_while_their_lease_covers_them(make_app, api, service,
                                                                 gateway, crowd):
    """They go back untried when the lease of the refused batch no longer covers a request,
    and the next claim sends them in the size the gateway took."""
    # A request may start up to 2 s after its claim (lease 10 - deadline 6 - half the rest).
    app = make_app(DELIVERY_LEASE_SECONDS=10, GATEWAY_CONNECT_TIMEOUT=1,
                   GATEWAY_READ_TIMEOUT=5)
    gateway.max_bytes, gateway.delay = 120000, 3.0  # the 413 comes after the 2 s
    crowd(api, service, gateway.url(BASE), 100)
    with delivery.Worker(app) as worker:
        with app.app_context(), db.connection_context():
            assert worker.run_once() == 100
        assert item_counts(gateway) == [100]
        rows = fetch(Delivery.select())
        assert {(r.state, r.attempts, r.lease_owner) for r in rows} == {("pending", 0, None)}
        assert max(r.next_attempt_at for r in rows) <= time.time()  # due at once
        gateway.delay = 0.0
        drain(app, worker)
    assert item_counts(gateway) == [100, 50, 50]
    assert states() == delivered_once(100)
