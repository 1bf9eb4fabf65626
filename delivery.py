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

A worker runs inside each server process by default (``PUSH_EMBEDDED_WORKER``) and as
``flask --app app worker``. A worker killed mid-send leaves its lease to expire
(``PUSH_DELIVERY_LEASE_SECONDS``); the rows are then sent again, so nothing is lost.
"""

import ipaddress
import json
import logging
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import urllib3
from cryptography.exceptions import InvalidTag
from marshmallow import ValidationError
from peewee import SqliteDatabase, fn
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection as urllib3_connection

import crypto
from models import Delivery, EncryptionKey, Notification, Pusher, db, delete_pusher, transaction
from schemas import check_gateway_url

log = logging.getLogger("push.delivery")

BATCH_SIZE = 100
BATCH_SUFFIX = "/push/v1/"

_wake = threading.Event()
_embedded = {"pid": None, "app": None, "stop": None, "thread": None, "fork_hook": False}


def redact(pushkey):
    """A pushkey shortened for logs: never the whole of it."""
    return pushkey[:6] + "…" if len(pushkey) > 6 else "…"


def wake():
    """Tell this process's worker that new deliveries are queued."""
    _wake.set()


def current_period():
    """The current month in UTC, as "YYYY-MM"."""
    return datetime.now(timezone.utc).strftime("%Y-%m")


# --- the HTTP client ------------------------------------------------------------------------


class Unsendable(Exception):
    """This delivery cannot be sent as things stand: it fails for good, with this reason."""


class BlockedAddress(Exception):
    """The gateway resolved to an address we may not connect to."""


