"""What goes over the wire to a push gateway, and what its answer means (SPEC section 5).

``delivery.py`` decides *when* a delivery is sent and records what happened; this module knows
*how*: the request each gateway URL gets (``request_for``: a gematik batch item, a gematik or
Matrix single notification, the sealed envelope where a Matrix gateway passes it on), batches
cut by count and by bytes as sent (``group_into_jobs``), the HTTP client that may call a URL a
user chose (SSRF rules, a deadline on each whole request, mutual TLS), and the mapping of a
gateway's answer to one ``Outcome`` per delivery, or to requests that carry deliveries again:
smaller batches for a gateway that refused a batch for its size, seed-era requests for a
gateway without the batch endpoints (``follow_ups``; ``GatewayMemory`` keeps what was learned).
Its two log helpers keep logs safe: ``redact`` shortens pushkeys, ``log_safe`` escapes what a
user or a request chose. Everything here is a plain function or a small class that tests can
call directly, without a worker.
"""

import functools
import heapq
import http.client
import ipaddress
import itertools
import json
import re
import select
import socket
import ssl
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from marshmallow import ValidationError

import crypto
from schemas import check_gateway_url

#: Items per batch request: the most upstream allows, and the least a gateway must take.
BATCH_SIZE = 100
#: The error a gateway answers with status 400 to a batch too big for it (upstream-latest).
BATCH_TOO_LARGE = "Batch size exceeds maximum limit"
MATRIX_NOTIFY = "/_matrix/push/v1/notify"
GEMATIK_NOTIFY = "/push/v1/notify"
USER_AGENT = "push-service/1.0"
DEFAULT_PORTS = {"http": 80, "https": 443}
#: Gateway URLs whose verdict a worker remembers (``request_for``); more, and it starts afresh.
CHECKED_URLS = 10000
#: Gateway origins whose idle connections are kept (those used longest ago go first).
MAX_ORIGINS = 64

#: How long a worker remembers what a gateway's answers taught it (``GatewayMemory``): an hour
#: costs a gateway that stays as it was one request an hour per worker to find out again, and
#: one upgraded or reconfigured in the meantime at most an hour of the old way.
GATEWAY_MEMORY_SECONDS = 3600.0


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
        alone = " (too large even alone)" if refused_as_too_large(status, answer) else ""
        reason = f"gateway answered {status}{alone}: {detail}"
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


@dataclass
class Request:
    """How one delivery goes to its gateway: ``body``, a notification object, POSTed alone to
    ``url`` or as an item of a batch to it. ``seed_era`` is the request to make instead when
    the gateway turns out to speak the seed-era API, which has no batch endpoints."""

    url: str
    body: dict
    batch: bool = False
    seed_era: "Request" = None


def device_of(pusher, data):
    """The ``device`` object a gateway gets: pusher data without the url."""
    return {"app_id": pusher.app_id, "pushkey": pusher.pushkey, "pushkey_ts": pusher.pushkey_ts,
            "data": {k: v for k, v in data.items() if k != "url"}, "tweaks": {}}


def request_for(pusher, notification, generations, checked=None):
    """The Request for one delivery: what its gateway URL gets (SPEC section 5).

    ``generations`` maps an encryption key id to (key_identifier, this month's generation).
    The URL is checked against the operator's rules again (they may have changed since the
    pusher was registered); ``checked``, a dict, remembers each URL's verdict for the next
    delivery to it (a worker keeps one: the rules change only with a restart).
    """
    data = json.loads(pusher.data)
    url = data.get("url", "")
    problem = url_problem(url, checked)
    if problem is not None:
        raise Unsendable(problem)
    device = device_of(pusher, data)
    common = {"prio": notification.prio}
    if notification.counts:
        common["counts"] = json.loads(notification.counts)
    if pusher.encryption_key_id is None:
        return plain_request(url, notification, common, device, data.get("format"))
    return sealed_request(url, envelope_for(pusher, notification, generations), common, device)


def url_problem(url, checked=None):
    """Why the operator's rules refuse gateway ``url`` now, or None; ``checked`` (a dict, or
    None) remembers the verdicts."""
    if checked is not None and url in checked:
        return checked[url]
    try:
        check_gateway_url(url)
        problem = None
    except ValidationError as e:
        problem = f"gateway URL not allowed: {e.messages}"
    if checked is not None:
        if len(checked) >= CHECKED_URLS:
            checked.clear()
        checked[url] = problem
    return problem


