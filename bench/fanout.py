"""Delivery fan-out benchmark: one notification to N encrypted pushers of one user.

It prints figures; it never passes or fails on timing (STYLE.md: speed is measured in bench/,
never asserted in a test). For each size N and gateway style it:

1. builds a fresh app on a temporary instance folder (``create_app(config, instance_path=tmp)``),
   creates a user, a service token and an enabled-by-default channel with the CLI runner;
2. registers N encrypted pushers (own key_identifier, random iss each) and times that apart;
3. POSTs one notification through the sender API (test client) and times the 202 (enqueue);
4. runs ``delivery.Worker(app).run_once()`` until ``delivery.stats()["pending"] == 0`` against a
   loopback gateway and times that (delivery).

The gateway runs in its own processes (ThreadingHTTPServer, HTTP/1.1 keep-alive, one shared
listening socket) so it is not the bottleneck; its request count and CPU time are printed.
Each case runs in a fresh subprocess, so "peak RSS" is that case's own peak.

    .venv/bin/python bench/fanout.py                       # 1,000 and 10,000; single and batch
    .venv/bin/python bench/fanout.py --sizes 1000 --styles single --threads 8
    .venv/bin/python bench/fanout.py --sizes 10000 --styles single --profile /tmp/prof
"""

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STYLES = {
    "single": "/_matrix/push/v1/notify",  # one POST per delivery
    "batch": "/push/v1/",  # batch-capable base: notify[Encrypted]/batch, up to 100 per POST
}
CHANNEL = "bench.fanout"
APP_ID = "com.example.bench"
PAYLOAD = {"title": "Benchmark", "body": "A new prescription is ready for you. " * 3,
           "task": "160.000.000.000.000.01"}


# --- machine -------------------------------------------------------------------------------


def machine():
    """What this ran on: CPUs, CPU model, memory, Python and library versions."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = "?"
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
            memory = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    import sqlite3

    versions = {}
    for name in ("flask", "peewee", "urllib3", "cryptography"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "?"
    return [
        ("nproc", f"{len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()})"),
        ("cpu", model),
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


def gateway_handler(counters, slot):
    """A minimal push gateway handler class counting into ``counters[slot:slot + 3]``."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True

        def log_message(self, *args):
            pass

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.endswith("/batch"):
                items = json.loads(raw)["notifications"]
                n = len(items)
                data = json.dumps({
                    "results": [{"id": it["id"], "status": "success", "rejected": []}
                                for it in items],
                    "summary": {"total": n, "successful": n, "failed": 0, "partial": 0},
                }, separators=(",", ":")).encode()
            else:
                n, data = 1, SINGLE_ANSWER
            encrypted = raw.count(b'"ciphertext"')
            # One write for head and body: no Nagle/delayed-ACK stall between two segments.
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            with lock:
                counters[slot] += 1
                counters[slot + 1] += n
                counters[slot + 2] += encrypted

    return Handler


