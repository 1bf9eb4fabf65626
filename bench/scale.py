"""Growth benchmark: how latencies grow with stored deliveries and with users.

It prints figures; it never passes or fails on timing. For every number of users U (default
10^3, 10^4, 10^5) it builds a fresh database, then grows the stored deliveries D step by step
(default 10^4, 10^5, 10^6) and, at each (U, D), times five operations, each repeated
``--repeat`` times after one unmeasured warm-up run:

- ``GET /push/v1/pushers`` of a random user (test client: auth, query, JSON);
- ``POST /push/v1/notifications`` to a user with 50 devices (test client; 50 delivery rows
  are stored; afterwards, unmeasured, they are marked delivered so the queue stays the same);
- ``delivery.Worker(app).claim()`` with a few hundred due deliveries among the D stored ones
  (the claimed rows are released again, unmeasured);
- ``GET /push/v1/history/device/<pushkey>`` of a random device of a random user (its answer
  grows with D/U: the mean number of messages is shown);
- the hourly purge: ``models.purge_history(days)`` when models.py has it, else
  ``Worker.purge_history()``. History is spread over the last 30 days (``HISTORY_DAYS``), and
  repetition k moves the cut-off one hour later, so each run deletes one hour of history, as
  the hourly purge does in steady state (that is 1/720 of D per run; it runs last).

The warm-up run records the SQL each operation executes (peewee's query hooks); the script
prints every SELECT/UPDATE/DELETE's plan (SQLite: EXPLAIN QUERY PLAN; PostgreSQL: EXPLAIN),
marked "full scan" when a table is read whole, "index scan" when a whole index is walked, and
"index" when rows are found through an index: what reads more as D or U grows.

The database is filled with bulk SQL, not through the API: INSERT ... SELECT over recursive
CTEs (plain SQL that SQLite and PostgreSQL both run), one transaction per table and step.
Rows are shaped like real ones: users with 1-3 devices (two in three end-to-end encrypted,
with a real sealed key generation), a token each, a channel catalogue and explicit channel
states; notifications with JSON payloads and idempotency keys, spread over 30 days (stored in
time order, with ids that begin with their time, as the app stores them); per notification
one delivery per device of its user, mostly delivered, some failed for good;
plus recent pending deliveries, most of them due, some waiting for a retry.

    .venv/bin/python bench/scale.py                  # U 10^3..10^5 x D 10^4..10^6 (~10 min)
    .venv/bin/python bench/scale.py --quick          # a smoke run in well under a minute
    .venv/bin/python bench/scale.py --users 1000 --deliveries 10000,1000000 --repeat 50
    .venv/bin/python bench/scale.py --database-url postgresql://push@/push_scratch
"""

import argparse
import logging
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from urllib.parse import quote

from fanout import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the service's modules live at the repository root

import crypto  # noqa: E402
import delivery  # noqa: E402
import models  # noqa: E402
from app import create_app  # noqa: E402
from models import (  # noqa: E402
    MODELS, Delivery, Notification, Pusher, Service, Token, User, db, token_digest)

NOTIFY_CHANNEL = "erp.task.activate"
CATALOGUE = [(NOTIFY_CHANNEL, "enabled"), ("erp.task.close", "enabled"),
             ("erp.communication", "disabled"), ("erp.chargeitem", "disabled"),
             ("erp.news", "disabled")]
FANOUT_DEVICES = 50
HISTORY_DAYS = 30
GATEWAY_DATA = '{"url":"https://push.example.com/_matrix/push/v1/notify","format":"event_id_only"}'
HEX = "0123456789abcdef" * 8  # pushkeys are slices of it, 64 characters long
RECENT = 200  # recent notifications whose deliveries are pending (most due)


# --- filling --------------------------------------------------------------------------------


def run_sql(sql, *params):
    """Execute SQL written with ``?`` placeholders on SQLite or PostgreSQL (psycopg2: ``%s``,
    and a literal ``%`` doubled; so no ``?`` may appear inside a string literal)."""
    if db.param != "?":
        sql = sql.replace("%", "%%").replace("?", db.param)
    return db.execute_sql(sql, params)


