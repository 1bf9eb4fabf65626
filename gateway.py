"""What goes over the wire to a push gateway, and what its answer means (SPEC section 5).

``delivery.py`` decides *when* a delivery is sent and records what happened; this module knows
*how*: the request body each gateway URL gets, the HTTP client that may call a URL a user chose
(SSRF rules, and a deadline on each whole request), and the mapping of a gateway's answer to
one ``Outcome`` per delivery. Its two log helpers keep logs safe: ``redact`` shortens pushkeys,
``log_safe`` escapes what a user or a request chose. Everything here is a plain function or a
small class that tests can call directly, without a worker.
"""

import heapq
import ipaddress
import itertools
import json
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import urllib3
from marshmallow import ValidationError
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection as urllib3_connection

import crypto
from schemas import check_gateway_url

BATCH_SIZE = 100
BATCH_BASES = ("/push/v1/", "/push/v1")  # a gematik gateway base, written with or without "/"
USER_AGENT = "push-service/1.0"


def redact(pushkey):
    """A pushkey shortened for logs: never the whole of it."""
    return pushkey[:6] + "…" if len(pushkey) > 6 else "…"


# C0 and C1 control characters, DEL and the Unicode line and paragraph separators.
UNSAFE_FOR_LOGS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def log_safe(text):
    """``text`` with its control characters escaped (``\\n``, ``\\x1b``): a value that came
    from a request can neither start a forged log line nor drive a terminal."""
    return UNSAFE_FOR_LOGS.sub(lambda m: m.group().encode("unicode_escape").decode(), str(text))


# --- outcomes ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What became of one delivery in one request.

    ``result`` is ``delivered``, ``failed`` (for good) or ``retry`` (later, with backoff).
    ``rejected`` holds the pushkeys the gateway rejected in its answer; ``retry_after`` is a
    429/5xx answer's Retry-After header (or the end of its gateway's pause, if later).
    """

    delivery: object
    result: str
    reason: str = None
    rejected: list = field(default_factory=list)
    retry_after: str = None

    @property
    def pushkey_rejected(self):
        """Whether the gateway rejected this delivery's own pushkey (its pusher must go)."""
        return self.result in ("delivered", "failed") and self.delivery.pushkey in self.rejected


def rejected_list(value):
    """A gateway's ``rejected`` value as a list of pushkeys (anything else counts as none)."""
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def outcomes_for(job, status, answer, retry_after=None):
    """Map one gateway answer to an Outcome for each delivery the request carried."""
    deliveries = job.deliveries
    if status == 429 or status >= 500:
        reason = f"gateway answered {status}"
        return [Outcome(d, "retry", reason, retry_after=retry_after) for d in deliveries]
    if not 200 <= status < 300:
        detail = json.dumps(answer)[:200] if answer else ""
        reason = f"gateway answered {status}: {detail}"
        return [Outcome(d, "failed", reason) for d in deliveries]
    answer = answer if isinstance(answer, dict) else {}
    if not job.batch:
        return [Outcome(deliveries[0], "delivered", rejected=rejected_list(answer.get("rejected")))]
    return batch_outcomes(deliveries, answer)


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
            outcomes.append(Outcome(d, "delivered", rejected=rejected_list(result.get("rejected"))))
        elif status == "failed":
            outcomes.append(Outcome(d, "failed", f"gateway: {str(result.get('error'))[:200]}",
                                    rejected=rejected_list(result.get("rejected"))))
        else:
            outcomes.append(Outcome(d, "retry", "batch answer did not cover this item"))
    return outcomes


# --- request bodies ---------------------------------------------------------------------------


class Unsendable(Exception):
    """This delivery cannot be sent as things stand: it fails for good, with this reason."""


def device_of(pusher, data):
    """The ``device`` object a gateway gets: pusher data without the url."""
    return {"app_id": pusher.app_id, "pushkey": pusher.pushkey, "pushkey_ts": pusher.pushkey_ts,
            "data": {k: v for k, v in data.items() if k != "url"}, "tweaks": {}}