def serve_gateway(sock, counters, slot):
    """One gateway process: a ThreadingHTTPServer on the inherited listening socket."""
    server = ThreadingHTTPServer(sock.getsockname(), gateway_handler(counters, slot),
                                 bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.daemon_threads = True
    server.serve_forever(poll_interval=0.5)


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
        self.counters = ctx.Array("q", 3 * procs, lock=False)
        self.procs = [ctx.Process(target=serve_gateway, args=(self.sock, self.counters, 3 * i),
                                  daemon=True, name=f"gateway-{i}") for i in range(procs)]
        for proc in self.procs:
            proc.start()

    def snapshot(self):
        """(requests, notifications, encrypted notifications, CPU seconds) so far."""
        c = list(self.counters)
        return (sum(c[0::3]), sum(c[1::3]), sum(c[2::3]),
                sum(cpu_seconds(p.pid) for p in self.procs))

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


# --- one case (runs in its own subprocess) -------------------------------------------------


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


def register_pushers(app, client, headers, bodies, mode):
    """Register every body; returns the mode actually used.

    ``client``: POST /pushers/set through the test client, one by one.
    ``direct``: the same view function (``PusherSet.post`` unwrapped) with the body loaded by
    the same ``PusherSetSchema``, in one request context, so the WSGI/HTTP layer is skipped
    but every row is made by the view's own code. The first pusher goes through the test
    client and its row is compared with the second's; a mismatch falls back to ``client``.
    """

    def via_client(body):
        response = client.post("/push/v1/pushers/set", json=body, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"pushers/set: {response.status_code} {response.get_json()}")

    if mode == "client" or len(bodies) < 2:
        for body in bodies:
            via_client(body)
        return "client"

    import inspect

    import app as app_module
    from models import EncryptionKey, Pusher, db, transaction
    from schemas import PusherSetSchema

    via_client(bodies[0])
    done = 1
    try:
        view = inspect.unwrap(app_module.PusherSet.post)
        schema = PusherSetSchema()
        instance = app_module.PusherSet()
        with app.test_request_context("/push/v1/pushers/set", method="POST", headers=headers):
            # The app's and the blueprint's before_request hooks (connection, authentication)
            # run once: every body is from the same user.
            early = app.preprocess_request()
            if early is not None:
                raise RuntimeError(f"a before_request hook answered {early}")
            view(instance, schema.load(bodies[1]))
            done = 2
            shapes = [row_shape(p, EncryptionKey.get_by_id(p.encryption_key_id))
                      for p in Pusher.select().where(Pusher.pushkey.in_(
                          [bodies[0]["pushkey"], bodies[1]["pushkey"]])).order_by(Pusher.id)]
            if len(shapes) != 2 or shapes[0] != shapes[1]:
                raise RuntimeError(f"it makes other rows than the API: {shapes}")
            for start in range(2, len(bodies), 1000):
                with transaction():  # the view's own transaction() nests as a savepoint
                    for body in bodies[start:start + 1000]:
                        view(instance, schema.load(body))
                done = min(start + 1000, len(bodies))
            db.close()
    except Exception as e:  # the view changed shape: the test client always works
        print(f"  direct registration failed ({type(e).__name__}: {e}); "
              f"the test client registers the other {len(bodies) - done:,}", file=sys.stderr)
        if not db.is_closed():
            db.close()
        for body in bodies[done:]:
            via_client(body)
        return "client"
    return "direct"


def instrument(worker, phases):
    """Wrap the worker's steps to split each round's wall time into phases."""
    marks = {}

    def wrap(name, gap=None, after=None):
        method = getattr(worker, name, None)
        if method is None:  # the worker changed shape: time what is still there
            return

        def timed(*args, **kwargs):
            start = time.perf_counter()
            if after in marks:
                phases[gap] = phases.get(gap, 0.0) + start - marks.pop(after)
            try:
                return method(*args, **kwargs)
            finally:
                end = time.perf_counter()
                phases[name] = phases.get(name, 0.0) + end - start
                marks[name] = end

        setattr(worker, name, timed)

    wrap("claim")
    wrap("build_jobs", gap="load", after="claim")  # load: rows read between claim and build
    wrap("record", gap="send", after="build_jobs")  # send: the executor.map between the two


class ThreadProfiles:
    """cProfile for ``Worker.send`` in the executor threads (cProfile sees one thread only)."""

    def __init__(self):
        import cProfile

        self.cProfile = cProfile
        self.local = threading.local()
        self.all = []
        self.lock = threading.Lock()

    def wrap(self, func):
        def profiled(*args, **kwargs):
            profile = getattr(self.local, "profile", None)
            if profile is None:
                profile = self.local.profile = self.cProfile.Profile()
                with self.lock:
                    self.all.append(profile)
            profile.enable()
            try:
                return func(*args, **kwargs)
            finally:
                profile.disable()

        return profiled

    def dump(self, path):
        import pstats

        if not self.all:
            return None
        stats = pstats.Stats(self.all[0])
        for profile in self.all[1:]:
            stats.add(profile)
        stats.dump_stats(path)
        return path


def run_case(args):
    """One (N, style) case in this process; prints a JSON result as its last stdout line."""
    sys.path.insert(0, ROOT)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from app import create_app

    import delivery
    from models import db

    n, style = args.case_size, args.case_style
    url = f"http://127.0.0.1:{args.port}{STYLES[style]}"
    period = args.key_period or datetime.now(timezone.utc).strftime("%Y-%m")
    config = {
        "EMBEDDED_WORKER": False,
        "RATE_LIMIT_ENABLED": False,
        "ALLOW_HTTP_GATEWAYS": True,
        "ALLOW_PRIVATE_GATEWAYS": True,
        "MAX_PUSHERS_PER_USER": max(n, 50),  # one user holds every device of the fan-out
    }
    if args.threads:
        config["WORKER_THREADS"] = args.threads
    if args.claim:
        config["WORKER_CLAIM"] = args.claim
    out = {"n": n, "style": style}

    with tempfile.TemporaryDirectory(prefix="push-bench-") as tmp:
        app = create_app(config, instance_path=tmp)
        out["threads"] = app.config["WORKER_THREADS"]
        out["claim"] = app.config["WORKER_CLAIM"]
        runner = app.test_cli_runner()
        user = {"Authorization": "Bearer " + cli_token(runner, "users", "create", "bench")}
        service = {"Authorization": "Bearer " + cli_token(runner, "services", "create", "bench")}
        result = runner.invoke(args=["channels", "add", CHANNEL, "--default", "enabled"])
        if result.exit_code != 0:
            raise RuntimeError(result.output)
        client = app.test_client()

        bodies = list(pusher_bodies(n, url, period))
        start = time.perf_counter()
        out["register_mode"] = register_pushers(app, client, user, bodies, args.register)
        out["register_s"] = time.perf_counter() - start
        del bodies
        out["rss_after_register_mib"] = peak_rss_mib()

        profiling = bool(args.profile)
        if profiling:
            import cProfile

            os.makedirs(args.profile, exist_ok=True)
            stem = os.path.join(args.profile, f"fanout-{n}-{style}")
            enqueue_profile = cProfile.Profile()
            enqueue_profile.enable()
        start = time.perf_counter()
        response = client.post("/push/v1/notifications", headers=service, json={
            "user_id": "bench", "channel": CHANNEL, "payload": PAYLOAD, "prio": "high",
            "counts": {"unread": 1}})
        out["enqueue_s"] = time.perf_counter() - start
        if profiling:
            enqueue_profile.disable()
            enqueue_profile.dump_stats(stem + "-enqueue.prof")
        if response.status_code != 202:
            raise RuntimeError(f"notifications: {response.status_code} {response.get_json()}")
        out["deliveries_queued"] = response.get_json()["deliveries"]

        worker = delivery.Worker(app)
        phases = {}
        instrument(worker, phases)
        if profiling:
            thread_profiles = ThreadProfiles()
            worker.send = thread_profiles.wrap(worker.send)
        rounds = 0
        cpu0 = time.process_time()
        with app.app_context():
            db.connect(reuse_if_open=True)
            if profiling:
                main_profile = cProfile.Profile()
                main_profile.enable()
            start = time.perf_counter()
            deadline = start + args.timeout
            while True:
                handled = worker.run_once()
                rounds += 1
                if handled:
                    continue
                stats = delivery.stats()
                if stats["pending"] == 0:
                    break
                if time.perf_counter() > deadline:
                    out["timed_out"] = True
                    break
                time.sleep(0.02)  # only retries with backoff are left
            out["deliver_s"] = time.perf_counter() - start
            if profiling:
                main_profile.disable()
                main_profile.dump_stats(stem + "-deliver-main.prof")
                thread_profiles.dump(stem + "-deliver-send.prof")
                out["profiles"] = stem
            out["stats"] = delivery.stats()
            db.close()
        out["worker_cpu_s"] = time.process_time() - cpu0
        out["rounds"] = rounds
        out["phases"] = {k: round(v, 4) for k, v in phases.items()}
        if hasattr(worker, "close"):
            worker.close()
        else:
            worker.executor.shutdown(wait=True)
        out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out))


