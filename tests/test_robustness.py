"""Nasty input found by fuzzing (schemathesis and hand-made requests): never a 500, never HTML,
always ``{"errcode", "error"}``, nothing stored by a refused request, and an OpenAPI document
that says what the server does."""

import json

import pytest
from support import ISS, assert_error, cli_token, encryption, fetch, pusher_body

from models import ChannelState, EncryptionKey, Notification, Pusher, db

pytestmark = pytest.mark.client_api

SEND = "/push/v1/notifications"
URL = "https://gw.example/_matrix/push/v1/notify"


def strict_json(response):
    """The body parsed as strict JSON: no NaN or Infinity, which json.loads would accept."""

    def refuse(name):
        raise ValueError(f"{name} in a response")

    return json.loads(response.get_data(as_text=True), parse_constant=refuse)


def post_raw(client, path, text, headers):
    return client.post(path, data=text.encode(), content_type="application/json",
                       headers=headers)


def nothing_stored():
    return (fetch(Pusher.select()) == [] and fetch(EncryptionKey.select()) == []
            and fetch(ChannelState.select()) == [] and fetch(Notification.select()) == [])


# --- lone UTF-16 surrogates (\ud800 escapes): were a 500 (UnicodeEncodeError) -------------------


@pytest.mark.parametrize("body", [
    pusher_body("\ud800"),
    {"kind": None, "app_id": "a", "pushkey": "\udfff"},
    {"kind": None, "app_id": "\udfff", "pushkey": "pk1"},
    pusher_body(app_display_name="\ud800"),
    pusher_body(data={"url": URL, "note": "\ud800"}),
    pusher_body(data={"url": URL, "\ud800": 1}),
    pusher_body(data={"url": URL + "\ud800"}),
    pusher_body(data={"url": "https://\ud800.example/push/v1/notify"}),
    pusher_body(encryption=encryption(key_identifier="\ud800")),
], ids=["pushkey", "pushkey-delete", "app_id", "display-name", "data-value", "data-key",
        "url-path", "url-host", "key-identifier"])
def test_lone_surrogate_in_pusher_set_is_400_not_json(client, paths, alice, body):
    text = json.dumps(body)  # ensure_ascii: the surrogate travels as a \\udxxx escape
    assert "\\ud" in text
    assert_error(post_raw(client, paths.pusher_set, text, alice), 400, "M_NOT_JSON")
    assert nothing_stored()


@pytest.mark.parametrize("body", [
    {"user_id": "alice", "channel": "news", "payload": {"text": "\ud800"}},
    {"user_id": "alice", "channel": "news", "payload": {"\udc00": 1}},
    {"user_id": "\ud800", "channel": "news", "payload": {}},
    {"user_id": "alice", "channel": "\ud800", "payload": {}},
    {"user_id": "alice", "channel": "news", "payload": {}, "identifier": "\ud800"},
    {"user_id": "alice", "channel": "news", "payload": {}, "counts": {"\ud800": 1}},
], ids=["payload-value", "payload-key", "user_id", "channel", "identifier", "counts-key"])
def test_lone_surrogate_in_a_notification_is_400_not_json(client, alice, service, channel,
                                                          register, body):
    channel("news", default="enabled")
    register(alice)
    assert_error(post_raw(client, SEND, json.dumps(body), service), 400, "M_NOT_JSON")
    assert fetch(Notification.select()) == []


def test_lone_surrogate_in_a_channel_change_is_400_not_json(client, paths, alice, channel,
                                                             register):
    channel("news")
    register(alice)
    text = json.dumps({"channels": [{"name": "\ud800", "value": "enabled"}]})
    assert_error(post_raw(client, paths.device("pk1"), text, alice), 400, "M_NOT_JSON")
    assert fetch(ChannelState.select()) == []


def test_surrogate_pairs_and_escaped_backslashes_are_fine(client, paths, alice, service,
                                                          channel):
    channel("news", default="enabled")
    # a proper pair (an emoji), and the six characters \ud800 (an escaped backslash)
    text = json.dumps(pusher_body("\U0001f600", data={"url": URL, "note": "\\ud800"}))
    assert "\\ud83d\\ude00" in text and "\\\\ud800" in text
    response = post_raw(client, paths.pusher_set, text, alice)
    assert response.status_code == 200, response.get_json()
    [pusher] = strict_json(client.get(paths.pushers, headers=alice))["pushers"]
    assert pusher["pushkey"] == "\U0001f600" and pusher["data"]["note"] == "\\ud800"
    sent = client.post(SEND, json={"user_id": "alice", "channel": "news",
                                   "payload": {"text": "\U0001f600 \\ud800"}}, headers=service)
    assert sent.status_code == 202 and sent.get_json()["deliveries"] == 1


