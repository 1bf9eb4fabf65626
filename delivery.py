"""Delivery of stored notifications to push gateways (SPEC section 5).

Every (notification, pusher) pair is a ``Delivery`` row. A worker claims due rows under a lease
(so no two workers send the same one), builds the gateway request at send time (so a retry in
a new month is sealed with the new month's key), sends it, and records the outcome:

- 2xx: delivered; a pushkey in ``rejected`` that we sent removes its pusher.
- 429, 5xx, timeouts, refused connections, untrusted certificates: retried with exponential
  backoff.
- any other answer: failed for good, with the reason kept.
- except that some answers ask for the same deliveries again in other requests (``follow_ups``
  in gateway.py): a batch refused for its size goes again in smaller batches, and a
  notifyEncrypted/batch that a seed-era gateway lacks (404, 405) goes to its /notify. The
  sending thread hands these requests back; they wait for a slot like any other, under the
  original's leases and latest start, and their outcomes are recorded as they end.

No one waits on strangers. The worker is a pipeline, not a series of rounds: its loop (``step``)
writes the outcome of each request as soon as it ends (together with those that ended in the
same few milliseconds: one commit for many), starts requests as sending threads and gateways
allow, and claims more while there is room, whatever is still under way. A request ends within
its deadline (``GatewayClient``: connect + read timeout in all). Gateways are kept apart
(``Throttle``, in each worker's memory): at most ``PUSH_GATEWAY_CONCURRENCY`` requests in flight
per gateway host, and a host that fails transiently is paused as a whole, its deliveries (new
ones too) handed back untried, due when the pause ends, no attempt counted. Work waiting for a
slow host does not stop the worker from claiming work for others.

Leases: a request starts only while its lease covers the request's deadline and time to
write its outcome, so no other worker can take a delivery over while it is being sent or
before its outcome is written; a delivery that waited too long for a slot is handed back
untried. Without a crash nothing is sent twice. A lease names its owner's host, process id
and process start time; a worker starting on a host releases at once the leases of that host's
processes that are gone (a crash, a ``kill -9``), and their deliveries are sent again, the one
case where a gateway may get a notification twice. Leases of other hosts lapse after
``PUSH_DELIVERY_LEASE_SECONDS``.

A worker runs inside each server process by default (``PUSH_EMBEDDED_WORKER``; ``init_app``
says where exactly) and as ``flask --app app worker``. What a request looks like and what a
gateway's answer means live in ``gateway.py``; this module is the queue: claim, send, record.
"""

import logging
import os
import queue
import random
import secrets
import signal
import socket
import threading
import time
import weakref
from bisect import insort
from collections import deque, namedtuple
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from peewee import SqliteDatabase, fn

import crypto
import metrics
from gateway import (
    BlockedAddress,
    GatewayClient,
    GatewayMemory,
    Outcome,
    Unsendable,
    follow_ups,
    group_into_jobs,
    outcomes_for,
    redact,
    request_for,
)
from models import (
    Delivery,
    EncryptionKey,
    Pusher,
    chunks,
    db,
    delete_pusher,
    marks,
    purge_audit,
    purge_history,
    rows,
    run,
    transaction,
)

log = logging.getLogger("push.delivery")

#: A gateway none of whose requests has started or ended for this long, while more work for
#: it waits, is slow: the worker claims past its waiting work (a healthy gateway answers in
#: well under a second, and frees a slot every moment while it has a backlog).
SLOW_GATEWAY_SECONDS = 1.0

#: Outcomes are written at most this long after their request ended, in one transaction with
#: those that ended meanwhile: under load, one commit (one fsync) for many outcomes.
RECORD_WINDOW_SECONDS = 0.05

#: Deliveries waiting for a slow gateway are held in memory up to this many claims' worth
#: (PUSH_WORKER_CLAIM each); beyond it the worker claims nothing more until some have gone.
HELD_CLAIMS = 10

