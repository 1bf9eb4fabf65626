"""The operator's commands (SPEC section 6), each ``flask --app app ...``.

Module-level click commands, registered on the app by ``init_app`` (as Flask's tutorial keeps
its ``init-db`` command in ``db.py``). Flask runs every command inside an app context; each
opens its own database connection and writes in one transaction, so a failing command changes
nothing. A command that prints a token prints it alone on its last line, for ``tail -n 1``.
"""

import functools
import json
import os
import sqlite3
import tempfile
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext
from marshmallow import ValidationError
from peewee import DatabaseError, SqliteDatabase

import delivery
import migrations
from models import (
    AuditEvent,
    Channel,
    Delivery,
    NotQueued,
    Pusher,
    Service,
    Token,
    User,
    db,
    delete_pusher,
    live_tokens,
    new_token,
    pushkey_prefix,
    queue_notification,
    revoke_tokens,
    transaction,
)
from schemas import NotificationRequestSchema, compact_json


def init_app(app):
    """Register the operator commands on ``app``."""
    for command in (users, services, channels, worker_command, deliveries_command,
                    send_command, pushers_command, audit_command, backup_command, schema):
        app.cli.add_command(command)


def with_database(func):
    """Run the command with its own database connection."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with db.connection_context():
            return func(*args, **kwargs)

    return wrapper


def show_token(intro, token):
    """Print a new token alone on the last line, so scripts can take it with ``tail -n 1``."""
    click.echo(f"{intro} (shown once):")
    click.echo(token)


def api_value(field):
    """A click callback that refuses what the sender API's ``field`` refuses (empty, too long,
    NUL): a user or channel the API could never address is of no use."""
    checked = NotificationRequestSchema().fields[field]

    def check(ctx, param, value):
        try:
            return checked.deserialize(value)
        except ValidationError as e:
            raise click.BadParameter(" ".join(e.messages)) from e

    return check


def get_user(name):
    """The user called ``name``, or a clean command error."""
    user = User.get_or_none(User.name == name)
    if user is None:
        raise click.ClickException(f"no user {name!r}")
    return user


def get_service(name):
    """The service called ``name``, or a clean command error."""
    service = Service.get_or_none(Service.name == name)
    if service is None:
        raise click.ClickException(f"no service {name!r}")
    return service


# --- users ------------------------------------------------------------------------------------

users = AppGroup("users", help="Manage users and their tokens.")


@users.command("create")
@click.argument("user_id", callback=api_value("user_id"))
@with_database
def users_create(user_id):
    """Create a user and print a new bearer token (last line)."""
    with transaction():
        if User.get_or_none(User.name == user_id):
            raise click.ClickException(f"user {user_id!r} exists; use 'users token'")
        token = new_token("pu_", user=User.create(name=user_id))
    show_token(f"created user {user_id}; its token", token)


@users.command("token")
@click.argument("user_id")
@with_database
def users_token(user_id):
    """Print a new bearer token for an existing user (last line)."""
    with transaction():
        token = new_token("pu_", user=get_user(user_id))
    show_token(f"new token for {user_id}", token)


@users.command("list")
@with_database
def users_list():
    """List users with their pusher and live token counts."""
    for user in User.select().order_by(User.name):
        click.echo(f"{user.name}\tpushers={user.pushers.count()}\ttokens={live_tokens(user)}")


@users.command("revoke")
@click.argument("user_id")
@with_database
def users_revoke(user_id):
    """Revoke every token of a user."""
    with transaction():
        count = revoke_tokens(Token.user, get_user(user_id))
    click.echo(f"revoked {count} token(s) of {user_id}")


@users.command("delete")
@click.argument("user_id")
@with_database
def users_delete(user_id):
    """Delete a user with their tokens, pushers, channel states and history."""
    with transaction():
        user = get_user(user_id)
        for pusher in user.pushers:
            delete_pusher(pusher, "user deleted by the operator (users delete)")
        # delete_nullable: tokens and notifications (nullable foreign keys) go too, rather
        # than stay behind pointing at nobody.
        user.delete_instance(recursive=True, delete_nullable=True)
    click.echo(f"deleted user {user_id}")


# --- services ---------------------------------------------------------------------------------

services = AppGroup("services", help="Manage sending services.")


@services.command("create")
@click.argument("name")
@with_database
def services_create(name):
    """Create a service, or a new token for it; prints the token (last line)."""
    with transaction():
        service, _ = Service.get_or_create(name=name)
        token = new_token("ps_", service=service)
    show_token(f"service {name}; its token", token)


@services.command("list")
@with_database
def services_list():
    """List services with their live token counts."""
    for service in Service.select().order_by(Service.name):
        click.echo(f"{service.name}\ttokens={live_tokens(service)}")


@services.command("revoke")
@click.argument("name")
@with_database
def services_revoke(name):
    """Revoke every token of a service."""
    with transaction():
        count = revoke_tokens(Token.service, get_service(name))
    click.echo(f"revoked {count} token(s) of {name}")


# --- channels ---------------------------------------------------------------------------------

channels = AppGroup("channels", help="Manage the channel catalogue.")


@channels.command("add")
@click.argument("channel_id", callback=api_value("channel"))
@click.option("--default", "default_status", type=click.Choice(["enabled", "disabled"]),
              help="State of devices that set none.  [new channel: disabled]")
@click.option("--description", help="What the channel is for.")
@with_database
def channels_add(channel_id, default_status, description):
    """Add a channel to the catalogue, or change its default and description.

    On an existing channel only the options given change.
    """
    with transaction():
        channel = Channel.get_or_none(Channel.id == channel_id)
        if channel is None:
            channel = Channel.create(id=channel_id, default_status=default_status or "disabled",
                                     description=description or "")
        else:
            if default_status is not None:
                channel.default_status = default_status
            if description is not None:
                channel.description = description
            channel.save()
    click.echo(f"channel {channel_id} (default {channel.default_status})")


@channels.command("list")
@with_database
def channels_list():
    """List the channel catalogue."""
    for channel in Channel.select().order_by(Channel.id):
        click.echo(f"{channel.id}\t{channel.default_status}\t{channel.description}")


@channels.command("remove")
@click.argument("channel_id")
@with_database
def channels_remove(channel_id):
    """Remove a channel and every device's state for it."""
    with transaction():
        if not Channel.delete().where(Channel.id == channel_id).execute():
            raise click.ClickException(f"no channel {channel_id!r}")
    click.echo(f"removed channel {channel_id}")