def plain_request(url, notification, common, device, data_format):
    """A plain notification: as it is to a single-notify URL, as a batch item to a base.

    ``room_id`` is the channel: the gematik gateway builds an Apple push only for a
    notification with both ``event_id`` and ``room_id``.
    """
    body = {"event_id": notification.id, "room_id": notification.channel,
            "type": notification.channel, **common, "devices": [device]}
    if data_format != "event_id_only":
        body["content"] = json.loads(notification.payload)
    if url_form(url) == "base":
        return Request(endpoint(url, "notify/batch"), body, batch=True)
    return Request(url, body)


def sealed_request(url, envelope, common, device):
    """An encrypted notification: a Matrix notification whose content is the envelope, or an
    item of a gematik notifyEncrypted/batch (never ciphertext to a current gateway's /notify,
    which takes plain notifications only)."""
    form = url_form(url)
    if form == "matrix":
        # Content is the one part a stock Matrix gateway passes on. event_id (the notification
        # id, as in the envelope) lets Sygnal's APNs and FCM paths send something at all, and
        # the app fetch the history entry where the envelope did not fit.
        body = {"event_id": envelope["identifier"], **common, "content": envelope,
                "devices": [device]}
        return Request(url, body)
    request = Request(endpoint(url, "notifyEncrypted/batch"),
                      {**envelope, **common, "device": device}, batch=True)
    if form == "notify":
        request.seed_era = Request(url, {**envelope, **common, "devices": [device]})
    return request


def envelope_for(pusher, notification, generations):
    """The sealed envelope of an encrypted delivery: its payload sealed under this month's key,
    and what the phone needs to open it."""
    if pusher.encryption_key_id not in generations:
        raise Unsendable("the stored key cannot be opened (was the server key changed?)")
    key_identifier, generation = generations[pusher.encryption_key_id]
    return {"ciphertext": crypto.seal(generation.aes_key, notification.payload.encode()),
            "time_message_encrypted": generation.period,
            "key_identifier": key_identifier, "identifier": notification.id}


@functools.lru_cache(maxsize=4096)  # the same few URLs, delivery after delivery
def url_form(url):
    """How a gateway URL ends: ``matrix`` (/_matrix/push/v1/notify), ``notify`` (a gematik
    /push/v1/notify) or ``base`` (a gematik /push/v1/ or /push/v1: the endpoint is ours to add)."""
    path = urlsplit(url).path
    if path.endswith(MATRIX_NOTIFY):
        return "matrix"
    return "notify" if path.endswith(GEMATIK_NOTIFY) else "base"


@functools.lru_cache(maxsize=4096)  # the same few URLs, delivery after delivery
def endpoint(url, name):
    """The URL of gematik endpoint ``name`` of the gateway ``url`` belongs to (a base or its
    /notify): the endpoint after .../push/v1/, the query kept."""
    parts = urlsplit(url)
    path = parts.path
    if path.endswith(GEMATIK_NOTIFY):
        path = path[:-len("notify")]
    elif not path.endswith("/"):
        path += "/"  # <base>/notify/batch, never .../v1notify/batch
    return urlunsplit(parts._replace(path=path + name))


def encode(body):
    """A request body as it goes on the wire (the client sends this; batches are cut by it)."""
    return json.dumps(body, separators=(",", ":")).encode()


class Job:
    """One gateway request and the deliveries it carries."""

    def __init__(self, url, batch=False, items=()):
        self.url = url
        self.batch = batch
        self.items = list(items)  # (delivery, Request)

    @property
    def deliveries(self):
        return [d for d, _ in self.items]

    @functools.cached_property
    def host(self):
        """The gateway's host and port, for logs (escaped: the URL came from a user)."""
        return log_safe(self.url.split("/")[2]) if "//" in self.url else "?"

    def body(self):
        """The JSON request body: a batch of items, or a single notification."""
        if self.batch:
            return {"notifications": [batch_item(d, r) for d, r in self.items]}
        return {"notification": self.items[0][1].body}

    def without(self, ids):
        """This job without the deliveries whose ids are in ``ids``."""
        return Job(self.url, self.batch, [(d, r) for d, r in self.items if d.id not in ids])


def batch_item(delivery, request):
    """One item of a batch request: the delivery's id, for the per-item results."""
    return {"id": str(delivery.id), "notification": request.body}


#: Bytes of a batch body without items, less the comma that every item after the first adds.
EMPTY_BATCH_BYTES = len(encode({"notifications": []})) - 1


