"""The operator's commands (SPEC section 6), each ``flask --app app ...``.

Module-level click commands, registered on the app by ``init_app`` (as Flask's tutorial keeps
its ``init-db`` command in ``db.py``). Flask runs every command inside an app context; each
opens its own database connection and writes in one transaction, so a failing command changes
nothing. A command that prints a token prints it alone on its last line, for ``tail -n 1``.
"""

import functools

import click
from flask import current_app
from flask.cli import AppGroup
from marshmallow import ValidationError

import delivery
from models import (
    Channel,
    Service,
    Token,
    User,
    db,
    delete_pusher,
    live_tokens,
    new_token,
    revoke_tokens,
    transaction,
)
from schemas import NotificationRequestSchema


def init_app(app):
    """Register the operator commands on ``app``."""
    for command in (users, services, channels, worker_command, deliveries_command):
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
            delete_pusher(pusher)
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
