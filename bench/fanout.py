"""Delivery fan-out benchmark: one notification to N encrypted pushers of one user.

It prints figures; it never passes or fails on timing (STYLE.md: speed is measured in bench/,
never asserted in a test). For each size N and gateway style it:

1. builds a fresh app on a temporary instance folder (``create_app(config, instance_path=tmp)``),
   creates a user, a service token and an enabled-by-default channel with the CLI runner;
2. registers N encrypted pushers (own key_identifier, random iss each) and times that apart
   (``--cache DIR`` keeps the registered instance folder and starts later runs from a copy);
3. POSTs one notification through the sender API (test client) and times the 202 (enqueue);
4. delivers: by default a worker loops as in a server process (``Worker.run`` in a thread)
   until every delivery has its outcome written; ``--drive rounds`` calls
   ``Worker.run_once()`` until nothing is pending, as the tests do.

The gateway runs in its own processes (asyncio, HTTP/1.1 keep-alive, one shared listening
socket): its connections, requests and CPU time are printed, so a lost keep-alive or a gateway
that is the bottleneck shows. Each case runs in a fresh subprocess, so "peak RSS" is that
case's own peak.

    .venv/bin/python bench/fanout.py                       # 1,000 and 10,000; single and batch
    .venv/bin/python bench/fanout.py --sizes 10000 --repeat 3 --cache /tmp/fanout-cache
    .venv/bin/python bench/fanout.py --sizes 10000 --styles single --profile /tmp/prof
"""

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import resource
import secrets
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STYLES = {
    "single": "/_matrix/push/v1/notify",  # one POST per delivery
    "batch": "/push/v1/",  # batch-capable base: notify[Encrypted]/batch, up to 100 per POST
}
CHANNEL = "bench.fanout"
APP_ID = "com.example.bench"
PAYLOAD = {"title": "Benchmark", "body": "A new prescription is ready for you. " * 3,
           "task": "160.000.000.000.000.01"}
#: The worker's methods whose wall time is split out ("phases"); the rest of the stepping
#: thread's time is spent waiting for the sending threads.
PHASES = ("claim", "queue", "build_jobs", "record", "start_waiting", "collect")


# --- machine -------------------------------------------------------------------------------