# --- numbers past a float's range: were stored and came back out as Infinity (not JSON) ----------


@pytest.mark.parametrize("number", ["1e400", "-1e400", "1E999", "123456789e999"])
def test_float_overflow_in_pusher_data_is_400_not_json(client, paths, alice, number):
    text = json.dumps(pusher_body(data={"url": URL, "x": 0})).replace('"x": 0', f'"x": {number}')
    assert_error(post_raw(client, paths.pusher_set, text, alice), 400, "M_NOT_JSON")
    assert strict_json(client.get(paths.pushers, headers=alice)) == {"pushers": []}


def test_float_overflow_in_a_payload_is_400_not_json(client, alice, service, channel, register):
    channel("news", default="enabled")
    register(alice)
    text = '{"user_id": "alice", "channel": "news", "payload": {"x": 1e400}}'
    assert_error(post_raw(client, SEND, text, service), 400, "M_NOT_JSON")
    assert fetch(Notification.select()) == []
    assert strict_json(client.get("/push/v1/history/device/pk1", headers=alice)) == {
        "messages": []}


def test_large_finite_and_tiny_numbers_still_pass(client, paths, alice):
    text = json.dumps(pusher_body(data={"url": URL, "x": 0, "y": 0}))
    text = text.replace('"x": 0', '"x": 1.7e308').replace('"y": 0', '"y": 1e-400')
    assert post_raw(client, paths.pusher_set, text, alice).status_code == 200
    [pusher] = strict_json(client.get(paths.pushers, headers=alice))["pushers"]
    assert pusher["data"]["x"] == 1.7e308 and pusher["data"]["y"] == 0.0


# --- encryption periods and iss: a period crypto refuses was a 500 ------------------------------


@pytest.mark.parametrize("period", ["0000-01", "0001-01", "1999-12", "2024-01\n",
                                    "\u0662\u0660\u0662\u0664-01", "2024-1", "2024-13"],
                         ids=["year-zero", "year-one", "before-2000", "trailing-newline",
                              "arabic-digits", "short", "month-13"])
@pytest.mark.parametrize("name", ["initial_key_period", "time_iss_created"])
def test_bad_key_period_is_400_invalid_param(client, paths, alice, period, name):
    enc = {"method": "aes-hmac-sha256", name: period, "iss": ISS, "key_identifier": "k1"}
    response = client.post(paths.pusher_set, json=pusher_body(encryption=enc), headers=alice)
    assert_error(response, 400, "M_INVALID_PARAM")
    assert nothing_stored()


@pytest.mark.parametrize("iss", [ISS + "\n", " " + ISS, ISS[:-2] + " 1"])
def test_iss_with_whitespace_is_400_invalid_param(client, paths, alice, iss):
    response = client.post(paths.pusher_set, json=pusher_body(encryption=encryption(iss=iss)),
                           headers=alice)
    assert_error(response, 400, "M_INVALID_PARAM")
    assert nothing_stored()


@pytest.mark.parametrize("period", ["2000-01", "2999-12"])
def test_extreme_but_valid_periods_are_accepted(client, paths, alice, period):
    response = client.post(paths.pusher_set,
                           json=pusher_body(encryption=encryption(period=period)), headers=alice)
    assert response.status_code == 200, response.get_json()


# --- NUL characters: PostgreSQL text cannot hold them (psycopg2 ValueError: a 500) --------------


NUL_PUSHER_BODIES = {
    "pushkey": pusher_body("pk\x00"),
    "pushkey-delete": {"kind": None, "app_id": "a", "pushkey": "pk\x00"},
    "app_id": pusher_body(app_id="a\x00"),
    "app_display_name": pusher_body(app_display_name="\x00"),
    "device_display_name": pusher_body(device_display_name="\x00"),
    "profile_tag": pusher_body(profile_tag="\x00"),
    "lang": pusher_body(lang="en\x00"),
    "key_identifier": pusher_body(encryption=encryption(key_identifier="k\x00")),
}