def group_into_jobs(requests, max_bytes, memory):
    """Jobs for (delivery, Request) pairs: one for each single request; for each batch
    endpoint, batches of at most BATCH_SIZE items (fewer where ``memory`` knows the gateway
    took fewer) and at most ``max_bytes`` of body as sent (an item bigger than that alone goes
    alone). A gateway ``memory`` knows to speak the seed-era API gets its seed-era requests."""
    jobs, open_batches = [], {}  # batch endpoint -> (its newest job, that job's body size)
    for d, request in requests:
        request = memory.as_known(request)
        if not request.batch:
            jobs.append(Job(request.url, items=[(d, request)]))
            continue
        item = len(encode(batch_item(d, request))) + 1  # and the comma before it
        job, size = open_batches.get(request.url, (None, 0))
        if (job is None or len(job.items) >= memory.batch_limit(request.url)
                or size + item > max_bytes):
            job, size = Job(request.url, batch=True), EMPTY_BATCH_BYTES
            jobs.append(job)
        job.items.append((d, request))
        open_batches[request.url] = (job, size + item)
    return jobs


# --- what a gateway's answer asks for ---------------------------------------------------------


def refused_as_too_large(status, answer):
    """Whether a gateway refused a request for its size: 413, or 400 with
    ``"error": "Batch size exceeds maximum limit"`` (upstream-latest)."""
    return status == 413 or (status == 400 and isinstance(answer, dict)
                             and answer.get("error") == BATCH_TOO_LARGE)