# The rows a worker reads for the deliveries it claimed, as named tuples with the models'
# attribute names: read with plain SQL, since building thousands of model instances (and the
# SQL of their ``IN`` lists) cost the stepping thread more than everything else it does.
ClaimedDelivery = namedtuple(
    "ClaimedDelivery", "id notification_id pusher_id pushkey attempts created_at")
NotificationRow = namedtuple("NotificationRow", "id channel payload prio counts")
PusherRow = namedtuple("PusherRow", "id app_id pushkey pushkey_ts data encryption_key_id")
KeyRow = namedtuple("KeyRow", "id key_identifier period sealed")

DUE = ("SELECT id FROM delivery WHERE state = 'pending' AND next_attempt_at <= ?"
       " AND (lease_until IS NULL OR lease_until < ?) ORDER BY next_attempt_at LIMIT ?")
LEASE = "UPDATE delivery SET lease_owner = ?, lease_until = ? WHERE id IN ({})"
CLAIMED = ("SELECT id, notification_id, pusher_id, pushkey, attempts, created_at FROM delivery"
           " WHERE id IN ({}) ORDER BY next_attempt_at, id")
NOTIFICATIONS = "SELECT id, channel, payload, prio, counts FROM notification WHERE id IN ({})"
PUSHERS = ("SELECT id, app_id, pushkey, pushkey_ts, data, encryption_key_id FROM pusher"
           " WHERE id IN ({})")
KEYS = "SELECT id, key_identifier, period, sealed FROM encryptionkey WHERE id IN ({})"
DELIVERED = ("UPDATE delivery SET state = 'delivered', attempts = attempts + 1,"
             " lease_owner = NULL, lease_until = NULL, last_error = NULL, finished_at = ?"
             " WHERE lease_owner = ? AND id IN ({})")


def rows_in(statement, ids, *params):
    """Every row of ``statement`` (``{}`` for an ``IN`` list, after ``params``) for ``ids``,
    a chunk of them at a time."""
    return [row for chunk in chunks(list(ids))
            for row in rows(statement.format(marks(len(chunk))), *params, *chunk)]


_listeners = weakref.WeakSet()  # the ``ready`` events of this process's workers
_listeners_lock = threading.Lock()
_embedded = {"pid": None, "app": None, "stop": None, "thread": None}
_embedded_lock = threading.Lock()


def wake():
    """Tell this process's workers that new deliveries are queued."""
    with _listeners_lock:
        events = list(_listeners)
    for event in events:
        event.set()


def current_period():
    """The current month in UTC, as "YYYY-MM"."""
    return datetime.now(timezone.utc).strftime("%Y-%m")


def retry_delay(config, attempts, retry_after=None):
    """Seconds until the next try after ``attempts`` failed ones.

    Exponential backoff: RETRY_INITIAL_SECONDS doubling after each failure, capped at
    RETRY_MAX_SECONDS (Synapse's httppusher: 1 s to 1 h), and never sooner than a gateway's
    Retry-After asks, within the same cap.
    """
    delay = min(config["RETRY_INITIAL_SECONDS"] * 2 ** (attempts - 1),
                config["RETRY_MAX_SECONDS"])
    try:
        delay = max(delay, min(float(retry_after), config["RETRY_MAX_SECONDS"]))
    except (TypeError, ValueError):
        pass
    return delay


def retry_seconds(outcome):
    """An outcome's Retry-After in seconds (0 when it has none or none that reads as such)."""
    try:
        return float(outcome.retry_after)
    except (TypeError, ValueError):
        return 0.0


# --- lease owners -----------------------------------------------------------------------------


