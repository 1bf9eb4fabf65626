"""POST /pushers/set and GET /pushers (SPEC section 1), with encryption (4); each test under
/push/v1 and under the seed-era paths (/pushers/v1/set, /pushers/v1)."""

import json
import os
import stat
import time

import pytest
from support import (
    ISS,
    PUSH_V1,
    SEED_ERA,
    Api,
    assert_error,
    encryption,
    fetch,
    stored_bytes,
    pusher_body,
)

import app as app_module
import crypto
from models import ChannelState, EncryptionKey, Pusher, db

pytestmark = pytest.mark.client_api

OTHER_ISS = "ff" * 32

with open(os.path.join(os.path.dirname(__file__), "vectors", "crypto.json")) as f:
    CHAINS = json.load(f)["chains"]


# --- create, list, update, delete -----------------------------------------------------------


def test_registered_pusher_is_listed_with_its_fields(api, alice):
    before = int(time.time())
    body = pusher_body("pk1", profile_tag="tag", lang="de-DE",
                       data={"url": "https://gw.example/push/v1/notify", "format": "event_id_only",
                             "custom": {"k": [1, 2]}})
    response = api.set_pusher(alice, body)
    assert response.status_code == 200 and response.get_json() == {}
    [listed] = api.pushers(alice)
    ts = listed.pop("pushkey_ts")
    assert before <= ts <= int(time.time()) + 1
    assert listed == {
        "pushkey": "pk1", "kind": "http", "app_id": "com.example.app",
        "app_display_name": "Example", "device_display_name": "Phone", "profile_tag": "tag",
        "lang": "de-DE",
        "data": {"url": "https://gw.example/push/v1/notify", "format": "event_id_only",
                 "custom": {"k": [1, 2]}},
    }


def test_pushers_are_listed_oldest_first_and_an_update_keeps_the_order(api, alice, register):
    for pushkey in ("pk-b", "pk-a", "pk-c"):
        register(alice, pushkey)
    register(alice, "pk-b", lang="fr")
    assert [p["pushkey"] for p in api.pushers(alice)] == ["pk-b", "pk-a", "pk-c"]


def test_a_user_sees_only_their_own_pushers(api, alice, user_token, register):
    bob = user_token("bob")
    register(alice, "alice-phone")
    register(bob, "bob-phone")
    assert [p["pushkey"] for p in api.pushers(alice)] == ["alice-phone"]
    assert [p["pushkey"] for p in api.pushers(bob)] == ["bob-phone"]


def test_kind_null_deletes_the_pusher(api, alice, register):
    register(alice, "pk1")
    register(alice, "pk2")
    response = api.set_pusher(alice, {"kind": None, "app_id": "com.example.app",
                                          "pushkey": "pk1"})
    assert response.status_code == 200 and response.get_json() == {}
    assert [p["pushkey"] for p in api.pushers(alice)] == ["pk2"]


def test_kind_null_deletes_only_the_matching_app_id(api, alice, register):
    register(alice, "pk1")
    register(alice, "pk1", app_id="com.example.other")
    api.set_pusher(alice, {"kind": None, "app_id": "com.example.other", "pushkey": "pk1"})
    assert [p["app_id"] for p in api.pushers(alice)] == ["com.example.app"]


def test_kind_null_does_not_touch_another_users_pusher(api, alice, user_token, register):
    bob = user_token("bob")
    register(bob, "pk1")
    response = api.set_pusher(alice, {"kind": None, "app_id": "com.example.app",
                                          "pushkey": "pk1"})
    assert response.status_code == 200
    assert [p["pushkey"] for p in api.pushers(bob)] == ["pk1"]


def test_deleting_a_missing_pusher_is_200_empty(api, alice):
    response = api.set_pusher(alice, {"kind": None, "app_id": "com.example.app",
                                          "pushkey": "never-registered"})
    assert response.status_code == 200
    assert response.get_json() == {}


