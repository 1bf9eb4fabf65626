"""``flask --app app worker``: separate worker processes share the queue, each delivery once."""

import collections
import os
import signal
import subprocess

from support import Api, Gateway, cli_token, pusher_body
from servers import BIN, ROOT, Gunicorn, wait_until

import delivery
from models import db


def start_worker(env, log_path):
    log = open(log_path, "w")
    try:
        return subprocess.Popen([os.path.join(BIN, "flask"), "--app", "app", "worker"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def test_two_worker_commands_deliver_everything_exactly_once(make_app, server_env, tmp_path):
    app = make_app(MAX_PUSHERS_PER_USER=100)
    client, runner = app.test_client(), app.test_cli_runner()
    alice = {"Authorization": "Bearer " + cli_token(runner, "users", "create", "alice")}
    service = {"Authorization": "Bearer " + cli_token(runner, "services", "create", "erp")}
    runner.invoke(args=["channels", "add", "erp.task", "--default", "enabled"])
    gateway = Gateway()
    try:
        for i in range(20):
            url = gateway.url("/push/v1/") if i % 2 else gateway.url()
            assert client.post("/push/v1/pushers/set", headers=alice,
                               json=pusher_body(f"phone-{i}", url=url)).status_code == 200
        ids = [client.post("/push/v1/notifications", headers=service, json={
            "user_id": "alice", "channel": "erp.task", "payload": {"n": n}}).get_json()[
            "notification_id"] for n in range(10)]

        env = server_env(app.instance_path, ALLOW_HTTP_GATEWAYS=True,
                       ALLOW_PRIVATE_GATEWAYS=True, WORKER_POLL_SECONDS=0.1, WORKER_CLAIM=15)
        workers = [start_worker(env, tmp_path / f"worker-{i}.log") for i in range(2)]
        try:
            wait_until(lambda: len(gateway.notifications()) >= 200, 60,
                       "every delivery to reach the gateway")
            with app.app_context(), db.connection_context():
                wait_until(lambda: delivery.stats()["pending"] == 0, 30, "nothing pending")
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGINT)
            codes = [worker.wait(timeout=30) for worker in workers]
        logs = [(tmp_path / f"worker-{i}.log").read_text() for i in range(2)]
        assert codes == [0, 0], logs
        assert all("delivery worker stopped" in log for log in logs), logs
        assert all("Traceback" not in log and "locked" not in log for log in logs), logs

        seen = collections.Counter(
            (note.get("event_id"), note["devices"][0]["pushkey"])
            for note in gateway.notifications())
        expected = {(nid, f"phone-{i}") for nid in ids for i in range(20)}
        assert set(seen) == expected
        assert set(seen.values()) == {1}
    finally:
        gateway.close()


def test_gunicorn_workers_deliver_from_boot_without_waiting_for_a_request(make_app, server_env,
                                                                         tmp_path):
    # Deliveries queued while no server ran (say, before a crash) go out when gunicorn starts,
    # though no request ever reaches it: the worker starts at boot (gunicorn.conf.py).
    app = make_app()
    api, runner = Api(app.test_client()), app.test_cli_runner()
    alice = {"Authorization": "Bearer " + cli_token(runner, "users", "create", "alice")}
    service = {"Authorization": "Bearer " + cli_token(runner, "services", "create", "erp")}
    runner.invoke(args=["channels", "add", "erp.task", "--default", "enabled"])
    gateway = Gateway()
    try:
        api.register(alice, "phone-1", url=gateway.url())
        assert api.send(service).status_code == 202
        env = server_env(app.instance_path, ALLOW_HTTP_GATEWAYS=True, ALLOW_PRIVATE_GATEWAYS=True,
                       EMBEDDED_WORKER=True, WORKER_POLL_SECONDS=0.1)
        with Gunicorn(env, workers=1, log_dir=tmp_path, probe=False) as server:
            wait_until(lambda: gateway.notifications(), 30, "the queued delivery to arrive")
            log = server.log()
        assert len(gateway.notifications()) == 1
        assert "Traceback" not in log
    finally:
        gateway.close()


def test_sigterm_stops_a_worker_command_gracefully(make_app, server_env, tmp_path):
    app = make_app()
    env = server_env(app.instance_path, WORKER_POLL_SECONDS=0.1)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        wait_until(lambda: "delivery worker started" in (tmp_path / "worker.log").read_text(),
                   30, "the worker to start")
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    log = (tmp_path / "worker.log").read_text()
    assert code == 0, log
    assert "delivery worker stopped" in log and "Traceback" not in log
