"""The audit trail (issue 9): every pusher registration, update and removal, whoever made it,
with a pushkey prefix only; ``flask audit`` shows it; it is purged after PUSH_AUDIT_DAYS."""

import threading
import time

from peewee import fn
from support import Api, bearer, cli_token, drain, fetch, pusher_body
from servers import wait_until

import delivery
from models import AuditEvent, db, purge_audit

LONG_PUSHKEY = "Xp/MzCt8/9DcSNE9cuia=TheRestOfAVeryLongPushkey"


def age_first_event(days):
    """Move the first audit event ``days`` into the past."""
    with db.connection_context():
        (AuditEvent.update(created_at=time.time() - days * 86400)
         .where(AuditEvent.id == AuditEvent.select(fn.MIN(AuditEvent.id))).execute())


def events():
    """(user, action, app_id, pushkey prefix, reason) of every audit event, oldest first."""
    return [(e.user, e.action, e.app_id, e.pushkey_prefix, e.reason) for e in
            fetch(AuditEvent.select().order_by(AuditEvent.created_at, AuditEvent.id))]


def test_registration_update_and_removal_by_the_user(api, alice):
    api.register(alice, LONG_PUSHKEY)
    api.register(alice, LONG_PUSHKEY, device_display_name="Renamed")
    api.unregister(alice, LONG_PUSHKEY)
    api.unregister(alice, "never-registered")  # removes nothing, records nothing
    app_id = "com.example.app"
    assert events() == [
        ("alice", "registered", app_id, "Xp/MzC", "registered by its user"),
        ("alice", "updated", app_id, "Xp/MzC", "updated by its user"),
        ("alice", "removed", app_id, "Xp/MzC", "removed by its user"),
    ]


def test_a_refused_registration_records_nothing(make_app):
    app = make_app(MAX_PUSHERS_PER_USER=1)
    api = Api(app.test_client())
    alice = bearer(cli_token(app.test_cli_runner(), "users", "create", "alice"))
    api.register(alice, "phone-1")
    assert api.set_pusher(alice, pusher_body("phone-2")).status_code == 403
    assert [e[1] for e in events()] == ["registered"]


def test_removal_by_another_users_registration_without_append(api, user_token):
    alice, bob = user_token("alice"), user_token("bob")
    api.register(alice, LONG_PUSHKEY)
    api.register(bob, LONG_PUSHKEY)  # append defaults to false: alice's pusher goes
    assert api.pushers(alice) == []
    assert events()[1:] == [
        ("bob", "registered", "com.example.app", "Xp/MzC", "registered by its user"),
        ("alice", "removed", "com.example.app", "Xp/MzC",
         "taken over by user bob (append: false)"),
    ]


def test_removal_by_a_gateways_rejection(app, api, alice, service, channel, gateway):
    channel("erp.task", default="enabled")
    api.register(alice, "reject-this-pushkey", url=gateway.url())
    assert api.send(service).status_code == 202
    drain(app, delivery.Worker(app))
    assert events()[-1] == ("alice", "removed", "com.example.app", "reject",
                            "rejected by its push gateway")


def test_removal_by_users_delete(api, alice, runner):
    api.register(alice, LONG_PUSHKEY)
    api.register(alice, "second-device")
    assert runner.invoke(args=["users", "delete", "alice"]).exit_code == 0
    removed = [e for e in events() if e[1] == "removed"]
    assert removed == [
        ("alice", "removed", "com.example.app", prefix, "user deleted by the operator"
         " (users delete)") for prefix in ("Xp/MzC", "second")]


def test_short_pushkeys_are_never_stored_whole(api, alice):
    api.register(alice, "abcd")
    assert events()[0][3] == "ab"


def test_audit_command_filters_by_user_and_age(api, user_token, runner):
    alice, bob = user_token("alice"), user_token("bob")
    api.register(alice, "alice-phone-old")
    api.register(alice, "alice-phone-new")
    api.register(bob, "bob-phone", append=True)
    age_first_event(days=10)

    lines = runner.invoke(args=["audit"]).output.splitlines()
    assert [line.split("\t")[1:5] for line in lines] == [
        ["alice", "registered", "com.example.app", "alice-…"],
        ["alice", "registered", "com.example.app", "alice-…"],
        ["bob", "registered", "com.example.app", "bob-…"],
    ]
    assert lines[0].split("\t")[0] < lines[1].split("\t")[0]  # ISO times, oldest first
    assert lines[0].split("\t")[0].endswith("Z")
    assert len(runner.invoke(args=["audit", "--user", "alice"]).output.splitlines()) == 2
    assert len(runner.invoke(args=["audit", "--since", "1"]).output.splitlines()) == 2
    recent_alice = runner.invoke(args=["audit", "--user", "alice", "--since", "1"]).output
    assert recent_alice.count("\n") == 1
    assert runner.invoke(args=["audit", "--user", "nobody"]).output == ""
    assert "alice-phone" not in runner.invoke(args=["audit"]).output


def test_the_worker_purges_events_older_than_audit_days(make_app):
    app = make_app(AUDIT_DAYS=30)
    api = Api(app.test_client())
    alice = bearer(cli_token(app.test_cli_runner(), "users", "create", "alice"))
    api.register(alice, "old-device")
    api.register(alice, "new-device")
    age_first_event(days=31)
    stop = threading.Event()
    worker = threading.Thread(target=delivery.Worker(app).run, args=(stop,))
    worker.start()
    try:
        wait_until(lambda: len(events()) == 1, 30, "the hourly purge at the worker's start")
    finally:
        stop.set()
        delivery.wake()
        worker.join(30)
    assert events()[0][3] == "new-d"


def test_purge_audit_keeps_younger_events(api, alice):
    api.register(alice, "device")
    with db.connection_context():
        assert purge_audit(90) == 0
    age_first_event(days=91)
    with db.connection_context():
        assert purge_audit(90) == 1