def machine():
    """What this ran on: CPUs, CPU model, memory, Python and library versions."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line for line in f if line.startswith("model name")).split(":")[1]
    except (OSError, StopIteration):
        pass
    memory = "?"
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
            memory = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("flask", "peewee", "cryptography"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "?"
    return [
        ("nproc", f"{len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()})"),
        ("cpu", model.strip()),
        ("memory", memory),
        ("python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("os", platform.platform()),
        ("load", "%.2f %.2f %.2f (1/5/15 min; other work on the box skews the figures)"
         % os.getloadavg()),
        ("sqlite", sqlite3.sqlite_version),
        ("libs", ", ".join(f"{k} {v}" for k, v in versions.items())),
    ]


# --- the loopback gateway ------------------------------------------------------------------

SINGLE_ANSWER = b'{"rejected":[]}'
#: Counters per gateway process: connections, requests, notifications, encrypted ones.
COUNTERS = 4


def answer_for(path, body):
    """(notifications, encrypted ones, the answer's bytes) of one request: every item of a
    batch succeeds, a single notification is taken."""
    encrypted = body.count(b'"ciphertext"')
    if not path.endswith(b"/batch"):
        data = SINGLE_ANSWER
        return 1, encrypted, data
    items = json.loads(body)["notifications"]  # a gateway parses what it gets
    n = len(items)
    data = json.dumps({
        "results": [{"id": item["id"], "status": "success", "rejected": []} for item in items],
        "summary": {"total": n, "successful": n, "failed": 0, "partial": 0},
    }, separators=(",", ":")).encode()
    return n, encrypted, data


class GatewayProtocol(asyncio.Protocol):
    """A minimal HTTP/1.1 push gateway connection: Content-Length requests, keep-alive,
    counting into ``counters[slot:slot + COUNTERS]`` (each process has its own slots)."""

    def __init__(self, counters, slot):
        self.counters, self.slot = counters, slot
        self.transport = None
        self.buffer = b""

    def connection_made(self, transport):
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.counters[self.slot] += 1

    def data_received(self, data):
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end]
            at = head.lower().find(b"\r\ncontent-length:")
            length = int(head[at + 17:].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4:end + 4 + length]
            self.buffer = self.buffer[end + 4 + length:]
            n, encrypted, answer = answer_for(head.split(b" ", 2)[1], body)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))
            c, s = self.counters, self.slot
            c[s + 1], c[s + 2], c[s + 3] = c[s + 1] + 1, c[s + 2] + n, c[s + 3] + encrypted


def serve_gateway(sock, counters, slot):
    """One gateway process: an asyncio server on the inherited listening socket."""

    async def serve():
        server = await asyncio.get_running_loop().create_server(
            lambda: GatewayProtocol(counters, slot), sock=sock)
        await server.serve_forever()

    asyncio.run(serve())


class GatewayProcesses:
    """``procs`` gateway processes sharing one listening socket on 127.0.0.1."""

    def __init__(self, procs):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)  # processes race for accept(); the losers must not block
        self.port = self.sock.getsockname()[1]
        ctx = multiprocessing.get_context("fork")
        self.counters = ctx.Array("q", COUNTERS * procs, lock=False)
        self.procs = [ctx.Process(target=serve_gateway,
                                  args=(self.sock, self.counters, COUNTERS * i),
                                  daemon=True, name=f"gateway-{i}") for i in range(procs)]
        for proc in self.procs:
            proc.start()

    def snapshot(self):
        """{connections, requests, notifications, encrypted, cpu_s} so far."""
        c = list(self.counters)
        names = ("connections", "requests", "notifications", "encrypted")
        out = {name: sum(c[i::COUNTERS]) for i, name in enumerate(names)}
        out["cpu_s"] = sum(cpu_seconds(p.pid) for p in self.procs)
        return out

    def close(self):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join(5)
        self.sock.close()


def cpu_seconds(pid):
    """User + system CPU seconds of a process (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# --- one case (runs in its own subprocess): setting up -------------------------------------


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cli_token(runner, *args):
    """Run a CLI command that prints a token on its last line; return the token."""
    result = runner.invoke(args=list(args))
    if result.exit_code != 0:
        raise RuntimeError(f"flask {' '.join(args)} failed: {result.output}")
    return result.output.strip().splitlines()[-1]


def pusher_bodies(n, url, period):
    """N POST /pushers/set bodies: encrypted, each its own key_identifier and random iss."""
    run = secrets.token_hex(3)
    for i in range(n):
        yield {
            "kind": "http",
            "app_id": APP_ID,
            "pushkey": f"bench{i:06d}-" + secrets.token_urlsafe(24),
            "app_display_name": "Bench",
            "device_display_name": f"Phone {i}",
            "lang": "en",
            "data": {"url": url},
            "encryption": {"method": "aes-hmac-sha256", "initial_key_period": period,
                           "iss": secrets.token_hex(32), "key_identifier": f"bench-{run}-{i}"},
        }


def row_shape(pusher, key):
    """The columns that must match between two registrations of different devices."""
    from playhouse.shortcuts import model_to_dict

    skip = {"id", "pushkey", "pushkey_ts", "created_at", "device_display_name",
            "encryption_key"}
    p = {k: v for k, v in model_to_dict(pusher, recurse=False).items() if k not in skip}
    k = {"period": key.period, "sealed_len": len(key.sealed),
         "fingerprint_len": len(key.iss_fingerprint)}
    return p, k


def register_directly(app, headers, bodies):
    """Register ``bodies`` with the /pushers/set view function itself, without the WSGI
    layer; check that its first row has the shape of the API-made one before it. Returns how
    many it registered (all of them, or fewer if it failed, having said why)."""
    import inspect

    import app as app_module
    from models import EncryptionKey, Pusher, db, transaction
    from schemas import PusherSetSchema

    view = inspect.unwrap(app_module.PusherSet.post)
    schema = PusherSetSchema()
    instance = app_module.PusherSet()
    done = 0
    try:
        with app.test_request_context("/push/v1/pushers/set", method="POST", headers=headers):
            # The app's and the blueprint's before_request hooks (connection, authentication)
            # run once: every body is from the same user.
            early = app.preprocess_request()
            if early is not None:
                raise RuntimeError(f"a before_request hook answered {early}")
            view(instance, schema.load(bodies[0]))
            done = 1
            shapes = [row_shape(p, EncryptionKey.get_by_id(p.encryption_key_id))
                      for p in Pusher.select().order_by(Pusher.id.desc()).limit(2)]
            if len(shapes) != 2 or shapes[0] != shapes[1]:
                raise RuntimeError(f"it makes other rows than the API: {shapes}")
            for start in range(1, len(bodies), 1000):
                with transaction():  # the view's own transaction() nests as a savepoint
                    for body in bodies[start:start + 1000]:
                        view(instance, schema.load(body))
                done = min(start + 1000, len(bodies))
    except Exception as e:  # the view changed shape: the test client always works
        print(f"  direct registration failed ({type(e).__name__}: {e}); "
              f"the test client registers the other {len(bodies) - done:,}", file=sys.stderr)
    finally:
        if not db.is_closed():
            db.close()
    return done


def register_pushers(app, client, headers, bodies, mode):
    """Register every body; returns the mode actually used.

    ``client``: POST /pushers/set through the test client, one by one.
    ``direct``: the first through the test client, the others with the view function itself
    (``register_directly``); any trouble falls back to ``client`` for the rest.
    """

    def via_client(body):
        response = client.post("/push/v1/pushers/set", json=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"pushers/set: {response.status_code} {response.get_json()}")

    done = 0
    if mode == "direct" and len(bodies) >= 2:
        via_client(bodies[0])
        done = 1 + register_directly(app, headers, bodies[1:])
    for body in bodies[done:]:
        via_client(body)
    return mode if done == len(bodies) else "client"


def cache_folder(args, n, period):
    """Where ``--cache`` keeps the instance folder of N registered pushers, or None."""
    return os.path.join(args.cache, f"fanout-{n}-{period}") if args.cache else None


def save_to_cache(app, folder, url, service):
    """Keep the instance folder (pushers registered, nothing queued) for later runs."""
    from models import db

    with app.app_context(), db.connection_context():
        db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(app.instance_path, partial)
    with open(os.path.join(partial, "bench.json"), "w") as f:
        json.dump({"url": url, "service": service}, f)
    os.replace(partial, folder)


def restore_from_cache(app, folder, url):
    """The service's headers of a cached instance folder (copied into ``app``'s before it
    was created), its pushers pointed at ``url``."""
    from peewee import fn

    from models import Pusher, db

    with open(os.path.join(folder, "bench.json")) as f:
        saved = json.load(f)
    with app.app_context(), db.connection_context():
        Pusher.update(data=fn.REPLACE(Pusher.data, saved["url"], url)).execute()
    return saved["service"]


def seed(app, args, n, url, period, out):
    """A user with N encrypted pushers of ``url``, a service and a channel; returns the
    service's headers."""
    folder = cache_folder(args, n, period)
    if folder and os.path.exists(os.path.join(app.instance_path, "bench.json")):
        out.update(register_mode="cached", register_s=0.0)
        return restore_from_cache(app, app.instance_path, url)
    runner = app.test_cli_runner()
    user = {"Authorization": "Bearer " + cli_token(runner, "users", "create", "bench")}
    service = {"Authorization": "Bearer " + cli_token(runner, "services", "create", "bench")}
    result = runner.invoke(args=["channels", "add", CHANNEL, "--default", "enabled"])
    if result.exit_code != 0:
        raise RuntimeError(result.output)
    bodies = list(pusher_bodies(n, url, period))
    start = time.perf_counter()
    out["register_mode"] = register_pushers(app, app.test_client(), user, bodies, args.register)
    out["register_s"] = time.perf_counter() - start
    if folder:
        save_to_cache(app, folder, url, service)
    return service


def make_app(args, n, tmp):
    """The case's app on instance folder ``tmp`` (a copy of the cached one, if any)."""
    from app import create_app

    folder = cache_folder(args, n, args.period)
    if folder and os.path.isdir(folder):
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
    config = {
        "EMBEDDED_WORKER": False,
        "RATE_LIMIT_ENABLED": False,
        "ALLOW_HTTP_GATEWAYS": True,
        "ALLOW_PRIVATE_GATEWAYS": True,
        "MAX_PUSHERS_PER_USER": max(n, 50),  # one user holds every device of the fan-out
    }
    for name, value in (("WORKER_THREADS", args.threads), ("WORKER_CLAIM", args.claim),
                        ("GATEWAY_CONCURRENCY", args.concurrency)):
        if value:
            config[name] = value
    return create_app(config, instance_path=tmp)


# --- one case: measuring --------------------------------------------------------------------


class Profiles:
    """cProfile per thread (cProfile sees one thread only), merged by group when dumped."""

    def __init__(self):
        import cProfile

        self.cProfile = cProfile
        self.local = threading.local()
        self.groups = {}  # name -> [Profile]
        self.lock = threading.Lock()

    def wrap(self, group, func):
        """``func``, profiled in whatever thread calls it, into ``group``."""

        def profiled(*args, **kwargs):
            profile = getattr(self.local, group, None)
            if profile is None:
                profile = self.cProfile.Profile()
                setattr(self.local, group, profile)
                with self.lock:
                    self.groups.setdefault(group, []).append(profile)
            profile.enable()
            try:
                return func(*args, **kwargs)
            finally:
                profile.disable()

        return profiled

    def dump(self, stem):
        """Write ``stem``-<group>.prof for each group."""
        import pstats

        for group, profiles in self.groups.items():
            stats = pstats.Stats(profiles[0])
            for profile in profiles[1:]:
                stats.add(profile)
            stats.dump_stats(f"{stem}-{group}.prof")


def instrument(worker, phases, done, expected):
    """Time the worker's PHASES (wall seconds, in ``phases``), and set ``done`` once
    ``expected`` deliveries have their final outcome written."""
    written = [0]

    def timed(name, method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    for name in PHASES:
        if hasattr(worker, name):  # the worker changed shape: time what is still there
            setattr(worker, name, timed(name, getattr(worker, name)))
    record = worker.record

    def counting(outcomes):
        record(outcomes)
        written[0] += sum(outcome.result != "retry" for outcome in outcomes)
        if written[0] >= expected:
            done.set()

    worker.record = counting


def drive_loop(app, worker, done, timeout):
    """Run the worker's loop in a thread, as a server process does, until ``done``; returns
    (whether it finished in time, the stepping thread's CPU seconds)."""
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="push-worker")
    thread.start()
    clock = time.pthread_getcpuclockid(thread.ident)
    finished = done.wait(timeout)
    cpu = time.clock_gettime(clock)
    stop.set()
    import delivery

    delivery.wake()
    thread.join()
    return finished, cpu


def drive_rounds(app, worker, timeout):
    """Call ``run_once`` until nothing is pending; returns (whether it finished in time, this
    thread's CPU seconds, rounds)."""
    import delivery
    from models import db

    cpu0, rounds = time.thread_time(), 0
    deadline = time.perf_counter() + timeout
    with app.app_context(), db.connection_context():
        while True:
            handled = worker.run_once()
            rounds += 1
            if handled:
                continue
            if delivery.stats()["pending"] == 0:
                return True, time.thread_time() - cpu0, rounds
            if time.perf_counter() > deadline:
                return False, time.thread_time() - cpu0, rounds
            time.sleep(0.02)  # only retries with backoff are left


PENDING_LEFT = "SELECT 1 FROM delivery WHERE state = 'pending' LIMIT 1"


def worker_process(app):
    """A forked delivery worker process, as each gunicorn worker process runs one: its loop
    until no delivery is pending (every outcome written, by this process or the others)."""
    import delivery
    from models import db, rows

    stop = threading.Event()

    def watch():
        with app.app_context(), db.connection_context():
            while not stop.wait(0.05):
                if not rows(PENDING_LEFT):
                    stop.set()
                    delivery.wake()

    threading.Thread(target=watch, daemon=True).start()
    worker = delivery.Worker(app)
    worker.run(stop)


def deliver_in_processes(app, args, out):
    """Deliver with ``args.processes`` forked worker processes sharing the queue; fills in
    the delivery figures of ``out`` (CPU: all the processes together)."""
    import delivery
    from models import db

    if not db.is_closed():
        db.close()  # each process opens its own
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=worker_process, args=(app,), name=f"worker-{i}")
                 for i in range(args.processes)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    for process in processes:
        process.start()
    for process in processes:
        process.join(args.timeout)
    out["deliver_s"] = time.perf_counter() - start
    out["timed_out"] = any(process.is_alive() for process in processes)
    for process in processes:
        process.kill()
        process.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["worker_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out["step_cpu_s"] = float("nan")  # a thread of each process: not summed
    out["phases"] = {}
    with app.app_context(), db.connection_context():
        out["stats"] = delivery.stats()


def deliver(app, args, expected, out, profiles):
    """Deliver everything queued; fills in the delivery figures of ``out``."""
    import delivery
    from models import db

    if args.processes > 1:
        deliver_in_processes(app, args, out)
        return

    worker = delivery.Worker(app)
    phases, done = {}, threading.Event()
    instrument(worker, phases, done, expected)
    if profiles:
        worker.send = profiles.wrap("deliver-send", worker.send)
        driven = "run" if args.drive == "loop" else "run_once"
        setattr(worker, driven, profiles.wrap("deliver-step", getattr(worker, driven)))
    cpu0 = time.process_time()
    start = time.perf_counter()
    if args.drive == "loop":
        finished, step_cpu = drive_loop(app, worker, done, args.timeout)
    else:
        finished, step_cpu, out["rounds"] = drive_rounds(app, worker, args.timeout)
    out["deliver_s"] = time.perf_counter() - start
    out["worker_cpu_s"] = time.process_time() - cpu0
    out["step_cpu_s"] = step_cpu
    out["timed_out"] = not finished
    worker.close()
    with app.app_context(), db.connection_context():
        out["stats"] = delivery.stats()
    out["phases"] = {k: round(v, 4) for k, v in phases.items()}


def run_case(args):
    """One (N, style) case in this process; prints a JSON result as its last stdout line."""
    sys.path.insert(0, ROOT)
    import logging

    logging.basicConfig(level=logging.WARNING)
    n, style = args.case_size, args.case_style
    url = f"http://127.0.0.1:{args.port}{STYLES[style]}"
    out = {"n": n, "style": style,
           "drive": args.drive if args.processes == 1 else f"{args.processes} processes"}
    profiles = Profiles() if args.profile else None
    with tempfile.TemporaryDirectory(prefix="push-bench-") as tmp:
        app = make_app(args, n, tmp)
        out.update(threads=app.config["WORKER_THREADS"], claim=app.config["WORKER_CLAIM"],
                   concurrency=app.config["GATEWAY_CONCURRENCY"])
        service = seed(app, args, n, url, args.period, out)
        out["rss_after_register_mib"] = peak_rss_mib()
        client = app.test_client()
        notify = client.post
        if profiles:
            notify = profiles.wrap("enqueue", notify)
        start = time.perf_counter()
        response = notify("/push/v1/notifications", headers=service, json={
            "user_id": "bench", "channel": CHANNEL, "payload": PAYLOAD, "prio": "high",
            "counts": {"unread": 1}})
        out["enqueue_s"] = time.perf_counter() - start
        if response.status_code != 202:
            raise RuntimeError(f"notifications: {response.status_code} {response.get_json()}")
        out["deliveries_queued"] = response.get_json()["deliveries"]
        deliver(app, args, out["deliveries_queued"], out, profiles)
        if profiles:
            os.makedirs(args.profile, exist_ok=True)
            out["profiles"] = os.path.join(args.profile, f"fanout-{n}-{style}")
            profiles.dump(out["profiles"])
        out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out))