@pytest.mark.parametrize("kind", ["email", "HTTP", "", "https"])
def test_kind_other_than_http_is_invalid_param(api, alice, kind):
    error = assert_error(api.set_pusher(alice, pusher_body(kind=kind)), 400, "M_INVALID_PARAM")
    assert "kind" in error
    assert api.pushers(alice) == []


def test_missing_conditional_fields_are_named_in_one_message(api, alice):
    body = pusher_body()
    del body["lang"], body["data"]
    response = api.set_pusher(alice, body)
    assert assert_error(response, 400, "M_MISSING_PARAM") == "Missing parameters: lang, data"


def test_every_conditional_field_is_required_with_kind_http(api, alice):
    response = api.set_pusher(alice, {"kind": "http", "app_id": "a", "pushkey": "k"})
    assert assert_error(response, 400, "M_MISSING_PARAM") == (
        "Missing parameters: app_display_name, device_display_name, lang, data")


def test_missing_fields_are_all_named_even_with_an_always_required_one_missing(api, alice):
    body = pusher_body()
    del body["app_id"], body["lang"]
    error = assert_error(api.set_pusher(alice, body), 400, "M_MISSING_PARAM")
    assert error.startswith("Missing parameters: ")
    assert set(error.removeprefix("Missing parameters: ").split(", ")) == {"app_id", "lang"}


@pytest.mark.parametrize("field", ["kind", "app_id", "pushkey"])
def test_kind_app_id_and_pushkey_are_always_required(api, alice, field):
    for body in (pusher_body(), {"kind": None, "app_id": "com.example.app", "pushkey": "pk1"}):
        del body[field]
        error = assert_error(api.set_pusher(alice, body), 400, "M_MISSING_PARAM")
        assert error == f"Missing parameters: {field}"
    assert api.pushers(alice) == []


def test_deleting_needs_no_conditional_fields(api, alice, register):
    register(alice)
    response = api.set_pusher(alice, {"kind": None, "app_id": "com.example.app",
                                          "pushkey": "pk1", "lang": 5})
    assert response.status_code == 400  # types are still checked
    response = api.set_pusher(alice, {"kind": None, "app_id": "com.example.app",
                                          "pushkey": "pk1"})
    assert response.status_code == 200
    assert api.pushers(alice) == []


@pytest.mark.parametrize("pushkey", [
    "é" * 255 + "a",  # 511 bytes, 256 characters
    "é" * 256,  # 512 bytes
    "a" * 512,
    "x",
])
def test_pushkey_up_to_512_utf8_bytes_is_accepted(api, alice, pushkey):
    assert len(pushkey.encode()) <= 512
    assert api.set_pusher(alice, pusher_body(pushkey)).status_code == 200
    assert [p["pushkey"] for p in api.pushers(alice)] == [pushkey]


@pytest.mark.parametrize("pushkey", [
    "é" * 256 + "a",  # 513 bytes but only 257 characters
    "a" * 513,
    "",
])
def test_pushkey_over_512_utf8_bytes_or_empty_is_refused(api, alice, pushkey):
    error = assert_error(api.set_pusher(alice, pusher_body(pushkey)), 400, "M_INVALID_PARAM")
    assert "pushkey" in error
    assert api.pushers(alice) == []


def test_app_id_limit_is_64_characters_not_bytes(api, alice):
    assert api.set_pusher(alice, pusher_body(app_id="é" * 64)).status_code == 200
    for app_id in ("a" * 65, ""):
        response = api.set_pusher(alice, pusher_body(app_id=app_id))
        error = assert_error(response, 400, "M_INVALID_PARAM")
        assert "app_id" in error
    assert [p["app_id"] for p in api.pushers(alice)] == ["é" * 64]


