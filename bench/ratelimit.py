"""Rate-limit cost benchmark: what counting a request costs, alone and under contention.

It prints figures; it never passes or fails on timing. Three measurements, each on a
temporary instance folder:

1. ``SqliteCounters.hit`` in one process: microseconds per hit (100 keys, round robin);
2. the same from P processes at once on one counters file (the fcntl lock under contention):
   hits per second in total and the mean microseconds per hit seen by each process;
3. GET /push/v1/pushers through the Flask test client with rate limits off and on: the
   difference is what the limit adds to a request (its one statement, plus the once-a-minute
   purge).

    .venv/bin/python bench/ratelimit.py
    .venv/bin/python bench/ratelimit.py --hits 50000 --procs 4 --requests 5000
"""

import argparse
import multiprocessing
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from models import SqliteCounters  # noqa: E402


def hammer(path, hits, start_at, results):
    """Count ``hits`` hits on 100 keys once ``start_at`` comes; report microseconds per hit."""
    counters = SqliteCounters(path)
    counters.hit("warm-up", time.time())
    time.sleep(max(0.0, start_at - time.time()))
    began = time.perf_counter()
    for n in range(hits):
        counters.hit(f"user:{n % 100}", time.time())
    results.put((time.perf_counter() - began) / hits * 1e6)


def counters_alone(folder, hits):
    path = os.path.join(folder, "alone.sqlite3")
    SqliteCounters(path).setup()
    queue = multiprocessing.Queue()
    hammer(path, hits, 0, queue)
    print(f"1. one process:   {queue.get():6.1f} µs per hit ({hits} hits)")


def counters_contended(folder, hits, procs):
    path = os.path.join(folder, "shared.sqlite3")
    SqliteCounters(path).setup()
    queue = multiprocessing.Queue()
    start_at = time.time() + 1.0
    workers = [multiprocessing.Process(target=hammer, args=(path, hits, start_at, queue))
               for _ in range(procs)]
    for worker in workers:
        worker.start()
    began = time.time()
    per_hit = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    elapsed = time.time() - max(began, start_at)
    print(f"2. {procs} processes: {procs * hits / elapsed:8.0f} hits/s in total, "
          f"{sum(per_hit) / procs:6.1f} µs per hit seen by each ({hits} hits each)")


def request_cost(folder, requests):
    from support import TEST_CONFIG, bearer, cli_token

    from app import create_app

    timings = {}
    for enabled in (False, True):
        app = create_app({**TEST_CONFIG, "RATE_LIMIT_ENABLED": enabled,
                          "RATE_LIMIT_PER_MINUTE": 10**9},
                         instance_path=os.path.join(folder, f"instance-{enabled}"))
        alice = bearer(cli_token(app.test_cli_runner(), "users", "create", "alice"))
        client = app.test_client()
        for _ in range(200):
            client.get("/push/v1/pushers", headers=alice)
        began = time.perf_counter()
        for _ in range(requests):
            client.get("/push/v1/pushers", headers=alice)
        timings[enabled] = (time.perf_counter() - began) / requests * 1e6
    print(f"3. GET /push/v1/pushers: {timings[False]:6.1f} µs off, {timings[True]:6.1f} µs on:"
          f" {timings[True] - timings[False]:+.1f} µs per request ({requests} requests each)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hits", type=int, default=20000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as folder:
        counters_alone(folder, args.hits)
        counters_contended(folder, args.hits, args.procs)
        request_cost(folder, args.requests)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