def sequence():
    """A recursive CTE ``seq(i)`` counting from a first to a last value (both parameters)."""
    return ("WITH RECURSIVE seq(i) AS (SELECT CAST(? AS BIGINT) UNION ALL "
            "SELECT i + 1 FROM seq WHERE i < ?) ")


def padded(expression, width):
    """SQL for the integer ``expression`` in decimal digits, zero-padded to ``width``."""
    text = f"CAST({expression} AS TEXT)"
    return f"substr('{'0' * width}' || {text}, length({text}) + 1)"


# Seeded notification i, created at second t: its id begins with t in milliseconds, as the
# app's do (models.new_notification_id: time first, 32 characters), and its identifier names i.
SQL_NOTIFICATION_ID = f"{padded('t * 1000', 13)} || 's' || {padded('i', 18)}"
SQL_IDENTIFIER = f"'task-' || {padded('i', 12)}"


def identifier(i):
    """The idempotency key of seeded notification i (SQL_IDENTIFIER)."""
    return "task-" + str(i).zfill(12)


def fill_users(app, users):
    """Users 1..U with 1-3 devices and a token each, the catalogue, channel states, the
    sending service and the 50-device user; returns the service's id."""
    now = time.time()
    server_key = app.extensions["push_server_key"]
    iss = bytes(range(32))
    sealed = server_key.seal_generation("kid", crypto.first_generation(iss, "2025-01"))
    # Device k of user u exists for k <= 1 + u % 3; devices 1 and 2 are end-to-end encrypted.
    devices = 'FROM "user" u JOIN seq k ON k.i <= 1 + u.id % 3'
    with db.atomic():
        run_sql(sequence() + """INSERT INTO "user" (name, created_at)
                SELECT 'insurant-' || i, ? FROM seq""", 1, users, int(now))
        first, last, count = run_sql('SELECT MIN(id), MAX(id), COUNT(*) FROM "user"').fetchone()
        if (first, last, count) != (1, users, users):  # the SQL below relies on ids 1..U
            raise RuntimeError(f"user ids are not 1..{users}: {first}..{last} ({count})")
        run_sql(sequence() + """INSERT INTO "encryptionkey" (key_identifier, iss_fingerprint,
                                                             period, sealed)
                SELECT 'kid-' || u.id || '-' || k.i, ?, '2025-01', ? """ + devices + """
                WHERE k.i <= 2""", 1, 3, server_key.iss_fingerprint(iss), sealed)
        run_sql(sequence() + """INSERT INTO "pusher" (user_id, app_id, pushkey, kind,
                    app_display_name, device_display_name, lang, data, pushkey_ts,
                    encryption_key_id, created_at)
                SELECT u.id,
                    CASE WHEN u.id % 2 = 0 THEN 'de.gematik.erezept.ios'
                         ELSE 'de.gematik.erezept.android' END,
                    'pk-' || u.id || '-' || k.i || '-'
                        || substr(CAST(? AS TEXT), CAST(1 + (u.id * 7 + k.i) % 64 AS INTEGER), 64),
                    'http', 'E-Rezept', 'Phone ' || k.i, 'de', ?, ? - u.id % 86400, e.id,
                    ? - 86400 * 60 + u.id % 86400 + k.i
                """ + devices + """
                LEFT JOIN "encryptionkey" e ON e.key_identifier = 'kid-' || u.id || '-' || k.i""",
                1, 3, HEX, GATEWAY_DATA, int(now), now)
        for channel, default in CATALOGUE:
            run_sql('INSERT INTO "channel" (id, description, default_status) VALUES (?, ?, ?)',
                    channel, f"{channel} (bench)", default)
        # Every device turned erp.communication on; one in ten turned the sent channel off.
        run_sql("""INSERT INTO "channelstate" (user_id, pushkey, channel_id, status)
                SELECT user_id, pushkey, 'erp.communication', 'enabled' FROM "pusher" """)
        run_sql("""INSERT INTO "channelstate" (user_id, pushkey, channel_id, status)
                SELECT user_id, pushkey, ?, 'disabled' FROM "pusher" WHERE id % 10 = 0""",
                NOTIFY_CHANNEL)
        user_tokens = [{"digest": token_digest(f"pu_scale_{uid}"), "user": uid,
                        "created_at": int(now)} for uid in range(1, users + 1)]
        for start in range(0, len(user_tokens), 1000):
            Token.insert_many(user_tokens[start:start + 1000]).execute()
        service = Service.create(name="erp")
        Token.create(digest=token_digest("ps_scale"), service=service)
        fanout = User.create(name="fanout")
        Token.create(digest=token_digest("pu_scale_fanout"), user=fanout)
        Pusher.insert_many([
            {"user": fanout, "app_id": "de.gematik.erezept.ios", "kind": "http",
             "pushkey": f"fanout-{k}-" + HEX[k:k + 64], "app_display_name": "E-Rezept",
             "device_display_name": f"Device {k}", "lang": "de", "data": GATEWAY_DATA,
             "pushkey_ts": int(now)} for k in range(FANOUT_DEVICES)]).execute()
    return service.id


