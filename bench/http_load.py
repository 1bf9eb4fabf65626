"""HTTP benchmark: the service under gunicorn, loaded with wrk over loopback.

It prints figures; it never passes or fails on timing. It fails (exit status 1) only when a
measurement would be worthless: wrk is missing, the server does not come up, an endpoint does
not answer its expected status, or most answers under load are errors.

Method, all in one run:

1. A temporary instance folder (``PUSH_INSTANCE_PATH``) with ``PUSH_RATE_LIMIT_ENABLED=false``
   and ``PUSH_EMBEDDED_WORKER=false``: ``POST /notifications`` only enqueues (it stores the
   notification and one delivery row per recipient; nothing is sent to any gateway).
   ``--database-url`` passes ``PUSH_DATABASE_URL`` through (PostgreSQL, say) instead.
2. The operator CLI seeds a user, a service and two channels (``flask --app app ...``).
3. gunicorn starts as the README's production command does:
   ``gunicorn -w 4 -b 127.0.0.1:PORT --no-control-socket 'app:create_app()'``, or with
   ``-c gunicorn.conf.py`` instead of ``-w 4`` when that file exists at the repository root
   (the config then decides the workers); ``--workers N`` adds ``-w N`` either way.
4. The user registers a handful of pushers through the API (encrypted and plain), so each
   notification stores that many delivery rows.
5. Per endpoint: one request that must answer the expected status, a short warm-up, then
   ``wrk -t2 -c16 -d<seconds>`` with ``bench/wrk.lua``, which adds the bearer token and, for
   the POSTs, varies every body so each request is a real write: ``/pushers/set`` updates the
   existing pushers in turn (the pusher count stays put), ``/channels/<pushkey>`` flips a
   channel between enabled and disabled, ``/notifications`` sends a new payload with a new
   idempotency key. wrk's ``done()`` prints p50/p99 in a parseable line.
6. A hello-world Flask app (``bench/hello.py``) under the same gunicorn settings gives the
   floor: each endpoint is also shown as a ratio of its req/s.

wrk and the server share the machine, so the figures move with its other load; the load
average is printed before and after. ``--profile DIR`` samples the gunicorn workers' wall-clock
time in requests with py-spy (``--profile-gil``: only the thread holding the GIL) while each
service endpoint is loaded and prints the hot functions (profiled figures are slower: compare
them with each other only).

    .venv/bin/python bench/http_load.py                       # every endpoint, 10 s each
    .venv/bin/python bench/http_load.py --only get-pushers,hello --duration 5
    .venv/bin/python bench/http_load.py --only get-pushers,set-pusher --profile /tmp/prof
"""

import argparse
import http.client
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from urllib.parse import quote, urlsplit, urlunsplit

from fanout import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)  # the venv's bin: gunicorn and flask live beside python
WRK_SCRIPT = os.path.join("bench", "wrk.lua")
CONFIG_FILE = "gunicorn.conf.py"
HOST = "127.0.0.1"
PUSHERS = 5  # the user's devices: each notification stores this many delivery rows
APP_ID = "com.example.bench"
NOTIFY_CHANNEL = "bench.task"  # enabled by default: every device gets it
TOGGLED_CHANNEL = "bench.news"  # the one POST /channels/<pushkey> flips
GATEWAY = "https://push-gateway.example.com/_matrix/push/v1/notify"  # never called


def endpoint_specs(run, pushkeys, iss):
    """What to load, in order: name -> (label, method, path, token, bodies, expected status).

    ``token`` is "user", "service" or None; ``bodies`` are JSON templates for wrk.lua (one per
    line, "{{n}}" made unique per request), or None for a GET.
    """
    first = quote(pushkeys[0], safe="")
    pushers = []
    for i, pushkey in enumerate(pushkeys):
        body = {"kind": "http", "app_id": APP_ID, "pushkey": pushkey,
                "app_display_name": "Bench", "device_display_name": "Phone {{n}}",
                "lang": "de", "data": {"url": GATEWAY, "format": "event_id_only"}}
        if i % 2 == 0:  # every other device end-to-end encrypted, as apps register them
            body["encryption"] = {"method": "aes-hmac-sha256", "time_iss_created": "2025-01",
                                  "iss": iss[i], "key_identifier": f"bench-{run}-{i}"}
        pushers.append(body)
    channels = [{"channels": [{"name": TOGGLED_CHANNEL, "value": value}]}
                for value in ("enabled", "disabled")]
    notification = {"user_id": f"bench-{run}", "channel": NOTIFY_CHANNEL, "prio": "high",
                    "counts": {"unread": 1}, "identifier": f"bench-{run}-{{{{n}}}}",
                    "payload": {"title": "Neues E-Rezept", "body": "Ein Rezept liegt bereit.",
                                "task": "160.000.{{n}}"}}
    pushers, channels, notification = (
        [json.dumps(body, separators=(",", ":")) for body in group]
        for group in (pushers, channels, [notification]))
    return {
        "hello": ("hello world (bench/hello.py)", "GET", "/", None, None, 200),
        "get-pushers": ("GET /push/v1/pushers", "GET", "/push/v1/pushers", "user", None, 200),
        "get-channels": ("GET /push/v1/channels/<pushkey>", "GET", f"/push/v1/channels/{first}",
                         "user", None, 200),
        "set-pusher": ("POST /push/v1/pushers/set", "POST", "/push/v1/pushers/set", "user",
                       pushers, 200),
        "set-channels": ("POST /push/v1/channels/<pushkey>", "POST",
                         f"/push/v1/channels/{first}", "user", channels, 200),
        "notify": (f"POST /push/v1/notifications ({PUSHERS} deliveries)", "POST",
                   "/push/v1/notifications", "service", notification, 202),
    }


