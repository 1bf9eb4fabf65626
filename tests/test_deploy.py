"""Deployment files in deploy/: the systemd units verify (``systemd-analyze verify`` where it
exists, else a parse of their keys) and the nginx site passes ``nginx -t`` and, where nginx is
installed, terminates TLS in front of a real gunicorn, buffering, with JSON errors of its own."""

import datetime
import http.client
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from servers import BIN, ROOT, Gunicorn, free_port, wait_until

DEPLOY = os.path.join(ROOT, "deploy")
UNITS = ("push-web.service", "push-worker.service")


def unit_entries(path):
    """{section: [(key, value), ...]} of a systemd unit (keys may repeat, as Environment=)."""
    sections, current = {}, None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], [])
                continue
            key, equals, value = line.partition("=")
            assert equals and current is not None and re.fullmatch(r"[A-Za-z]+", key), (
                f"{path}:{number}: not a key=value line in a section: {line}")
            current.append((key, value))
    return sections


def values(entries, section, key):
    return [v for k, v in entries[section] if k == key]


def test_units_run_the_shipped_server_and_a_separate_worker_on_one_instance():
    web, worker = (unit_entries(os.path.join(DEPLOY, name)) for name in UNITS)
    for entries in (web, worker):
        assert set(entries) == {"Unit", "Service", "Install"}
        assert values(entries, "Install", "WantedBy") == ["multi-user.target"]
    assert values(web, "Service", "ExecStart") == [
        "/opt/push-service/.venv/bin/gunicorn -c gunicorn.conf.py"]
    assert values(worker, "Service", "ExecStart") == [
        "/opt/push-service/.venv/bin/flask --app app worker"]
    for key in ("WorkingDirectory", "Environment", "EnvironmentFile", "User", "StateDirectory"):
        shared = set(values(web, "Service", key)) & set(values(worker, "Service", key))
        assert shared, key  # the same checkout, instance folder, settings and user
    assert "PUSH_EMBEDDED_WORKER=false" in values(web, "Service", "Environment")
    assert "push-worker.service" in " ".join(values(web, "Unit", "Wants"))
    assert values(worker, "Service", "KillSignal") == ["SIGINT"]  # the worker's clean stop
    assert os.path.exists(os.path.join(ROOT, "gunicorn.conf.py"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_pass_systemd_analyze_verify(tmp_path):
    for name in UNITS:  # this checkout and its venv stand in for /opt/push-service
        with open(os.path.join(DEPLOY, name), encoding="utf-8") as f:
            text = f.read()
        text = text.replace("/opt/push-service/.venv/bin/", BIN + "/").replace(
            "WorkingDirectory=/opt/push-service", "WorkingDirectory=" + ROOT)
        (tmp_path / name).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           *(str(tmp_path / name) for name in UNITS)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if "push-" in line]
    assert done.returncode == 0 and complaints == [], done.stdout + done.stderr


# --- nginx --------------------------------------------------------------------------------------


def site_text():
    with open(os.path.join(DEPLOY, "nginx-push.conf"), encoding="utf-8") as f:
        return f.read()


def test_nginx_site_buffers_terminates_tls_and_caps_bodies():
    text = re.sub(r"#[^\n]*", "", site_text())
    quoted = re.sub(r"'[^']*'", "''", text)
    assert quoted.count("{") == quoted.count("}")
    directives = {tuple(line.split()) for line in (s.strip() for s in re.split(r"[;{}]", quoted))
                  if line}
    for directive in [("proxy_request_buffering", "on"), ("proxy_buffering", "on"),
                      ("client_max_body_size", "64k"), ("proxy_pass", "http://push_service"),
                      ("server", "127.0.0.1:8000"), ("listen", "443", "ssl", "http2"),
                      ("return", "301", "https://$host$request_uri"),
                      ("error_page", "413", "@too_large")]:
        assert directive in directives, directive
    assert any(d[0] == "ssl_certificate" for d in directives)


def make_certificate(folder):
    """A self-signed certificate for push.example.com and 127.0.0.1; returns (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "push.example.com")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("push.example.com"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def nginx_config(folder, upstream_port, http_port, https_port):
    """The shipped site on test ports and a test certificate, in a main config of the test's."""
    cert, key = make_certificate(folder)
    site = site_text()
    site = re.sub(r"ssl_certificate .*;", f"ssl_certificate {cert};", site)
    site = re.sub(r"ssl_certificate_key .*;", f"ssl_certificate_key {key};", site)
    site = site.replace("127.0.0.1:8000", f"127.0.0.1:{upstream_port}")
    site = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", site)  # the test host may lack IPv6
    site = site.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    site = site.replace("listen 443 ", f"listen 127.0.0.1:{https_port} ")
    (folder / "site.conf").write_text(site)
    temp = {name: folder / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers may read the test's files
    (folder / "nginx.conf").write_text(
        f"{user}pid {folder}/nginx.pid;\nerror_log {folder}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n"
        + "".join(f"  {name}_temp_path {path};\n" if name != "body" else
                  f"  client_body_temp_path {path};\n" for name, path in temp.items())
        + f"  include {folder}/site.conf;\n}}\n")
    return str(folder / "nginx.conf"), cert


needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")


@needs_nginx
def test_nginx_accepts_the_site(tmp_path):
    config, _ = nginx_config(tmp_path, 8000, free_port(), free_port())
    done = subprocess.run(["nginx", "-t", "-c", config, "-p", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


def https(port, cert, method, path, body=None):
    """(status, headers, body) of one request over TLS, checking nginx's certificate."""
    context = ssl.create_default_context(cafile=str(cert))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        connection.request(method, path, body=body,
                           headers={"Content-Type": "application/json"} if body else {})
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        connection.close()


@needs_nginx
def test_nginx_in_front_of_gunicorn_serves_tls_and_answers_json_errors(tmp_path, server_env):
    env = server_env(tmp_path / "instance", EMBEDDED_WORKER=False)
    with Gunicorn(env, workers=1, log_dir=tmp_path) as server:
        http_port, https_port = free_port(), free_port()
        config, cert = nginx_config(tmp_path, server.port, http_port, https_port)
        nginx = subprocess.Popen(["nginx", "-c", config, "-p", str(tmp_path), "-g",
                                  "daemon off;"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: responds(https_port, cert), 30, "nginx to listen")
            status, _, body = https(https_port, cert, "GET", "/healthz")
            assert (status, json.loads(body)) == (200, {"status": "ok"})
            status, _, body = https(https_port, cert, "POST", "/push/v1/pushers/set",
                                    b"{" + b" " * 70_000 + b"}")
            assert status == 413 and json.loads(body)["errcode"] == "M_TOO_LARGE"
            assert https(https_port, cert, "GET", "/metrics")[0] == 200
            plain = http.client.HTTPConnection("127.0.0.1", http_port, timeout=30)
            try:
                plain.request("GET", "/healthz")
                moved = plain.getresponse()
                assert moved.status == 301
                assert moved.headers["Location"].startswith("https://")
            finally:
                plain.close()
            server.stop()
            status, headers, body = https(https_port, cert, "GET", "/healthz")
            assert status == 503 and json.loads(body)["errcode"] == "M_UNKNOWN"
            assert headers["Retry-After"] == "5"
        finally:
            nginx.terminate()
            nginx.wait(timeout=30)


def responds(port, cert):
    try:
        return https(port, cert, "GET", "/healthz")[0] == 200
    except OSError:
        return False