def fill_deliveries(target, users, service_id, next_j):
    """Add notifications and their deliveries until ``target`` deliveries are stored.

    Notification j goes to user 1 + (j * 7919) % U, created at a pseudo-random second of
    the last 30 days; each gets one delivery per device of its user (2 on average), the
    last one perhaps only some (as when a device has turned the channel off). Returns the
    next free j.
    """
    missing = target - Delivery.select().count()
    if missing <= 0:
        return next_j
    devices = Pusher.select().where(Pusher.user <= users).count()
    count = math.ceil(missing * users / devices * 1.05) + 10  # a margin for the LIMIT below
    last_j = next_j + count - 1
    now = int(time.time())
    if db.param == "?":
        # SQLite: a 512 MiB page cache for this connection (closed after the fill) keeps the
        # index updates in memory; the default 2 MiB makes a 10^6 fill twice as slow.
        db.execute_sql("PRAGMA cache_size = -524288")
    # Rows go in in the order of their times, as the app stores them.
    with db.atomic():
        run_sql(sequence() + """INSERT INTO "notification" (id, service_id, identifier, user_id,
                    channel, payload, prio, counts, created_at)
                SELECT """ + SQL_NOTIFICATION_ID + ", ?, " + SQL_IDENTIFIER + """,
                    1 + (i * 7919) % ?, ?,
                    '{"type":"erp.task.activate","task":"160.000.' || i || '.01",'
                        || '"title":"Neues E-Rezept","body":"Ein E-Rezept liegt in Ihrer '
                        || 'Apotheke bereit. Bitte holen Sie es dort ab.",'
                        || '"prescriptions":' || (1 + i % 3) || '}',
                    'high', '{"unread":' || (1 + i % 5) || '}', t
                FROM (SELECT i, ? - (i * 104729) % ? - 300 AS t FROM seq) s ORDER BY t""",
                next_j, last_j, service_id, users, NOTIFY_CHANNEL, now, HISTORY_DAYS * 86400)
        # One device in 97 has a gateway that refuses it: its deliveries failed for good.
        run_sql("""INSERT INTO "delivery" (notification_id, pusher_id, user_id, pushkey, state,
                    attempts, next_attempt_at, last_error, finished_at, created_at)
                SELECT n.id, p.id, p.user_id, p.pushkey,
                    CASE WHEN p.id % 97 = 0 THEN 'failed' ELSE 'delivered' END, 1, n.created_at,
                    CASE WHEN p.id % 97 = 0 THEN 'gateway answered 400: {"error":"bad token"}'
                    END, n.created_at + 1, n.created_at
                FROM "notification" n JOIN "pusher" p ON p.user_id = n.user_id
                WHERE n.service_id = ? AND n.identifier >= ? AND n.identifier <= ?
                ORDER BY n.created_at, p.id LIMIT ?""",
                service_id, identifier(next_j), identifier(last_j), missing)
    return last_j + 1