def smaller_batches(job, answer):
    """The items of a batch refused for its size, in smaller batches: of the gateway's
    ``details.max_batch_size`` when it names one below this batch's size, else of half."""
    details = answer.get("details") if isinstance(answer, dict) else None
    given = details.get("max_batch_size") if isinstance(details, dict) else None
    count = len(job.items)
    size = (given if isinstance(given, int) and not isinstance(given, bool) and 0 < given < count
            else (count + 1) // 2)
    return [Job(job.url, True, job.items[i:i + size]) for i in range(0, count, size)]


def follow_ups(job, status, answer, memory):
    """The jobs that carry some of ``job``'s deliveries again after this answer (the others
    get their outcomes), and what ``memory`` learns of the gateway from it.

    A batch refused for its size goes again in smaller batches; a single delivery refused so
    fails (``outcomes_for``). A notifyEncrypted/batch that the gateway does not have (404,
    405: a gateway of the seed-era API) goes again as seed-era requests to /notify, for the
    items that came from such a URL.
    """
    if not job.batch:
        return []
    if refused_as_too_large(status, answer) and len(job.items) > 1:
        again = smaller_batches(job, answer)
        memory.learn_batch_limit(job.url, len(again[0].items))
        return again
    if status in (404, 405):
        again = [Job(r.seed_era.url, items=[(d, r.seed_era)]) for d, r in job.items if r.seed_era]
        if again:
            memory.learn_seed_era(job.url)
        return again
    return []


class GatewayMemory:
    """What a worker has learned of gateways from their answers: which batch endpoints a
    gateway of the seed-era API lacks, and how many items a batch endpoint that refused a
    batch for its size was sent next. Each fact is kept GATEWAY_MEMORY_SECONDS, then tried
    afresh (a gateway may be upgraded or reconfigured). Taught by the sending threads, read
    by the one that builds requests."""

    def __init__(self, seconds=GATEWAY_MEMORY_SECONDS):
        self.seconds = seconds
        self.lock = threading.Lock()
        self.facts = {}  # (what, batch endpoint URL) -> (value, until as monotonic time)

    def learn(self, what, url, value):
        """Remember ``value`` for a while; forget what has lapsed."""
        current = time.monotonic()
        with self.lock:
            self.facts = {k: v for k, v in self.facts.items() if v[1] > current}
            self.facts[(what, url)] = (value, current + self.seconds)

    def recall(self, what, url, default):
        """What was learned and has not lapsed, or ``default``."""
        with self.lock:
            value, until = self.facts.get((what, url), (default, 0.0))
        return value if until > time.monotonic() else default

    def learn_seed_era(self, url):
        """The gateway of batch endpoint ``url`` does not have it (a seed-era gateway)."""
        self.learn("seed-era", url, True)

    def learn_batch_limit(self, url, items):
        """Batch endpoint ``url`` is sent at most ``items`` items at once from now on."""
        self.learn("batch limit", url, min(items, self.batch_limit(url)))

    def batch_limit(self, url):
        """The most items a batch to ``url`` may carry."""
        return self.recall("batch limit", url, BATCH_SIZE)

    def as_known(self, request):
        """``request``, or its seed-era form for a gateway known to be of the seed era."""
        if request.seed_era is not None and self.recall("seed-era", request.url, False):
            return request.seed_era
        return request


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


def open_socket(host, port, timeout, allow_private):
    """A TCP connection to ``host``: its first address that we may connect to (public unicast
    only, unless the operator allows private gateways), checked after resolution so that a
    name cannot point a request somewhere a URL check let through."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        addresses = [a for a in addresses if address_allowed(a)]
        if not addresses:
            raise BlockedAddress(f"{host} resolves only to non-public addresses")
    sock = socket.create_connection((addresses[0], port), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def shut_down(sock):
    """Shut a connection down both ways; a socket already closed is fine.

    The plain socket's shutdown, also for a TLS socket (``SSLSocket.shutdown`` would drop its
    TLS state under the thread reading from it). A closed socket object has no descriptor any
    more, so this never reaches a descriptor number that was closed and handed to another
    connection meanwhile.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class GatewayConnection(http.client.HTTPConnection):
    """One keep-alive connection to a gateway (http, or https with ``tls``), made by
    ``open_socket``, under the deadline of the request it carries.

    The standard library's HTTP/1.1 client reads the answer (status line, at most 100
    headers, Content-Length or chunked framing); what this adds is where it connects, the
    TLS handshake done after the socket is under the deadline, and ``cut``: shutting the
    socket down from the watchdog thread, whatever the request's thread is doing with it.
    """

    def __init__(self, origin, timeouts, tls, allow_private):
        scheme, host, port = origin
        super().__init__(host, port, timeout=timeouts[1])
        self.default_port = DEFAULT_PORTS[scheme]  # Host: names the port only if it is another
        self.origin = origin
        self.connect_timeout = timeouts[0]
        self.tls = tls
        self.allow_private = allow_private
        self.lock = threading.Lock()
        self.deadline = None  # the Deadline of the request under way
        self.cuttable = None  # the socket a cut shuts down

    def connect(self):
        sock = open_socket(self.host, self.port, self.connect_timeout, self.allow_private)
        sock.settimeout(self.timeout)  # the read timeout from here on, handshake included
        self.adopt(sock)
        if self.tls is not None:
            self.adopt(self.tls.wrap_socket(sock, server_hostname=self.host,
                                            do_handshake_on_connect=False))
            self.sock.do_handshake()

    def adopt(self, sock):
        """Carry on over ``sock``; if the deadline has passed meanwhile, it is cut at once.

        ``cuttable`` keeps the socket also after ``http.client`` lets go of it for an answer
        that ends when the gateway closes the connection (the answer still reads from it).
        """
        with self.lock:
            self.sock = self.cuttable = sock
            if self.deadline is not None and self.deadline.expired:
                shut_down(sock)

    def cut(self):
        """Shut the connection down: a connect, handshake, write or read under way ends."""
        with self.lock:
            if self.cuttable is not None:
                shut_down(self.cuttable)

    def dropped(self):
        """Whether an idle connection cannot carry another request: the gateway closed it
        (or sent something nobody asked for). poll, not select: a busy process may hold
        descriptors above select's limit of 1024."""
        if self.sock is None:
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))


class Deadline:
    """The time limit of one request: when it is up, the request's connection is cut, so
    whatever read or write is under way ends at once."""

    __slots__ = ("at", "lock", "connection", "expired", "finished")

    def __init__(self, at):
        self.at = at
        self.lock = threading.Lock()
        self.connection = None
        self.expired = False
        self.finished = False

    def watch(self, connection):
        """Cut ``connection`` when the time is up."""
        with self.lock:
            self.connection = connection
            connection.deadline = self

    def expire(self):
        """The time is up: cut the request's connection, unless the request has finished."""
        with self.lock:
            if not self.finished:
                self.expired = True
                if self.connection is not None:
                    self.connection.cut()

    def finish(self):
        """The request is over: nothing is cut after this. Returns whether it expired."""
        with self.lock:
            self.finished = True
            if self.connection is not None:
                self.connection.deadline = None
                self.connection = None  # the pool decides how long it lives, not the heap
            return self.expired


