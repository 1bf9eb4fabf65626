"""Delivery of stored notifications to push gateways (SPEC section 5).

Every (notification, pusher) pair is a ``Delivery`` row. A worker claims due rows under a lease
(so no two workers send the same one), builds the gateway request at send time (so a retry in
a new month is sealed with the new month's key), sends it, and records the outcome:

- 2xx: delivered; a pushkey in ``rejected`` that we sent removes its pusher.
- 429, 5xx, timeouts, refused connections: retried with exponential backoff.
- any other answer: failed for good, with the reason kept.

A round never starts a request its lease might not outlast (lease minus the connect and read
timeouts); what is left is handed back, due at once, so a slow gateway cannot make two workers
send the same delivery.

A worker runs inside each server process by default (``PUSH_EMBEDDED_WORKER``; ``init_app``
says where exactly) and as ``flask --app app worker``. A worker killed mid-send leaves its lease
to expire (``PUSH_DELIVERY_LEASE_SECONDS``); the rows are then sent again, so nothing is lost.

What a request looks like and what a gateway's answer means live in ``gateway.py``; this
module is the queue: claim, send, record.
"""

import logging
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from cryptography.exceptions import InvalidTag
from peewee import SqliteDatabase, fn

import crypto
import metrics
from gateway import (
    BlockedAddress,
    GatewayClient,
    Outcome,
    Unsendable,
    group_into_jobs,
    outcomes_for,
    redact,
    request_for,
)
from models import (
    Delivery,
    EncryptionKey,
    Notification,
    Pusher,
    db,
    delete_pusher,
    purge_audit,
    purge_history,
    transaction,
)

log = logging.getLogger("push.delivery")

_wake = threading.Event()
_embedded = {"pid": None, "app": None, "stop": None, "thread": None}
_embedded_lock = threading.Lock()


def wake():
    """Tell this process's worker that new deliveries are queued."""
    _wake.set()


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