def request_for(pusher, notification, generations):
    """(gateway URL, batch endpoint or None, notification body) for one delivery.

    ``generations`` maps an encryption key id to (key_identifier, this month's generation).
    """
    data = json.loads(pusher.data)
    url = data.get("url", "")
    try:
        check_gateway_url(url)
    except ValidationError as e:
        raise Unsendable(f"gateway URL not allowed: {e.messages}") from e
    batch = url.endswith(BATCH_BASES)
    if batch and not url.endswith("/"):
        url += "/"  # the endpoint goes after a slash: <base>/notify/batch, never .../v1notify
    device = device_of(pusher, data)
    body = {"prio": notification.prio}
    if notification.counts:
        body["counts"] = json.loads(notification.counts)
    if pusher.encryption_key_id is not None:
        if pusher.encryption_key_id not in generations:
            raise Unsendable("the stored key cannot be opened (was the server key changed?)")
        key_identifier, generation = generations[pusher.encryption_key_id]
        body = {"ciphertext": crypto.seal(generation.aes_key, notification.payload.encode()),
                "time_message_encrypted": generation.period,
                "key_identifier": key_identifier, "identifier": notification.id, **body}
        endpoint = "notifyEncrypted/batch"
    else:
        body = {"event_id": notification.id, "type": notification.channel, **body}
        if data.get("format") != "event_id_only":
            body["content"] = json.loads(notification.payload)
        endpoint = "notify/batch"
    if batch and endpoint == "notifyEncrypted/batch":
        body["device"] = device
    else:
        body["devices"] = [device]
    return url, endpoint if batch else None, body


class Job:
    """One gateway request and the deliveries it carries."""

    def __init__(self, url, batch=False):
        self.url = url
        self.batch = batch
        self.items = []  # (delivery, notification body)

    @property
    def deliveries(self):
        return [d for d, _ in self.items]

    @property
    def host(self):
        """The gateway's host and port, for logs (escaped: the URL came from a user)."""
        return log_safe(self.url.split("/")[2]) if "//" in self.url else "?"

    def body(self):
        """The JSON request body: a batch of items, or a single notification."""
        if self.batch:
            return {"notifications": [{"id": str(d.id), "notification": n} for d, n in self.items]}
        return {"notification": self.items[0][1]}


def group_into_jobs(requests):
    """Jobs for (delivery, url, batch endpoint or None, body) tuples: one request per
    single-notify delivery, batches of at most BATCH_SIZE per batch endpoint."""
    single, batches = [], {}
    for d, url, endpoint, body in requests:
        if endpoint is None:
            job = Job(url)
            job.items.append((d, body))
            single.append(job)
            continue
        group = batches.setdefault(url + endpoint, [])
        if not group or len(group[-1].items) >= BATCH_SIZE:
            group.append(Job(url + endpoint, batch=True))
        group[-1].items.append((d, body))
    return single + [job for group in batches.values() for job in group]


# --- the HTTP client --------------------------------------------------------------------------


class BlockedAddress(Exception):
    """The gateway resolved to an address we may not connect to."""


class DeadlineExceeded(Exception):
    """The gateway did not answer in full within the request's deadline."""


class CertificateFailure(Exception):
    """The gateway's TLS certificate did not verify (retried: its operator may fix it)."""


