"""Schema migrations: a database of the first release, full of data, is upgraded in place and
then serves exactly as a new one would, on SQLite and PostgreSQL."""

import json
import os
import time
import uuid

import first_release as first
import pytest
from support import ISS, Api, Gateway, bearer, drain, envelope, phone_decrypt, this_month
from servers import cli, push_env

import crypto
import delivery
import migrations
from models import AuditEvent, db, open_database, sqlite_path, token_digest

ALICE = "pu_first-release-alice-token"
ERP = "ps_first-release-erp-token"
STEP_NAMES = [name for name, _ in migrations.STEPS]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """(URL of an empty database, URL of another one) on this backend."""
    if request.param == "sqlite":
        return (sqlite_path(str(tmp_path)), "sqlite:///" + str(tmp_path / "fresh.sqlite3"))
    postgres = request.getfixturevalue("postgres")
    return (request.getfixturevalue("pg_url"),
            postgres.create_database("push_fresh_" + uuid.uuid4().hex[:12]))


def describe(url):
    """Every table's columns, indexes (partial ones with their condition) and foreign keys, as
    the database reports them."""
    database = open_database(url)
    database.connect()
    try:
        return {table: (
            sorted((c.name, c.data_type, c.null, c.primary_key)
                   for c in database.get_columns(table)),
            sorted((i.name, tuple(i.columns), i.unique, predicate(i.sql))
                   for i in database.get_indexes(table)),
            sorted((f.column, f.dest_table, f.dest_column)
                   for f in database.get_foreign_keys(table)),
        ) for table in database.get_tables()}
    finally:
        database.close()


def predicate(sql):
    """The WHERE of a partial index's definition, without quotes, brackets and spaces (the
    engines print it their own ways), or "" for a whole-table index."""
    where = (sql or "").partition(" WHERE ")[2]
    return "".join(char for char in where if char not in "\"'() ").lower()


def new_schema(url, tmp_path):
    """What a new database gets from ``migrations.upgrade``."""
    db.initialize(open_database(url))
    assert migrations.upgrade(str(tmp_path / "fresh.lock")) == []
    with db.connection_context():
        assert migrations.applied_steps() == STEP_NAMES
    return describe(url)


def fill_first_release(url, instance_path, gateway_url):
    """A first-release database with users, tokens, channels, a plain and an encrypted pusher,
    a device's channel state and a notification whose deliveries are still pending."""
    os.makedirs(instance_path, exist_ok=True)
    server_key = crypto.ServerKey.load(None, os.path.join(instance_path, "server.key"))
    db.initialize(open_database(url))
    with db.connection_context():
        db.create_tables(first.MODELS)
        alice = first.User.create(name="alice")
        first.Token.create(digest=token_digest(ALICE), user=alice)
        erp = first.Service.create(name="erp")
        first.Token.create(digest=token_digest(ERP), service=erp)
        first.Channel.create(id="erp.task", default_status="enabled")
        first.Channel.create(id="erp.news")
        iss = bytes.fromhex(ISS)
        generation = crypto.first_generation(iss, this_month(-3))
        key = first.EncryptionKey.create(
            key_identifier="key-1", iss_fingerprint=server_key.iss_fingerprint(iss),
            period=generation.period, sealed=server_key.seal_generation("key-1", generation))
        pushers = [first.Pusher.create(
            user=alice, app_id="com.example", pushkey=pushkey, kind="http",
            app_display_name="Example", device_display_name="Phone", lang="en",
            data=json.dumps({"url": gateway_url}), pushkey_ts=int(time.time()),
            encryption_key=encryption_key) for pushkey, encryption_key in
            (("plain-1", None), ("sealed-1", key))]
        first.ChannelState.create(user=alice, pushkey="plain-1", channel="erp.news",
                                  status="enabled")
        first.Notification.create(id="a" * 32, service=erp, identifier="old-1", user=alice,
                                  channel="erp.task", payload='{"task":"old"}', prio="high",
                                  created_at=time.time())
        for pusher in pushers:
            first.Delivery.create(notification="a" * 32, pusher=pusher, user=alice,
                                  pushkey=pusher.pushkey, next_attempt_at=time.time(),
                                  created_at=time.time())