# --- processes ------------------------------------------------------------------------------


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def call(port, method, path, body=None, token=None):
    """One HTTP request; return (status, body text)."""
    headers = {"Authorization": "Bearer " + token} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def child_pids(pid):
    """The processes whose parent is ``pid`` (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass  # the process ended while we looked
    return children


class Gunicorn:
    """A gunicorn master and its workers on a free loopback port, logging to a file.

    Use it as a context manager: leaving the block stops it (SIGTERM, then SIGKILL of its
    own process group if it lingers).
    """

    def __init__(self, settings, app_spec, env, log_path, health_path):
        self.settings, self.app_spec, self.env = settings, app_spec, env
        self.log_path, self.health_path = log_path, health_path
        self.process = self.port = None

    def argv(self, port):
        return [os.path.join(BIN, "gunicorn"), *self.settings, "-b", f"{HOST}:{port}",
                "--no-control-socket", self.app_spec]

    def __enter__(self):
        for _ in range(3):  # another program may take the free port before gunicorn binds it
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(self.argv(self.port), cwd=ROOT, env=self.env,
                                                stdout=log, stderr=log, start_new_session=True)
            if self.wait_healthy():
                return self
            self.stop()
            if "Connection in use" not in self.log():
                break
        raise SystemExit(f"gunicorn did not come up; its log:\n{self.log()[-3000:]}")

    def __exit__(self, *exc):
        self.stop()

    def wait_healthy(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if call(self.port, "GET", self.health_path)[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(0.2)
        return False

    def workers(self):
        """The worker pids, once their number has stopped changing (they boot one by one)."""
        seen, stable_since = None, time.monotonic()
        while time.monotonic() - stable_since < 1.0:
            pids = sorted(child_pids(self.process.pid))
            if pids != seen:
                seen, stable_since = pids, time.monotonic()
            time.sleep(0.1)
        return seen

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def flask_cli(env, *args):
    """Run ``flask --app app ARGS``; return its last output line (a new token, for some)."""
    result = subprocess.run([os.path.join(BIN, "flask"), "--app", "app", *args], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise SystemExit(f"flask {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout.strip().splitlines()[-1]


# --- wrk ------------------------------------------------------------------------------------


def wrk_version():
    """wrk's version line (``wrk -v`` prints it, then the usage, and exits 1)."""
    result = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (result.stdout or result.stderr).splitlines()[0].strip()


def run_wrk(args, port, method, path, token, bodies, seconds):
    """Load one URL for ``seconds``; return (wrk's WRK_RESULT dict, command line)."""
    env = dict(os.environ, BENCH_METHOD=method, BENCH_TOKEN=token or "",
               BENCH_BODIES="\n".join(bodies or []))
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s",
            "--timeout", "10s", "-s", WRK_SCRIPT, f"http://{HOST}:{port}{path}"]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=seconds + 60)
    found = re.search(r"^WRK_RESULT (\{.*\})$", result.stdout, re.MULTILINE)
    if result.returncode != 0 or not found:
        raise SystemExit(f"wrk failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return json.loads(found.group(1)), argv


def wrk_command_line(argv, method, token_kind, bodies):
    """The wrk command as a shell line, the token as a variable and the bodies abridged."""
    env = [f"BENCH_METHOD={method}"]
    if token_kind:
        env.append(f"BENCH_TOKEN=${token_kind.upper()}_TOKEN")
    if bodies:
        env.append(f"BENCH_BODIES=<{len(bodies)} line(s) like {shlex.quote(bodies[0])}>")
    return " ".join(env + [shlex.quote(a) for a in argv])


# --- profiles -------------------------------------------------------------------------------


def start_profile(args, pid, name):
    """py-spy sampling gunicorn's workers (children of ``pid``) until SIGINT: every thread,
    idle or not (wall-clock time), or with ``--profile-gil`` only the one holding the GIL
    (the Python work the CPUs do)."""
    out = os.path.join(args.profile, f"{name}.txt")
    argv = [args.py_spy, "record", "--pid", str(pid), "--subprocesses",
            "--gil" if args.profile_gil else "--idle", "--nolineno",
            "--format", "raw", "--rate", "100", "--output", out]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True), out