class Watchdog:
    """One thread that expires deadlines when their time is up, for all requests of a client
    (a timer thread per request would cost a thread start per request).

    It wakes when the earliest deadline is due, and then also drops the deadlines of finished
    requests from the front of its heap: a thousand requests a second cost it no thousand
    wake-ups, and the heap holds about the requests under way.
    """

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
                while self.heap and (self.heap[0][0] <= current or self.heap[0][2].finished):
                    heapq.heappop(self.heap)[2].expire()  # a finished one ignores this
                self.condition.wait(self.heap[0][0] - current if self.heap else None)

    def close(self, wait=True):
        """Stop the thread (requests still under way keep their connections); ``wait``: until
        it has ended."""
        with self.condition:
            self.closed = True
            self.condition.notify()
        if wait and self.thread is not None:
            self.thread.join()


def tls_context(config):
    """The TLS context of gateway requests: the system CAs and ``PUSH_GATEWAY_CA_BUNDLE``
    trusted, TLS 1.2 at least, the client certificate of ``PUSH_GATEWAY_CLIENT_CERT`` (its key in
    ``PUSH_GATEWAY_CLIENT_KEY`` or in the same file) presented: mutual TLS.

    Raises RuntimeError naming the setting when a file is missing, cannot be read, holds no
    usable PEM, or the key does not belong to the certificate (``create_app`` builds one at
    start for that: such a mistake stops the start, not the first send).
    """
    context = ssl.create_default_context()  # system CAs; certificate and host name checked
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    bundle, cert, key = (readable_file(config, name) for name in (
        "GATEWAY_CA_BUNDLE", "GATEWAY_CLIENT_CERT", "GATEWAY_CLIENT_KEY"))
    if bundle:
        try:
            context.load_verify_locations(cafile=bundle)
        except ssl.SSLError as e:
            raise RuntimeError(f"PUSH_GATEWAY_CA_BUNDLE: no PEM certificates in {bundle}"
                               f" ({e.reason or e})") from e
    if key and not cert:
        raise RuntimeError("PUSH_GATEWAY_CLIENT_KEY is set without PUSH_GATEWAY_CLIENT_CERT")
    if cert:
        try:
            context.load_cert_chain(cert, key, password=refuse_password)
        except ssl.SSLError as e:
            if e.reason == "KEY_VALUES_MISMATCH":
                raise RuntimeError("PUSH_GATEWAY_CLIENT_KEY: the key does not belong to the"
                                   " certificate in PUSH_GATEWAY_CLIENT_CERT") from e
            raise RuntimeError("PUSH_GATEWAY_CLIENT_CERT / PUSH_GATEWAY_CLIENT_KEY: not a PEM"
                               " certificate and its key (the key goes in PUSH_GATEWAY_CLIENT_KEY"
                               f" or after the certificate in one file): {e}") from e
    return context


def readable_file(config, name):
    """The path the file setting ``name`` holds, once it is known to be readable; None when
    it is not set."""
    path = config[name]
    if not path:
        return None
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise RuntimeError(f"PUSH_{name}: cannot read {path}: {e.strerror}") from e
    return path


def refuse_password():
    """An encrypted client key is refused rather than its password asked for on a terminal
    that a server does not have."""
    raise RuntimeError("PUSH_GATEWAY_CLIENT_KEY: the key is encrypted; give it unencrypted"
                       " (in a file only the server's user can read)")




