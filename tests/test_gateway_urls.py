"""Gateway URLs a user may register (SPEC section 1, data.url) and the addresses the gateway
client may connect to (SPEC section 5): what could never be sent is refused at registration,
the allow-list compares normalised URLs, IPv4 inside IPv6 transition forms is judged as itself,
and a host from a URL is escaped before it reaches a log."""

import logging

import pytest
from support import Api, assert_error, drain, fetch, pusher_body

from delivery import Worker
from gateway import Job, address_allowed
from models import Delivery, Pusher, db


@pytest.mark.parametrize("url", [
    "https://gw.example/push/v1/ notify",
    "https://gw.example/tenant a/push/v1/notify",
    "https://gw.example/push/v1/notify\r\nX-Injected: 1",
    "https://gw.example\r\n/push/v1/notify",
    "https://gw.exa\tmple/push/v1/notify",
    "https://gw.example/\x00/push/v1/notify",
    "https://gw.example/\x7f/push/v1/notify",
    "https://münchen.example/push/v1/notify",
    "https://gw.example/tenant-ä/push/v1/notify",
    "https://gw.example/{x}/push/v1/notify",
    "https://gw.example\\@evil.example/push/v1/notify",
    "https://gw.example/%zz/push/v1/notify",
    "https://gw.example/100%/push/v1/notify",
])
def test_a_url_with_characters_no_url_may_hold_is_refused(api, alice, url):
    error = assert_error(api.set_pusher(alice, pusher_body(url=url)), 400, "M_INVALID_PARAM")
    assert "data.url" in error
    assert api.pushers(alice) == []


@pytest.mark.parametrize("url", [
    "https://user@gw.example/push/v1/notify",
    "https://@gw.example/push/v1/notify",
    "https://:pw@gw.example/push/v1/notify",
    "https://gw.example/push/v1/notify#",
])
def test_credentials_and_fragments_are_refused(api, alice, url):
    error = assert_error(api.set_pusher(alice, pusher_body(url=url)), 400, "M_INVALID_PARAM")
    assert "credentials or fragment" in error


@pytest.mark.parametrize("path", [
    "/tenant-a/../push/v1/notify",
    "/./push/v1/notify",
    "/a/%2e%2E/push/v1/notify",
    "/a/%2E/push/v1/notify",
    "/a/.%2e/push/v1/notify",
    "/a/..%2fb/push/v1/notify",
    "/a/..%5Cb/push/v1/notify",
    "/..",
])
def test_dot_segments_are_refused_also_percent_encoded(api, alice, path):
    url = "https://gw.example" + path
    if not path.endswith("notify"):
        url += "/push/v1/notify"
    error = assert_error(api.set_pusher(alice, pusher_body(url=url)), 400, "M_INVALID_PARAM")
    assert ". or .. segments" in error


@pytest.mark.parametrize("host", [
    "gw_1.example",  # not a host name (RFC 1123)
    "-gw.example",
    "gw-.example",
    "gw..example",
    "a" * 64 + ".example",  # a label over 63 characters
    "xn--zz-.example",  # punycode that does not round-trip
    "xn--a.example",
    "2130706433",  # 127.0.0.1 as one number
    "0x7f.1",
    "127.1",
    "0177.0.0.1",
    "[v1.future]",
    "[fe80::1%25eth0]",
    "gw.example:0",
])
def test_hosts_that_are_not_dns_names_or_ip_addresses_are_refused(api, alice, host):
    url = f"https://{host}/push/v1/notify"
    error = assert_error(api.set_pusher(alice, pusher_body(url=url)), 400, "M_INVALID_PARAM")
    assert "data.url" in error
    assert api.pushers(alice) == []


@pytest.mark.parametrize("host", [
    "gw.example", "GW.Example", "gw.example.", "xn--mnchen-3ya.example", "gw-1.example",
    "203.0.113.7", "[2001:db8::1]", "gw.example:8443", "gw.example:",
])
def test_dns_names_punycode_and_ip_addresses_are_accepted(api, alice, host):
    url = f"https://{host}/push/v1/notify"
    assert api.set_pusher(alice, pusher_body(url=url)).status_code == 200
    assert api.pushers(alice)[0]["data"]["url"] == url  # stored as given


def test_percent_encoded_characters_and_queries_are_accepted(api, alice):
    url = "https://gw.example/tenant%20a/push/v1/notify?token=a%2Bb&x=1"
    assert api.set_pusher(alice, pusher_body(url=url)).status_code == 200