def fill_pending(users, service_id):
    """Recent notifications with pending deliveries: three in four due, the rest waiting
    for a retry in 15 minutes. Returns how many are due."""
    now = time.time()
    with db.atomic():
        run_sql(sequence() + """INSERT INTO "notification" (id, service_id, identifier, user_id,
                    channel, payload, prio, created_at)
                SELECT 'recent' || substr('00000000000000000000000000' || CAST(i AS TEXT),
                                          length(CAST(i AS TEXT)) + 1),
                    ?, 'recent-' || i, 1 + (i * 7919) % ?, ?,
                    '{"type":"erp.task.activate","task":"160.100.' || i || '.01"}', 'high', ? - i
                FROM seq""", 1, RECENT, service_id, users, NOTIFY_CHANNEL, now)
        run_sql("""INSERT INTO "delivery" (notification_id, pusher_id, user_id, pushkey, state,
                    attempts, next_attempt_at, last_error, created_at)
                SELECT n.id, p.id, p.user_id, p.pushkey, 'pending',
                    CASE WHEN p.id % 4 = 0 THEN 2 ELSE 0 END,
                    CASE WHEN p.id % 4 = 0 THEN ? ELSE n.created_at END,
                    CASE WHEN p.id % 4 = 0 THEN 'gateway answered 503' END, n.created_at
                FROM "notification" n JOIN "pusher" p ON p.user_id = n.user_id
                WHERE n.id LIKE 'recent%'""", now + 900)
    return (Delivery.select().where((Delivery.state == "pending")
                                    & (Delivery.next_attempt_at <= time.time())).count())


def database_size(path):
    """The SQLite file with its WAL, in MiB (None for other databases)."""
    if path is None:
        return None
    files = [path, path + "-wal"]
    return sum(os.path.getsize(f) for f in files if os.path.exists(f)) / 2**20


# --- query plans ----------------------------------------------------------------------------


class QueryLog:
    """Records the SQL run inside ``record()`` (peewee query hooks), to explain it later."""

    def __init__(self):
        self.statements = {}

    def hook(self, event):
        if re.match(r"\s*(SELECT|UPDATE|DELETE|WITH)\b", event.sql, re.IGNORECASE):
            self.statements.setdefault(event.sql, event.params)

    def record(self, action):
        db.obj.query_hooks.append(self.hook)
        try:
            return action()
        finally:
            db.obj.query_hooks.remove(self.hook)


def explain(sql, params):
    """(verdict, plan steps) of one statement: "full scan", "index scan" or "index"."""
    if db.param == "?":  # SQLite
        rows = db.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        tables = {alias: table for table, alias in re.findall(r'"(\w+)" AS "(\w+)"', sql)}
        steps = tuple(re.sub(r"\w+", lambda m: tables.get(m.group(0), m.group(0)), row[3])
                      for row in rows)
        # A subquery's rows kept aside ("MATERIALIZE h", then "SCAN h") are not a table.
        materialized = {step.split()[1] for step in steps if step.startswith("MATERIALIZE ")}
        if any(re.fullmatch(r"SCAN \w+", step) and step.split()[1] not in materialized
               for step in steps):
            return "full scan", steps
        if any(re.match(r"SCAN \w+ USING (COVERING )?INDEX", step) for step in steps):
            return "index scan", steps
        return "index", steps
    lines = [row[0] for row in db.execute_sql("EXPLAIN " + sql, params).fetchall()]
    steps = tuple(re.sub(r"\s+\(cost=.*$", "", line).replace("->", "").strip()
                  for line in lines if "cost=" in line)
    if any("Seq Scan" in step for step in steps):
        return "full scan", steps
    return "index", steps