@pytest.mark.parametrize("field, ok, too_long", [
    ("app_display_name", 255, 256),
    ("device_display_name", 255, 256),
    ("profile_tag", 255, 256),
    ("lang", 32, 33),
])
def test_other_strings_are_bounded(api, alice, field, ok, too_long):
    assert api.set_pusher(alice, pusher_body(**{field: "x" * ok})).status_code == 200
    response = api.set_pusher(alice, pusher_body("pk2", **{field: "x" * too_long}))
    assert field in assert_error(response, 400, "M_INVALID_PARAM")
    assert [p["pushkey"] for p in api.pushers(alice)] == ["pk1"]


@pytest.mark.parametrize("field, value", [
    ("append", "yes"),
    ("append", 1),
    ("append", "true"),
    ("append", None),
    ("data", "https://gw.example/push/v1/notify"),
    ("data", ["https://gw.example/push/v1/notify"]),
    ("data", None),
    ("lang", 5),
    ("app_display_name", True),
    ("device_display_name", ["Phone"]),
    ("profile_tag", 1),
    ("pushkey", 123),
    ("app_id", {"id": "x"}),
    ("kind", 1),
    ("encryption", "aes-hmac-sha256"),
])
def test_types_are_strict(api, alice, field, value):
    error = assert_error(api.set_pusher(alice, pusher_body(**{field: value})), 400, "M_BAD_JSON")
    assert field in error
    assert api.pushers(alice) == []


@pytest.mark.parametrize("data", [
    {"url": 5},
    {"url": ["https://gw.example/push/v1/notify"]},
    {"url": "https://gw.example/push/v1/notify", "format": 1},
])
def test_data_url_and_format_must_be_strings(api, alice, data):
    assert_error(api.set_pusher(alice, pusher_body(data=data)), 400, "M_BAD_JSON")
    assert api.pushers(alice) == []


@pytest.mark.parametrize("append", [True, False])
def test_append_accepts_booleans(api, alice, append):
    assert api.set_pusher(alice, pusher_body(append=append)).status_code == 200


def test_unknown_top_level_keys_are_ignored(api, alice):
    body = pusher_body(device_id="ABC", extra={"nested": True}, tweaks=[1])
    assert api.set_pusher(alice, body).status_code == 200
    [listed] = api.pushers(alice)
    assert not {"device_id", "extra", "tweaks"} & set(listed)


# --- data.url --------------------------------------------------------------------------------


def test_data_url_is_required(api, alice):
    response = api.set_pusher(alice, pusher_body(data={"format": "event_id_only"}))
    assert assert_error(response, 400, "M_MISSING_PARAM") == "Missing parameters: data.url"


@pytest.mark.parametrize("url", [
    "https://gw.example/_matrix/push/v1/notify",
    "https://gw.example/push/v1/notify",
    "https://gw.example/push/v1/",
    "https://gw.example/push/v1",  # a gematik base as the concept's examples write it
    "https://gw.example:8443/tenant/push/v1",
    "https://gw.example:8443/tenant/push/v1/notify",
    "https://gw.example/push/v1/notify?tenant=1",
])
def test_gateway_url_ending_in_a_notify_path_or_a_base_is_accepted(api, alice, url):
    assert api.set_pusher(alice, pusher_body(url=url)).status_code == 200
    assert api.pushers(alice)[0]["data"]["url"] == url


@pytest.mark.parametrize("url", [
    "https://gw.example/",
    "https://gw.example",
    "https://gw.example/push/v1x",
    "https://gw.example/push/v1//",
    "https://gw.example/push/v1/notify/",
    "https://gw.example/_matrix/push/v1/notifyx",
    "https://gw.example/push/v2/notify",
    "gw.example/push/v1/notify",
    "https:///push/v1/notify",
    "https://user:pw@gw.example/push/v1/notify",
    "https://gw.example/push/v1/notify#x",
    "https://gw.example:99999/push/v1/notify",
    "ftp://gw.example/push/v1/notify",
    "",
])
def test_gateway_url_that_is_not_a_notify_url_is_refused(api, alice, url):
    error = assert_error(api.set_pusher(alice, pusher_body(url=url)), 400, "M_INVALID_PARAM")
    assert "data.url" in error
    assert api.pushers(alice) == []