def stop_profile(profile):
    """Stop py-spy as the load ends (so no idle time after it is sampled); it then writes."""
    process, _ = profile
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    if process.returncode != 0:
        print(f"  py-spy failed: {err.strip()[-300:]}", file=sys.stderr)


#: A gunicorn worker's frame that handles one request (SyncWorker's or gthread's ThreadWorker's).
REQUEST_FRAME = re.compile(r"\w+Worker\.handle_request \(gunicorn/workers/")


def print_profile(path, top, gil):
    """Hot spots of a py-spy raw profile of gunicorn's workers, in their requests.

    Each raw line is ``process master;process worker;frame;...;frame count``, outermost
    first. Only stacks inside a request count (under a worker's ``handle_request``): the
    master, a worker's main loop and the threads of a threaded worker that wait for their
    next request are left out (their share is printed), or they would dwarf the rest. The
    samples cover wall-clock time (py-spy --idle): time spent waiting -- for SQLite's write
    lock, an fsync, the GIL, the CPU -- counts for the function that waits. A function's own
    share counts the samples where it is the innermost frame; its inclusive share those where
    it is anywhere on the stack. With ``gil`` (``--profile-gil``) the samples are of the
    thread holding the GIL only: where the Python work goes, waits left out.
    """
    own_modules = {name for name in os.listdir(ROOT) if name.endswith(".py")}
    own, by_module, inclusive, total, idle = Counter(), Counter(), Counter(), 0, 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            processes = sum(frame.startswith("process ") for frame in frames)
            frames = frames[processes:]
            if processes < 2 or not frames:
                continue
            count = int(count)
            if not any(REQUEST_FRAME.match(frame) for frame in frames):
                idle += count
                continue
            total += count
            own[frames[-1]] += count
            by_module[module_of(frames[-1])] += count
            for frame in set(frames):
                if module_of(frame) in own_modules:
                    inclusive[frame] += count
    what = "time holding the GIL" if gil else "wall-clock time"
    print(f"\n=== profile {path}: {total:,} samples of the gunicorn workers' {what}"
          f" in requests ({idle:,} more outside any request left out) ===")
    if not total:
        return
    for title, counter in (("functions by own time", own),
                           ("modules and packages by own time", by_module),
                           ("the service's own functions by inclusive time", inclusive)):
        print(f"--- top {top} {title} ---")
        for name, count in counter.most_common(top):
            print(f"{100 * count / total:6.1f}%  {name}")


def module_of(frame):
    """The top-level module or package of a py-spy frame ``function (path/file.py)``."""
    path = frame.rpartition(" (")[2].rstrip(")")
    return path.split("/")[0] if "/" in path else path


# --- the run --------------------------------------------------------------------------------


