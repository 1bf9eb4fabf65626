"""Mutual TLS with gateways (SPEC section 5): PUSH_GATEWAY_CLIENT_CERT / _KEY presented to every
gateway, PUSH_GATEWAY_CA_BUNDLE trusted beside the system CAs, and TLS files that cannot be used
stop the start. The gateways are real TLS servers on 127.0.0.1 (support.Gateway with a server
context) that require a client certificate; every certificate is made here with trustme.
"""

import ssl

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from support import drain, fetch

import delivery
from models import Delivery


class Certificates:
    """A gateway CA and a client CA, a gateway certificate and a client certificate, and the
    PEM files an operator would give (in ``folder``)."""

    def __init__(self, folder):
        self.folder = folder
        self.gateway_ca, self.client_ca = trustme.CA(), trustme.CA()
        self.client = self.client_ca.issue_cert("push-service.example")
        self.bundle = self.write("gateway-ca.pem", self.gateway_ca.cert_pem.bytes())
        self.cert_and_key = self.write("client.pem",
                                       self.client.private_key_and_cert_chain_pem.bytes())
        self.cert = self.write("client-cert.pem", self.client.cert_chain_pems[0].bytes())
        self.key = self.write("client-key.pem", self.client.private_key_pem.bytes())

    def write(self, name, data):
        path = self.folder / name
        path.write_bytes(data)
        return str(path)

    def gateway_context(self, ca=None, require_client=True):
        """A server context with a certificate for 127.0.0.1 from ``ca`` (the gateway CA),
        requiring a client certificate from the client CA."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        (ca or self.gateway_ca).issue_cert("127.0.0.1").configure_cert(context)
        if require_client:
            context.verify_mode = ssl.CERT_REQUIRED
            self.client_ca.configure_trust(context)
        return context


@pytest.fixture
def certs(tmp_path):
    return Certificates(tmp_path)


@pytest.fixture
def setup(alice, service, channel):
    channel("erp.task", default="enabled")
    return alice


def deliver(app):
    """Run a worker on ``app`` until nothing is pending, or for a few rounds; return the
    (state, attempts, last_error) of every delivery."""
    with delivery.Worker(app) as worker:
        try:
            drain(app, worker, rounds=3)
        except AssertionError:  # still pending: the caller looks at why
            pass
    return [(d.state, d.attempts, d.last_error)
            for d in fetch(Delivery.select().order_by(Delivery.id))]


@pytest.mark.parametrize("key_file", [False, True], ids=["key-in-cert-file", "key-file"])
def test_a_gateway_requiring_a_client_certificate_gets_the_notification(
        make_app, api, setup, service, certs, make_gateway, key_file):
    gateway = make_gateway(tls=certs.gateway_context())
    api.register(setup, "phone-1", url=gateway.url("/push/v1/notify"))
    api.send(service)
    tls = ({"GATEWAY_CLIENT_CERT": certs.cert, "GATEWAY_CLIENT_KEY": certs.key} if key_file
           else {"GATEWAY_CLIENT_CERT": certs.cert_and_key})
    app = make_app(GATEWAY_CA_BUNDLE=certs.bundle, **tls)
    assert deliver(app) == [("delivered", 1, None)]
    [note] = gateway.notifications()
    assert note["devices"][0]["pushkey"] == "phone-1"


def test_without_the_client_certificate_nothing_is_delivered_and_nothing_is_lost(
        make_app, api, setup, service, certs, make_gateway):
    gateway = make_gateway(tls=certs.gateway_context())
    api.register(setup, "phone-1", url=gateway.url("/push/v1/notify"))
    api.send(service)

    [(state, attempts, error)] = deliver(make_app(GATEWAY_CA_BUNDLE=certs.bundle))
    assert (state, attempts) == ("pending", 3) and "SSL" in error  # retried, not failed
    assert gateway.requests == []

    app = make_app(GATEWAY_CA_BUNDLE=certs.bundle, GATEWAY_CLIENT_CERT=certs.cert_and_key)
    assert deliver(app) == [("delivered", 4, None)]
    assert len(gateway.requests) == 1


def test_a_gateway_whose_ca_is_only_in_the_bundle_is_trusted_beside_the_system_cas(
        make_app, api, setup, service, certs, make_gateway, monkeypatch):
    """The system CAs stay trusted: here "the system" is a CA file of our own, through the
    SSL_CERT_FILE variable OpenSSL reads for its default locations."""
    system_ca = trustme.CA()
    monkeypatch.setenv("SSL_CERT_FILE", certs.write("system.pem", system_ca.cert_pem.bytes()))
    known = make_gateway(tls=certs.gateway_context(system_ca, require_client=False))
    own = make_gateway(tls=certs.gateway_context(require_client=False))
    api.register(setup, "phone-known", url=known.url())
    api.register(setup, "phone-own", url=own.url())
    api.send(service)

    without = deliver(make_app())
    assert sorted(state for state, _, _ in without) == ["delivered", "pending"]
    assert "certificate verify failed" in [e for s, _, e in without if s == "pending"][0]
    assert deliver(make_app(GATEWAY_CA_BUNDLE=certs.bundle)) == [
        ("delivered", 1, None), ("delivered", 4, None)]
    assert len(known.requests) == len(own.requests) == 1


def test_the_address_check_holds_with_mutual_tls(make_app, api, setup, service, certs,
                                                 make_gateway):
    gateway = make_gateway(tls=certs.gateway_context())
    api.register(setup, "phone-1", url=gateway.url())
    api.send(service)
    app = make_app(ALLOW_PRIVATE_GATEWAYS=False, GATEWAY_CA_BUNDLE=certs.bundle,
                   GATEWAY_CLIENT_CERT=certs.cert_and_key)
    [(state, _, error)] = deliver(app)
    assert state == "failed" and "non-public" in error
    assert gateway.requests == []


def encrypted_key(certs):
    """The client key, encrypted with a password."""
    key = serialization.load_pem_private_key(certs.client.private_key_pem.bytes(), None)
    return certs.write("encrypted-key.pem", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))


@pytest.mark.parametrize("settings, name, message", [
    (lambda c: {"GATEWAY_CLIENT_CERT": str(c.folder / "missing.pem")},
     "PUSH_GATEWAY_CLIENT_CERT", "cannot read"),
    (lambda c: {"GATEWAY_CLIENT_CERT": c.cert, "GATEWAY_CLIENT_KEY": str(c.folder)},
     "PUSH_GATEWAY_CLIENT_KEY", "cannot read"),
    (lambda c: {"GATEWAY_CA_BUNDLE": str(c.folder / "missing.pem")},
     "PUSH_GATEWAY_CA_BUNDLE", "cannot read"),
    (lambda c: {"GATEWAY_CA_BUNDLE": c.key}, "PUSH_GATEWAY_CA_BUNDLE", "no PEM certificates"),
    (lambda c: {"GATEWAY_CLIENT_CERT": c.cert}, "PUSH_GATEWAY_CLIENT_KEY", "not a PEM"),
    (lambda c: {"GATEWAY_CLIENT_CERT": c.cert,
                "GATEWAY_CLIENT_KEY": c.write("other.pem", trustme.CA().issue_cert(
                    "x.example").private_key_pem.bytes())},
     "PUSH_GATEWAY_CLIENT_KEY", "does not belong"),
    (lambda c: {"GATEWAY_CLIENT_KEY": c.key}, "PUSH_GATEWAY_CLIENT_CERT", "without"),
    (lambda c: {"GATEWAY_CLIENT_CERT": c.cert, "GATEWAY_CLIENT_KEY": encrypted_key(c)},
     "PUSH_GATEWAY_CLIENT_KEY", "encrypted"),
], ids=["cert-missing", "key-unreadable", "bundle-missing", "bundle-without-certificates",
        "no-key", "key-of-another-cert", "key-without-cert", "encrypted-key"])
def test_tls_files_that_cannot_be_used_stop_the_start(make_app, certs, settings, name, message):
    with pytest.raises(RuntimeError, match=name) as raised:
        make_app(**settings(certs))
    assert message in str(raised.value)