def abridged(sql, width=120):
    """A statement shortened for print: no column list, no long IN lists."""
    sql = " ".join(sql.split())
    sql = re.sub(r"^SELECT .*? FROM ", "SELECT … FROM ", sql)
    sql = re.sub(r"\((\?|%s)(, (\?|%s))+\)", "(?, …)", sql)
    return sql if len(sql) <= width else sql[:width - 1] + "…"


# --- the measured operations ----------------------------------------------------------------


class Operations:
    """The five measured operations on one database; each returns (seconds, detail).

    Only the call being measured is timed (and, in the warm-up, has its SQL recorded);
    the bookkeeping around it (picking a user, putting the queue back) is not.
    """

    LABELS = {
        "get_pushers": "GET /push/v1/pushers (a random user's 1-3 devices)",
        "send": f"POST /push/v1/notifications to a user with {FANOUT_DEVICES} devices",
        "claim": "Worker.claim() of due deliveries",
        "history": "GET /push/v1/history/device/<pushkey> (a random device)",
        "purge": "hourly purge (one hour of history per run)",
    }

    def __init__(self, app, users, rng):
        self.app, self.users, self.rng = app, users, rng
        self.client = app.test_client()
        self.worker = delivery.Worker(app)
        self.log = None
        self.sent = 0
        self.purge_runs = 0
        self.purge_function = getattr(models, "purge_history", None)

    def timed(self, action):
        start = time.perf_counter()
        result = self.log.record(action) if self.log else action()
        return time.perf_counter() - start, result

    def get_pushers(self):
        user = self.rng.randint(1, self.users)
        headers = {"Authorization": f"Bearer pu_scale_{user}"}
        seconds, response = self.timed(lambda: self.client.get("/push/v1/pushers",
                                                               headers=headers))
        expect(response, 200)
        return seconds, None

    def send(self):
        self.sent += 1
        body = {"user_id": "fanout", "channel": NOTIFY_CHANNEL, "prio": "high",
                "identifier": f"scale-{self.sent}", "counts": {"unread": self.sent % 9},
                "payload": {"type": NOTIFY_CHANNEL, "task": f"160.200.{self.sent}.01",
                            "title": "Neues E-Rezept", "body": "Ein E-Rezept liegt bereit."}}
        headers = {"Authorization": "Bearer ps_scale"}
        seconds, response = self.timed(lambda: self.client.post(
            "/push/v1/notifications", json=body, headers=headers))
        expect(response, 202)
        answer = response.get_json()
        if answer["deliveries"] != FANOUT_DEVICES:
            raise RuntimeError(f"the send made {answer['deliveries']} deliveries")
        with db.connection_context():  # as if a worker had sent them: the queue stays put
            (Delivery.update(state="delivered", attempts=1, finished_at=time.time())
             .where(Delivery.notification == answer["notification_id"]).execute())
        return seconds, None

    def claim(self):
        with self.app.app_context():
            db.connect(reuse_if_open=True)
            seconds, ids = self.timed(self.worker.claim)
            (Delivery.update(lease_owner=None, lease_until=None)
             .where(Delivery.id.in_(ids)).execute())
        return seconds, len(ids)

    def history(self):
        user = self.rng.randint(1, self.users)
        with db.connection_context():
            pushkeys = [p.pushkey for p in Pusher.select(Pusher.pushkey)
                        .where(Pusher.user == user)]
        path = "/push/v1/history/device/" + quote(self.rng.choice(pushkeys), safe="")
        headers = {"Authorization": f"Bearer pu_scale_{user}"}
        seconds, response = self.timed(lambda: self.client.get(path, headers=headers))
        expect(response, 200)
        return seconds, len(response.get_json()["messages"])

    def purge(self):
        """Run k uses a cut-off k hours later than HISTORY_DAYS (run 0, the warm-up, none)."""
        days = HISTORY_DAYS - self.purge_runs / 24
        self.purge_runs += 1
        with self.app.app_context():
            db.connect(reuse_if_open=True)
            if self.purge_function is not None:
                seconds, removed = self.timed(lambda: self.purge_function(days))
            else:
                self.app.config["HISTORY_DAYS"] = days
                seconds, removed = self.timed(self.worker.purge_history)
        return seconds, removed if isinstance(removed, int) else None

    def close(self):
        self.worker.close()
        if not db.is_closed():
            db.close()