def redacted(url):
    """A database URL without its password, for printing."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def gunicorn_settings(args):
    """The production settings: the repository's gunicorn.conf.py if any, else ``-w 4``;
    ``--workers N`` adds ``-w N`` (gunicorn's command line beats its config file)."""
    has_config = os.path.exists(os.path.join(ROOT, CONFIG_FILE))
    settings = ["-c", CONFIG_FILE] if has_config else []
    if args.workers:
        return settings + ["-w", str(args.workers)], f"-w {args.workers} from --workers"
    if has_config:
        return settings, f"{CONFIG_FILE} decides"
    return ["-w", "4"], "-w 4: no gunicorn.conf.py, so the README's command"


def seed(env, run):
    """User, service and channels through the operator CLI; returns (user, service) tokens."""
    commands = [
        ("users", "create", f"bench-{run}"),
        ("services", "create", "bench"),
        ("channels", "add", NOTIFY_CHANNEL, "--default", "enabled"),
        ("channels", "add", TOGGLED_CHANNEL, "--default", "disabled"),
    ]
    last_lines = [flask_cli(env, *command) for command in commands]
    for command in commands:
        print(f"  .venv/bin/flask --app app {' '.join(command)}")
    return last_lines[0], last_lines[1]


def measure(args, port, spec, token, server):
    """Preflight, warm up and load one endpoint; return its result row."""
    label, method, path, token_kind, bodies, expected = spec
    sample = bodies[0].replace("{{n}}", "preflight") if bodies else None
    status, text = call(port, method, path, sample, token)
    if status != expected:
        raise SystemExit(f"{label}: answered {status}, expected {expected}: {text[:300]}")
    if args.warmup:
        run_wrk(args, port, method, path, token, bodies, args.warmup)
    profile = None
    if args.profile and token_kind:
        profile = start_profile(args, server.process.pid, spec_name(label))
    result, argv = run_wrk(args, port, method, path, token, bodies, args.duration)
    if profile:
        stop_profile(profile)
    seconds = result["duration_us"] / 1e6
    errors = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors",
                                     "timeouts"))
    row = {"label": label, "rps": result["requests"] / seconds, "p50": result["p50_us"] / 1e3,
           "p99": result["p99_us"] / 1e3, "requests": result["requests"],
           "non2xx": result["status_errors"], "socket_errors": errors,
           "command": wrk_command_line(argv, method, token_kind, bodies),
           "profile": profile[1] if profile else None}
    print(f"  {label}: {row['rps']:,.0f} req/s, p50 {row['p50']:.2f} ms, "
          f"p99 {row['p99']:.2f} ms, {row['requests']:,} requests, non-2xx {row['non2xx']:,}, "
          f"socket errors {errors:,}; load {os.getloadavg()[0]:.2f}", flush=True)
    return row


