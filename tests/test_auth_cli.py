"""Bearer tokens, rate limiting, configuration and the operator CLI (SPEC section 6).

The token and rate-limit tests run under /push/v1 and under the seed-era paths.
"""

import hashlib

import pytest
from support import bearer, cli_token, fetch, stored_bytes, pusher_body

from app import create_app
from models import Channel, ChannelState, Notification, Pusher, Token, User

pytestmark = pytest.mark.client_api

#: (method, where in support.Paths, body) of every client API endpoint.
CLIENT_ENDPOINTS = [
    ("get", "pushers", None),
    ("post", "pusher_set", pusher_body()),
    ("get", "channels", None),
    ("get", "device", None),
    ("post", "device", {"channels": []}),
]


def call(client, paths, method, endpoint, body, headers=None):
    """Call one of CLIENT_ENDPOINTS (the device one for pk1)."""
    path = paths.device("pk1") if endpoint == "device" else getattr(paths, endpoint)
    if method == "get":
        return client.get(path, headers=headers)
    return client.post(path, json=body, headers=headers)


# --- tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method, endpoint, body", CLIENT_ENDPOINTS)
def test_request_without_token_is_401_missing_token(client, paths, register, alice, method,
                                                    endpoint, body):
    register(alice)
    response = call(client, paths, method, endpoint, body)
    assert response.status_code == 401
    assert response.get_json()["errcode"] == "M_MISSING_TOKEN"


@pytest.mark.parametrize("header", ["Basic YWxpY2U6cHc=", "Bearer", "Bearer   ", "token abc"])
def test_authorization_without_a_bearer_token_is_401_missing_token(client, paths, alice, header):
    response = client.get(paths.pushers, headers={"Authorization": header})
    assert response.status_code == 401
    assert response.get_json()["errcode"] == "M_MISSING_TOKEN"


@pytest.mark.parametrize("method, endpoint, body", CLIENT_ENDPOINTS)
def test_unknown_token_is_401_unknown_token(client, paths, register, alice, method, endpoint,
                                            body):
    register(alice)
    response = call(client, paths, method, endpoint, body, bearer("pu_not-a-real-token"))
    assert response.status_code == 401
    assert response.get_json()["errcode"] == "M_UNKNOWN_TOKEN"


def test_bearer_scheme_is_case_insensitive(client, paths, alice):
    token = alice["Authorization"].split(" ", 1)[1]
    response = client.get(paths.pushers, headers={"Authorization": "bearer " + token})
    assert response.status_code == 200


def test_token_is_checked_before_the_body(client, paths, alice):
    response = client.post(paths.pusher_set, data=b"not json", content_type="application/json")
    assert response.status_code == 401
    assert response.get_json()["errcode"] == "M_MISSING_TOKEN"
    response = client.post(paths.pusher_set, json={"kind": "http"}, headers=bearer("pu_wrong"))
    assert response.status_code == 401
    assert response.get_json()["errcode"] == "M_UNKNOWN_TOKEN"


def test_revoked_token_is_401_unknown_token(client, paths, runner, alice, user_token):
    bob = user_token("bob")
    assert client.get(paths.pushers, headers=alice).status_code == 200
    assert runner.invoke(args=["users", "revoke", "alice"]).exit_code == 0
    response = client.get(paths.pushers, headers=alice)
    assert response.status_code == 401
    assert response.get_json()["errcode"] == "M_UNKNOWN_TOKEN"
    assert client.get(paths.pushers, headers=bob).status_code == 200


@pytest.mark.parametrize("method, endpoint, body", CLIENT_ENDPOINTS)
def test_service_token_on_client_api_is_403_forbidden(client, paths, register, alice, service,
                                                      method, endpoint, body):
    register(alice)
    response = call(client, paths, method, endpoint, body, service)
    assert response.status_code == 403
    assert response.get_json()["errcode"] == "M_FORBIDDEN"
    assert len(fetch(Pusher.select())) == 1  # the service's set did nothing


def test_user_token_on_sender_api_is_403_forbidden(client, alice, channel, register):
    register(alice)
    channel("erp.task", default="enabled")
    response = client.post("/push/v1/notifications", headers=alice,
                           json={"user_id": "alice", "channel": "erp.task", "payload": {}})
    assert response.status_code == 403
    assert response.get_json()["errcode"] == "M_FORBIDDEN"
    assert fetch(Notification.select()) == []


def test_tokens_are_stored_only_as_sha256_digests(app, client, alice, service, register):
    register(alice)  # some traffic, so the WAL has seen writes too
    user_token = alice["Authorization"].split(" ", 1)[1]
    service_token = service["Authorization"].split(" ", 1)[1]
    stored = stored_bytes(app)
    assert b"com.example.app" in stored  # the scan does see the database's contents
    for token in (user_token, service_token):
        assert token.encode() not in stored
        digest = hashlib.sha256(token.encode()).hexdigest()
        assert len(fetch(Token.select().where(Token.digest == digest))) == 1


