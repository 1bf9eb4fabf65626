"""GET /channels and GET/POST /channels/<pushkey> (SPEC section 1); each test under /push/v1
and under the seed-era paths (/channels/v1, /channels/v1/<pushtoken>)."""

import pytest
from support import assert_error, fetch

from models import ChannelState, Delivery, db

pytestmark = pytest.mark.client_api


def stored_states():
    with db.connection_context():
        return sorted((s.user.name, s.pushkey, s.channel_id, s.status)
                      for s in ChannelState.select())


@pytest.fixture
def catalogue(channel):
    """Three channels: a and c disabled by default, b enabled."""
    channel("a")
    channel("b", default="enabled")
    channel("c")


# --- the catalogue --------------------------------------------------------------------------


def test_catalogue_lists_every_channel_with_its_default(client, paths, alice, catalogue):
    response = client.get(paths.channels, headers=alice)
    assert response.status_code == 200
    assert response.get_json() == {"channels": [
        {"id": "a", "status": "disabled"},
        {"id": "b", "status": "enabled"},
        {"id": "c", "status": "disabled"},
    ]}


def test_catalogue_default_is_disabled_unless_set(client, paths, alice, runner):
    assert runner.invoke(args=["channels", "add", "plain"]).exit_code == 0
    assert client.get(paths.channels, headers=alice).get_json() == {
        "channels": [{"id": "plain", "status": "disabled"}]}


def test_catalogue_is_empty_out_of_the_box(client, paths, alice):
    assert client.get(paths.channels, headers=alice).get_json() == {"channels": []}


def test_catalogue_needs_no_pusher_and_ignores_device_states(api, client, alice, user_token,
                                                             register, catalogue):
    bob = user_token("bob")
    register(alice)
    assert api.set_channels(alice, "pk1", ("a", "enabled")).status_code == 200
    expected = {"a": "disabled", "b": "enabled", "c": "disabled"}
    for headers in (alice, bob):
        listed = client.get(api.paths.channels, headers=headers).get_json()["channels"]
        assert {c["id"]: c["status"] for c in listed} == expected


# --- device states --------------------------------------------------------------------------


def test_never_set_channels_show_the_catalogue_default(api, alice, register, catalogue):
    register(alice)
    assert api.channels(alice, "pk1") == {"a": "disabled", "b": "enabled", "c": "disabled"}
    assert stored_states() == []


def test_device_listing_follows_the_catalogue_order(api, client, alice, register, catalogue):
    register(alice)
    response = client.get(api.paths.device("pk1"), headers=alice)
    assert [c["id"] for c in response.get_json()["channels"]] == ["a", "b", "c"]


def test_states_set_with_name_and_value(api, alice, register, catalogue):
    register(alice)
    response = api.set_channels(alice, "pk1", ("a", "enabled"), ("b", "disabled"))
    assert response.status_code == 200 and response.get_json() == {}
    assert api.channels(alice, "pk1") == {"a": "enabled", "b": "disabled", "c": "disabled"}


def test_states_set_with_id_and_status(api, alice, register, catalogue):
    register(alice)
    response = api.set_channels(alice, "pk1", {"id": "a", "status": "enabled"},
                                {"id": "c", "status": "disabled"})
    assert response.status_code == 200
    assert api.channels(alice, "pk1") == {"a": "enabled", "b": "enabled", "c": "disabled"}


def test_channels_not_named_stay_as_they_are(api, alice, register, catalogue):
    register(alice)
    api.set_channels(alice, "pk1", ("a", "enabled"), ("b", "disabled"))
    assert api.set_channels(alice, "pk1", ("c", "enabled")).status_code == 200
    assert api.channels(alice, "pk1") == {"a": "enabled", "b": "disabled", "c": "enabled"}
    assert api.set_channels(alice, "pk1").status_code == 200  # an empty list changes nothing
    assert api.channels(alice, "pk1") == {"a": "enabled", "b": "disabled", "c": "enabled"}


def test_a_state_can_be_changed_again(api, alice, register, catalogue):
    register(alice)
    api.set_channels(alice, "pk1", ("a", "enabled"))
    api.set_channels(alice, "pk1", ("a", "disabled"))
    assert api.channels(alice, "pk1")["a"] == "disabled"
    assert len(stored_states()) == 1


def test_not_set_is_stored_and_round_trips(api, alice, register, catalogue):
    register(alice)
    api.set_channels(alice, "pk1", ("a", "enabled"), ("b", "disabled"))
    assert api.set_channels(alice, "pk1", ("a", "not_set"), {"id": "b", "status": "not_set"},
                            ("c", "not_set")).status_code == 200
    assert api.channels(alice, "pk1") == {"a": "not_set", "b": "not_set", "c": "not_set"}
    assert stored_states() == [("alice", "pk1", c, "not_set") for c in ("a", "b", "c")]
    assert api.set_channels(alice, "pk1", ("b", "enabled")).status_code == 200
    assert api.channels(alice, "pk1") == {"a": "not_set", "b": "enabled", "c": "not_set"}


