"""/metrics (SPEC section 6): Prometheus counters summed over every process of an instance,
gauges read from the database, route labels that never carry a pushkey, an optional token."""

import glob
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.parser import text_string_to_metric_families
from support import Gateway, assert_error, bearer, cli_token
from servers import BIN, ROOT, Gunicorn, call, pushkey_path, wait_until

import metrics
from models import Delivery, db


def samples(text):
    """{(sample name, ((label, value), ...)): value} of a /metrics answer."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found, name, **labels):
    """One sample's value; 0 when absent (a counter never incremented is not listed)."""
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(client, headers=None):
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "text/plain"
    return samples(response.get_data(as_text=True))


# --- in one process -------------------------------------------------------------------------


def test_route_label_is_the_url_rule_never_the_pushkey(client, api, alice):
    pushkey = "Xp/SECRETsecret+="
    api.register(alice, pushkey)
    before = scrape(client)
    api.channels(alice, pushkey, encode=True)
    text = client.get("/metrics").get_data(as_text=True)
    assert "SECRET" not in text
    route = "/push/v1/channels/<pushkey:pushkey>"
    after = samples(text)
    key = {"method": "GET", "route": route, "status": "200"}
    assert value(after, "push_http_requests_total", **key) == value(
        before, "push_http_requests_total", **key) + 1
    assert value(after, "push_http_request_duration_seconds_count", route=route) == value(
        before, "push_http_request_duration_seconds_count", route=route) + 1


def test_unknown_paths_and_methods_share_one_label(client):
    before = scrape(client)
    client.get("/no/such/path/abcdef123")
    client.open("/push/v1/pushers", method="BREW")
    after = scrape(client)
    assert "abcdef123" not in str(after) and "BREW" not in str(after)
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert value(after, "push_http_requests_total", **unmatched) == value(
        before, "push_http_requests_total", **unmatched) + 1
    other = {"method": "other", "route": "unmatched", "status": "405"}
    assert value(after, "push_http_requests_total", **other) == value(
        before, "push_http_requests_total", **other) + 1


def test_gauges_are_read_from_the_database(client, api, alice, service, channel):
    channel("erp.task", default="enabled")
    api.register(alice, "phone-1")
    api.register(alice, "phone-2")
    found = scrape(client)
    assert value(found, "push_pushers") == 2
    assert value(found, "push_deliveries_pending") == 0
    assert value(found, "push_delivery_oldest_pending_seconds") == 0

    assert api.send(service).status_code == 202
    with db.connection_context():
        Delivery.update(created_at=time.time() - 600).execute()
    found = scrape(client)
    assert value(found, "push_deliveries_pending") == 2
    assert 600 <= value(found, "push_delivery_oldest_pending_seconds") < 3600


def test_metrics_need_the_token_when_one_is_set(make_app):
    client = make_app(METRICS_TOKEN="s3cret-scrape").test_client()
    assert_error(client.get("/metrics"), 401, "M_MISSING_TOKEN")
    assert_error(client.get("/metrics", headers=bearer("wrong")), 401, "M_UNKNOWN_TOKEN")
    assert "push_pushers" in str(scrape(client, bearer("s3cret-scrape")))


def test_metrics_need_no_token_by_default(client):
    assert value(scrape(client), "push_pushers") == 0