def test_deleted_users_token_stays_unknown_when_the_name_is_reused(client, paths, runner, alice):
    assert runner.invoke(args=["users", "delete", "alice"]).exit_code == 0
    response = client.get(paths.pushers, headers=alice)
    assert response.status_code == 401
    assert response.get_json()["errcode"] == "M_UNKNOWN_TOKEN"
    new = bearer(cli_token(runner, "users", "create", "alice"))
    assert client.get(paths.pushers, headers=new).status_code == 200
    assert client.get(paths.pushers, headers=alice).status_code == 401


# --- rate limiting --------------------------------------------------------------------------


def test_rate_limit_answers_429_with_retry_after(make_app, paths, alice):
    client = make_app(RATE_LIMIT_ENABLED=True, RATE_LIMIT_PER_MINUTE=3).test_client()
    for _ in range(3):
        assert client.get(paths.pushers, headers=alice).status_code == 200
    response = client.get(paths.pushers, headers=alice)
    assert response.status_code == 429
    body = response.get_json()
    assert body["errcode"] == "M_LIMIT_EXCEEDED"
    assert isinstance(body["retry_after_ms"], int) and 0 < body["retry_after_ms"] <= 60_000
    retry_after = int(response.headers["Retry-After"])
    assert retry_after == -(-body["retry_after_ms"] // 1000)
    assert 1 <= retry_after <= 60


def test_rate_limit_is_per_user_whichever_token_they_use(make_app, paths, runner, alice,
                                                         user_token):
    bob = user_token("bob")
    alice_again = bearer(cli_token(runner, "users", "token", "alice"))
    client = make_app(RATE_LIMIT_ENABLED=True, RATE_LIMIT_PER_MINUTE=2).test_client()
    assert client.get(paths.pushers, headers=alice).status_code == 200
    assert client.get(paths.pushers, headers=alice_again).status_code == 200
    assert client.get(paths.pushers, headers=alice_again).status_code == 429
    assert client.get(paths.pushers, headers=alice).status_code == 429
    assert client.get(paths.pushers, headers=bob).status_code == 200


def test_rate_limit_counts_requests_with_bad_bodies(make_api, alice):
    api = make_api(RATE_LIMIT_ENABLED=True, RATE_LIMIT_PER_MINUTE=2)
    for _ in range(2):
        assert api.set_pusher(alice, {"kind": "http"}).status_code == 400
    assert api.set_pusher(alice, pusher_body()).status_code == 429


def test_both_path_sets_share_one_rate_limit(make_app, alice):
    client = make_app(RATE_LIMIT_ENABLED=True, RATE_LIMIT_PER_MINUTE=2).test_client()
    assert client.get("/push/v1/pushers", headers=alice).status_code == 200
    assert client.get("/pushers/v1", headers=alice).status_code == 200
    for path in ("/push/v1/pushers", "/pushers/v1", "/channels/v1"):
        assert client.get(path, headers=alice).status_code == 429


def test_services_have_their_own_higher_limit(make_app, alice, service, channel):
    channel("erp.task", default="enabled")
    client = make_app(RATE_LIMIT_ENABLED=True, RATE_LIMIT_PER_MINUTE=1,
                      SERVICE_RATE_LIMIT_PER_MINUTE=3).test_client()
    body = {"user_id": "alice", "channel": "erp.task", "payload": {}}
    for _ in range(3):
        assert client.post("/push/v1/notifications", json=body,
                           headers=service).status_code == 202
    limited = client.post("/push/v1/notifications", json=body, headers=service)
    assert limited.status_code == 429 and limited.get_json()["errcode"] == "M_LIMIT_EXCEEDED"


def test_rate_limit_off_lets_everything_through(make_api, alice):
    api = make_api(RATE_LIMIT_ENABLED=False, RATE_LIMIT_PER_MINUTE=1)
    for _ in range(5):
        assert api.pushers(alice) == []


# --- configuration --------------------------------------------------------------------------


def test_environment_variables_with_push_prefix_configure_the_app(tmp_path, monkeypatch):
    monkeypatch.setenv("PUSH_MAX_PUSHERS_PER_USER", "7")
    monkeypatch.setenv("PUSH_RATE_LIMIT_ENABLED", "false")
    monkeypatch.setenv("PUSH_GATEWAY_ALLOWLIST", "https://a.example/, https://b.example/gw/")
    monkeypatch.setenv("PUSH_ENCRYPTION", "required")
    app = create_app({"TESTING": True, "EMBEDDED_WORKER": False},
                     instance_path=str(tmp_path / "instance"))
    assert app.config["MAX_PUSHERS_PER_USER"] == 7
    assert app.config["RATE_LIMIT_ENABLED"] is False
    assert app.config["GATEWAY_ALLOWLIST"] == ["https://a.example/", "https://b.example/gw/"]
    assert app.config["ENCRYPTION"] == "required"
    assert app.config["MAX_CONTENT_LENGTH"] == 65536


@pytest.mark.parametrize("overrides", [{"ENCRYPTION": "sometimes"},
                                       {"MAX_PUSHERS_PER_USER": "many"},
                                       {"RATE_LIMIT_ENABLED": "perhaps"}])
def test_unreadable_settings_stop_the_app(make_app, overrides):
    with pytest.raises(RuntimeError):
        make_app(**overrides)


# --- CLI: users -----------------------------------------------------------------------------


def test_users_create_prints_the_token_alone_on_its_last_line(runner, client):
    result = runner.invoke(args=["users", "create", "carol"])
    assert result.exit_code == 0, result.output
    token = result.output.strip().splitlines()[-1]
    assert token == token.strip() and " " not in token and len(token) >= 32
    assert token not in result.output.strip().splitlines()[0]
    assert client.get("/push/v1/pushers", headers=bearer(token)).status_code == 200


@pytest.mark.parametrize("user_id, problem", [
    ("", "Length must be between 1 and 255"),
    ("u" * 256, "Length must be between 1 and 255"),
    ("a\x00b", "NUL"),
])
def test_users_create_refuses_a_name_the_api_cannot_address(runner, user_id, problem):
    result = runner.invoke(args=["users", "create", user_id])
    assert result.exit_code == 2 and problem in result.output, result.output
    assert fetch(User.select()) == []


def test_a_user_of_255_characters_is_made_and_the_api_reaches_them(runner, client, service,
                                                                     channel):
    name = "u" * 255
    token = bearer(cli_token(runner, "users", "create", name))
    assert client.get("/push/v1/pushers", headers=token).status_code == 200
    channel("erp.task", default="enabled")
    response = client.post("/push/v1/notifications", headers=service,
                           json={"user_id": name, "channel": "erp.task", "payload": {}})
    assert response.status_code == 202
    assert fetch(Notification.select())[0].user_id is not None


def test_users_create_of_an_existing_user_fails(runner, client, alice):
    result = runner.invoke(args=["users", "create", "alice"])
    assert result.exit_code != 0
    assert "exists" in result.output
    assert len(fetch(User.select())) == 1
    assert len(fetch(Token.select())) == 1
    assert client.get("/push/v1/pushers", headers=alice).status_code == 200


def test_users_token_gives_an_existing_user_another_working_token(runner, client, alice):
    second = bearer(cli_token(runner, "users", "token", "alice"))
    assert second != alice
    assert client.get("/push/v1/pushers", headers=second).status_code == 200
    assert client.get("/push/v1/pushers", headers=alice).status_code == 200
    result = runner.invoke(args=["users", "token", "nobody"])
    assert result.exit_code != 0 and "nobody" in result.output


def test_users_list_shows_pushers_and_live_tokens(runner, alice, user_token, register):
    user_token("bob")
    register(alice, "pk1")
    register(alice, "pk2")
    runner.invoke(args=["users", "token", "alice"])
    runner.invoke(args=["users", "revoke", "bob"])
    lines = runner.invoke(args=["users", "list"]).output.strip().splitlines()
    assert lines == ["alice\tpushers=2\ttokens=2", "bob\tpushers=0\ttokens=0"]


def test_users_revoke_revokes_every_token_of_that_user(runner, client, alice):
    second = bearer(cli_token(runner, "users", "token", "alice"))
    result = runner.invoke(args=["users", "revoke", "alice"])
    assert result.exit_code == 0 and "revoked 2" in result.output
    for headers in (alice, second):
        assert client.get("/push/v1/pushers", headers=headers).status_code == 401
    assert runner.invoke(args=["users", "revoke", "nobody"]).exit_code != 0


def test_users_delete_removes_the_user_and_everything_of_theirs(runner, api, alice,
                                                                 user_token, register, channel):
    bob = user_token("bob")
    channel("c1")
    register(alice, "pk1")
    register(bob, "pk1", append=True)
    for headers in (alice, bob):
        assert api.set_channels(headers, "pk1", ("c1", "enabled")).status_code == 200
    result = runner.invoke(args=["users", "delete", "alice"])
    assert result.exit_code == 0, result.output
    assert [u.name for u in fetch(User.select())] == ["bob"]
    assert [p.user.name for p in fetch(Pusher.select())] == ["bob"]
    states = fetch(ChannelState.select())
    assert [(s.user.name, s.status) for s in states] == [("bob", "enabled")]
    assert all(t.user_id is not None for t in fetch(Token.select()))
    assert api.channels(bob, "pk1") == {"c1": "enabled"}
    assert runner.invoke(args=["users", "delete", "alice"]).exit_code != 0


# --- CLI: services --------------------------------------------------------------------------


def notify(client, headers):
    return client.post("/push/v1/notifications", headers=headers,
                       json={"user_id": "alice", "channel": "c1", "payload": {"a": 1}})


def test_services_create_list_and_revoke(runner, client, channel):
    channel("c1")
    first = bearer(cli_token(runner, "services", "create", "erp"))
    assert notify(client, first).status_code == 202
    second = bearer(cli_token(runner, "services", "create", "erp"))
    assert second != first and notify(client, second).status_code == 202
    runner.invoke(args=["services", "create", "billing"])
    lines = runner.invoke(args=["services", "list"]).output.strip().splitlines()
    assert lines == ["billing\ttokens=1", "erp\ttokens=2"]
    result = runner.invoke(args=["services", "revoke", "erp"])
    assert result.exit_code == 0 and "revoked 2" in result.output
    for headers in (first, second):
        response = notify(client, headers)
        assert response.status_code == 401
        assert response.get_json()["errcode"] == "M_UNKNOWN_TOKEN"
    assert runner.invoke(args=["services", "list"]).output.strip().splitlines()[1] \
        == "erp\ttokens=0"
    assert runner.invoke(args=["services", "revoke", "nobody"]).exit_code != 0


def test_service_token_is_not_a_user_token(runner, client):
    token = bearer(cli_token(runner, "services", "create", "erp"))
    response = client.get("/push/v1/channels", headers=token)
    assert response.status_code == 403


# --- CLI: channels --------------------------------------------------------------------------


def test_channels_add_with_default_and_description_then_list(runner, client, alice):
    result = runner.invoke(args=["channels", "add", "erp.task", "--default", "enabled",
                                 "--description", "Tasks to do"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(args=["channels", "add", "erp.info"]).exit_code == 0
    lines = runner.invoke(args=["channels", "list"]).output.strip().splitlines()
    assert lines == ["erp.info\tdisabled\t", "erp.task\tenabled\tTasks to do"]
    assert client.get("/push/v1/channels", headers=alice).get_json() == {"channels": [
        {"id": "erp.info", "status": "disabled"}, {"id": "erp.task", "status": "enabled"}]}


@pytest.mark.parametrize("channel_id, problem", [
    ("", "Length must be between 1 and 255"),
    ("c" * 256, "Length must be between 1 and 255"),
    ("erp\x00task", "NUL"),
])
def test_channels_add_refuses_an_id_the_api_cannot_name(runner, channel_id, problem):
    result = runner.invoke(args=["channels", "add", channel_id, "--default", "enabled"])
    assert result.exit_code == 2 and problem in result.output, result.output
    assert fetch(Channel.select()) == []


def test_a_channel_id_of_255_characters_is_added_and_the_api_names_it(runner, client, alice,
                                                                      register):
    channel_id = "c" * 255
    assert runner.invoke(args=["channels", "add", channel_id]).exit_code == 0
    register(alice)
    response = client.post("/push/v1/channels/pk1", headers=alice,
                           json={"channels": [{"name": channel_id, "value": "enabled"}]})
    assert response.status_code == 200, response.get_json()


def test_channels_add_refuses_an_unknown_default(runner):
    result = runner.invoke(args=["channels", "add", "c1", "--default", "maybe"])
    assert result.exit_code != 0
    assert fetch(Channel.select()) == []


def test_channels_add_again_changes_only_the_options_given(runner):
    runner.invoke(args=["channels", "add", "c1", "--default", "enabled", "--description", "one"])
    assert runner.invoke(args=["channels", "add", "c1", "--description", "two"]).exit_code == 0
    channel = fetch(Channel.select())[0]
    assert (channel.default_status, channel.description) == ("enabled", "two")
    assert runner.invoke(args=["channels", "add", "c1", "--default", "disabled"]).exit_code == 0
    channel = fetch(Channel.select())[0]
    assert (channel.default_status, channel.description) == ("disabled", "two")
    assert len(fetch(Channel.select())) == 1


def test_channels_remove_drops_the_channel_and_device_states(runner, api, alice, register,
                                                             channel):
    channel("c1")
    channel("c2")
    register(alice)
    api.set_channels(alice, "pk1", ("c1", "enabled"), ("c2", "enabled"))
    result = runner.invoke(args=["channels", "remove", "c1"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(args=["channels", "list"]).output.splitlines() == ["c2\tdisabled\t"]
    assert [s.channel_id for s in fetch(ChannelState.select())] == ["c2"]
    assert api.channels(alice, "pk1") == {"c2": "enabled"}
    result = runner.invoke(args=["channels", "remove", "c1"])
    assert result.exit_code != 0 and "c1" in result.output
