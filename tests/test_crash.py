"""Durability: a server killed outright (master and workers, SIGKILL) loses no queued delivery,
and once restarted sends each one exactly once.

Two gateways are out of order when the server dies:
- alice's gateway is down (nothing listens on its port): her deliveries wait for a retry;
- bob's gateway is stalled (it accepts connections but never answers): some of his deliveries
  are mid-send, their leases held by workers that are about to die.
"""

import socket
import time
from collections import Counter

from servers import Gunicorn, call, cli, cli_token, delivery_stats, free_port, query, wait_until
from support import Gateway

NOTIFICATIONS = 4


def register(port, token, pushkey, url):
    """Register a plain pusher for ``url``."""
    body = {"kind": "http", "app_id": "com.example.app", "pushkey": pushkey,
            "app_display_name": "App", "device_display_name": "Phone", "lang": "en",
            "data": {"url": url}}
    assert call(port, "POST", "/push/v1/pushers/set", body, token) == (200, {})


def notify(port, token, user_id, deliveries):
    """Send NOTIFICATIONS notifications to a user; return their ids."""
    sent = []
    for n in range(NOTIFICATIONS):
        status, answer = call(port, "POST", "/push/v1/notifications",
                              {"user_id": user_id, "channel": "C", "payload": {"n": n}}, token)
        assert status == 202, answer
        assert answer["deliveries"] == deliveries
        sent.append(answer["notification_id"])
    return sent


def deliveries(env):
    """{pushkey: [(attempts, lease held)]} read straight from the database."""
    out = {}
    for pushkey, attempts, leased in query(
            env, "SELECT pushkey, attempts, lease_until > %s FROM delivery", (time.time(),)):
        out.setdefault(pushkey, []).append((attempts, bool(leased)))
    return out


def test_deliveries_survive_a_killed_server_and_arrive_exactly_once(tmp_path, server_env):
    env = server_env(tmp_path / "instance", EMBEDDED_WORKER=True, ALLOW_PRIVATE_GATEWAYS=True,
                   ALLOW_HTTP_GATEWAYS=True, RATE_LIMIT_ENABLED=False,
                   RETRY_INITIAL_SECONDS=0.2, RETRY_MAX_SECONDS=1, DELIVERY_LEASE_SECONDS=3,
                   GATEWAY_PAUSE_INITIAL_SECONDS=0,  # no gateway pauses: see them tried
                   WORKER_POLL_SECONDS=0.2, GATEWAY_CONNECT_TIMEOUT=0.5,
                   GATEWAY_READ_TIMEOUT=2)  # a request always ends within its 3 s lease
    down_port = free_port()
    stalled = socket.create_server(("127.0.0.1", 0), backlog=64)  # listens, never accepts
    stalled_port = stalled.getsockname()[1]
    alice_pushers = {  # a single-notify gateway and a batch-capable one, both down
        "down-a": f"http://127.0.0.1:{down_port}/_matrix/push/v1/notify",
        "down-b/+=": f"http://127.0.0.1:{down_port}/_matrix/push/v1/notify",
        "down-batch-1": f"http://127.0.0.1:{down_port}/push/v1/",
        "down-batch-2": f"http://127.0.0.1:{down_port}/push/v1/",
    }
    bob_pushers = {"stalled-a": f"http://127.0.0.1:{stalled_port}/_matrix/push/v1/notify",
                   "stalled-b": f"http://127.0.0.1:{stalled_port}/_matrix/push/v1/notify"}
    gateways = []
    try:
        with Gunicorn(env, workers=2, log_dir=tmp_path, name="before-crash") as server:
            cli(env, "channels", "add", "C", "--default", "enabled")
            service = cli_token(env, "services", "create", "erp")
            alice = cli_token(env, "users", "create", "alice")
            bob = cli_token(env, "users", "create", "bob")
            for pushkey, url in alice_pushers.items():
                register(server.port, alice, pushkey, url)
            for pushkey, url in bob_pushers.items():
                register(server.port, bob, pushkey, url)

            to_alice = notify(server.port, service, "alice", len(alice_pushers))
            wait_until(lambda: all(attempts > 0 for pushkey in alice_pushers
                                   for attempts, _ in deliveries(env).get(pushkey, [])),
                       60, "alice's deliveries to be tried against her gateway that is down")
            to_bob = notify(server.port, service, "bob", len(bob_pushers))
            wait_until(lambda: any(leased for pushkey in bob_pushers
                                   for _, leased in deliveries(env)[pushkey]),
                       60, "some of bob's deliveries to be mid-send to his stalled gateway")
            server.kill()  # master and workers at once
        stalled.close()

        expected = {(n, pushkey) for n in to_alice for pushkey in alice_pushers}
        expected |= {(n, pushkey) for n in to_bob for pushkey in bob_pushers}
        gateways = [Gateway(port=down_port), Gateway(port=stalled_port)]

        def received():
            return [(n["event_id"], device["pushkey"])
                    for gateway in gateways for n in gateway.notifications()
                    for device in n.get("devices") or [n.get("device")]]

        with Gunicorn(env, workers=2, log_dir=tmp_path, name="after-crash") as server:
            wait_until(lambda: set(received()) >= expected, 60,
                       "the restarted server to deliver everything queued before the crash")
            wait_until(lambda: delivery_stats(env)["pending"] == 0, 30, "no pending delivery")
            time.sleep(4)  # more than a lease and some polls: time for a duplicate to show up
            counts = Counter(received())
            stats = delivery_stats(env)
            log = server.log()

        assert set(counts) == expected
        assert [pair for pair, count in counts.items() if count != 1] == []
        assert (stats["pending"], stats["delivered"], stats["failed"]) == (0, len(expected), 0)
        assert "database is locked" not in log
    finally:
        stalled.close()
        for gateway in gateways:
            gateway.close()


def test_a_graceful_stop_records_requests_under_way_and_sends_nothing_twice(tmp_path,
                                                                             server_env):
    # SIGTERM while a gateway takes its time to answer: the request finishes, its outcome is
    # written, and the restarted server has nothing to send again.
    env = server_env(tmp_path / "instance", EMBEDDED_WORKER=True, ALLOW_PRIVATE_GATEWAYS=True,
                     ALLOW_HTTP_GATEWAYS=True, RATE_LIMIT_ENABLED=False,
                     WORKER_POLL_SECONDS=0.1, GATEWAY_CONNECT_TIMEOUT=1,
                     GATEWAY_READ_TIMEOUT=5)
    gateway = Gateway()
    gateway.delay = 2
    try:
        with Gunicorn(env, workers=1, log_dir=tmp_path, name="before") as server:
            cli(env, "channels", "add", "C", "--default", "enabled")
            service = cli_token(env, "services", "create", "erp")
            alice = cli_token(env, "users", "create", "alice")
            register(server.port, alice, "slow-phone", gateway.url())
            status, answer = call(server.port, "POST", "/push/v1/notifications",
                                  {"user_id": "alice", "channel": "C", "payload": {}}, service)
            assert (status, answer["deliveries"]) == (202, 1)
            sent = answer["notification_id"]
            wait_until(lambda: gateway.active, 30, "the request to be under way")
            server.stop()
            log = server.log()
        assert query(env, "SELECT state, attempts FROM delivery") == [("delivered", 1)]
        with Gunicorn(env, workers=1, log_dir=tmp_path, name="after"):
            time.sleep(2)
        assert [n["event_id"] for n in gateway.notifications()] == [sent]
        assert "Traceback" not in log
    finally:
        gateway.close()