def test_plain_http_gateway_is_refused_unless_the_operator_allows_it(make_api, alice):
    strict = make_api(ALLOW_HTTP_GATEWAYS=False)
    body = pusher_body(url="http://gw.example/push/v1/notify")
    assert "https" in assert_error(strict.set_pusher(alice, body), 400, "M_INVALID_PARAM")
    assert strict.set_pusher(alice, pusher_body()).status_code == 200
    relaxed = make_api(ALLOW_HTTP_GATEWAYS=True)
    assert relaxed.set_pusher(alice, body).status_code == 200


def test_gateway_allow_list_restricts_url_prefixes(make_api, alice):
    api = make_api(GATEWAY_ALLOWLIST="https://good.example/, https://shared.example/tenant-a/")
    for url in ("https://good.example/push/v1/notify",
                "https://shared.example/tenant-a/_matrix/push/v1/notify"):
        assert api.set_pusher(alice, pusher_body(url=url)).status_code == 200
    for url in ("https://evil.example/push/v1/notify",
                "https://shared.example/tenant-b/push/v1/notify",
                "https://good.example.evil.example/push/v1/notify"):
        response = api.set_pusher(alice, pusher_body("pk2", url=url))
        error = assert_error(response, 400, "M_INVALID_PARAM")
        assert "allow-list" in error
    assert [p["pushkey"] for p in api.pushers(alice)] == ["pk1"]


def test_data_size_is_bounded(api, alice):
    data = {"url": "https://gw.example/push/v1/notify", "blob": "x" * 5000}
    response = api.set_pusher(alice, pusher_body(data=data))
    assert "data" in assert_error(response, 400, "M_INVALID_PARAM")


# --- upsert and append -----------------------------------------------------------------------


def test_setting_again_updates_fields_and_pushkey_ts_without_a_duplicate(api, alice,
                                                                        monkeypatch):
    monkeypatch.setattr(app_module, "now", lambda: 1_700_000_000)
    assert api.set_pusher(alice, pusher_body(lang="en")).status_code == 200
    monkeypatch.setattr(app_module, "now", lambda: 1_700_000_500)
    body = pusher_body(lang="de", device_display_name="New phone",
                       url="https://gw2.example/push/v1/notify")
    assert api.set_pusher(alice, body).status_code == 200
    [listed] = api.pushers(alice)
    assert listed["pushkey_ts"] == 1_700_000_500
    assert (listed["lang"], listed["device_display_name"], listed["data"]["url"]) == (
        "de", "New phone", "https://gw2.example/push/v1/notify")
    assert len(fetch(Pusher.select())) == 1


def test_same_pushkey_with_another_app_id_is_another_pusher(api, alice, register):
    register(alice, "pk1")
    register(alice, "pk1", app_id="com.example.other")
    assert [p["app_id"] for p in api.pushers(alice)] == ["com.example.app",
                                                           "com.example.other"]


def test_append_false_removes_that_pusher_of_other_users_with_its_channel_states(api,
        client, alice, user_token, register, channel):
    bob = user_token("bob")
    channel("c1")
    register(bob, "pk1")
    assert api.set_channels(bob, "pk1", ("c1", "enabled")).status_code == 200
    register(alice, "pk1", append=False)
    assert api.pushers(bob) == []
    assert [p["pushkey"] for p in api.pushers(alice)] == ["pk1"]
    assert fetch(ChannelState.select()) == []
    register(bob, "pk1", append=True)  # back again: the old state did not survive
    assert api.channels(bob, "pk1") == {"c1": "disabled"}  # the channel's default


def test_append_false_is_the_default(api, alice, user_token, register):
    bob = user_token("bob")
    register(bob, "pk1")
    body = pusher_body("pk1")
    assert "append" not in body
    assert api.set_pusher(alice, body).status_code == 200
    assert api.pushers(bob) == []