def test_a_server_start_clears_only_files_of_processes_that_are_gone(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name in (f"counter_{gone.pid}.db", f"histogram_{gone.pid}.db",
                 f"counter_{os.getpid()}.db", f"histogram_{os.getpid()}.db"):
        (tmp_path / name).write_bytes(b"")
    assert metrics.clean_folder(str(tmp_path)) == 2
    assert sorted(os.listdir(tmp_path)) == [f"counter_{os.getpid()}.db",
                                            f"histogram_{os.getpid()}.db"]


# --- across processes -----------------------------------------------------------------------

#: pushkey -> what the test gateway does with it (support.Gateway's magic prefixes).
DEVICES = ["ok-1", "ok-2", "reject-1", "bad-1", "fail-1-once"]
NOTIFICATIONS = 3


def test_totals_add_up_across_four_gunicorn_workers_and_a_worker_command(make_app, tmp_path,
                                                                         server_env):
    app = make_app()
    runner = app.test_cli_runner()
    alice = cli_token(runner, "users", "create", "alice")
    erp = cli_token(runner, "services", "create", "erp")
    runner.invoke(args=["channels", "add", "erp.task", "--default", "enabled"])
    gateway = Gateway()
    env = server_env(app.instance_path, RATE_LIMIT_ENABLED=False, EMBEDDED_WORKER=False,
                     ALLOW_HTTP_GATEWAYS=True, ALLOW_PRIVATE_GATEWAYS=True,
                     RETRY_INITIAL_SECONDS=0, WORKER_POLL_SECONDS=0.1)
    try:
        with Gunicorn(env, workers=4, log_dir=tmp_path) as server:
            send_known_traffic(server.port, alice, erp, gateway)
            # Deliveries are made by a separate worker process, after all were queued.
            worker = start_worker(env, tmp_path / "worker.log")
            try:
                wait_until(lambda: len(gateway.requests) == 16 and value(
                    scrape_server(server.port), "push_deliveries_pending") == 0, 60,
                    "every delivery to be sent and recorded")
            finally:
                worker.terminate()
                worker.wait(timeout=30)
            scrapes = [scrape_server(server.port) for _ in range(8)]
            served = http_processes(app.instance_path, server.worker_pids())
            log = server.log()
        assert "Traceback" not in log, log
    finally:
        gateway.close()
    assert len(served) >= 2, served  # the totals below really are sums over processes
    for found in scrapes:
        assert_known_totals(found, gateway)


def send_known_traffic(port, alice, erp, gateway):
    """From 8 threads at once, so that every gunicorn worker gets some of it."""
    for pushkey in DEVICES:
        body = {"kind": "http", "app_id": "com.example", "pushkey": pushkey,
                "app_display_name": "A", "device_display_name": "D", "lang": "en",
                "data": {"url": gateway.url()}}
        assert call(port, "POST", "/push/v1/pushers/set", body, alice) == (200, {})
    notification = {"user_id": "alice", "channel": "erp.task", "payload": {"n": 1}}
    requests = ([("GET", "/push/v1/pushers", None, alice)] * 20
                + [("GET", "/push/v1/channels/" + pushkey_path("ok-1"), None, alice)] * 10
                + [("GET", "/no-such-path", None, None)] * 5
                + [("POST", "/push/v1/notifications", notification, erp)] * NOTIFICATIONS)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: call(port, *r)[0], requests))
    assert answers == [200] * 30 + [404] * 5 + [202] * NOTIFICATIONS


def assert_known_totals(found, gateway):
    http = "push_http_requests_total"
    assert value(found, http, method="POST", route="/push/v1/pushers/set", status="200") == 5
    assert value(found, http, method="GET", route="/push/v1/pushers", status="200") == 20
    assert value(found, http, method="GET", route="/push/v1/channels/<pushkey:pushkey>",
                 status="200") == 10
    assert value(found, http, method="GET", route="unmatched", status="404") == 5
    assert value(found, http, method="POST", route="/push/v1/notifications",
                 status="202") == NOTIFICATIONS
    assert value(found, "push_http_request_duration_seconds_count",
                 route="/push/v1/pushers") == 20
    assert value(found, "push_notifications_total") == NOTIFICATIONS
    # Per notification: ok-1, ok-2 and fail-1-once delivered; reject-1 rejected (its pusher
    # goes); bad-1 failed. fail-1-once's first request got a 503: retried once.
    outcomes = {o: value(found, "push_deliveries_total", outcome=o)
                for o in ("delivered", "retried", "failed", "rejected")}
    assert outcomes == {"delivered": 9, "retried": 1, "failed": 3, "rejected": 3}
    assert value(found, "push_gateway_request_duration_seconds_count",
                 gateway=f"127.0.0.1:{gateway.port}") == len(gateway.requests) == 16
    assert value(found, "push_deliveries_pending") == 0
    assert value(found, "push_delivery_oldest_pending_seconds") == 0
    assert value(found, "push_pushers") == len(DEVICES) - 1


def scrape_server(port):
    status, text = call(port, "GET", "/metrics")
    assert status == 200, text
    return samples(text)


def http_processes(instance_path, worker_pids):
    """The gunicorn workers that counted at least one request."""
    folder = os.path.join(instance_path, "metrics")
    pids = {int(path.rsplit("_", 1)[1][:-3]) for path in glob.glob(f"{folder}/counter_*.db")}
    return pids & set(worker_pids)


def start_worker(env, log_path):
    with open(log_path, "w") as log:
        return subprocess.Popen([os.path.join(BIN, "flask"), "--app", "app", "worker"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