# --- delivery ---------------------------------------------------------------------------------


@click.command("worker")
def worker_command():
    """Run the delivery worker in the foreground (Ctrl-C stops it)."""
    delivery.run_forever(current_app._get_current_object())


@click.command("deliveries")
@with_database
def deliveries_command():
    """Show pending, delivered and failed deliveries and the oldest pending age."""
    for key, value in delivery.stats().items():
        click.echo(f"{key}\t{value}")


@click.command("send")
@click.argument("user_id")
@click.argument("channel")
@click.argument("payload")
@click.option("--prio", type=click.Choice(["high", "low"]), default="high", show_default=True)
@with_database
def send_command(user_id, channel, payload, prio):
    """Queue a notification for USER_ID on CHANNEL; PAYLOAD is a JSON object.

    Prints the notification id and how many deliveries were queued; the server's workers
    send them.
    """
    try:
        value = json.loads(payload, parse_constant=refuse_constant)
        json.dumps(value, allow_nan=False)  # a number too large became infinity
        body = NotificationRequestSchema().load(
            {"user_id": user_id, "channel": channel, "payload": value, "prio": prio})
        notification_id, deliveries, _ = queue_notification(
            None, user_id, channel, compact_json(body["payload"]), prio)
    except ValidationError as e:
        raise click.ClickException(f"not sent: {e.messages}")
    except (ValueError, NotQueued) as e:  # bad JSON, unknown channel, too large
        raise click.ClickException(f"not sent: {e}")
    click.echo(f"notification_id\t{notification_id}")
    click.echo(f"deliveries\t{deliveries}")


def refuse_constant(name):
    """json.loads hook: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not JSON")


@click.command("pushers")
@click.argument("user_id")
@with_database
def pushers_command(user_id):
    """List a user's pushers: pushkey prefix, app, gateway host, last delivery."""
    pushers = get_user(user_id).pushers.order_by(Pusher.created_at, Pusher.id)
    click.echo("pushkey\tapp_id\tgateway\tencrypted\tlast delivery")
    for pusher in pushers:
        last = (Delivery.select().where(Delivery.pusher == pusher.id)
                .order_by(Delivery.id.desc()).first())
        gateway = urlsplit(json.loads(pusher.data).get("url", "")).netloc
        encrypted = "yes" if pusher.encryption_key_id is not None else "no"
        click.echo(f"{pushkey_prefix(pusher.pushkey)}…\t{pusher.app_id}\t{gateway}"
                   f"\t{encrypted}\t{last_delivery(last)}")