def process_start(pid):
    """When process ``pid`` started (clock ticks after boot, from /proc), or None if no such
    process runs (a zombie is dead) or /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name before it may hold anything
    return None if fields[0] in ("Z", "X") else fields[19]


def this_host():
    """This machine's name as lease owners carry it: at most 24 characters, a longer name cut
    and ended with a hash of the whole (two hosts must not share a name here)."""
    host = socket.gethostname()
    return host if len(host) <= 24 else host[:15] + "~" + sha256(host.encode()).hexdigest()[:8]


def lease_owner():
    """A new owner name, "host:pid:start time:random": the random part tells apart two workers
    of one process. At most 24 + 7 + 20 + 8 + 3 = 62 characters (the column holds 64)."""
    pid = os.getpid()
    return f"{this_host()}:{pid}:{process_start(pid) or '-'}:{secrets.token_hex(4)}"


def owner_is_dead(owner, host):
    """Whether ``owner`` names a process of ``host`` (this one) that no longer runs: its pid
    is gone, or taken by a process that started at another time."""
    parts = owner.rsplit(":", 3)
    if len(parts) != 4 or parts[0] != host or not parts[1].isdigit() or parts[2] == "-":
        return False  # another host, or an owner we cannot judge: its lease lapses
    return process_start(int(parts[1])) != parts[2]


def release_dead_leases():
    """Release the leases held by this host's dead processes; return how many.

    Their deliveries are due again at once instead of after PUSH_DELIVERY_LEASE_SECONDS.
    """
    if process_start(os.getpid()) is None:
        return 0  # no /proc here: we cannot tell a live process from a dead one
    host = this_host()
    owners = (Delivery.select(Delivery.lease_owner).distinct()
              .where((Delivery.state == "pending") & Delivery.lease_owner.startswith(host + ":")))
    dead = [owner for (owner,) in owners.tuples() if owner_is_dead(owner, host)]
    if not dead:
        return 0
    with transaction():
        released = (Delivery.update(lease_owner=None, lease_until=None)
                    .where((Delivery.state == "pending") & Delivery.lease_owner.in_(dead))
                    .execute())
    log.warning("released %d deliveries leased by %d processes of this host that are gone",
                released, len(dead))
    return released


# --- fairness between gateways ----------------------------------------------------------------


class GatewayState:
    """What a worker knows of one gateway host: requests in flight, trouble, last movement."""

    def __init__(self):
        self.in_flight = 0
        self.failures = 0  # transient failures in a row
        self.paused_until = 0.0  # unix time
        self.moved = time.monotonic()  # when a request to it last started or ended


class Throttle:
    """Which gateway hosts (host and port of the URL) a worker may send to now.

    A host gets at most GATEWAY_CONCURRENCY requests at once, so a slow one cannot take every
    sending thread. A host whose request failed transiently (network error, deadline,
    untrusted certificate, 429, 5xx) is paused as a whole: GATEWAY_PAUSE_INITIAL_SECONDS,
    doubling with each failure in a row up to GATEWAY_PAUSE_MAX_SECONDS, each pause drawn
    between half and all of that (jitter: workers paused together do not all come back
    together). After a pause one request at a time tries the host; the first success ends its
    trouble. The state lives in this worker's memory: each server process learns by itself
    that a gateway fails, at the cost of a request or so.
    """

    def __init__(self, config):
        self.cap = max(1, config["GATEWAY_CONCURRENCY"])
        self.initial = config["GATEWAY_PAUSE_INITIAL_SECONDS"]
        self.maximum = config["GATEWAY_PAUSE_MAX_SECONDS"]
        self.hosts = {}

    def paused_until(self, host):
        """The unix time a paused host may be tried again, or None if it is not paused."""
        state = self.hosts.get(host)
        return state.paused_until if state and state.paused_until > time.time() else None

    def may_start(self, host):
        """Whether a request to ``host`` may start now."""
        state = self.hosts.get(host)
        if state is None:
            return True
        if state.failures:  # in trouble: one request at a time, once the pause is over
            return state.in_flight == 0 and state.paused_until <= time.time()
        return state.in_flight < self.cap

    def started(self, host):
        """A request to ``host`` started."""
        state = self.hosts.setdefault(host, GatewayState())
        state.in_flight += 1
        state.moved = time.monotonic()

    def finished(self, host, failed):
        """A request to ``host`` ended; ``failed`` if it failed transiently."""
        state = self.hosts[host]
        state.in_flight -= 1
        state.moved = time.monotonic()
        if failed:
            state.failures += 1
            pause = min(self.initial * 2 ** (state.failures - 1), self.maximum)
            state.paused_until = time.time() + pause * random.uniform(0.5, 1.0)
        else:
            state.failures, state.paused_until = 0, 0.0
        if not state.in_flight and not state.failures:
            del self.hosts[host]  # nothing worth remembering

    def slow(self, host):
        """Whether ``host`` has had requests in flight and none started or ended for a while."""
        state = self.hosts.get(host)
        return (state is not None and state.in_flight > 0
                and time.monotonic() - state.moved > SLOW_GATEWAY_SECONDS)


# --- the worker -------------------------------------------------------------------------------


class Worker:
    """Claims due deliveries, sends them, records outcomes. One per process or command.

    The loop (``run``) calls ``step`` whenever a request ends, new work is announced or the
    poll interval passes; ``run_once`` drives the same steps to completion for tests (``with
    Worker(app) as worker:`` closes it after). All
    database work happens in the thread that steps; the sending threads only talk HTTP and
    hand their outcomes back through ``finished``.
    """

    def __init__(self, app):
        self.app = app
        self.config = app.config
        self.owner = lease_owner()
        self.threads = max(1, self.config["WORKER_THREADS"])
        self.client = GatewayClient(self.config, max(1, self.config["GATEWAY_CONCURRENCY"]))
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="push-send")
        self.throttle = Throttle(self.config)
        self.memory = GatewayMemory()
        self.server_key = app.extensions["push_server_key"]
        lease = self.config["DELIVERY_LEASE_SECONDS"]
        request_time = (self.config["GATEWAY_CONNECT_TIMEOUT"]
                        + self.config["GATEWAY_READ_TIMEOUT"])
        # A request starts only while this much of its lease is left: its deadline, and half
        # of the lease's slack to write its outcome after it (a busy database may make that
        # wait); the other half of the slack is for waiting for a free slot.
        self.start_margin = request_time + max(0.0, lease - request_time) / 2
        self.waiting = {}  # gateway host -> deque of (job, latest start as unix time)
        self.in_flight = 0
        # (job, its latest start, outcomes, failed, jobs to send again) from sending threads
        self.finished = queue.SimpleQueue()
        self.unrecorded = []  # outcomes collected but not written yet
        self.unrecorded_since = 0.0  # when the first of them was collected (monotonic)
        self.ready = threading.Event()  # set when a request ends or work is announced
        with _listeners_lock:
            _listeners.add(self.ready)
        self.last_purge = 0.0
        self.checked_urls = {}  # gateway URL -> why it is not allowed, or None (request_for)

    def run_once(self):
        """Claim what is due, send it and wait until every outcome is written; return how many
        deliveries were claimed (tests and benchmarks drive the worker with this)."""
        claimed = self.step()
        while self.in_flight or self.waiting or self.unrecorded:
            self.ready.wait(self.wait_time(1.0))
            self.ready.clear()
            self.step(claim=False)
        return claimed

    def step(self, claim=True):
        """Write what has ended, start what may start, claim more while there is room; return
        how many deliveries were claimed."""
        self.collect()
        self.start_waiting()  # first, so that the sending threads work while we write
        self.write_outcomes()
        claimed = 0
        while claim and self.room_to_claim():
            start_by = time.time() + self.config["DELIVERY_LEASE_SECONDS"] - self.start_margin
            ids = self.claim()
            if not ids:
                break
            claimed += len(ids)
            self.queue(ids, start_by)
            if self.start_waiting():
                break  # what was just handed back would be claimed again at once
        return claimed

    def room_to_claim(self):
        """Whether to claim more now: a sending thread is free, and all that waits for a slot
        waits for a slow gateway (one that frees slots every moment is worked through first)."""
        if self.in_flight >= self.threads:
            return False
        if not all(self.throttle.slow(host) for host in self.waiting):
            return False
        held = sum(len(job.items) for jobs in self.waiting.values() for job, _ in jobs)
        return held < HELD_CLAIMS * self.config["WORKER_CLAIM"]

    def wait_time(self, poll):
        """How long the loop may sleep: until the poll interval, the moment outcomes are due to
        be written, the first waiting request's latest start, or the moment a gateway with
        waiting work counts as slow."""
        times = [poll]
        if self.unrecorded:
            times.append(self.record_wait())
        if self.waiting:
            first = min(jobs[0][1] for jobs in self.waiting.values())
            times += [SLOW_GATEWAY_SECONDS, first - time.time()]
        return max(0.0, min(times))

    def claim(self):
        """Lease up to WORKER_CLAIM due deliveries to this worker; return their ids."""
        current = time.time()
        due = DUE if isinstance(db.obj, SqliteDatabase) else DUE + " FOR UPDATE SKIP LOCKED"
        with transaction():
            ids = [row[0] for row in rows(due, current, current, self.config["WORKER_CLAIM"])]
            if ids:
                run(LEASE.format(marks(len(ids))), self.owner,
                    current + self.config["DELIVERY_LEASE_SECONDS"], *ids)
        return ids

    def queue(self, ids, start_by):
        """Build the requests for claimed deliveries and line them up by gateway host; those
        for a paused host go back untried, due when its pause ends."""
        deliveries = [ClaimedDelivery(*row) for row in rows_in(CLAIMED, ids)]  # oldest first
        unsendable, paused = [], {}
        for job in self.build_jobs(deliveries, unsendable):
            until = self.throttle.paused_until(job.host)
            if until:
                paused.setdefault(until, []).extend(job.deliveries)
            else:
                self.waiting.setdefault(job.host, deque()).append((job, start_by))
        self.record(unsendable)
        for until, waiting in paused.items():
            self.release(waiting, due=until)

    # building

    def build_jobs(self, deliveries, outcomes):
        """Group deliveries into gateway requests; unsendable ones go straight to outcomes."""
        notifications = {row[0]: NotificationRow(*row) for row in rows_in(
            NOTIFICATIONS, {d.notification_id for d in deliveries})}
        pushers = {row[0]: PusherRow(*row) for row in rows_in(
            PUSHERS, {d.pusher_id for d in deliveries if d.pusher_id})}
        generations = self.generations_for(
            {p.encryption_key_id for p in pushers.values() if p.encryption_key_id is not None},
            current_period())
        requests = []
        for d in deliveries:
            pusher = pushers.get(d.pusher_id)
            if pusher is None:
                outcomes.append(Outcome(d, "failed", "pusher removed before delivery"))
                continue
            try:
                request = request_for(pusher, notifications[d.notification_id], generations,
                                      self.checked_urls)
            except Unsendable as e:
                outcomes.append(Outcome(d, "failed", str(e)))
                continue
            except Exception as e:  # one bad row must not stall the others
                log.exception("could not build delivery %s", d.id)
                outcomes.append(Outcome(d, "failed", f"could not build the request: {e!r}"[:300]))
                continue
            requests.append((d, request))
        return group_into_jobs(requests, self.config["GATEWAY_MAX_BATCH_BYTES"], self.memory)

    def generations_for(self, key_ids, period):
        """{key id: (key_identifier, generation for ``period``)} for a claim's keys.

        Keys behind ``period`` are ratcheted forward and stored before use, all in one
        transaction; a key another worker moved meanwhile is read again.
        """
        found, behind = {}, []
        keys = [KeyRow(*row) for row in rows_in(KEYS, key_ids)]
        while keys:
            for key in keys:
                try:
                    generation = self.server_key.open_generation(key.key_identifier,
                                                                 key.period, key.sealed)
                except InvalidTag:
                    log.error("key generation %s does not open with this server key", key.id)
                    continue
                if generation.period >= period:
                    found[key.id] = (key.key_identifier, generation)
                else:
                    behind.append((key, crypto.ratchet(generation, period)))
            moved = []
            if behind:
                with transaction():
                    for key, newer in behind:
                        if self.store_generation(key, newer):
                            found[key.id] = (key.key_identifier, newer)
                        else:
                            moved.append(key.id)
            behind = []
            keys = [KeyRow(*row) for row in rows_in(KEYS, moved)]
        return found

    def store_generation(self, key, newer):
        """Replace ``key``'s generation with ``newer`` unless another worker moved it first."""
        sealed = self.server_key.seal_generation(key.key_identifier, newer)
        return (EncryptionKey.update(period=newer.period, sealed=sealed)
                .where((EncryptionKey.id == key.id) & (EncryptionKey.period == key.period))
                .execute())

    # sending

    def start_waiting(self):
        """Start waiting requests whose gateway has a free slot; hand back untried those of a
        gateway that has been paused, due when the pause ends, and those whose lease would no
        longer cover them, due at once (returns how many of the latter)."""
        current = time.time()
        late = []
        for host, jobs in list(self.waiting.items()):
            while jobs and jobs[0][1] < current:  # claimed together, so the oldest come first
                late.extend(jobs.popleft()[0].deliveries)
            until = self.throttle.paused_until(host)
            if until:
                self.release([d for job, _ in jobs for d in job.deliveries], due=until)
                jobs.clear()
            while jobs and self.in_flight < self.threads and self.throttle.may_start(host):
                self.start(*jobs.popleft())
            if not jobs:
                del self.waiting[host]
        self.release(late)
        return len(late)

    def start(self, job, start_by):
        """Hand one request to a sending thread."""
        self.in_flight += 1
        self.throttle.started(job.host)
        self.executor.submit(self.send_and_report, job, start_by)

    def send_and_report(self, job, start_by):
        """In a sending thread: send, then hand the outcomes to the stepping thread."""
        try:
            outcomes, failed, again = self.send(job)
        except Exception as e:  # a bug must not keep the slot or the leases forever
            log.exception("sending to %s failed unexpectedly", job.host)
            outcomes, failed, again = [Outcome(d, "retry", f"internal error: {e!r}"[:300])
                                       for d in job.deliveries], False, []
        self.finished.put((job, start_by, outcomes, failed, again))
        self.ready.set()

    def send(self, job):
        """Send one request; return (an Outcome for each delivery it carries that is done
        with, whether the gateway failed transiently: no full answer in time, no connection, a
        certificate that does not verify, 429 or 5xx, and the requests that carry the other
        deliveries again: smaller batches, or a seed-era gateway's /notify)."""
        try:
            with metrics.timed_gateway_request(job.host):
                status, answer, retry_after = self.client.post(job.url, job.body())
        except BlockedAddress as e:
            return [Outcome(d, "failed", str(e)) for d in job.deliveries], False, []
        except Exception as e:  # network trouble of any kind: try again later
            reason = f"{type(e).__name__}: {str(e)[:200]}"
            log.info("gateway %s unreachable (%s); %d deliveries retry", job.host, reason,
                     len(job.items))
            return [Outcome(d, "retry", reason) for d in job.deliveries], True, []
        again = follow_ups(job, status, answer, self.memory)
        rest = job.without({d.id for follow_up in again for d in follow_up.deliveries})
        if again:
            log.info("gateway %s answered %s; %d deliveries go again in %d requests", job.host,
                     status, len(job.items) - len(rest.items), len(again))
        if rest.items and not (200 <= status < 300 or status == 429 or status >= 500):
            log.warning("gateway %s refused %d deliveries with %s", job.host, len(rest.items),
                        status)
        failed = status == 429 or status >= 500
        return outcomes_for(rest, status, answer, retry_after), failed, again

    # recording

    def collect(self):
        """Take in every request that has ended since the last step: its slot is free again,
        its gateway's health updated, its outcomes ready to be written."""
        while True:
            try:
                job, start_by, outcomes, failed, again = self.finished.get_nowait()
            except queue.Empty:
                break
            self.in_flight -= 1
            self.throttle.finished(job.host, failed)
            for follow_up in again:  # under the same leases: started by the same time or not
                insort(self.waiting.setdefault(follow_up.host, deque()), (follow_up, start_by),
                       key=lambda waiting: waiting[1])
            until = self.throttle.paused_until(job.host)
            for outcome in outcomes:
                if until and outcome.result == "retry":  # no sooner than the pause ends
                    outcome.retry_after = max(until - time.time(), retry_seconds(outcome))
            if not self.unrecorded:
                self.unrecorded_since = time.monotonic()
            self.unrecorded.extend(outcomes)

    def write_outcomes(self):
        """Write what ``collect`` took in, once the oldest of it is RECORD_WINDOW_SECONDS old
        or nothing else is under way (kept for the next step if the database fails)."""
        if not self.unrecorded or (self.in_flight and self.record_wait() > 0):
            return
        self.record(self.unrecorded)
        self.unrecorded = []

    def record_wait(self):
        """Seconds until the outcomes taken in are due to be written."""
        return self.unrecorded_since + RECORD_WINDOW_SECONDS - time.monotonic()

    def record(self, outcomes):
        """Write outcomes in one transaction; only rows we still hold.

        Plain successes (the common case) are written in bulk; the rest row by row.
        """
        if not outcomes:
            return
        current = time.time()
        plain = [o.delivery.id for o in outcomes
                 if o.result == "delivered" and not o.pushkey_rejected]
        with transaction():
            for chunk in chunks(plain):
                run(DELIVERED.format(marks(len(chunk))), current, self.owner, *chunk)
            metrics.delivery_outcome("delivered", len(plain))
            for outcome in outcomes:
                if outcome.result == "delivered" and not outcome.pushkey_rejected:
                    continue
                self.record_one(outcome, current)
                if outcome.pushkey_rejected:
                    remove_rejected(outcome.delivery)

    def record_one(self, outcome, current):
        """Write one outcome that is not a plain success."""
        d, result = outcome.delivery, outcome.result
        changes = {"lease_owner": None, "lease_until": None, "attempts": d.attempts + 1,
                   "last_error": outcome.reason}
        if result == "retry":
            next_at = current + retry_delay(self.config, d.attempts + 1, outcome.retry_after)
            if next_at - d.created_at > self.config["RETRY_GIVE_UP_SECONDS"]:
                result, changes["last_error"] = "failed", f"gave up: {outcome.reason}"
            else:
                changes["next_attempt_at"] = next_at
        if result in ("delivered", "failed"):
            changes.update(state=result, finished_at=current)
        (Delivery.update(changes)
         .where((Delivery.id == d.id) & (Delivery.lease_owner == self.owner))
         .execute())
        metrics.delivery_outcome("rejected" if outcome.pushkey_rejected else result)

    def release(self, deliveries, due=None):
        """Hand deliveries back untried, no attempt counted: due at ``due``, or at once."""
        ids = [d.id for d in deliveries]
        if not ids:
            return
        changes = {"lease_owner": None, "lease_until": None}
        if due is not None:
            changes["next_attempt_at"] = due
        with transaction():
            for chunk in chunks(ids):
                (Delivery.update(changes)
                 .where(Delivery.id.in_(chunk)
                        & (Delivery.lease_owner == self.owner))
                 .execute())

    # the loop

    def run(self, stop):
        """Loop until ``stop`` is set, then finish what is under way and let go.

        At start, the leases of this host's dead processes are released (a server restarted
        after a crash resends their deliveries at once).
        """
        with self.app.app_context():
            try:
                try:
                    db.connect(reuse_if_open=True)
                    release_dead_leases()
                except Exception:
                    log.exception("could not release the leases of dead processes; they lapse")
                self.loop(stop)
            finally:
                self.wind_down()
                if not db.is_closed():
                    db.close()
                self.close()

    def loop(self, stop):
        """Step whenever a request ends, work is announced or it is time; purge hourly."""
        poll = self.config["WORKER_POLL_SECONDS"]
        while not stop.is_set():
            self.ready.clear()  # before stepping: a request ending meanwhile wakes us at once
            try:
                db.connect(reuse_if_open=True)
                if time.time() - self.last_purge > 3600:
                    self.last_purge = time.time()
                    purge_history(self.config["HISTORY_DAYS"])
                    purge_audit(self.config["AUDIT_DAYS"])
                self.step()
                timeout = self.wait_time(poll)
            except Exception:
                log.exception("delivery step failed; retrying shortly")
                if not db.is_closed():
                    db.close()
                timeout = poll
            self.ready.wait(timeout)

    def wind_down(self):
        """Stop: hand back what has not started, and write the outcomes of the requests
        under way (each ends within its deadline)."""
        try:
            db.connect(reuse_if_open=True)
            while True:
                self.collect()  # what ended, and the requests that carry some of it again
                self.release([d for jobs in self.waiting.values() for job, _ in jobs
                              for d in job.deliveries])
                self.waiting.clear()
                self.write_outcomes()
                if not (self.in_flight or self.unrecorded):
                    return
                self.ready.wait(self.wait_time(1.0))
                self.ready.clear()
        except Exception:
            log.exception("could not write every outcome on stopping; those leases lapse")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self):
        """Let go of the sending threads and pooled connections."""
        self.executor.shutdown(wait=True)
        self.client.close()
        with _listeners_lock:
            _listeners.discard(self.ready)