class Worker:
    """Claims due deliveries, sends them, records outcomes. One per process or command."""

    def __init__(self, app):
        self.app = app
        self.config = app.config
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{secrets.token_hex(4)}"
        self.threads = max(1, self.config["WORKER_THREADS"])
        self.client = GatewayClient(self.config, self.threads)
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="push-send")
        self.server_key = app.extensions["push_server_key"]
        self.send_deadline = 0.0
        self.last_purge = 0.0

    def run_once(self):
        """Claim, send and record one round; return how many deliveries it handled."""
        # Our lease must outlast any request we start: past this moment, a request could still
        # be under way when another worker takes the delivery over, so we hand it back instead.
        self.send_deadline = (time.time() + self.config["DELIVERY_LEASE_SECONDS"]
                              - self.config["GATEWAY_CONNECT_TIMEOUT"]
                              - self.config["GATEWAY_READ_TIMEOUT"])
        ids = self.claim()
        if not ids:
            return 0
        deliveries = list(Delivery.select().where(Delivery.id.in_(ids)))
        outcomes = []
        jobs = self.build_jobs(deliveries, outcomes)
        for result in self.executor.map(self.send, jobs):
            outcomes.extend(result)
        self.record(outcomes)
        return len(deliveries)

    def claim(self):
        """Lease up to WORKER_CLAIM due deliveries to this worker; return their ids."""
        current = time.time()
        due = (Delivery.select(Delivery.id)
               .where((Delivery.state == "pending") & (Delivery.next_attempt_at <= current)
                      & (Delivery.lease_until.is_null() | (Delivery.lease_until < current)))
               .order_by(Delivery.next_attempt_at)
               .limit(self.config["WORKER_CLAIM"]))
        if not isinstance(db.obj, SqliteDatabase):
            due = due.for_update("FOR UPDATE SKIP LOCKED")
        with transaction():
            ids = [row.id for row in due]
            if ids:
                (Delivery.update(lease_owner=self.owner,
                                 lease_until=current + self.config["DELIVERY_LEASE_SECONDS"])
                 .where(Delivery.id.in_(ids)).execute())
        return ids

    # building

    def build_jobs(self, deliveries, outcomes):
        """Group deliveries into gateway requests; unsendable ones go straight to outcomes."""
        notifications = {n.id: n for n in Notification.select().where(
            Notification.id.in_({d.notification_id for d in deliveries}))}
        pushers = {p.id: p for p in Pusher.select().where(
            Pusher.id.in_({d.pusher_id for d in deliveries if d.pusher_id}))}
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
                url, endpoint, body = request_for(pusher, notifications[d.notification_id],
                                                  generations)
            except Unsendable as e:
                outcomes.append(Outcome(d, "failed", str(e)))
                continue
            except Exception as e:  # one bad row must not stall the whole round
                log.exception("could not build delivery %s", d.id)
                outcomes.append(Outcome(d, "failed", f"could not build the request: {e!r}"[:300]))
                continue
            requests.append((d, url, endpoint, body))
        return group_into_jobs(requests)

    def generations_for(self, key_ids, period):
        """{key id: (key_identifier, generation for ``period``)} for a round's keys.

        Keys behind ``period`` are ratcheted forward and stored before use, all in one
        transaction; a key another worker moved meanwhile is read again.
        """
        found, behind = {}, []
        keys = list(EncryptionKey.select().where(EncryptionKey.id.in_(key_ids))) if key_ids else []
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
            keys = list(EncryptionKey.select().where(EncryptionKey.id.in_(moved))) if moved else []
        return found

    def store_generation(self, key, newer):
        """Replace ``key``'s generation with ``newer`` unless another worker moved it first."""
        sealed = self.server_key.seal_generation(key.key_identifier, newer)
        return (EncryptionKey.update(period=newer.period, sealed=sealed)
                .where((EncryptionKey.id == key.id) & (EncryptionKey.period == key.period))
                .execute())

    # sending

    def send(self, job):
        """Send one request; return an Outcome for each delivery it carries."""
        if time.time() > self.send_deadline:
            return [Outcome(d, "released") for d in job.deliveries]
        try:
            with metrics.timed_gateway_request(job.host):
                status, answer, retry_after = self.client.post(job.url, job.body())
        except BlockedAddress as e:
            return [Outcome(d, "failed", str(e)) for d in job.deliveries]
        except Exception as e:  # network trouble of any kind: try again later
            reason = f"{type(e).__name__}: {str(e)[:200]}"
            log.info("gateway %s unreachable (%s); %d deliveries retry", job.host, reason,
                     len(job.items))
            return [Outcome(d, "retry", reason) for d in job.deliveries]
        if not (200 <= status < 300 or status == 429 or status >= 500):
            log.warning("gateway %s refused %d deliveries with %s", job.host, len(job.items),
                        status)
        return outcomes_for(job, status, answer, retry_after)

    # recording

    def record(self, outcomes):
        """Write every outcome of a round in one transaction; only rows we still hold.

        Plain successes (the common case) are written in bulk; the rest row by row.
        """
        current = time.time()
        plain = [o.delivery.id for o in outcomes
                 if o.result == "delivered" and not o.pushkey_rejected]
        with transaction():
            for start in range(0, len(plain), 500):
                (Delivery.update(state="delivered", attempts=Delivery.attempts + 1,
                                 lease_owner=None, lease_until=None, last_error=None,
                                 finished_at=current)
                 .where(Delivery.id.in_(plain[start:start + 500])
                        & (Delivery.lease_owner == self.owner))
                 .execute())
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
        changes = {"lease_owner": None, "lease_until": None}
        if result != "released":  # released: not tried, due again at once
            changes.update(attempts=d.attempts + 1, last_error=outcome.reason)
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

    # the loop

    def run(self, stop):
        """Loop until ``stop`` is set: rounds while there is work, else wait for a wake-up."""
        poll = self.config["WORKER_POLL_SECONDS"]
        with self.app.app_context():
            while not stop.is_set():
                try:
                    db.connect(reuse_if_open=True)
                    if time.time() - self.last_purge > 3600:
                        self.last_purge = time.time()
                        purge_history(self.config["HISTORY_DAYS"])
                        purge_audit(self.config["AUDIT_DAYS"])
                    handled = self.run_once()
                except Exception:
                    log.exception("delivery round failed; retrying shortly")
                    if not db.is_closed():
                        db.close()
                    handled = 0
                    stop.wait(poll)
                if not handled and not stop.is_set():
                    _wake.wait(poll)
                    _wake.clear()
            if not db.is_closed():
                db.close()
        self.close()

    def close(self):
        """Let go of the sending threads and pooled connections."""
        self.executor.shutdown(wait=True)
        self.client.close()


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
        _wake.set()
        _embedded["thread"].join(timeout=30)
    _embedded.update(pid=None, app=None, stop=None, thread=None)


def run_forever(app):
    """The ``flask worker`` command: a worker in the foreground until interrupted."""
    stop = threading.Event()
    log.info("delivery worker started")
    try:
        Worker(app).run(stop)
    except KeyboardInterrupt:
        stop.set()
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
