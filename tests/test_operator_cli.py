"""Operator commands of issue 9: ``send``, ``pushers``, ``backup`` (and a restore)."""

import json
import os
import shutil
import sqlite3
import threading
import uuid

import pytest
from support import ISS, Api, bearer, cli_token, drain, encryption, phone_decrypt
from servers import Gunicorn, call, cli, push_env, wait_until

import delivery
from models import Notification, db


def invoke(runner, *args):
    """Run a command; return (exit code, output)."""
    result = runner.invoke(args=list(args))
    return result.exit_code, result.output


# --- send -------------------------------------------------------------------------------------


def test_send_queues_like_the_sender_api_and_prints_id_and_count(app, api, alice, runner,
                                                                 channel, gateway):
    channel("erp.task", default="enabled")
    api.register(alice, "phone-1", url=gateway.url())
    api.register(alice, "phone-2", url=gateway.url(), encryption=encryption())
    code, output = invoke(runner, "send", "alice", "erp.task", '{"task": "7"}', "--prio", "low")
    assert code == 0, output
    lines = [line.split("\t") for line in output.splitlines()]
    assert [key for key, _ in lines] == ["notification_id", "deliveries"]
    notification_id, deliveries = lines[0][1], lines[1][1]
    assert deliveries == "2"

    drain(app, delivery.Worker(app))
    plain, sealed = sorted(gateway.notifications(), key=lambda n: "ciphertext" in n)
    assert plain["event_id"] == notification_id and plain["content"] == {"task": "7"}
    assert plain["prio"] == "low"
    assert phone_decrypt(ISS, "2024-11", sealed) == {"task": "7"}
    history = api.client.get(f"/push/v1/history/{notification_id}", headers=alice)
    assert history.get_json() == {"identifier": notification_id, "payload": {"task": "7"}}


@pytest.mark.parametrize("payload, message", [
    ("{not json", "not sent"),
    ("[1, 2]", "not sent"),
    ('{"n": NaN}', "NaN is not JSON"),
    ('{"n": 1e999}', "not sent"),
    (json.dumps({"x": "y" * 1100}), "at most"),
])
def test_send_refuses_bad_payloads_and_queues_nothing(runner, alice, channel, payload, message):
    channel("erp.task", default="enabled")
    code, output = invoke(runner, "send", "alice", "erp.task", payload)
    assert code == 1 and message in output, output
    with db.connection_context():
        assert Notification.select().count() == 0


def test_send_to_an_unknown_channel_fails(runner, alice):
    code, output = invoke(runner, "send", "alice", "erp.nothing", "{}")
    assert code == 1 and "Unknown channel: erp.nothing" in output


def test_send_to_an_unknown_user_queues_no_delivery(runner, channel):
    channel("erp.task", default="enabled")
    code, output = invoke(runner, "send", "nobody", "erp.task", "{}")
    assert code == 0 and output.splitlines()[1] == "deliveries\t0"


# --- pushers ----------------------------------------------------------------------------------


def test_pushers_lists_prefix_app_gateway_and_last_delivery(app, api, alice, runner, channel,
                                                            service, gateway):
    channel("erp.task", default="enabled")
    api.register(alice, "phone-delivered-Secret", url=gateway.url())
    api.register(alice, "bad-phone-Secret", url=gateway.url("/push/v1/notify"),
                 encryption=encryption())
    assert api.send(service).status_code == 202
    drain(app, delivery.Worker(app))
    api.register(alice, "phone-new-Secret", app_id="com.example.other",
                 url="https://gw.example/_matrix/push/v1/notify")

    code, output = invoke(runner, "pushers", "alice")
    assert code == 0, output
    assert "Secret" not in output
    rows = [line.split("\t") for line in output.splitlines()]
    host = f"127.0.0.1:{gateway.port}"
    assert rows[0] == ["pushkey", "app_id", "gateway", "encrypted", "last delivery"]
    assert rows[1][:4] == ["phone-…", "com.example.app", host, "no"]
    assert rows[1][4].startswith("delivered 20") and rows[1][4].endswith("Z")
    assert rows[2][:4] == ["bad-ph…", "com.example.app", host, "yes"]
    assert rows[2][4].startswith("failed 20") and "gateway answered 400" in rows[2][4]
    assert rows[3] == ["phone-…", "com.example.other", "gw.example", "no", "none yet"]


def test_pushers_shows_a_pending_retry(app, api, alice, runner, channel, service, gateway):
    channel("erp.task", default="enabled")
    api.register(alice, "fail-5-phone", url=gateway.url())
    assert api.send(service).status_code == 202
    assert "pending (queued)" in invoke(runner, "pushers", "alice")[1]
    with app.app_context(), db.connection_context():
        delivery.Worker(app).run_once()
    assert "pending (1 attempt(s), last: gateway answered 503)" in invoke(
        runner, "pushers", "alice")[1]


def test_pushers_of_an_unknown_user_fails(runner):
    code, output = invoke(runner, "pushers", "nobody")
    assert code == 1 and "no user 'nobody'" in output


# --- backup -----------------------------------------------------------------------------------