def test_explicit_not_set_counts_as_disabled_and_never_set_follows_the_default(
        api, alice, service, register, catalogue):
    # a is disabled by default, b enabled (the catalogue fixture).
    for pushkey in ("never-set", "b-not-set", "a-enabled", "a-not-set"):
        register(alice, pushkey)
    api.set_channels(alice, "b-not-set", ("b", "not_set"))
    api.set_channels(alice, "a-enabled", ("a", "enabled"))
    api.set_channels(alice, "a-not-set", ("a", "not_set"))

    def recipients(channel):
        response = api.send(service, channel=channel)
        assert response.status_code == 202, response.get_json()
        notification_id = response.get_json()["notification_id"]
        rows = fetch(Delivery.select().where(Delivery.notification == notification_id))
        assert len(rows) == response.get_json()["deliveries"]
        return sorted(d.pushkey for d in rows)

    assert recipients("b") == ["a-enabled", "a-not-set", "never-set"]
    assert recipients("a") == ["a-enabled"]


@pytest.mark.parametrize("value", ["on", "ENABLED", "", "default"])
def test_unknown_value_is_invalid_param_and_nothing_is_applied(api, alice, register, catalogue,
                                                               value):
    register(alice)
    response = api.set_channels(alice, "pk1", ("a", "enabled"), ("b", value))
    assert_error(response, 400, "M_INVALID_PARAM")
    assert stored_states() == []


def test_unknown_channel_is_rejected_atomically(api, alice, register, catalogue):
    register(alice)
    api.set_channels(alice, "pk1", ("a", "disabled"), ("b", "enabled"))
    response = api.set_channels(alice, "pk1", ("a", "enabled"), ("b", "not_set"),
                                ("c", "enabled"), ("nope", "enabled"))
    error = assert_error(response, 400, "M_INVALID_PARAM")
    assert "nope" in error
    assert api.channels(alice, "pk1") == {"a": "disabled", "b": "enabled", "c": "disabled"}
    assert stored_states() == [("alice", "pk1", "a", "disabled"), ("alice", "pk1", "b", "enabled")]


def test_duplicate_channel_is_rejected_atomically(api, alice, register, catalogue):
    register(alice)
    api.set_channels(alice, "pk1", ("c", "disabled"))
    response = api.set_channels(alice, "pk1", ("a", "enabled"), ("c", "not_set"),
                                ("b", "disabled"), ("a", "disabled"))
    error = assert_error(response, 400, "M_INVALID_PARAM")
    assert "a" in error
    assert api.channels(alice, "pk1") == {"a": "disabled", "b": "enabled", "c": "disabled"}
    assert stored_states() == [("alice", "pk1", "c", "disabled")]


def test_duplicate_across_the_two_forms_is_rejected(api, alice, register, catalogue):
    register(alice)
    response = api.set_channels(alice, "pk1", ("a", "enabled"), {"id": "a", "status": "enabled"})
    assert_error(response, 400, "M_INVALID_PARAM")
    assert stored_states() == []


@pytest.mark.parametrize("entry, missing", [
    ({"name": "a"}, "channels.0.value"),
    ({"value": "enabled"}, "channels.0.name"),
    ({"id": "a"}, "channels.0.value"),
    ({"status": "enabled"}, "channels.0.name"),
    ({}, "channels.0.name, channels.0.value"),
])
def test_incomplete_entry_is_missing_param(api, alice, register, catalogue, entry, missing):
    register(alice)
    response = api.set_channels(alice, "pk1", entry, ("b", "enabled"))
    assert assert_error(response, 400, "M_MISSING_PARAM") == f"Missing parameters: {missing}"
    assert stored_states() == []


def test_body_without_channels_is_missing_param(api, client, alice, register, catalogue):
    register(alice)
    response = client.post(api.paths.device("pk1"), headers=alice, json={"channel": []})
    assert assert_error(response, 400, "M_MISSING_PARAM") == "Missing parameters: channels"


@pytest.mark.parametrize("body", [
    {"channels": {"a": "enabled"}},
    {"channels": "a"},
    {"channels": ["a"]},
    {"channels": [{"name": 1, "value": "enabled"}]},
    {"channels": [{"name": "a", "value": True}]},
    {"channels": [{"name": None, "value": "enabled"}]},
    {"channels": [{"id": ["a"], "status": "enabled"}]},
])
def test_wrong_shapes_are_bad_json(api, client, alice, register, catalogue, body):
    register(alice)
    assert_error(client.post(api.paths.device("pk1"), headers=alice, json=body), 400, "M_BAD_JSON")
    assert stored_states() == []


def test_unknown_keys_in_the_body_are_ignored(api, client, alice, register, catalogue):
    register(alice)
    response = client.post(api.paths.device("pk1"), headers=alice, json={
        "channels": [{"name": "a", "value": "enabled", "comment": "x"}], "device": "phone"})
    assert response.status_code == 200
    assert api.channels(alice, "pk1")["a"] == "enabled"


# --- what a device is -----------------------------------------------------------------------