# --- driver ---------------------------------------------------------------------------------


def run_in_subprocess(args, size, style, port):
    """Run one case in a fresh interpreter so its peak RSS is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case-size", str(size),
           "--case-style", style, "--port", str(port), "--register", args.register,
           "--timeout", str(args.timeout), "--drive", args.drive, "--key-period", args.period,
           "--processes", str(args.processes)]
    for flag, value in (("--threads", args.threads), ("--claim", args.claim),
                        ("--concurrency", args.concurrency), ("--profile", args.profile),
                        ("--cache", args.cache)):
        if value:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          timeout=args.timeout * 3 + 600)
    if proc.returncode != 0:
        raise RuntimeError(f"case {size}/{style} exited with {proc.returncode}:\n{proc.stdout}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(args, gateway, size, style):
    """Run one case against ``gateway``; the case's figures with the gateway's added."""
    before = gateway.snapshot()
    row = run_in_subprocess(args, size, style, gateway.port)
    time.sleep(0.05)  # let the gateway finish counting the last answers
    after = gateway.snapshot()
    row["gateway"] = {k: after[k] - before[k] for k in after}
    row["load"] = os.getloadavg()[0]
    return row


def per_delivery_us(row, seconds):
    """CPU microseconds per delivered notification ("-" when not measured)."""
    if math.isnan(seconds):
        return "-"
    return f"{1e6 * seconds / max(1, row['stats']['delivered']):.0f}"


def print_case(row, profiled):
    """One line (and the phases) of a case as it finishes."""
    s, gw = row["stats"], row["gateway"]
    expected = row["n"] if row["style"] == "single" else math.ceil(row["n"] / 100)
    print(f"N={row['n']:,} {row['style']}: register {row['register_s']:.2f}s "
          f"({row['register_mode']}), enqueue {row['enqueue_s']:.3f}s, "
          f"deliver {row['deliver_s']:.2f}s = {s['delivered'] / row['deliver_s']:,.0f}/s; "
          f"delivered {s['delivered']:,}, failed {s['failed']:,}, pending {s['pending']:,}; "
          f"gateway: {gw['connections']:,} connections, {gw['requests']:,} requests (expected "
          f"{expected:,}), {gw['notifications']:,} notifications ({gw['encrypted']:,} encrypted),"
          f" CPU {gw['cpu_s']:.2f}s; worker CPU {row['worker_cpu_s']:.2f}s "
          f"({per_delivery_us(row, row['worker_cpu_s'])} us/delivery, stepping thread "
          f"{per_delivery_us(row, row['step_cpu_s'])}); {row['threads']} threads, claim "
          f"{row['claim']}, {row['concurrency']} per gateway, drive {row['drive']}"
          + (f" ({row['rounds']} rounds)" if "rounds" in row else "")
          + f"; peak RSS {row['peak_rss_mib']:.0f} MiB; load {row['load']:.2f}"
          + ("  [TIMED OUT]" if row["timed_out"] else "")
          + ("  [PROFILED]" if profiled else ""), flush=True)
    phases = dict(row["phases"])
    if not phases:
        return
    phases.pop("build_jobs", None)  # inside queue
    busy = sum(phases.values())
    phases["waiting"] = max(0.0, row["deliver_s"] - busy)
    print("    stepping thread's wall time: " + ", ".join(
        f"{k} {v:.2f}s" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])), flush=True)


def print_table(rows):
    """The figures of every case: one line per case and run, then the median of each case."""
    header = ("N", "style", "run", "register s", "enqueue s", "deliver s", "deliv/s",
              "worker us/d", "step us/d", "gw conns", "gw reqs", "gw cpu s", "ok/fail",
              "load", "RSS MiB")
    lines = [header]
    cases = {}
    for r in rows:
        cases.setdefault((r["n"], r["style"]), []).append(r)
    for (n, style), runs in cases.items():
        for i, r in enumerate(runs, 1):
            s, gw = r["stats"], r["gateway"]
            lines.append((
                f"{n:,}", style, str(i), f"{r['register_s']:.2f}", f"{r['enqueue_s']:.3f}",
                f"{r['deliver_s']:.2f}", f"{s['delivered'] / r['deliver_s']:,.0f}",
                per_delivery_us(r, r["worker_cpu_s"]),
                per_delivery_us(r, r["step_cpu_s"]), f"{gw['connections']:,}",
                f"{gw['requests']:,}", f"{gw['cpu_s']:.2f}",
                f"{s['delivered']:,}/{s['failed']:,}", f"{r['load']:.2f}",
                f"{r['peak_rss_mib']:.0f}"))
        if len(runs) > 1:
            rate = statistics.median(r["stats"]["delivered"] / r["deliver_s"] for r in runs)
            cpu = statistics.median(1e6 * r["worker_cpu_s"] / max(1, r["stats"]["delivered"])
                                    for r in runs)
            lines.append((f"{n:,}", style, "median", "", "", "", f"{rate:,.0f}", f"{cpu:.0f}",
                          "", "", "", "", "", "", ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_profiles(stem, limit):
    """Top functions of a case's profiles: overall by own time, and the app's own code."""
    import pstats

    ours = r"(delivery|gateway|app|models|crypto|schemas)\.py"
    for part in ("enqueue", "deliver-step", "deliver-send"):
        path = f"{stem}-{part}.prof"
        if not os.path.exists(path):
            continue
        print(f"\n=== profile {path} ===")
        stats = pstats.Stats(path, stream=sys.stdout).strip_dirs()
        print(f"--- top {limit} by own time (tottime) ---")
        stats.sort_stats("tottime").print_stats(limit)
        print("--- the app's own functions by cumulative time ---")
        stats.sort_stats("cumulative").print_stats(ours, limit)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated pusher counts")
    parser.add_argument("--styles", default="single,batch",
                        help="comma-separated gateway styles: single, batch")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each case")
    parser.add_argument("--drive", choices=("loop", "rounds"), default="loop",
                        help="loop: Worker.run in a thread, as a server process runs it; "
                             "rounds: Worker.run_once until nothing is pending, as tests do")
    parser.add_argument("--processes", type=int, default=1,
                        help="worker processes sharing the queue (forked, each with its loop, "
                             "as each gunicorn worker process runs one); more than 1 implies "
                             "--drive loop and no --profile")
    parser.add_argument("--threads", type=int, default=None,
                        help="WORKER_THREADS (default: the app's default)")
    parser.add_argument("--claim", type=int, default=None,
                        help="WORKER_CLAIM, deliveries leased per claim (default: the app's)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="GATEWAY_CONCURRENCY (default: the app's)")
    parser.add_argument("--register", choices=("direct", "client"), default="direct",
                        help="direct: the pushers/set view without the HTTP layer (checked "
                             "against an API-made row); client: the test client, one by one")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="keep the instance folder of registered pushers in DIR and start "
                             "later runs of the same N from a copy of it")
    parser.add_argument("--gateway-procs", type=int, default=2,
                        help="gateway processes sharing the listening socket")
    parser.add_argument("--key-period", dest="period",
                        default=datetime.now(timezone.utc).strftime("%Y-%m"),
                        help="initial_key_period of the pushers (default: this month; an "
                             "older month makes the first delivery ratchet every key)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="cProfile enqueue and delivery into DIR and print the hot spots "
                             "(profiling slows the run: those figures are not comparable)")
    parser.add_argument("--profile-lines", type=int, default=25)
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="give up delivering after this many seconds per case")
    parser.add_argument("--case-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--case-style", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [s for s in args.styles.split(",") if s.strip() not in STYLES]
    if unknown:
        parser.error(f"unknown style(s): {', '.join(unknown)}; use single, batch")
    if args.processes > 1 and (args.profile or args.drive != "loop"):
        parser.error("--processes above 1 goes with --drive loop and without --profile")
    return args


def main():
    args = parse_args()
    if args.case_size is not None:
        run_case(args)
        return
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    styles = [s.strip() for s in args.styles.split(",")]
    print("# push fan-out benchmark")
    for name, value in machine():
        print(f"{name:>8}: {value}")
    print(f" command: {' '.join([os.path.relpath(sys.executable, ROOT)] + sys.argv)}")
    gateway = GatewayProcesses(args.gateway_procs)
    print(f" gateway: {args.gateway_procs} process(es), asyncio HTTP/1.1 keep-alive, "
          f"127.0.0.1:{gateway.port}")
    print("   cases: each in a fresh subprocess; one notification to N encrypted pushers\n",
          flush=True)
    rows = []
    try:
        for size in sizes:
            for style in styles:
                for _ in range(args.repeat):
                    rows.append(measure(args, gateway, size, style))
                    print_case(rows[-1], bool(args.profile))
    finally:
        gateway.close()
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} on "
          f"{len(os.sched_getaffinity(0))} CPUs (worker CPU per delivery well below the wall "
          "time per delivery means it waited: for the gateway, or for a busy machine)\n")
    print_table(rows)
    for row in rows:
        if row.get("profiles"):
            print_profiles(row["profiles"], args.profile_lines)


if __name__ == "__main__":
    main()