def remove_rejected(delivery):
    """The gateway rejected a pushkey we sent it: its pusher goes."""
    pusher = Pusher.get_or_none(Pusher.id == delivery.pusher_id)
    if pusher is not None:
        log.info("gateway rejected pushkey %s; pusher removed", redact(pusher.pushkey))
        delete_pusher(pusher, "rejected by its push gateway")


# --- where workers run --------------------------------------------------------------------------


def init_app(app):
    """Run a worker inside every process that serves this app over HTTP, when configured.

    This is the one place that decides where the embedded worker runs (``PUSH_EMBEDDED_WORKER``):
    in a process that serves HTTP, which calls ``serving``. A process does so when it serves
    its first request; the shipped ``gunicorn.conf.py`` does so as soon as a gunicorn worker
    process has booted, so that a restarted server resumes delivery before any traffic
    arrives. CLI commands serve no requests and so never start one; nor does an app with the
    setting off (tests, and web processes beside separate ``flask --app app worker`` ones).
    """
    if app.config["EMBEDDED_WORKER"]:
        app.before_request(lambda: serving(app))


def serving(app):
    """This process serves ``app`` over HTTP: start its embedded worker, if configured."""
    if app.config["EMBEDDED_WORKER"]:
        start_embedded(app)


def start_embedded(app):
    """Start this process's worker thread, once per process (a forked child starts its own)."""
    if _embedded["pid"] == os.getpid():
        return
    with _embedded_lock:  # threaded servers: two first requests at once start one worker
        if _embedded["pid"] == os.getpid():
            return
        stop = threading.Event()
        thread = threading.Thread(target=Worker(app).run, args=(stop,), name="push-worker",
                                  daemon=True)
        _embedded.update(pid=os.getpid(), app=app, stop=stop, thread=thread)
        thread.start()