# IPv6 forms that carry an IPv4 address in their last 32 bits: IPv4-compatible (deprecated),
# IPv4-translated (SIIT) and the well-known NAT64 prefix. IPv4-mapped (::ffff:0:0/96) and 6to4
# (2002::/16) have their own ipaddress properties.
EMBEDDING_IPV4 = [ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96")]
# Local-use NAT64 (RFC 8215): where it carries the IPv4 address depends on the local prefix
# length, and IANA lists it as not globally reachable, so it is refused as a whole.
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def embedded_ipv4(ip):
    """The IPv4 address an IPv6 transition form carries, or None."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in network for network in EMBEDDING_IPV4):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_allowed(ip):
    """Only public unicast addresses, unless the operator allows private gateways; an IPv4
    address inside an IPv6 transition form is judged as itself."""
    ip = ipaddress.ip_address(ip)
    if ip.version == 6:
        if ip in LOCAL_NAT64:
            return False
        ip = embedded_ipv4(ip) or ip
    return ip.is_global and not ip.is_multicast


def guarded(connection_cls, allow_private, watch):
    """A urllib3 connection class that checks the resolved address before connecting and
    hands every socket it uses to ``watch`` (the current request's deadline)."""

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
                sock = urllib3_connection.create_connection(
                    (addresses[0], self.port), self.timeout, socket_options=self.socket_options)
            except socket.timeout as e:
                raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from e
            except OSError as e:
                raise NewConnectionError(self, f"Failed to connect: {e}") from e
            watch(sock)  # before any TLS handshake: a slow one counts too
            return sock

        def request(self, *args, **kwargs):
            """Send a request; a pooled connection used again goes under its deadline."""
            if self.sock is not None:
                watch(self.sock)
            return super().request(*args, **kwargs)

    return Guarded


class Deadline:
    """The time limit of one request: when it is up, the request's sockets are shut down, so
    whatever read or write is under way ends at once."""

    def __init__(self, at):
        self.at = at
        self.lock = threading.Lock()
        self.copies = {}  # watched socket's descriptor -> a duplicate of it, ours to close
        self.expired = False
        self.finished = False

    def watch(self, sock):
        """Shut ``sock`` down when the time is up (at once if it is up already)."""
        with self.lock:
            if self.finished or sock.fileno() in self.copies:
                return
            # A duplicate descriptor of the same connection: it stays valid when urllib3 wraps
            # the socket for TLS (which detaches the original) and is never one that a closed
            # and reused descriptor number could point at.
            copy = socket.fromfd(sock.fileno(), sock.family, sock.type)
            self.copies[sock.fileno()] = copy
            if self.expired:
                shut_down(copy)

    def expire(self):
        """The time is up: shut down every socket of the request, unless it has finished."""
        with self.lock:
            if not self.finished:
                self.expired = True
                for copy in self.copies.values():
                    shut_down(copy)

    def finish(self):
        """The request is over: nothing is shut down after this. Returns whether it expired."""
        with self.lock:
            self.finished = True
            for copy in self.copies.values():
                copy.close()
            self.copies.clear()
            return self.expired


def shut_down(sock):
    """Shut a connection down both ways; a socket already gone is fine."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Watchdog:
    """One thread that expires deadlines when their time is up, for all requests of a client
    (a timer thread per request would cost a thread start per request)."""

    def __init__(self):
        self.condition = threading.Condition()
        self.heap = []  # (monotonic time, sequence number, Deadline)
        self.sequence = itertools.count()
        self.thread = None
        self.closed = False

    def start(self, seconds):
        """A Deadline ``seconds`` from now."""
        deadline = Deadline(time.monotonic() + seconds)
        with self.condition:
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="push-deadlines",
                                               daemon=True)
                self.thread.start()
            first = not self.heap or deadline.at < self.heap[0][0]
            heapq.heappush(self.heap, (deadline.at, next(self.sequence), deadline))
            if first:
                self.condition.notify()
        return deadline

    def run(self):
        """The thread: expire each deadline when its time comes, until closed."""
        with self.condition:
            while not self.closed:
                current = time.monotonic()
                while self.heap and self.heap[0][0] <= current:
                    heapq.heappop(self.heap)[2].expire()  # a finished one ignores this
                self.condition.wait(self.heap[0][0] - current if self.heap else None)

    def close(self):
        """Stop the thread (requests still under way keep their sockets)."""
        with self.condition:
            self.closed = True
            self.condition.notify()
        if self.thread is not None:
            self.thread.join()


def certificate_error(error):
    """The certificate verification failure behind a urllib3 error, if that is what it is."""
    for _ in range(5):  # urllib3 nests it in args or chains it; a few levels at most
        if isinstance(error, ssl.SSLCertVerificationError):
            return error
        nested = [a for a in getattr(error, "args", ()) if isinstance(a, BaseException)]
        error = nested[0] if nested else error.__cause__ or error.__context__
        if error is None:
            return None
    return None


class GatewayClient:
    """POSTs JSON to gateways: pooled connections, no redirects, capped responses, and a
    deadline on the whole exchange.

    The connect and read timeouts of urllib3 bound each socket operation; a gateway that
    trickles its answer a byte at a time never trips them. So each request also gets a total
    deadline of connect + read timeout, kept by a watchdog thread that shuts the request's
    socket down when it passes (whether it is connecting, in a TLS handshake, sending, or
    reading headers or body). Name resolution is left to the system resolver and its own
    timeouts; the deadline covers everything from the first connection attempt on.
    """

    HEADERS = {"User-Agent": USER_AGENT, "Content-Type": "application/json"}

    def __init__(self, config, pool_size):
        allow_private = config["ALLOW_PRIVATE_GATEWAYS"]
        self.timeout = urllib3.Timeout(connect=config["GATEWAY_CONNECT_TIMEOUT"],
                                       read=config["GATEWAY_READ_TIMEOUT"])
        self.total = config["GATEWAY_CONNECT_TIMEOUT"] + config["GATEWAY_READ_TIMEOUT"]
        self.max_response = config["GATEWAY_MAX_RESPONSE_BYTES"]
        self.watchdog = Watchdog()
        self.current = threading.local()  # the deadline of this thread's request
        self.pools = urllib3.PoolManager(num_pools=64, maxsize=pool_size, block=False)
        http_pool = type("GuardedHTTPPool", (HTTPConnectionPool,), {
            "ConnectionCls": guarded(HTTPConnection, allow_private, self.watch)})
        https_pool = type("GuardedHTTPSPool", (HTTPSConnectionPool,), {
            "ConnectionCls": guarded(HTTPSConnection, allow_private, self.watch)})
        self.pools.pool_classes_by_scheme = {"http": http_pool, "https": https_pool}

    def watch(self, sock):
        """Put ``sock`` under the deadline of the request this thread is making."""
        self.current.deadline.watch(sock)

    def post(self, url, body):
        """Return (status, parsed JSON or None, Retry-After header or None).

        Raises DeadlineExceeded when the whole exchange outlasts connect + read timeout,
        CertificateFailure when the gateway's certificate does not verify, and urllib3's
        errors on other network trouble.
        """
        deadline = self.current.deadline = self.watchdog.start(self.total)
        response, data, error = None, b"", None
        try:
            # headers= replaces the pool's headers for this request, so every header goes here.
            response = self.pools.request(
                "POST", url, body=json.dumps(body, separators=(",", ":")).encode(),
                headers=self.HEADERS, redirect=False, retries=False, timeout=self.timeout,
                preload_content=False)
            data = response.read(self.max_response + 1)
        except Exception as e:
            error = e
        finally:
            expired = deadline.finish()  # before the connection can go back to the pool
            self.current.deadline = None
            if response is not None:
                if error or expired or len(data) > self.max_response:
                    response.close()  # broken off, late or too long: never reused
                response.release_conn()
        if expired:
            raise DeadlineExceeded(f"no complete answer within the {self.total:g} s deadline"
                                   " (connect + read timeout)") from error
        if error is not None:
            if certificate_error(error) is not None:
                raise CertificateFailure(str(certificate_error(error))) from error
            raise error
        try:
            parsed = json.loads(data) if data and len(data) <= self.max_response else None
        except ValueError:
            parsed = None
        return response.status, parsed, response.headers.get("Retry-After")

    def close(self):
        """Close every pooled connection and stop the watchdog."""
        self.pools.clear()
        self.watchdog.close()