# --- driver ---------------------------------------------------------------------------------


def run_in_subprocess(args, size, style, port):
    """Run one case in a fresh interpreter so its peak RSS is its own."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case-size", str(size),
           "--case-style", style, "--port", str(port), "--register", args.register,
           "--timeout", str(args.timeout)]
    for flag, value in (("--threads", args.threads), ("--claim", args.claim),
                        ("--key-period", args.key_period), ("--profile", args.profile)):
        if value:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          timeout=args.timeout * 3 + 600)
    if proc.returncode != 0:
        raise RuntimeError(f"case {size}/{style} exited with {proc.returncode}:\n{proc.stdout}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows):
    header = ("N", "style", "thr", "register s", "reg/s", "enqueue s", "deliver s",
              "deliv/s", "gw reqs", "gw notifs", "enc", "ok/fail", "worker cpu s",
              "gw cpu s", "peak RSS MiB")
    lines = [header]
    for r in rows:
        s = r["stats"]
        lines.append((
            f"{r['n']:,}", r["style"], str(r["threads"]), f"{r['register_s']:.2f}",
            f"{r['n'] / r['register_s']:,.0f}", f"{r['enqueue_s']:.3f}",
            f"{r['deliver_s']:.2f}", f"{s['delivered'] / r['deliver_s']:,.0f}",
            f"{r['gw_requests']:,}", f"{r['gw_notifications']:,}", f"{r['gw_encrypted']:,}",
            f"{s['delivered']:,}/{s['failed']:,}", f"{r['worker_cpu_s']:.1f}",
            f"{r['gw_cpu_s']:.1f}", f"{r['peak_rss_mib']:.0f}",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_profiles(stem, limit):
    """Top functions of a case's profiles: overall by own time, and the app's own code."""
    import pstats

    ours = r"(delivery|app|models|crypto|schemas)\.py"
    for part in ("enqueue", "deliver-main", "deliver-send"):
        path = f"{stem}-{part}.prof"
        if not os.path.exists(path):
            continue
        print(f"\n=== profile {path} ===")
        stats = pstats.Stats(path, stream=sys.stdout).strip_dirs()
        print(f"--- top {limit} by own time (tottime) ---")
        stats.sort_stats("tottime").print_stats(limit)
        print("--- the app's own functions by cumulative time ---")
        stats.sort_stats("cumulative").print_stats(ours, limit)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated pusher counts")
    parser.add_argument("--styles", default="single,batch",
                        help="comma-separated gateway styles: single, batch")
    parser.add_argument("--threads", type=int, default=None,
                        help="WORKER_THREADS (default: the app's default)")
    parser.add_argument("--claim", type=int, default=None,
                        help="WORKER_CLAIM, deliveries leased per round (default: the app's)")
    parser.add_argument("--register", choices=("direct", "client"), default="direct",
                        help="direct: the pushers/set view without the HTTP layer (checked "
                             "against an API-made row); client: the test client, one by one")
    parser.add_argument("--gateway-procs", type=int, default=2,
                        help="gateway processes sharing the listening socket")
    parser.add_argument("--key-period", default=None,
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

    if args.case_size is not None:
        run_case(args)
        return

    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        parser.error(f"unknown style(s): {', '.join(unknown)}; use single, batch")

    print("# push fan-out benchmark")
    for name, value in machine():
        print(f"{name:>8}: {value}")
    print(f" command: {' '.join([os.path.relpath(sys.executable, ROOT)] + sys.argv)}")
    gateway = GatewayProcesses(args.gateway_procs)
    print(f" gateway: {args.gateway_procs} process(es), ThreadingHTTPServer HTTP/1.1 keep-alive, "
          f"127.0.0.1:{gateway.port}")
    print("   cases: each in a fresh subprocess; one notification to N encrypted pushers\n",
          flush=True)

    rows = []
    try:
        for size in sizes:
            for style in styles:
                before = gateway.snapshot()
                row = run_in_subprocess(args, size, style, gateway.port)
                time.sleep(0.05)  # let the gateway finish counting the last answers
                after = gateway.snapshot()
                row.update(gw_requests=after[0] - before[0], gw_notifications=after[1] - before[1],
                           gw_encrypted=after[2] - before[2], gw_cpu_s=after[3] - before[3])
                rows.append(row)
                s = row["stats"]
                expected = size if style == "single" else math.ceil(size / 100)
                print(f"N={size:,} {style}: register {row['register_s']:.2f}s "
                      f"({row['register_mode']}), enqueue {row['enqueue_s']:.3f}s "
                      f"({row['deliveries_queued']:,} queued), deliver {row['deliver_s']:.2f}s "
                      f"= {s['delivered'] / row['deliver_s']:,.0f}/s; delivered {s['delivered']:,}"
                      f", failed {s['failed']:,}, pending {s['pending']:,}; gateway got "
                      f"{row['gw_requests']:,} requests (expected {expected:,}) carrying "
                      f"{row['gw_notifications']:,} notifications ({row['gw_encrypted']:,} "
                      f"encrypted); {row['rounds']} rounds of {row['claim']}, "
                      f"{row['threads']} threads; worker CPU {row['worker_cpu_s']:.1f}s, "
                      f"gateway CPU {row['gw_cpu_s']:.1f}s; peak RSS {row['peak_rss_mib']:.0f} "
                      f"MiB (after registering {row['rss_after_register_mib']:.0f})"
                      + f"; load {os.getloadavg()[0]:.2f}"
                      + ("  [TIMED OUT]" if row.get("timed_out") else "")
                      + ("  [PROFILED]" if args.profile else ""), flush=True)
                phases = row["phases"]
                if phases:
                    print("    delivery wall time by phase: " + ", ".join(
                        f"{k} {v:.2f}s" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])))
    finally:
        gateway.close()

    print(f"\nload average at the end: {os.getloadavg()[0]:.2f} on "
          f"{len(os.sched_getaffinity(0))} CPUs (worker CPU well below deliver s means it waited "
          "for the gateway, the sending threads, or a busy machine)\n")
    print_table(rows)
    if args.profile:
        for row in rows:
            if row.get("profiles"):
                print_profiles(row["profiles"], args.profile_lines)


if __name__ == "__main__":
    main()