ALLOWLIST = "https://shared.example/tenant-a/, https://Good.Example:443"


@pytest.mark.parametrize("url", [
    "https://shared.example/tenant-a/../tenant-b/push/v1/notify",
    "https://shared.example/tenant-a/%2e%2e/tenant-b/push/v1/notify",
    "https://shared.example/tenant-a/..%2ftenant-b/push/v1/notify",
    "https://shared.example/tenant-b/push/v1/notify",
    "https://good.example.evil.example/push/v1/notify",
    "https://good.example:8443/push/v1/notify",
])
def test_the_allow_list_cannot_be_escaped(make_app, alice, url):
    client = make_app(GATEWAY_ALLOWLIST=ALLOWLIST).test_client()
    response = Api(client).set_pusher(alice, pusher_body(url=url))
    assert_error(response, 400, "M_INVALID_PARAM")
    assert Api(client).pushers(alice) == []


@pytest.mark.parametrize("url", [
    "https://shared.example/tenant-a/push/v1/notify",
    "https://SHARED.example/tenant-a/push/v1/notify",
    "https://shared.example:443/tenant-a/push/v1/notify",
    "https://shared.example/tenant-%61/push/v1/notify",  # %61 is "a"
    "https://good.example/push/v1/",
    "https://GOOD.example/_matrix/push/v1/notify",
])
def test_the_allow_list_compares_normalised_urls(make_app, alice, url):
    client = make_app(GATEWAY_ALLOWLIST=ALLOWLIST).test_client()
    response = Api(client).set_pusher(alice, pusher_body(url=url))
    assert response.status_code == 200, response.get_json()


def test_an_allow_list_entry_that_is_no_url_prefix_stops_the_app(make_app):
    with pytest.raises(RuntimeError, match="GATEWAY_ALLOWLIST"):
        make_app(GATEWAY_ALLOWLIST="gw.example/")


def test_a_stored_url_that_can_no_longer_be_sent_fails_at_send_time(app, client, alice, service,
                                                                    channel, register):
    """Rows written before these rules (or by hand) are judged again when sent, and fail for
    good instead of being retried for a day."""
    channel("erp.task", default="enabled")
    register(alice, "phone-1", url="https://gw.example/push/v1/notify")
    with app.app_context(), db.connection_context():
        Pusher.update(data='{"url": "https://gw example/push/v1/notify"}').execute()
    Api(client).send(service)
    worker = Worker(app)
    try:
        drain(app, worker)
    finally:
        worker.close()
    [row] = fetch(Delivery.select())
    assert row.state == "failed" and "not allowed" in row.last_error


@pytest.mark.parametrize("address", [
    "::7f00:1",  # IPv4-compatible 127.0.0.1
    "::a9fe:a9fe",
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT) 127.0.0.1
    "::ffff:0:a00:1",
    "64:ff9b::a9fe:a9fe",  # NAT64 169.254.169.254
    "64:ff9b::7f00:1",
    "64:ff9b::c0a8:101",
    "64:ff9b:1::808:808",  # local-use NAT64: refused whatever it carries
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",
    "2002:c0a8:101::1",
    "::ffff:127.0.0.1",
    "::1",
    "::",
])
def test_ipv4_in_ipv6_transition_forms_is_judged_as_itself(address):
    assert not address_allowed(address)


@pytest.mark.parametrize("address", [
    "::ffff:0:808:808", "64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8",
    "2606:4700::1111",
])
def test_public_ipv4_in_transition_forms_and_public_ipv6_are_allowed(address):
    assert address_allowed(address)


def test_a_gateway_host_is_escaped_for_logs():
    job = Job("https://gw.example\r\n2026-01-01 INFO push: forged/push/v1/notify")
    assert "\r" not in job.host and "\n" not in job.host
    assert job.host == "gw.example\\r\\n2026-01-01 INFO push: forged"
    assert Job("https://gw.example:8443/push/v1/notify").host == "gw.example:8443"


def test_a_gateway_host_is_logged_on_one_line(app, caplog):
    """The log line delivery.py writes for an unreachable gateway, with a host that holds a
    line break: one record, one line."""
    worker = Worker(app)
    try:
        job = Job("http://127.0.0.1\n2026-01-01 WARNING forged:1/push/v1/notify")
        with caplog.at_level(logging.INFO, logger="push.delivery"):
            worker.send_deadline = float("inf")
            worker.send(job)
    finally:
        worker.close()
    [line] = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert "\n" not in line and "\\n2026-01-01 WARNING forged" in line