def test_state_is_shared_by_the_users_pushers_with_that_pushkey(api, alice, register,
                                                               catalogue):
    register(alice, "pk1", app_id="com.example.one")
    register(alice, "pk1", app_id="com.example.two")
    api.set_channels(alice, "pk1", ("a", "enabled"))
    assert stored_states() == [("alice", "pk1", "a", "enabled")]
    api.unregister(alice, "pk1", app_id="com.example.one")
    assert api.channels(alice, "pk1")["a"] == "enabled"  # the other pusher still has it


def test_states_go_with_the_last_pusher_of_the_device(api, client, alice, register, catalogue):
    register(alice, "pk1", app_id="com.example.one")
    register(alice, "pk1", app_id="com.example.two")
    register(alice, "pk2")
    api.set_channels(alice, "pk1", ("a", "enabled"), ("b", "not_set"))
    api.set_channels(alice, "pk2", ("b", "disabled"))
    api.unregister(alice, "pk1", app_id="com.example.one")
    assert len(stored_states()) == 3  # pk1 still has a pusher
    api.unregister(alice, "pk1", app_id="com.example.two")
    assert_error(client.get(api.paths.device("pk1"), headers=alice), 404, "M_NOT_FOUND")
    assert stored_states() == [("alice", "pk2", "b", "disabled")]
    register(alice, "pk1")
    assert api.channels(alice, "pk1") == {"a": "disabled", "b": "enabled", "c": "disabled"}


def test_states_are_per_user_even_for_the_same_pushkey(api, alice, user_token, register,
                                                      catalogue):
    bob = user_token("bob")
    register(alice, "pk1")
    register(bob, "pk1", append=True)
    api.set_channels(alice, "pk1", ("a", "enabled"))
    api.set_channels(bob, "pk1", ("a", "disabled"))
    assert api.channels(alice, "pk1")["a"] == "enabled"
    assert api.channels(bob, "pk1")["a"] == "disabled"


def test_new_catalogue_channels_show_up_with_their_default(api, alice, register, channel,
                                                           catalogue):
    register(alice)
    api.set_channels(alice, "pk1", ("a", "enabled"))
    channel("d", default="enabled")
    channel("e")
    assert api.channels(alice, "pk1") == {"a": "enabled", "b": "enabled", "c": "disabled",
                                          "d": "enabled", "e": "disabled"}


@pytest.mark.parametrize("pushkey", [
    "ab/cd+ef==",
    "/leading+slash=",
    "a//double",
    "trailing/",
    "+/=",
    "APA91b/x+y/z==",
])
@pytest.mark.parametrize("encode_set, encode_get", [(False, False), (True, True), (False, True),
                                                    (True, False)],
                         ids=["raw", "encoded", "raw-set-encoded-get", "encoded-set-raw-get"])
def test_base64_pushkeys_work_raw_and_percent_encoded(api, alice, register, catalogue,
                                                      pushkey, encode_set, encode_get):
    register(alice, pushkey)
    response = api.set_channels(alice, pushkey, ("a", "enabled"), encode=encode_set)
    assert response.status_code == 200, response.get_json()
    assert api.channels(alice, pushkey, encode=encode_get) == {
        "a": "enabled", "b": "enabled", "c": "disabled"}
    assert stored_states() == [("alice", pushkey, "a", "enabled")]


def test_percent_encoding_uses_the_expected_escapes(api, client, alice, register, catalogue):
    register(alice, "a/b+c=")
    response = client.get(f"{api.paths.channels}/a%2Fb%2Bc%3D", headers=alice)
    assert response.status_code == 200
    register(alice, "a%2Fb")  # a pushkey that itself holds a percent sign
    api.set_channels(alice, "a%2Fb", ("c", "enabled"), encode=True)
    assert api.channels(alice, "a%2Fb", encode=True)["c"] == "enabled"
    assert api.channels(alice, "a/b+c=")["c"] == "disabled"


def test_pushkey_of_another_user_is_404_and_leaks_nothing(api, client, alice, user_token, register,
                                                          catalogue):
    bob = user_token("bob")
    register(bob, "bobs-phone")
    api.set_channels(bob, "bobs-phone", ("a", "enabled"))
    response = client.get(api.paths.device("bobs-phone"), headers=alice)
    error = assert_error(response, 404, "M_NOT_FOUND")
    assert "channels" not in response.get_json() and "enabled" not in error
    response = api.set_channels(alice, "bobs-phone", ("a", "disabled"), ("b", "disabled"))
    assert_error(response, 404, "M_NOT_FOUND")
    assert stored_states() == [("bob", "bobs-phone", "a", "enabled")]
    assert api.channels(bob, "bobs-phone")["a"] == "enabled"


def test_unregistered_pushkey_is_404(api, client, alice, register, catalogue):
    register(alice, "pk1")
    assert_error(client.get(api.paths.device("pk2"), headers=alice), 404, "M_NOT_FOUND")
    assert_error(api.set_channels(alice, "pk2", ("a", "enabled")), 404, "M_NOT_FOUND")
    assert stored_states() == []