def last_delivery(row):
    """One delivery's outcome in a few words."""
    if row is None:
        return "none yet"
    if row.state == "pending":
        tried = f"{row.attempts} attempt(s), last: {row.last_error}" if row.attempts else "queued"
        return f"pending ({tried})"
    text = f"{row.state} {utc(row.finished_at)}"
    return f"{text}: {row.last_error}" if row.state == "failed" else text


def utc(timestamp):
    """A unix time as ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@click.command("audit")
@click.option("--user", "user_id", help="Only this user's pushers.")
@click.option("--since", type=click.FloatRange(min=0), help="Only the last DAYS days.",
              metavar="DAYS")
@with_database
def audit_command(user_id, since):
    """Show the audit trail of pusher registrations, updates and removals, oldest first.

    Columns: time (UTC), user, action, app_id, pushkey prefix, reason. Kept for
    PUSH_AUDIT_DAYS days.
    """
    events = AuditEvent.select().order_by(AuditEvent.created_at, AuditEvent.id)
    if user_id is not None:
        events = events.where(AuditEvent.user == user_id)
    if since is not None:
        events = events.where(AuditEvent.created_at >= time.time() - since * 86400)
    for event in events:
        click.echo(f"{utc(event.created_at)}\t{event.user}\t{event.action}\t{event.app_id}"
                   f"\t{event.pushkey_prefix}…\t{event.reason}")


# --- the database -----------------------------------------------------------------------------


@click.command("backup")
@click.argument("path", type=click.Path(dir_okay=False))
@with_appcontext
def backup_command(path):
    """Copy the live SQLite database to PATH, consistently, while the server runs."""
    if not isinstance(db.obj, SqliteDatabase):
        raise click.ClickException(
            "the database is not SQLite: back it up with the database's own tool, for"
            " PostgreSQL pg_dump (pg_dump -Fc -f push.dump DBNAME), and keep server.key too")
    if os.path.exists(path):
        raise click.ClickException(f"{path} exists; give a new file name")
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, partial = tempfile.mkstemp(dir=folder, prefix=".backup-")  # mode 0600
    os.close(descriptor)
    try:
        check = copy_sqlite(db.obj.database, partial)
        if check != "ok":
            raise click.ClickException(f"the copy failed its integrity check: {check}")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    click.echo(f"backed up {db.obj.database} to {path} (integrity check: ok)")
    click.echo(server_key_reminder())


def copy_sqlite(source_path, target_path):
    """Copy a live database with SQLite's online backup API; return the copy's
    ``PRAGMA integrity_check`` answer ("ok" when sound)."""
    source = sqlite3.connect(source_path, timeout=30)
    try:
        target = sqlite3.connect(target_path)
        try:
            # One step (all pages at once): in WAL mode it reads one snapshot and writers go
            # on; copying in slices would start over each time the server writes.
            source.backup(target)
            return target.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            target.close()
    finally:
        source.close()


def server_key_reminder():
    """What else a restore needs: the server key, kept apart from the database copy."""
    if current_app.config["SERVER_KEY"]:
        return ("Keep PUSH_SERVER_KEY as well: without it, encrypted pushers cannot be"
                " served from this copy.")
    key = os.path.join(current_app.instance_path, "server.key")
    return (f"Back up {key} as well, apart from this copy: without it, encrypted pushers"
            " cannot be served from it.")


schema = AppGroup("db", help="The database schema.")


@schema.command("upgrade")
def db_upgrade():
    """Apply the schema steps the database lacks (every process also does at start)."""
    app = current_app
    applied = app.extensions["push_schema_steps_applied"] + migrations.upgrade(
        os.path.join(app.instance_path, migrations.LOCK_FILE))
    for name in applied:
        click.echo(f"applied {name}")
    with db.connection_context():
        steps = migrations.applied_steps()
    click.echo(f"schema up to date: {len(steps)} step(s), the last {steps[-1]}")


@schema.command("copy")
@click.option("--to", "url", required=True, metavar="URL",
              help="The empty target database, e.g. postgresql://push:secret@db/push.")
def db_copy(url):
    """Copy this whole installation into an empty database (stop the server first)."""
    try:
        copied = migrations.copy_to(url)
    except migrations.TargetNotEmpty as e:
        raise click.ClickException(f"{e}; nothing was copied")
    except DatabaseError as e:
        raise click.ClickException(f"the copy failed and the target is as it was: {e}")
    for table, count in copied.items():
        click.echo(f"{table}\t{count}")
    click.echo(f"copied to {redact_url(url)}. Point PUSH_DATABASE_URL there and keep this"
               " instance's server key (instance/server.key or PUSH_SERVER_KEY).")


def redact_url(url):
    """A database URL without its password, for output."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