def test_append_false_keeps_other_users_pushers_with_another_app_id_or_pushkey(
        api, alice, user_token, register):
    bob = user_token("bob")
    register(bob, "pk1", app_id="com.example.other")
    register(bob, "pk2")
    register(alice, "pk1", append=False)
    assert sorted((p["app_id"], p["pushkey"]) for p in api.pushers(bob)) == [
        ("com.example.app", "pk2"), ("com.example.other", "pk1")]


def test_append_false_keeps_other_users_state_while_they_still_have_that_pushkey(api,
        client, alice, user_token, register, channel):
    bob = user_token("bob")
    channel("c1")
    register(bob, "pk1")
    register(bob, "pk1", app_id="com.example.other")
    assert api.set_channels(bob, "pk1", ("c1", "enabled")).status_code == 200
    register(alice, "pk1", append=False)
    assert [p["app_id"] for p in api.pushers(bob)] == ["com.example.other"]
    assert api.channels(bob, "pk1") == {"c1": "enabled"}


def test_append_true_keeps_other_users_pushers_and_states(api, client, alice, user_token, register,
                                                          channel):
    bob = user_token("bob")
    channel("c1")
    register(bob, "pk1")
    assert api.set_channels(bob, "pk1", ("c1", "enabled")).status_code == 200
    register(alice, "pk1", append=True)
    assert [p["pushkey"] for p in api.pushers(bob)] == ["pk1"]
    assert [p["pushkey"] for p in api.pushers(alice)] == ["pk1"]
    assert api.channels(bob, "pk1") == {"c1": "enabled"}
    assert api.channels(alice, "pk1") == {"c1": "disabled"}  # never set: the default


# --- per-user cap ---------------------------------------------------------------------------


def test_pusher_cap_refuses_one_more_with_403(make_api, alice, user_token):
    bob = user_token("bob")
    api = make_api(MAX_PUSHERS_PER_USER=2)
    for pushkey in ("pk1", "pk2"):
        assert api.set_pusher(alice, pusher_body(pushkey)).status_code == 200
    response = api.set_pusher(alice, pusher_body("pk3"))
    assert_error(response, 403, "M_RESOURCE_LIMIT_EXCEEDED")
    assert [p["pushkey"] for p in api.pushers(alice)] == ["pk1", "pk2"]
    # The cap is per user.
    assert api.set_pusher(bob, pusher_body("pk3")).status_code == 200


def test_updating_an_existing_pusher_at_the_cap_still_works(make_api, alice):
    api = make_api(MAX_PUSHERS_PER_USER=2)
    for pushkey in ("pk1", "pk2"):
        api.set_pusher(alice, pusher_body(pushkey))
    assert api.set_pusher(alice, pusher_body("pk2", lang="fr")).status_code == 200
    assert [p["lang"] for p in api.pushers(alice)] == ["en", "fr"]
    api.set_pusher(alice, {"kind": None, "app_id": "com.example.app", "pushkey": "pk1"})
    assert api.set_pusher(alice, pusher_body("pk3")).status_code == 200


def test_a_refused_pusher_over_the_cap_changes_nothing(make_api, alice, user_token):
    bob = user_token("bob")
    api = make_api(MAX_PUSHERS_PER_USER=1)
    api.set_pusher(alice, pusher_body("pk1"))
    api.set_pusher(bob, pusher_body("shared", append=True))
    response = api.set_pusher(alice, pusher_body("shared", append=False,
                                             encryption=encryption("new-key")))
    assert response.status_code == 403
    assert [p["pushkey"] for p in api.pushers(bob)] == ["shared"]
    assert fetch(EncryptionKey.select()) == []


def test_a_refused_update_leaves_the_pusher_as_it_was(api, alice, register):
    register(alice, "pk1", lang="en")
    before = api.pushers(alice)
    for bad in (pusher_body(lang="x" * 40), pusher_body(lang=7), pusher_body(kind="email"),
                pusher_body(url="https://gw.example/nowhere")):
        assert api.set_pusher(alice, bad).status_code == 400
    assert api.pushers(alice) == before