@pytest.mark.parametrize("body", NUL_PUSHER_BODIES.values(), ids=NUL_PUSHER_BODIES.keys())
def test_nul_in_a_pusher_string_is_400_invalid_param(client, paths, alice, body):
    response = client.post(paths.pusher_set, json=body, headers=alice)
    assert_error(response, 400, "M_INVALID_PARAM")
    assert nothing_stored()


NUL_NOTIFICATIONS = {
    "user_id": {"user_id": "alice\x00", "channel": "news", "payload": {}},
    "channel": {"user_id": "alice", "channel": "news\x00", "payload": {}},
    "identifier": {"user_id": "alice", "channel": "news", "payload": {}, "identifier": "\x00"},
}


@pytest.mark.parametrize("body", NUL_NOTIFICATIONS.values(), ids=NUL_NOTIFICATIONS.keys())
def test_nul_in_a_notification_string_is_400_invalid_param(client, service, channel, body):
    channel("news", default="enabled")
    assert_error(client.post(SEND, json=body, headers=service), 400, "M_INVALID_PARAM")
    assert fetch(Notification.select()) == []


@pytest.mark.parametrize("item", [{"name": "news\x00", "value": "enabled"},
                                  {"id": "news\x00", "status": "enabled"}], ids=["name", "id"])
def test_nul_in_a_channel_name_is_400_invalid_param(client, paths, alice, channel, register,
                                                    item):
    channel("news")
    register(alice)
    response = client.post(paths.device("pk1"), json={"channels": [item]}, headers=alice)
    assert_error(response, 400, "M_INVALID_PARAM")
    assert fetch(ChannelState.select()) == []


@pytest.mark.parametrize("path", ["/push/v1/history/device/pk%00", "/push/v1/history/%00",
                                  "/push/v1/history/abc%00def"])
def test_nul_in_a_path_is_404_not_found(client, alice, path):
    assert_error(client.get(path, headers=alice), 404, "M_NOT_FOUND")


@pytest.mark.parametrize("pushkey", ["pk%00", "%00"])
def test_nul_in_a_device_path_is_404_not_found(client, paths, alice, register, pushkey):
    register(alice)
    assert_error(client.get(paths.device(pushkey), headers=alice), 404, "M_NOT_FOUND")


def test_nul_in_a_channel_change_path_is_404_not_found(client, paths, alice, channel, register):
    channel("news")
    register(alice)
    response = client.post(paths.device("pk1%00"),
                           json={"channels": [{"name": "news", "value": "enabled"}]},
                           headers=alice)
    assert_error(response, 404, "M_NOT_FOUND")
    assert fetch(ChannelState.select()) == []


def test_nul_inside_data_and_payload_is_stored_escaped_and_fine(client, paths, alice, service,
                                                               channel):
    channel("news", default="enabled")
    body = pusher_body(data={"url": URL, "note": "a\x00b", "k\x00": 1})
    assert client.post(paths.pusher_set, json=body, headers=alice).status_code == 200
    [pusher] = client.get(paths.pushers, headers=alice).get_json()["pushers"]
    assert pusher["data"] == {"url": URL, "note": "a\x00b", "k\x00": 1}
    sent = client.post(SEND, json={"user_id": "alice", "channel": "news",
                                   "payload": {"t": "\x00"}}, headers=service)
    assert sent.status_code == 202
    item = client.get(f"/push/v1/history/{sent.get_json()['notification_id']}", headers=alice)
    assert item.get_json()["payload"] == {"t": "\x00"}