def expect(response, status):
    if response.status_code != status:
        raise RuntimeError(f"{response.request.method} {response.request.path}: "
                           f"{response.status_code} {response.get_data(as_text=True)[:300]}")


def measure(ops, name, repeat):
    """Warm up (recording the SQL), then time ``repeat`` runs; returns the cell's figures."""
    ops.log = QueryLog()
    getattr(ops, name)()
    log, ops.log = ops.log, None
    with db.connection_context():
        plans = {abridged(sql): explain(sql, params) for sql, params in log.statements.items()}
    runs = [getattr(ops, name)() for _ in range(repeat)]
    times = sorted(seconds * 1000 for seconds, _ in runs)
    details = [detail for _, detail in runs if detail is not None]
    return {"median": statistics.median(times),
            "p95": times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)],
            "detail": statistics.mean(details) if details else None, "plans": plans}


# --- the run --------------------------------------------------------------------------------


def power(n):
    """10^k for powers of ten, else the number with separators."""
    k = round(math.log10(n)) if n > 0 else 0
    return f"10^{k}" if 10**k == n else f"{n:,}"


DETAILS = {"claim": "{:.0f} claimed", "history": "{:.0f} msgs", "purge": "{:.0f} purged"}


def print_results(results, users_sizes, delivery_sizes):
    """One table per operation (users down, deliveries across) with its query plans."""
    for name, label in Operations.LABELS.items():
        print(f"\n## {label}\n   median / p95 ms over the repetitions")
        cells = {key: value[name] for key, value in results.items()}
        detail = DETAILS.get(name)
        header = ["users \\ deliveries"] + [power(d) for d in delivery_sizes]
        lines = [header]
        for u in users_sizes:
            line = [power(u)]
            for d in delivery_sizes:
                cell = cells.get((u, d))
                text = "-" if cell is None else f"{cell['median']:.2f} / {cell['p95']:.2f}"
                if cell and detail and cell["detail"] is not None:
                    text += ", " + detail.format(cell["detail"])
                line.append(text)
            lines.append(line)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        for line in lines:
            print("   " + "  ".join([line[0].ljust(widths[0])]
                                    + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]))
        print("   query plans (from each cell's warm-up run):")
        statements = {}  # statement -> {plan: cells}, in the order the operation ran them
        for key, cell in cells.items():
            for sql, plan in cell["plans"].items():
                statements.setdefault(sql, {}).setdefault(plan, []).append(key)
        for sql, plans in statements.items():
            for (verdict, steps), keys in plans.items():
                where = "" if len(plans) == 1 else "  [only at " + ", ".join(
                    f"U={power(u)} D={power(d)}" for u, d in sorted(keys)) + "]"
                print(f"   {verdict:>10}  {sql}{where}")
                for step in steps:
                    print(f"   {'':>10}    {step}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", default="10000,100000,1000000",
                        help="comma-separated stored delivery counts, grown in this order")
    parser.add_argument("--users", default="1000,10000,100000",
                        help="comma-separated user counts (one fresh database each)")
    parser.add_argument("--repeat", type=int, default=20, help="measured runs per cell")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 100 and 1,000 users, 10^3 and 10^4 deliveries, "
                             "5 runs per cell (overrides the three options above)")
    parser.add_argument("--database-url", default=None,
                        help="a scratch database (e.g. postgresql://...): its tables are "
                             "DROPPED and made anew for every user count (default: SQLite "
                             "files in a temporary folder)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random picks")
    args = parser.parse_args()
    if args.quick:
        args.users, args.deliveries, args.repeat = "100,1000", "1000,10000", 5
    return args