# --- encryption -----------------------------------------------------------------------------


@pytest.mark.parametrize("change", [
    {"method": "aes-gcm"},
    {"method": ""},
    {"time_iss_created": "2024-13"},
    {"time_iss_created": "2024-1"},
    {"time_iss_created": "24-11"},
    {"time_iss_created": "2024/11"},
    {"initial_key_period": "2024-13"},  # the seed-era alias is checked the same way
    {"iss": ISS[:-2]},
    {"iss": ISS + "00"},
    {"iss": "g" + ISS[1:]},
    {"key_identifier": ""},
    {"key_identifier": "k" * 129},
], ids=lambda change: "-".join(f"{k}={v[:12]}" for k, v in change.items()))
def test_bad_encryption_values_are_invalid_param(api, alice, change):
    response = api.set_pusher(alice, pusher_body(encryption={**encryption(), **change}))
    error = assert_error(response, 400, "M_INVALID_PARAM")
    assert f"encryption.{next(iter(change))}" in error
    assert api.pushers(alice) == []
    assert fetch(EncryptionKey.select()) == []


@pytest.mark.parametrize("field", ["method", "time_iss_created", "iss", "key_identifier"])
def test_missing_encryption_fields_are_missing_param(api, alice, field):
    enc = encryption()
    del enc[field]
    response = api.set_pusher(alice, pusher_body(encryption=enc))
    error = assert_error(response, 400, "M_MISSING_PARAM")
    assert error == f"Missing parameters: encryption.{field}"


def test_key_identifier_of_128_characters_and_uppercase_iss_are_accepted(api, alice):
    enc = encryption("k" * 128, iss=ISS.upper())
    assert api.set_pusher(alice, pusher_body(encryption=enc)).status_code == 200
    assert api.pushers(alice)[0]["encryption"]["key_identifier"] == "k" * 128


def test_get_pushers_shows_only_method_and_key_identifier(api, alice, register):
    register(alice, "pk1", encryption=encryption("key-1"))
    register(alice, "pk2")
    response = api.client.get(api.paths.pushers, headers=alice)
    first, second = response.get_json()["pushers"]
    assert first["encryption"] == {"method": "aes-hmac-sha256", "key_identifier": "key-1"}
    assert "encryption" not in second
    text = response.get_data(as_text=True).lower()
    assert ISS not in text and "iss" not in text
    assert "time_iss_created" not in text and "initial_key_period" not in text


def test_the_iss_and_derived_keys_never_reach_the_instance_folder(app, client, alice, register):
    chain = next(c for c in CHAINS if c["iss"] == ISS)
    register(alice, "pk1", encryption=encryption("key-1", ISS, chain["initial_key_period"]))
    stored = stored_bytes(app)
    assert b"key-1" in stored and b"pk1" in stored  # the scan does see what was stored
    forbidden = {"iss": ISS}
    for generation in chain["generations"]:
        forbidden[generation["period"] + " secret"] = generation["secret"]
        forbidden[generation["period"] + " aes_key"] = generation["aes_key"]
    for name, hex_value in forbidden.items():
        for needle in (bytes.fromhex(hex_value), hex_value.encode(), hex_value.upper().encode()):
            assert needle not in stored, name


@pytest.mark.parametrize("chain", CHAINS, ids=[c["initial_key_period"] for c in CHAINS])
def test_stored_generation_opens_to_the_first_generation_of_the_vectors(app, client, alice,
                                                                       register, chain):
    register(alice, encryption=encryption("key-1", chain["iss"], chain["initial_key_period"]))
    [row] = fetch(EncryptionKey.select())
    server_key = crypto.ServerKey.load(None, os.path.join(app.instance_path, "server.key"))
    generation = server_key.open_generation(row.key_identifier, row.period, bytes(row.sealed))
    first = chain["generations"][0]
    assert (generation.period, generation.secret.hex(), generation.aes_key.hex()) == (
        first["period"], first["secret"], first["aes_key"])


