"""Moving house: ``flask --app app db copy --to URL`` carries a whole SQLite installation over
to PostgreSQL, which then serves the same users, tokens, devices, keys and pending deliveries."""

import pytest
import psycopg2
from support import ISS, Api, drain, encryption, envelope, phone_decrypt, this_month

import delivery
from models import MODELS, db

pytestmark = pytest.mark.sqlite_only  # the source is the SQLite default, whatever the engine

TABLES = [m._meta.table_name for m in MODELS] + ["schemamigration"]


def row_counts(url):
    """{table: rows} of a PostgreSQL database, read from outside the app."""
    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            counts = {}
            for table in TABLES:
                cursor.execute(f'SELECT count(*) FROM "{table}"')
                counts[table] = cursor.fetchone()[0]
            return counts
    finally:
        connection.close()


def populate(app, gateway, user_token, service, channel):
    """Users, tokens, a service, channels, plain and encrypted pushers, channel states, a
    delivered notification and a pending one (with the audit rows all that leaves)."""
    api = Api(app.test_client())
    alice, bob = user_token("alice"), user_token("bob")
    channel("erp.task", default="enabled")
    channel("erp.news")
    api.register(alice, "plain", url=gateway.url())
    api.register(alice, "sealed", url=gateway.url("/push/v1/"),
                 encryption=encryption("kid-1", ISS, this_month(-1)))
    api.register(bob, "bob-phone", url=gateway.url())
    assert api.set_channels(bob, "bob-phone", ("erp.task", "not_set")).status_code == 200
    assert api.set_channels(alice, "plain", ("erp.news", "enabled")).status_code == 200
    first = api.send(service, payload={"n": 1}).get_json()
    drain(app, delivery.Worker(app))
    second = api.send(service, payload={"n": 2}).get_json()
    assert (first["deliveries"], second["deliveries"]) == (2, 2)
    return alice, bob, first["notification_id"], second["notification_id"]


def test_a_sqlite_installation_moves_to_postgresql_and_serves_from_there(
        make_app, pg_url, gateway, user_token, service, channel, runner):
    source = make_app(DATABASE_URL=None)
    assert type(db.obj).__name__ == "SqliteDatabase"
    alice, bob, delivered_id, pending_id = populate(source, gateway, user_token, service,
                                                    channel)
    with source.app_context(), db.connection_context():
        expected = {m._meta.table_name: m.select().count() for m in MODELS}
    gateway.requests.clear()

    result = runner.invoke(args=["db", "copy", "--to", pg_url])
    assert result.exit_code == 0, result.output
    counts = row_counts(pg_url)
    assert {t: counts[t] for t in expected} == expected
    assert counts["schemamigration"] > 0 and counts["auditevent"] > 0
    assert f"delivery\t{expected['delivery']}" in result.output

    # A server on PostgreSQL, same instance folder (the same server key): nothing to upgrade,
    # the old tokens work, the pending delivery goes out and the phone opens it.
    target = make_app(DATABASE_URL=pg_url)
    assert type(db.obj).__name__ == "PostgresqlDatabase"
    assert target.extensions["push_schema_steps_applied"] == []
    api = Api(target.test_client())
    assert api.pushkeys(alice) == ["plain", "sealed"]
    assert api.channels(alice, "plain") == {"erp.news": "enabled", "erp.task": "enabled"}
    assert api.channels(bob, "bob-phone")["erp.task"] == "not_set"
    third = api.send(service, payload={"n": 3}).get_json()["notification_id"]
    api.register(alice, "new-phone", url=gateway.url())  # ids continue past the copied ones
    drain(target, delivery.Worker(target))
    received = {(n.get("event_id") or n.get("identifier"),
                 (n.get("devices") or [n.get("device")])[0]["pushkey"])
                for n in gateway.notifications()}
    assert received == {(pending_id, "plain"), (pending_id, "sealed"), (third, "plain"),
                        (third, "sealed")}
    sealed = [envelope(n) for n in gateway.notifications() if envelope(n)]
    assert {phone_decrypt(ISS, this_month(-1), n)["n"] for n in sealed} == {2, 3}
    history = target.test_client().get("/push/v1/history/device/plain", headers=alice)
    assert [m["identifier"] for m in history.get_json()["messages"]] == [
        third, pending_id, delivered_id]


def test_a_target_that_holds_data_is_refused_and_left_alone(make_app, pg_url, gateway,
                                                            user_token, service, channel,
                                                            runner):
    source = make_app(DATABASE_URL=None)
    populate(source, gateway, user_token, service, channel)
    assert runner.invoke(args=["db", "copy", "--to", pg_url]).exit_code == 0
    before = row_counts(pg_url)
    again = runner.invoke(args=["db", "copy", "--to", pg_url])
    assert again.exit_code != 0
    assert "already holds data" in again.output and "nothing was copied" in again.output
    assert row_counts(pg_url) == before


def test_a_copy_that_fails_midway_leaves_the_target_as_it_was(make_app, pg_url, gateway,
                                                              user_token, service, channel,
                                                              runner):
    source = make_app(DATABASE_URL=None)
    populate(source, gateway, user_token, service, channel)
    # The last table refuses every row: the copy fails after writing all the others.
    connection = psycopg2.connect(pg_url)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE auditevent (id SERIAL PRIMARY KEY, created_at DOUBLE"
                       " PRECISION, \"user\" TEXT, app_id TEXT, pushkey_prefix TEXT,"
                       " action TEXT, reason TEXT, CHECK (false))")
    result = runner.invoke(args=["db", "copy", "--to", pg_url])
    assert result.exit_code != 0
    assert "the target is as it was" in result.output
    with connection.cursor() as cursor:
        cursor.execute("SELECT table_name FROM information_schema.tables"
                       " WHERE table_schema = 'public'")
        assert [name for (name,) in cursor.fetchall()] == ["auditevent"]
    connection.close()
