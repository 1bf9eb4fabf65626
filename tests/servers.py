"""Helpers for the tests that run real processes on 127.0.0.1.

A ``Gunicorn`` is a master (with the shipped gunicorn.conf.py) and its workers in a process
group of their own, so a test can stop it gently or kill all of it at once. ``cli`` runs
``flask --app app ...`` against the same instance folder, ``call`` makes one JSON request and
``exchange`` sends raw bytes (for requests a client library would not make). A ``Cluster`` is
a throwaway PostgreSQL server.
"""

import glob
import http.client
import json
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from urllib.parse import quote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's bin: gunicorn and flask live beside python
HOST = "127.0.0.1"


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def push_env(instance_path, **settings):
    """The environment for a server or CLI on ``instance_path``, with these PUSH_ settings only
    (and the metrics folder of that instance, not the test session's)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PUSH_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PUSH_INSTANCE_PATH"] = str(instance_path)
    for key, value in settings.items():
        env["PUSH_" + key] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def query(env, sql, params=()):
    """Rows of one read-only query on the database of a server's ``env`` (PostgreSQL when it
    names a URL, else the instance folder's SQLite file), from outside the server. ``sql``
    uses ``%s`` placeholders."""
    url = env.get("PUSH_DATABASE_URL")
    if url:
        import psycopg2

        connection = psycopg2.connect(url)
    else:
        path = os.path.join(env["PUSH_INSTANCE_PATH"], "push.sqlite3")
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        sql = sql.replace("%s", "?")
    try:
        cursor = connection.cursor()
        cursor.execute(sql, params)
        return cursor.fetchall()
    finally:
        connection.close()


def cli(env, *args, timeout=60):
    """Run ``flask --app app ARGS`` and return its stdout; fail the test if it fails."""
    result = subprocess.run([os.path.join(BIN, "flask"), "--app", "app", *args], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"flask {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def cli_token(env, *args):
    """Run a CLI command that prints a token alone on its last line; return the token."""
    return cli(env, *args).strip().splitlines()[-1]


def delivery_stats(env):
    """``flask deliveries`` as a dict: pending, delivered, failed, oldest_pending_seconds."""
    lines = cli(env, "deliveries").strip().splitlines()
    return {key: int(value) for key, value in (line.split("\t") for line in lines)}


def pushkey_path(pushkey):
    """A pushkey as one URL path segment (base64 pushkeys carry ``/``, ``+`` and ``=``)."""
    return quote(pushkey, safe="")


def call(port, method, path, body=None, token=None, timeout=30, headers=None, source=None):
    """One HTTP request to 127.0.0.1:port, with more ``headers`` if given, from the address
    ``source`` if given (any 127.x.y.z works on Linux); return (status, the JSON body or raw
    text)."""
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = "Bearer " + token
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout,
                                            source_address=(source, 0) if source else None)
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw) if raw else None
    except ValueError:
        return response.status, raw.decode(errors="replace")


def exchange(port, data, timeout=30, until_close=True):
    """Send raw bytes to 127.0.0.1:port (for requests an HTTP client library would not make)
    and return what comes back: all of it until the server closes the connection, or, without
    ``until_close``, the first whole response."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
            if not until_close and response_complete(received):
                break
    return received


def response_complete(raw):
    """Whether ``raw`` holds a whole response with a Content-Length."""
    head, separator, rest = raw.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    return bool(separator and length and len(rest) >= int(length.group(1)))