@pytest.mark.sqlite_only  # backup copies a SQLite file (PostgreSQL: pg_dump)
def test_backup_copies_a_sound_database_and_reminds_of_the_server_key(app, runner, alice,
                                                                      register, tmp_path):
    register(alice, "phone-1")
    target = tmp_path / "copy.sqlite3"
    code, output = invoke(runner, "backup", str(target))
    assert code == 0, output
    assert os.path.join(app.instance_path, "server.key") in output
    assert os.stat(target).st_mode & 0o077 == 0  # token digests and sealed keys: owner only
    copy = sqlite3.connect(target)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("SELECT pushkey FROM pusher").fetchall() == [("phone-1",)]
    finally:
        copy.close()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".backup-")] == []


@pytest.mark.sqlite_only  # backup copies a SQLite file (PostgreSQL: pg_dump)
def test_backup_never_overwrites_a_file(runner, tmp_path):
    target = tmp_path / "exists"
    target.write_text("precious")
    code, output = invoke(runner, "backup", str(target))
    assert code == 1 and "exists" in output
    assert target.read_text() == "precious"


def test_backup_on_postgresql_says_to_use_pg_dump(pg_app, tmp_path):
    code, output = invoke(pg_app.test_cli_runner(), "backup", str(tmp_path / "x"))
    assert code == 1 and "pg_dump" in output
    assert not (tmp_path / "x").exists()


@pytest.mark.sqlite_only  # backup copies a SQLite file (PostgreSQL: pg_dump)
def test_backup_while_the_server_writes_then_restore_and_serve(make_app, tmp_path, gateway):
    """Copies taken under a stream of writes are each consistent (every notification has
    all its deliveries); a restored copy with its server key serves and delivers."""
    app = make_app()
    runner = app.test_cli_runner()
    alice = cli_token(runner, "users", "create", "alice")
    erp = cli_token(runner, "services", "create", "erp")
    runner.invoke(args=["channels", "add", "erp.task", "--default", "enabled"])
    api = Api(app.test_client())
    for n in range(3):
        api.register(bearer(alice), f"phone-{n}", url=gateway.url(), encryption=encryption(
            key_identifier=f"key-{n}"))
    env = push_env(app.instance_path, RATE_LIMIT_ENABLED=False, EMBEDDED_WORKER=False)
    copies = [tmp_path / f"copy-{n}.sqlite3" for n in range(3)]
    with Gunicorn(env, workers=2, log_dir=tmp_path) as server:
        stop, sent = threading.Event(), []
        writers = [threading.Thread(target=write_notifications, args=(server.port, erp, stop,
                                                                      sent)) for _ in range(2)]
        for writer in writers:
            writer.start()
        try:
            wait_until(lambda: len(sent) >= 5, 60, "the first writes")
            for copy in copies:
                assert "integrity check: ok" in cli(env, "backup", str(copy))
        finally:
            stop.set()
            for writer in writers:
                writer.join(60)
    counts = [consistent_counts(copy) for copy in copies]
    assert counts == sorted(counts) and counts[-1] >= 5  # each later copy has more

    restored = tmp_path / "restored"
    restored.mkdir(mode=0o700)
    shutil.copy(copies[-1], restored / "push.sqlite3")
    shutil.copy(os.path.join(app.instance_path, "server.key"), restored / "server.key")
    serve_restored(push_env(restored, EMBEDDED_WORKER=True, ALLOW_HTTP_GATEWAYS=True,
                            ALLOW_PRIVATE_GATEWAYS=True, WORKER_POLL_SECONDS=0.1),
                   tmp_path, alice, erp, gateway, counts[-1])


def write_notifications(port, token, stop, sent):
    while not stop.is_set():
        body = {"user_id": "alice", "channel": "erp.task", "payload": {"n": uuid.uuid4().hex}}
        status, answer = call(port, "POST", "/push/v1/notifications", body, token)
        assert status == 202 and answer["deliveries"] == 3, (status, answer)
        sent.append(answer["notification_id"])


def consistent_counts(path):
    """The notifications in a copy, after checking each has its three deliveries."""
    copy = sqlite3.connect(path)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        notifications = copy.execute("SELECT COUNT(*) FROM notification").fetchone()[0]
        uneven = copy.execute("SELECT n.id FROM notification n LEFT JOIN delivery d"
                              " ON d.notification_id = n.id GROUP BY n.id"
                              " HAVING COUNT(d.id) != 3").fetchall()
        assert uneven == []
        return notifications
    finally:
        copy.close()


def serve_restored(env, tmp_path, alice, erp, gateway, notifications):
    """The restored instance answers with its data and delivers what was pending in it."""
    with Gunicorn(env, workers=1, log_dir=tmp_path, name="restored") as server:
        status, answer = call(server.port, "GET", "/push/v1/pushers", token=alice)
        assert status == 200
        assert [p["pushkey"] for p in answer["pushers"]] == ["phone-0", "phone-1", "phone-2"]
        wait_until(lambda: states(env) == [("delivered", 3 * notifications)], 120,
                   "every delivery of the restored copy")
        assert "Traceback" not in server.log()
    assert len(gateway.notifications()) == 3 * notifications
    payloads = {json.dumps(phone_decrypt(ISS, "2024-11", n)) for n in gateway.notifications()}
    assert len(payloads) == notifications


def states(env):
    """[(delivery state, count)] in the instance's database."""
    database = sqlite3.connect(os.path.join(env["PUSH_INSTANCE_PATH"], "push.sqlite3"),
                               timeout=30)
    try:
        return database.execute("SELECT state, COUNT(*) FROM delivery GROUP BY state"
                                ).fetchall()
    finally:
        database.close()