def test_a_first_release_database_upgrades_and_then_serves(database, make_app, tmp_path):
    url, fresh_url = database
    expected = new_schema(fresh_url, tmp_path)
    gateway = Gateway()
    try:
        instance = str(tmp_path / "instance")
        fill_first_release(url, instance, gateway.url())
        app = make_app(DATABASE_URL=url)  # the server's start upgrades it
        assert app.extensions["push_schema_steps_applied"] == STEP_NAMES
        assert describe(url) == expected
        serve_after_upgrade(app, gateway)
    finally:
        gateway.close()
        if not db.is_closed():
            db.close()


def serve_after_upgrade(app, gateway):
    """Tokens, pushers, channel states, idempotency keys, pending deliveries: all still work."""
    api = Api(app.test_client())
    alice, erp = bearer(ALICE), bearer(ERP)
    assert api.pushkeys(alice) == ["plain-1", "sealed-1"]
    # never set: the catalogue default shows (not_set as upstream says)
    assert api.channels(alice, "plain-1") == {"erp.news": "enabled", "erp.task": "enabled"}
    repeated = api.send(erp, channel="erp.task", identifier="old-1").get_json()
    assert repeated == {"notification_id": "a" * 32, "deliveries": 2}
    assert api.send(erp, channel="erp.news", payload={"news": 1}).get_json()["deliveries"] == 1
    assert api.send(erp, channel="erp.task", payload={"task": "new"}).get_json()[
        "deliveries"] == 2
    api.register(alice, "plain-2", url=gateway.url())
    drain(app, delivery.Worker(app))

    plain = sorted(json.dumps(n["content"]) for n in gateway.notifications()
                   if not envelope(n) and "content" in n)
    assert plain == ['{"news": 1}', '{"task": "new"}', '{"task": "old"}']
    sealed = sorted(json.dumps(phone_decrypt(ISS, this_month(-3), envelope(n)))
                    for n in gateway.notifications() if envelope(n))
    assert sealed == ['{"task": "new"}', '{"task": "old"}']
    with app.app_context(), db.connection_context():
        assert [(e.user, e.action, e.pushkey_prefix) for e in AuditEvent.select()] == [
            ("alice", "registered", "pla")]


def test_db_upgrade_applies_what_is_missing_and_a_second_run_changes_nothing(tmp_path):
    instance = tmp_path / "instance"
    url = sqlite_path(str(instance))
    fill_first_release(url, str(instance), "https://gw.example/_matrix/push/v1/notify")
    env = push_env(instance)
    first_run = cli(env, "db", "upgrade")
    assert first_run.splitlines() == [f"applied {name}" for name in STEP_NAMES] + [
        f"schema up to date: {len(STEP_NAMES)} step(s), the last {STEP_NAMES[-1]}"]
    schema = describe(url)
    second_run = cli(env, "db", "upgrade")
    assert second_run.splitlines() == first_run.splitlines()[-1:]
    assert describe(url) == schema
    assert cli(env, "users", "list") == "alice\tpushers=2\ttokens=1\n"


def test_a_new_model_without_a_step_still_gets_its_table(make_app, monkeypatch):
    from peewee import CharField

    from models import BaseModel

    class Later(BaseModel):  # as another branch might add one
        name = CharField()

    app = make_app()
    monkeypatch.setattr(migrations, "MODELS", [*migrations.MODELS, Later])
    migrations.upgrade(os.path.join(app.instance_path, migrations.LOCK_FILE))
    with app.app_context(), db.connection_context():
        assert "later" in db.get_tables()
        assert migrations.applied_steps() == STEP_NAMES