def stop_embedded():
    """Stop this process's embedded worker and wait for it (tests, clean shutdowns)."""
    if _embedded["pid"] == os.getpid():
        _embedded["stop"].set()
        wake()
        _embedded["thread"].join(timeout=30)
    _embedded.update(pid=None, app=None, stop=None, thread=None)


def run_forever(app):
    """The ``flask worker`` command: a worker in the foreground until SIGINT or SIGTERM.

    The signal only sets ``stop`` (a KeyboardInterrupt could land in the middle of the
    worker's bookkeeping); the worker then winds down within a poll interval. A second
    signal ends the process at once.
    """
    stop = threading.Event()

    def request_stop(signum, frame):
        stop.set()
        signal.signal(signum, signal.SIG_DFL)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)
    log.info("delivery worker started")
    Worker(app).run(stop)
    log.info("delivery worker stopped")


def stats():
    """Counts by state and the age of the oldest pending delivery, for operators."""
    counts = dict(Delivery.select(Delivery.state, fn.COUNT(Delivery.id))
                  .group_by(Delivery.state).tuples())
    oldest = Delivery.select(fn.MIN(Delivery.created_at)).where(
        Delivery.state == "pending").scalar()
    return {
        "pending": counts.get("pending", 0),
        "delivered": counts.get("delivered", 0),
        "failed": counts.get("failed", 0),
        "oldest_pending_seconds": round(time.time() - oldest) if oldest else 0,
    }