def parse_response(raw):
    """(status, {lower-case header: value}, JSON body, what follows) of the first HTTP
    response in ``raw``."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":")
                                                           for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    return status, headers, json.loads(rest[:length]) if length else None, rest[length:]


def wait_until(condition, timeout, what, interval=0.1):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Gunicorn:
    """``gunicorn -c gunicorn.conf.py -w N`` (the shipped production settings) on a free
    loopback port, logging to a file.

    Use it as a context manager: leaving the block always stops it.
    """

    def __init__(self, env, workers, log_dir, name="gunicorn", probe=True, args=()):
        """Start gunicorn and, with ``probe``, wait until /healthz answers (a request: a test
        that must see the server act before any request passes ``probe=False``). ``args``
        are more command-line options."""
        self.env = env
        self.workers = workers
        self.args = list(args)
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.port = None
        self.process = None
        for _ in range(3):  # another program may grab the free port before gunicorn binds it
            self.start()
            if not probe or self.wait_healthy():
                return
            self.stop()
            if "Connection in use" not in self.log():
                break
        raise AssertionError(f"gunicorn did not come up; its log:\n{self.log()}")

    def start(self):
        """Start the master (it forks the workers) in a new session, hence its own group."""
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [os.path.join(BIN, "gunicorn"), "-c", "gunicorn.conf.py", "-w", str(self.workers),
                 "-b", f"{HOST}:{self.port}", *self.args],
                cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout=60):
        """True once /healthz answers 200; False if the master exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if call(self.port, "GET", "/healthz", timeout=5)[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def log(self):
        """Everything gunicorn and the app wrote to stdout and stderr so far."""
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            return log.read()

    def worker_pids(self):
        """The pids of the workers the master says it booted."""
        return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", self.log())]

    def stop(self, timeout=30):
        """SIGTERM to the master, which stops its workers; SIGKILL to the group if it hangs."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self):
        """SIGKILL to the master and every worker at once, as a power cut would do."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# --- PostgreSQL -------------------------------------------------------------------------------


def server_binaries():
    """The folder holding both initdb and pg_ctl: PATH first, then the newest Debian layout."""
    candidates = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(os.path.realpath(on_path)))
        candidates.append(os.path.dirname(on_path))

    def version(path):
        name = path.split(os.sep)[-2]
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for folder in candidates:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in ("initdb", "pg_ctl")):
            return folder
    return None


class Unavailable(Exception):
    """No PostgreSQL server can be started here (the tests that need one skip)."""


class Cluster:
    """A throwaway PostgreSQL server: initdb and pg_ctl in a temporary folder, listening on
    127.0.0.1 on a free port, run as the postgres user when we are root (initdb refuses root),
    stopped with ``pg_ctl stop -m immediate``."""

    def __init__(self, bindir):
        self.bindir = bindir
        self.prefix = []
        self.base = tempfile.mkdtemp(prefix="push-pg-")
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.base)
                raise Unavailable("running as root and there is no 'postgres' user to run initdb")
            runuser = shutil.which("runuser")
            if runuser is None:
                shutil.rmtree(self.base)
                raise Unavailable("running as root and 'runuser' is missing (initdb refuses root)")
            os.chown(self.base, account.pw_uid, account.pw_gid)
            self.prefix = [runuser, "-u", "postgres", "--"]
        os.chmod(self.base, 0o700)
        self.data = os.path.join(self.base, "data")
        self.log = os.path.join(self.base, "server.log")
        self.port = None
        self.started = False

    def run(self, *args, timeout=120):
        command = self.prefix + [os.path.join(self.bindir, args[0]), *args[1:]]
        return subprocess.run(command, cwd=self.base, capture_output=True, text=True,
                              timeout=timeout)

    def start(self):
        done = self.run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--locale=C", "--no-sync")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        for _ in range(5):  # a free port can be taken between our probe and the server's bind
            self.port = free_port()
            options = (f"-h 127.0.0.1 -p {self.port} -k {self.base} -F "
                       "-c max_connections=50 -c full_page_writes=off")
            done = self.run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "60",
                            "-o", options, "start")
            if done.returncode == 0:
                self.started = True
                return
        with open(self.log, errors="replace") as f:
            raise RuntimeError(f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{f.read()}")

    def stop(self):
        try:
            if self.started:
                self.run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", timeout=60)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def url(self, database):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name):
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                      dbname="postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)