def spec_name(label):
    """A file name for an endpoint's label."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def print_table(rows):
    """The results, each endpoint with its req/s as a ratio of hello world's."""
    hello = next((r["rps"] for r in rows if r["label"].startswith("hello")), None)
    header = ("endpoint", "req/s", "p50 ms", "p99 ms", "vs hello", "requests", "non-2xx",
              "sock err")
    lines = [header]
    for r in rows:
        ratio = f"{r['rps'] / hello:.2f}" if hello else "-"
        lines.append((r["label"], f"{r['rps']:,.0f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}",
                      ratio, f"{r['requests']:,}", f"{r['non2xx']:,}", f"{r['socket_errors']:,}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join([line[0].ljust(widths[0])]
                        + [cell.rjust(w) for cell, w in zip(line[1:], widths[1:])]))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per endpoint")
    parser.add_argument("--warmup", type=int, default=2,
                        help="seconds of unmeasured load before each endpoint (0: none)")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t")
    parser.add_argument("--workers", type=int, default=None,
                        help="gunicorn -w N (default: gunicorn.conf.py's, else 4)")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of: hello, get-pushers, get-channels, "
                             "set-pusher, set-channels, notify")
    parser.add_argument("--database-url", default=None,
                        help="PUSH_DATABASE_URL for the server (default: SQLite in a temporary "
                             "instance folder)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="sample the workers with py-spy during each service endpoint and "
                             "print the hot functions (pip install py-spy into the venv)")
    parser.add_argument("--profile-gil", action="store_true",
                        help="with --profile: sample only the thread that holds the GIL (CPU "
                             "work) instead of every thread's wall-clock time")
    parser.add_argument("--profile-lines", type=int, default=20)
    args = parser.parse_args()

    if shutil.which("wrk") is None:
        print("wrk is not installed: install it with `apt-get install wrk` (Debian/Ubuntu) "
              "or from https://github.com/wg/wrk", file=sys.stderr)
        sys.exit(2)
    if args.profile:
        args.py_spy = shutil.which("py-spy", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        if args.py_spy is None:
            parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
        os.makedirs(args.profile, exist_ok=True)
    return parser, args


def server_env(args, tmp):
    """The environment of every command: the shell's without its PUSH_ settings, plus ours;
    and how the database is described in print."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSH_")}
    env.update(PUSH_INSTANCE_PATH=os.path.join(tmp, "instance"),
               PUSH_RATE_LIMIT_ENABLED="false", PUSH_EMBEDDED_WORKER="false")
    if args.database_url:
        env["PUSH_DATABASE_URL"] = args.database_url
    database = (redacted(args.database_url) if args.database_url
                else "SQLite file in the temporary instance folder (WAL, synchronous=FULL)")
    return env, database


def print_setup(args, env, database):
    print(f"{'database':>9}: {database}")
    print(f"{'delivery':>9}: PUSH_EMBEDDED_WORKER=false, no worker runs: POST /notifications "
          f"only enqueues ({PUSHERS} delivery rows each; nothing is sent)")
    print(f"{'limits':>9}: PUSH_RATE_LIMIT_ENABLED=false")
    print(f"{'wrk load':>9}: wrk -t{args.threads} -c{args.connections} -d{args.duration}s per "
          f"endpoint after a {args.warmup} s warm-up; bench/wrk.lua adds the token and "
          "varies POST bodies\n")
    print("environment of every command below: "
          + " ".join(f"{k}={env[k] if k != 'PUSH_DATABASE_URL' else database}"
                     for k in sorted(env) if k.startswith("PUSH_")))


def measure_service(args, settings, settings_source, env, tmp, specs, names, tokens):
    """Start the service under gunicorn, register the user's pushers, load each endpoint."""
    rows = []
    with Gunicorn(settings, "app:create_app()", env, os.path.join(tmp, "server.log"),
                  "/healthz") as server:
        print(f"server: {shlex.join(server.argv(server.port))}")
        print(f"  workers: {len(server.workers())} ({settings_source})")
        bodies = specs["set-pusher"][4]
        for body in bodies:  # the user's devices, registered through the API
            status, text = call(server.port, "POST", "/push/v1/pushers/set",
                                body.replace("{{n}}", "0"), tokens["user"])
            if status != 200:
                raise SystemExit(f"registering a pusher: {status} {text[:300]}")
        print(f"  registered {len(bodies)} pushers (POST /push/v1/pushers/set; every other "
              "one encrypted)", flush=True)
        for name in names:
            spec = specs[name]
            rows.append(measure(args, server.port, spec, tokens[spec[3]], server))
    return rows


def report(args, rows):
    """The table, the wrk commands, the profiles; exit 1 if the figures are worthless."""
    print(f"\nload average after: {'%.2f %.2f %.2f' % os.getloadavg()} on "
          f"{len(os.sched_getaffinity(0))} CPUs (wrk and gunicorn share them)\n")
    print_table(rows)
    print("\nwrk commands (run from the repository root; $USER_TOKEN / $SERVICE_TOKEN are the "
          "seeded tokens):")
    for r in rows:
        print(f"  {r['label']}:\n    {r['command']}")
    if args.profile:
        for r in rows:
            if r["profile"] and os.path.exists(r["profile"]):
                print_profile(r["profile"], args.profile_lines, args.profile_gil)

    failed = [r["label"] for r in rows
              if r["requests"] == 0 or r["non2xx"] + r["socket_errors"] > r["requests"] / 2]
    if failed:
        print(f"\nFAILED: most answers were errors for {', '.join(failed)}; "
              "these figures are worthless", file=sys.stderr)
        sys.exit(1)
    noisy = [r["label"] for r in rows if r["non2xx"] or r["socket_errors"]]
    if noisy:
        print(f"\nWARNING: some answers were errors for {', '.join(noisy)}", file=sys.stderr)


def main():
    parser, args = parse_args()
    run = secrets.token_hex(3)  # names unique per run, so a reused database does not clash
    pushkeys = [f"{secrets.token_urlsafe(30)}/+{i}=" for i in range(PUSHERS)]  # base64-like
    specs = endpoint_specs(run, pushkeys, [secrets.token_hex(32) for _ in range(PUSHERS)])
    names = list(specs) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in specs]
    if unknown:
        parser.error(f"unknown endpoint(s) {', '.join(unknown)}; choose from {', '.join(specs)}")
    settings, settings_source = gunicorn_settings(args)

    print("# HTTP benchmark: gunicorn + wrk over loopback")
    for name, value in machine():
        print(f"{name:>9}: {value}")
    print(f"{'wrk':>9}: {wrk_version()}")
    print(f"{'command':>9}: {' '.join([os.path.relpath(sys.executable, ROOT)] + sys.argv)}")

    with tempfile.TemporaryDirectory(prefix="push-http-bench-") as tmp:
        env, database = server_env(args, tmp)
        print_setup(args, env, database)
        print("seed:")
        user_token, service_token = seed(env, run)
        tokens = {"user": user_token, "service": service_token, None: None}
        rows = []
        if "hello" in names:
            with Gunicorn(settings, "bench.hello:app", env, os.path.join(tmp, "hello.log"),
                          "/") as server:
                print(f"server: {shlex.join(server.argv(server.port))}")
                print(f"  workers: {len(server.workers())} ({settings_source})", flush=True)
                rows.append(measure(args, server.port, specs["hello"], None, server))
        service_names = [n for n in names if n != "hello"]
        if service_names:
            rows += measure_service(args, settings, settings_source, env, tmp, specs,
                                    service_names, tokens)
    report(args, rows)


if __name__ == "__main__":
    main()