def test_seed_era_name_initial_key_period_is_accepted_as_an_alias(app, api, alice):
    chain = CHAINS[0]
    enc = {"method": "aes-hmac-sha256", "initial_key_period": chain["initial_key_period"],
           "iss": chain["iss"], "key_identifier": "f47ac10b-58cc-4372-a567-0e02b2c3d479"}
    assert api.set_pusher(alice, pusher_body(encryption=enc)).status_code == 200
    [row] = fetch(EncryptionKey.select())
    assert row.period == chain["initial_key_period"]
    server_key = crypto.ServerKey.load(None, os.path.join(app.instance_path, "server.key"))
    opened = server_key.open_generation(row.key_identifier, row.period, bytes(row.sealed))
    assert opened.aes_key.hex() == chain["generations"][0]["aes_key"]


def test_both_period_names_are_accepted_only_when_they_agree(api, alice):
    disagree = {**encryption("key-1", period="2024-11"), "initial_key_period": "2024-10"}
    error = assert_error(api.set_pusher(alice, pusher_body(encryption=disagree)), 400,
                         "M_INVALID_PARAM")
    assert "encryption.initial_key_period" in error
    assert api.pushers(alice) == [] and fetch(EncryptionKey.select()) == []
    agree = {**encryption("key-1", period="2024-11"), "initial_key_period": "2024-11"}
    assert api.set_pusher(alice, pusher_body(encryption=agree)).status_code == 200
    assert [k.period for k in fetch(EncryptionKey.select())] == ["2024-11"]


def test_server_key_file_is_created_with_mode_0600(app, alice, register):
    register(alice, encryption=encryption())
    path = os.path.join(app.instance_path, "server.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_known_key_identifier_with_another_iss_is_refused_and_nothing_changes(api, alice,
                                                                              register):
    register(alice, "pk1", encryption=encryption("key-1", ISS))
    [before] = fetch(EncryptionKey.select())
    listed = api.pushers(alice)
    for body in (pusher_body("pk2", encryption=encryption("key-1", OTHER_ISS)),
                 pusher_body("pk1", lang="fr", encryption=encryption("key-1", OTHER_ISS))):
        error = assert_error(api.set_pusher(alice, body), 400, "M_INVALID_PARAM")
        assert "key_identifier" in error
    assert api.pushers(alice) == listed
    [after] = fetch(EncryptionKey.select())
    assert (after.id, after.iss_fingerprint, after.period, bytes(after.sealed)) == (
        before.id, before.iss_fingerprint, before.period, bytes(before.sealed))


def test_known_key_identifier_of_another_user_with_another_iss_is_refused(api, alice,
                                                                          user_token, register):
    bob = user_token("bob")
    register(alice, "pk1", encryption=encryption("key-1", ISS))
    response = api.set_pusher(bob, pusher_body("pk2", encryption=encryption("key-1",
                                                                                OTHER_ISS)))
    assert_error(response, 400, "M_INVALID_PARAM")
    assert api.pushers(bob) == []


def test_same_iss_again_keeps_the_ratchet(app, api, alice, register):
    chain = next(c for c in CHAINS if c["iss"] == ISS)
    register(alice, "pk1", encryption=encryption("key-1", ISS, chain["initial_key_period"]))
    # Let the ratchet move on, as sending in a later month does.
    server_key = app.extensions["push_server_key"]
    later = chain["generations"][-1]
    moved = crypto.Generation(later["period"], bytes.fromhex(later["secret"]),
                              bytes.fromhex(later["aes_key"]))
    with db.connection_context():
        EncryptionKey.update(period=moved.period,
                             sealed=server_key.seal_generation("key-1", moved)).execute()
    [before] = fetch(EncryptionKey.select())
    register(alice, "pk1", lang="fr",
             encryption=encryption("key-1", ISS, chain["initial_key_period"]))
    register(alice, "pk2", encryption=encryption("key-1", ISS, chain["initial_key_period"]))
    [after] = fetch(EncryptionKey.select())
    assert (after.id, after.period, bytes(after.sealed)) == (
        before.id, later["period"], bytes(before.sealed))
    assert [p["lang"] for p in api.pushers(alice)] == ["fr", "en"]
    assert {p.encryption_key_id for p in fetch(Pusher.select())} == {after.id}