class GatewayClient:
    """POSTs JSON to gateways: keep-alive connections kept per origin, no redirects, capped
    answers, and a deadline on the whole exchange.

    The standard library's ``http.client`` speaks HTTP/1.1 (a client follows no redirect
    unless it is told to; this one never is). Its timeouts bound each socket operation, so a
    gateway that trickles its answer a byte at a time never trips them: each request also gets
    a total deadline of connect + read timeout, kept by a watchdog thread that cuts the
    request's connection when it passes (whether it is connecting, in a TLS handshake,
    sending, or reading headers or body). Name resolution is left to the system resolver and
    its own timeouts. A connection goes back for the next request to its origin only after a
    complete answer in time that did not ask to close it; at most ``pool_size`` idle ones per
    origin, for the ``MAX_ORIGINS`` origins used last. TLS trusts the system CAs and the
    operator's bundle, and presents the operator's client certificate, if any
    (``tls_context``).
    """

    HEADERS = {"User-Agent": USER_AGENT, "Content-Type": "application/json"}

    def __init__(self, config, pool_size):
        self.allow_private = config["ALLOW_PRIVATE_GATEWAYS"]
        self.timeouts = (config["GATEWAY_CONNECT_TIMEOUT"], config["GATEWAY_READ_TIMEOUT"])
        self.total = sum(self.timeouts)
        self.max_response = config["GATEWAY_MAX_RESPONSE_BYTES"]
        self.pool_size = pool_size
        self.tls = tls_context(config)
        self.watchdog = Watchdog()
        self.lock = threading.Lock()
        self.idle = OrderedDict()  # origin -> [idle GatewayConnection]; used last at the end
        # A client dropped without close() still closes its connections and ends its thread.
        weakref.finalize(self, close_pool, self.idle, self.lock, self.watchdog, False)

    def post(self, url, body):
        """Return (status, parsed JSON or None, Retry-After header or None).

        Raises DeadlineExceeded when the whole exchange outlasts connect + read timeout,
        CertificateFailure when the gateway's certificate does not verify, BlockedAddress for
        a host that resolves only to addresses we may not connect to, and OSError or
        ``http.client.HTTPException`` on other network trouble.
        """
        origin, target = origin_of(url)
        connection = self.connection(origin)
        deadline = self.watchdog.start(self.total)
        deadline.watch(connection)
        response, data, error, cut_short = None, b"", None, False
        try:
            try:
                connection.request("POST", target, body=encode(body), headers=self.HEADERS)
            except (BrokenPipeError, ConnectionResetError):
                # A gateway may answer before it has taken the whole body (413 for a batch
                # too large) and close: its answer may be waiting to be read all the same.
                cut_short, response = True, early_answer(connection)
                if response is None:
                    raise
            else:
                response = connection.getresponse()
            data = response.read(self.max_response + 1)
        except Exception as e:
            error = e
        expired = deadline.finish()  # before the connection can go back to the pool
        if error or expired or cut_short or not response.isclosed() or connection.sock is None:
            if response is not None:
                response.close()  # broken off, late, too long, or the gateway closes it
            connection.close()
        else:
            self.keep(connection)
        if expired:
            raise DeadlineExceeded(f"no complete answer within the {self.total:g} s deadline"
                                   " (connect + read timeout)") from error
        if isinstance(error, ssl.SSLCertVerificationError):
            raise CertificateFailure(str(error)) from error
        if error is not None:
            raise error
        try:
            parsed = json.loads(data) if data and len(data) <= self.max_response else None
        except ValueError:
            parsed = None
        return response.status, parsed, response.getheader("Retry-After")

    def connection(self, origin):
        """An idle connection to ``origin`` that is still open, or a new one (it connects
        when the request goes out, under the request's deadline)."""
        while True:
            with self.lock:
                kept = self.idle.get(origin)
                connection = kept.pop() if kept else None
            if connection is None:
                tls = self.tls if origin[0] == "https" else None
                return GatewayConnection(origin, self.timeouts, tls, self.allow_private)
            if not connection.dropped():
                return connection
            connection.close()

    def keep(self, connection):
        """Keep a connection whose exchange ended cleanly for the next request to its origin."""
        surplus = []
        with self.lock:
            kept = self.idle.setdefault(connection.origin, [])
            self.idle.move_to_end(connection.origin)
            if len(kept) < self.pool_size:
                kept.append(connection)
            else:
                surplus.append(connection)
            while len(self.idle) > MAX_ORIGINS:
                surplus += self.idle.popitem(last=False)[1]
        for extra in surplus:
            extra.close()

    def idle_connections(self, url):
        """How many open connections are kept for ``url``'s origin."""
        with self.lock:
            return len(self.idle.get(origin_of(url)[0], ()))

    def close(self):
        """Close every kept connection and stop the watchdog."""
        close_pool(self.idle, self.lock, self.watchdog, True)


def close_pool(idle, lock, watchdog, wait):
    """Close the connections in ``idle`` (a client's pool) and stop its watchdog."""
    with lock:
        kept = [c for connections in idle.values() for c in connections]
        idle.clear()
    for connection in kept:
        connection.close()
    watchdog.close(wait)


def early_answer(connection):
    """The answer a gateway sent before it closed a connection we were still sending on, or
    None when there is none to read."""
    try:
        return connection.getresponse()
    except (OSError, http.client.HTTPException):
        return None


def origin_of(url):
    """((scheme, host, port), request target) of a gateway URL."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError("not an http or https URL with a host")
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (parts.scheme, parts.hostname, port), target