def address_allowed(ip):
    """Only public unicast addresses, unless the operator allows private gateways."""
    ip = ipaddress.ip_address(ip)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def guarded(connection_cls, allow_private):
    """A urllib3 connection class that checks the resolved address before connecting."""

    class Guarded(connection_cls):
        def _new_conn(self):
            try:
                infos = socket.getaddrinfo(self._dns_host, self.port, type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise NameResolutionError(self.host, self, e) from e
            addresses = [info[4][0] for info in infos]
            if not allow_private:
                addresses = [a for a in addresses if address_allowed(a)]
                if not addresses:
                    raise BlockedAddress(f"{self.host} resolves only to non-public addresses")
            try:
                return urllib3_connection.create_connection(
                    (addresses[0], self.port), self.timeout, socket_options=self.socket_options)
            except socket.timeout as e:
                raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from e
            except OSError as e:
                raise NewConnectionError(self, f"Failed to connect: {e}") from e

    return Guarded


class GatewayClient:
    """POSTs JSON to gateways: pooled connections, timeouts, no redirects, capped responses."""

    def __init__(self, config, pool_size):
        allow_private = config["ALLOW_PRIVATE_GATEWAYS"]
        self.timeout = urllib3.Timeout(connect=config["GATEWAY_CONNECT_TIMEOUT"],
                                       read=config["GATEWAY_READ_TIMEOUT"])
        self.max_response = config["GATEWAY_MAX_RESPONSE_BYTES"]
        self.pools = urllib3.PoolManager(num_pools=64, maxsize=pool_size, block=False,
                                         headers={"User-Agent": "push-service/1.0"})
        http_pool = type("GuardedHTTPPool", (HTTPConnectionPool,),
                         {"ConnectionCls": guarded(HTTPConnection, allow_private)})
        https_pool = type("GuardedHTTPSPool", (HTTPSConnectionPool,),
                          {"ConnectionCls": guarded(HTTPSConnection, allow_private)})
        self.pools.pool_classes_by_scheme = {"http": http_pool, "https": https_pool}

    def post(self, url, body):
        """Return (status, parsed JSON or None); raise on network errors."""
        response = self.pools.request(
            "POST", url, body=json.dumps(body, separators=(",", ":")).encode(),
            headers={"Content-Type": "application/json"}, redirect=False, retries=False,
            timeout=self.timeout, preload_content=False)
        try:
            data = response.read(self.max_response + 1)
        finally:
            if len(data) > self.max_response:
                response.close()
            else:
                response.release_conn()
        try:
            parsed = json.loads(data) if data and len(data) <= self.max_response else None
        except ValueError:
            parsed = None
        return response.status, parsed, response.headers.get("Retry-After")


# --- building requests ----------------------------------------------------------------------


def device_of(pusher, data):
    """The ``device`` object a gateway gets: pusher data without the url."""
    return {"app_id": pusher.app_id, "pushkey": pusher.pushkey, "pushkey_ts": pusher.pushkey_ts,
            "data": {k: v for k, v in data.items() if k != "url"}, "tweaks": {}}


class Job:
    """One gateway request and the deliveries it carries."""

    def __init__(self, url, batch_id=None):
        self.url = url
        self.items = []  # (delivery, notification body)
        self.batch_id = batch_id


class Worker:
    """Claims due deliveries, sends them, records outcomes. One per process or command."""

    def __init__(self, app):
        self.app = app
        config = app.config
        self.config = config
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{secrets.token_hex(4)}"
        self.threads = max(1, config["WORKER_THREADS"])
        self.client = GatewayClient(config, self.threads)
        self.executor = ThreadPoolExecutor(self.threads, thread_name_prefix="push-send")
        self.server_key = app.extensions["push_server_key"]
        self.send_deadline = 0.0
        self.last_purge = 0.0

    # claiming

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
        notifications = {n.id: n for n in Notification.select().where(
            Notification.id.in_({d.notification_id for d in deliveries}))}
        pushers = {p.id: p for p in Pusher.select().where(
            Pusher.id.in_({d.pusher_id for d in deliveries if d.pusher_id}))}
        outcomes = []
        jobs = self.build_jobs(deliveries, notifications, pushers, outcomes)
        for result in self.executor.map(self.send, jobs):
            outcomes.extend(result)
        self.record(outcomes)
        return len(deliveries)

    # building

    def build_jobs(self, deliveries, notifications, pushers, outcomes):
        """Group deliveries into gateway requests; unsendable ones go straight to outcomes."""
        generations = self.generations_for(
            {p.encryption_key_id for p in pushers.values() if p.encryption_key_id is not None},
            current_period())
        single, batches = [], {}
        for d in deliveries:
            pusher = pushers.get(d.pusher_id)
            if pusher is None:
                outcomes.append((d, "failed", "pusher removed before delivery", None))
                continue
            try:
                url, endpoint, body = self.request_for(pusher, notifications[d.notification_id],
                                                       generations)
            except Unsendable as e:
                outcomes.append((d, "failed", str(e), None))
                continue
            except Exception as e:  # one bad row must not stall the whole round
                log.exception("could not build delivery %s", d.id)
                outcomes.append((d, "failed", f"could not build the request: {e!r}"[:300], None))
                continue
            if endpoint is None:
                job = Job(url)
                job.items.append((d, {"notification": body}))
                single.append(job)
                continue
            group = batches.setdefault(url + endpoint, [])
            if not group or len(group[-1].items) >= BATCH_SIZE:
                group.append(Job(url + endpoint, batch_id=True))
            group[-1].items.append((d, {"id": str(d.id), "notification": body}))
        return single + [job for group in batches.values() for job in group]

    @staticmethod
    def request_for(pusher, n, generations):
        """(gateway URL, batch endpoint or None, notification body) for one delivery."""
        data = json.loads(pusher.data)
        url = data.get("url", "")
        try:
            check_gateway_url(url)
        except ValidationError as e:
            raise Unsendable(f"gateway URL not allowed: {e.messages}") from e
        batch = url.endswith(BATCH_SUFFIX)
        device = device_of(pusher, data)
        body = {"prio": n.prio}
        if n.counts:
            body["counts"] = json.loads(n.counts)
        if pusher.encryption_key_id is not None:
            if pusher.encryption_key_id not in generations:
                raise Unsendable("the stored key cannot be opened (was the server key changed?)")
            key_identifier, generation = generations[pusher.encryption_key_id]
            body = {"ciphertext": crypto.seal(generation.aes_key, n.payload.encode()),
                    "time_message_encrypted": generation.period,
                    "key_identifier": key_identifier, "identifier": n.id, **body}
            endpoint = "notifyEncrypted/batch"
        else:
            body = {"event_id": n.id, "type": n.channel, **body}
            if data.get("format") != "event_id_only":
                body["content"] = json.loads(n.payload)
            endpoint = "notify/batch"
        if batch and endpoint == "notifyEncrypted/batch":
            body["device"] = device
        else:
            body["devices"] = [device]
        return url, endpoint if batch else None, body

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
                        stored = (EncryptionKey
                                  .update(period=newer.period,
                                          sealed=self.server_key.seal_generation(
                                              key.key_identifier, newer))
                                  .where((EncryptionKey.id == key.id)
                                         & (EncryptionKey.period == key.period))
                                  .execute())
                        if stored:
                            found[key.id] = (key.key_identifier, newer)
                        else:
                            moved.append(key.id)
            behind = []
            keys = list(EncryptionKey.select().where(EncryptionKey.id.in_(moved))) if moved else []
        return found

    # sending

    def send(self, job):
        """Send one request; return its outcomes (see ``record``)."""
        if job.batch_id:
            body = {"notifications": [item for _, item in job.items]}
        else:
            body = job.items[0][1]
        deliveries = [d for d, _ in job.items]
        if time.time() > self.send_deadline:
            return [(d, "released", None, None) for d in deliveries]
        host = job.url.split("/")[2] if "//" in job.url else "?"
        try:
            status, answer, retry_after = self.client.post(job.url, body)
        except BlockedAddress as e:
            return [(d, "failed", str(e), None) for d in deliveries]
        except Exception as e:  # network trouble of any kind: try again later
            reason = f"{type(e).__name__}: {str(e)[:200]}"
            log.info("gateway %s unreachable (%s); %d deliveries retry", host, reason,
                     len(deliveries))
            return [(d, "retry", reason, None) for d in deliveries]
        if status == 429 or status >= 500:
            reason = f"gateway answered {status}"
            return [(d, "retry", reason, retry_after) for d in deliveries]
        if not 200 <= status < 300:
            reason = f"gateway answered {status}: {json.dumps(answer)[:200] if answer else ''}"
            log.warning("gateway %s refused %d deliveries with %s", host, len(deliveries), status)
            return [(d, "failed", reason, None) for d in deliveries]
        answer = answer if isinstance(answer, dict) else {}
        if not job.batch_id:
            rejected = answer.get("rejected")
            return [(deliveries[0], "delivered", None, rejected)]
        return self.batch_outcomes(deliveries, answer)

    @staticmethod
    def batch_outcomes(deliveries, answer):
        """Honour per-item results of a batch answer; items it does not mention are retried."""
        results = {}
        for result in answer.get("results") or []:
            if isinstance(result, dict) and isinstance(result.get("id"), str):
                results[result["id"]] = result
        outcomes = []
        for d in deliveries:
            result = results.get(str(d.id))
            status = result.get("status") if result else None
            if status in ("success", "partial"):
                outcomes.append((d, "delivered", None, result.get("rejected")))
            elif status == "failed":
                outcomes.append((d, "failed", f"gateway: {str(result.get('error'))[:200]}",
                                 result.get("rejected")))
            else:
                outcomes.append((d, "retry", "batch answer did not cover this item", None))
        return outcomes

    # recording

    def retry_delay(self, attempts, retry_after):
        """Exponential backoff from RETRY_INITIAL_SECONDS, capped, at least Retry-After."""
        config = self.config
        delay = min(config["RETRY_INITIAL_SECONDS"] * 2 ** (attempts - 1),
                    config["RETRY_MAX_SECONDS"])
        try:
            delay = max(delay, min(float(retry_after), config["RETRY_MAX_SECONDS"]))
        except (TypeError, ValueError):
            pass
        return delay

    def record(self, outcomes):
        """Write every outcome of a round in one transaction; only rows we still hold.

        An outcome is (delivery, "delivered" | "failed" | "retry" | "released", reason, extra),
        where extra is the rejected pushkeys of a gateway answer, or a retry's Retry-After.
        Plain successes (the common case) are written in bulk; the rest row by row.
        """
        current = time.time()
        give_up = self.config["RETRY_GIVE_UP_SECONDS"]
        plain, rest = [], []
        for item in outcomes:
            _, outcome, _, extra = item
            (plain if outcome == "delivered" and not extra else rest).append(item)
        with transaction():
            ids = [d.id for d, *_ in plain]
            for start in range(0, len(ids), 500):
                (Delivery.update(state="delivered", attempts=Delivery.attempts + 1,
                                 lease_owner=None, lease_until=None, last_error=None,
                                 finished_at=current)
                 .where(Delivery.id.in_(ids[start:start + 500])
                        & (Delivery.lease_owner == self.owner))
                 .execute())
            for d, outcome, reason, extra in rest:
                mine = (Delivery.id == d.id) & (Delivery.lease_owner == self.owner)
                changes = {"lease_owner": None, "lease_until": None}
                if outcome != "released":  # released: not tried, due again at once
                    changes.update(attempts=d.attempts + 1, last_error=reason)
                if outcome == "retry":
                    next_at = current + self.retry_delay(d.attempts + 1, extra)
                    if next_at - d.created_at > give_up:
                        outcome, changes["last_error"] = "failed", f"gave up: {reason}"
                    else:
                        changes["next_attempt_at"] = next_at
                if outcome in ("delivered", "failed"):
                    changes.update(state=outcome, finished_at=current)
                Delivery.update(changes).where(mine).execute()
                if (outcome in ("delivered", "failed") and isinstance(extra, list)
                        and d.pushkey in extra):
                    self.remove_rejected(d)

    @staticmethod
    def remove_rejected(delivery):
        """The gateway rejected a pushkey we sent it: its pusher goes."""
        pusher = Pusher.get_or_none(Pusher.id == delivery.pusher_id)
        if pusher is not None:
            log.info("gateway rejected pushkey %s; pusher removed", redact(pusher.pushkey))
            delete_pusher(pusher)

    # upkeep

    def purge_history(self):
        """Delete notifications older than HISTORY_DAYS that have nothing left to send."""
        cutoff = time.time() - self.config["HISTORY_DAYS"] * 86400
        pending = Delivery.select(Delivery.notification).where(Delivery.state == "pending")
        old = Notification.select(Notification.id).where(
            (Notification.created_at < cutoff) & Notification.id.not_in(pending))
        with transaction():
            Delivery.delete().where(Delivery.notification.in_(old)).execute()
            removed = Notification.delete().where(
                (Notification.created_at < cutoff) & Notification.id.not_in(pending)).execute()
        if removed:
            log.info("purged %d notifications older than %s days", removed,
                     self.config["HISTORY_DAYS"])
        return removed

    def run(self, stop):
        """Loop until ``stop`` is set: rounds while there is work, else wait for a wake-up."""
        poll = self.config["WORKER_POLL_SECONDS"]
        with self.app.app_context():
            while not stop.is_set():
                try:
                    db.connect(reuse_if_open=True)
                    if time.time() - self.last_purge > 3600:
                        self.last_purge = time.time()
                        self.purge_history()
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
        self.client.pools.clear()


def start_embedded(app):
    """Start this process's worker thread (once per process; again in a forked child)."""
    if _embedded["pid"] == os.getpid():
        return
    if not _embedded["fork_hook"]:
        _embedded["fork_hook"] = True
        os.register_at_fork(after_in_child=_restart_after_fork)
    stop = threading.Event()
    worker = Worker(app)
    thread = threading.Thread(target=worker.run, args=(stop,), name="push-worker", daemon=True)
    _embedded.update(pid=os.getpid(), app=app, stop=stop, thread=thread)
    thread.start()


def _restart_after_fork():
    """In a forked child (gunicorn --preload) the parent's thread is gone: start our own."""
    app = _embedded["app"]
    _embedded["pid"] = None
    if app is not None:
        start_embedded(app)


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