def test_nul_never_reaches_postgresql(make_app, paths, pg_url):
    app = make_app(DATABASE_URL=pg_url, TESTING=False)
    try:
        runner, client = app.test_cli_runner(), app.test_client()
        user = {"Authorization": "Bearer " + cli_token(runner, "users", "create", "alice")}
        sender = {"Authorization": "Bearer " + cli_token(runner, "services", "create", "erp")}
        runner.invoke(args=["channels", "add", "news", "--default", "enabled"])
        assert client.post(paths.pusher_set, json=pusher_body(), headers=user).status_code == 200
        for body in NUL_PUSHER_BODIES.values():
            response = client.post(paths.pusher_set, json=body, headers=user)
            assert_error(response, 400, "M_INVALID_PARAM")
        for body in NUL_NOTIFICATIONS.values():
            assert_error(client.post(SEND, json=body, headers=sender), 400, "M_INVALID_PARAM")
        response = client.post(paths.device("pk1"), headers=user,
                               json={"channels": [{"name": "n\x00", "value": "enabled"}]})
        assert_error(response, 400, "M_INVALID_PARAM")
        for path in (paths.device("%00"), "/push/v1/history/device/%00",
                     "/push/v1/history/%00"):
            assert_error(client.get(path, headers=user), 404, "M_NOT_FOUND")
        body = pusher_body("pk2", data={"url": URL, "note": "\x00"})
        assert client.post(paths.pusher_set, json=body, headers=user).status_code == 200
        sent = client.post(SEND, json={"user_id": "alice", "channel": "news",
                                       "payload": {"t": "\x00"}}, headers=sender)
        assert sent.status_code == 202 and sent.get_json()["deliveries"] == 2
    finally:
        if not db.is_closed():
            db.close()


# --- double slashes: were a 308 redirect with an HTML body --------------------------------------


def doubled_slashes(path):
    """``path`` with each of its slashes but the first doubled in turn."""
    return [path[:i] + "/" + path[i:] for i, char in enumerate(path) if char == "/" and i]


@pytest.mark.parametrize("method, path", [
    ("post", "/push/v1//notifications"),
    ("get", "/push/v1/history//abc"),
])
def test_double_slash_outside_a_pushkey_is_404_json_not_a_redirect(client, alice, method, path):
    response = getattr(client, method)(path, headers=alice, json={})
    assert_error(response, 404, "M_UNRECOGNIZED")
    assert "Location" not in response.headers


@pytest.mark.parametrize("method, endpoint", [("get", "pushers"), ("post", "pusher_set"),
                                              ("get", "channels"), ("options", "pushers")])
def test_double_slash_in_a_client_path_is_404_json_not_a_redirect(client, paths, alice, method,
                                                                  endpoint):
    for path in doubled_slashes(getattr(paths, endpoint)):
        response = getattr(client, method)(path, headers=alice, json={})
        assert_error(response, 404, "M_UNRECOGNIZED")
        assert "Location" not in response.headers


def test_double_slash_inside_a_pushkey_still_reaches_the_device(api, client, alice, register):
    register(alice, "a//b")
    assert api.channels(alice, "a//b") == {}
    assert client.get("/push/v1/history/device/a//b", headers=alice).get_json() == {
        "messages": []}


# --- the OpenAPI document --------------------------------------------------------------------


@pytest.fixture
def spec(client):
    return client.get("/openapi.json").get_json()


def test_openapi_documents_no_422_validation_errors(client, paths, alice, spec):
    # A body that fails validation is a 400 (SPEC section 3); 422 never happens.
    assert_error(client.post(paths.pusher_set, json={"kind": 5}, headers=alice), 400, "M_BAD_JSON")
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            responses = operation["responses"]
            assert "422" not in responses, (path, method)
            if "requestBody" in operation:
                assert responses["400"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"}, (path, method)
    assert "UNPROCESSABLE_ENTITY" not in spec["components"].get("responses", {})


def test_openapi_request_schemas_state_the_hidden_rules(spec):
    schemas = spec["components"]["schemas"]
    pusher_set = schemas["PusherSet"]["properties"]
    assert pusher_set["kind"]["enum"] == ["http", None]
    assert pusher_set["data"]["required"] == ["url"]
    assert pusher_set["pushkey"]["maxLength"] == 512
    assert pusher_set["app_id"]["pattern"] == "^[^\\u0000]*$"
    assert {"required": ["app_display_name", "device_display_name", "lang", "data"]} in (
        schemas["PusherSet"]["anyOf"])
    encryption = schemas["Encryption"]
    assert encryption["anyOf"] == [{"required": ["time_iss_created"]},
                                   {"required": ["initial_key_period"]}]
    assert len(schemas["ChannelChange"]["allOf"]) == 2
    for name in ("time_iss_created", "initial_key_period"):
        assert encryption["properties"][name]["pattern"].startswith("^2[0-9]{3}-")
    assert encryption["properties"]["initial_key_period"]["deprecated"] is True
    assert "deprecated" not in encryption["properties"]["time_iss_created"]