def test_key_material_goes_with_the_last_pusher_using_it(api, alice, register):
    register(alice, "pk1", encryption=encryption("key-1"))
    register(alice, "pk2", encryption=encryption("key-1"))
    api.set_pusher(alice, {"kind": None, "app_id": "com.example.app", "pushkey": "pk1"})
    assert [k.key_identifier for k in fetch(EncryptionKey.select())] == ["key-1"]
    register(alice, "pk2")  # updated without encryption
    assert "encryption" not in api.pushers(alice)[0]
    assert fetch(EncryptionKey.select()) == []


def test_switching_to_a_new_key_identifier_drops_the_old_key(api, alice, register):
    register(alice, "pk1", encryption=encryption("key-1"))
    register(alice, "pk1", encryption=encryption("key-2", OTHER_ISS))
    assert [k.key_identifier for k in fetch(EncryptionKey.select())] == ["key-2"]
    assert api.pushers(alice)[0]["encryption"]["key_identifier"] == "key-2"


def test_encryption_required_policy_refuses_plain_pushers(make_api, alice):
    api = make_api(ENCRYPTION="required")
    response = api.set_pusher(alice, pusher_body())
    assert assert_error(response, 400, "M_MISSING_PARAM") == "Missing parameters: encryption"
    assert api.pushers(alice) == []
    assert api.set_pusher(alice, pusher_body(encryption=encryption())).status_code == 200
    response = api.set_pusher(alice, {"kind": None, "app_id": "com.example.app",
                                      "pushkey": "pk1"})
    assert response.status_code == 200
    assert api.pushers(alice) == []


def test_encryption_forbidden_policy_refuses_encrypted_pushers(make_api, alice):
    api = make_api(ENCRYPTION="forbidden")
    response = api.set_pusher(alice, pusher_body(encryption=encryption()))
    assert_error(response, 400, "M_INVALID_PARAM")
    assert fetch(EncryptionKey.select()) == []
    assert api.set_pusher(alice, pusher_body()).status_code == 200


def test_encryption_optional_by_default_takes_both(api, alice):
    assert api.set_pusher(alice, pusher_body("plain")).status_code == 200
    assert api.set_pusher(alice, pusher_body("sealed", encryption=encryption())).status_code \
        == 200
    assert ["encryption" in p for p in api.pushers(alice)] == [False, True]


# --- the two path sets ------------------------------------------------------------------------


def test_both_path_sets_serve_the_same_pushers_and_states(client, alice, channel):
    channel("a")
    push_v1, seed_era = Api(client, PUSH_V1), Api(client, SEED_ERA)
    push_v1.register(alice, "ab/c+d=", encryption=encryption("key-1"))
    seed_era.register(alice, "pk2")
    assert seed_era.pushers(alice) == push_v1.pushers(alice)
    assert seed_era.pushkeys(alice) == ["ab/c+d=", "pk2"]
    response = seed_era.set_channels(alice, "ab/c+d=", ("a", "enabled"), encode=True)
    assert response.status_code == 200
    assert push_v1.channels(alice, "ab/c+d=") == seed_era.channels(alice, "ab/c+d=") == {
        "a": "enabled"}
    seed_era.unregister(alice, "ab/c+d=")
    assert push_v1.pushkeys(alice) == ["pk2"]
    assert fetch(ChannelState.select()) == [] and fetch(EncryptionKey.select()) == []