def print_header(args):
    print("# growth benchmark: latency against stored deliveries and users")
    for name, value in machine():
        print(f"{name:>9}: {value}")
    print(f"{'command':>9}: {' '.join([os.path.relpath(sys.executable, ROOT)] + sys.argv)}")
    database = args.database_url or "SQLite (WAL, synchronous=FULL), a fresh file per user count"
    purge = ("models.purge_history(days)" if hasattr(models, "purge_history")
             else "delivery.Worker(app).purge_history()")
    print(f"{'database':>9}: {database}")
    print(f"{'purge':>9}: {purge}")
    print(f"{'method':>9}: {args.repeat} timed runs per cell after 1 warm-up; test client "
          "in-process, no HTTP server; the delivery worker does not run\n", flush=True)


def fill_database(args, app, users):
    """A fresh database of ``users`` users with their due deliveries; returns the service id."""
    if args.database_url:
        db.drop_tables(MODELS)
        db.create_tables(MODELS)
    start = time.perf_counter()
    service_id = fill_users(app, users)
    due = fill_pending(users, service_id)
    print(f"U={power(users)}: {users:,} users, "
          f"{Pusher.select().count():,} pushers, {due} due deliveries "
          f"filled in {time.perf_counter() - start:.1f} s", flush=True)
    return service_id


def grow_and_measure(args, ops, users, service_id, delivery_sizes, sqlite_file, results):
    """Grow the stored deliveries to each size in turn and time every operation there."""
    next_j = 1
    for target in delivery_sizes:
        with db.connection_context():
            start = time.perf_counter()
            next_j = fill_deliveries(target, users, service_id, next_j)
            if args.database_url:
                db.execute_sql("ANALYZE")  # what autovacuum would soon do
            stored = Delivery.select().count()
            notifications = Notification.select().count()
        fill_s = time.perf_counter() - start
        size = database_size(sqlite_file)
        print(f"  D={power(target)}: {stored:,} deliveries, {notifications:,} "
              f"notifications (filled in {fill_s:.1f} s"
              + (f"; file {size:,.0f} MiB" if size is not None else "") + ")",
              end="", flush=True)
        cell = {name: measure(ops, name, args.repeat) for name in Operations.LABELS}
        results[(users, target)] = cell
        print("; measured: " + ", ".join(f"{n} {c['median']:.2f} ms"
                                          for n, c in cell.items()), flush=True)


def main():
    args = parse_args()
    users_sizes = [int(s) for s in args.users.split(",")]
    delivery_sizes = sorted(int(s) for s in args.deliveries.split(","))
    for key in [k for k in os.environ if k.startswith("PUSH_")]:
        del os.environ[key]  # the shell's settings would skew the figures
    logging.basicConfig(level=logging.WARNING)  # no INFO line per purge
    print_header(args)

    rng = random.Random(args.seed)
    results = {}
    started = time.monotonic()
    for users in users_sizes:
        folder = tempfile.mkdtemp(prefix="push-scale-")
        try:
            config = {"EMBEDDED_WORKER": False, "RATE_LIMIT_ENABLED": False}
            if args.database_url:
                config["DATABASE_URL"] = args.database_url
            app = create_app(config, instance_path=folder)
            sqlite_file = None if args.database_url else os.path.join(folder, "push.sqlite3")
            with db.connection_context():
                service_id = fill_database(args, app, users)
            ops = Operations(app, users, rng)
            grow_and_measure(args, ops, users, service_id, delivery_sizes, sqlite_file, results)
            ops.close()
        finally:
            if not db.is_closed():
                db.close()
            shutil.rmtree(folder, ignore_errors=True)

    print(f"\ntotal {time.monotonic() - started:.0f} s; load average at the end: "
          f"{'%.2f %.2f %.2f' % os.getloadavg()}")
    print_results(results, users_sizes, delivery_sizes)


if __name__ == "__main__":
    main()
