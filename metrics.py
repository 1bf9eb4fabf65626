"""Prometheus metrics (SPEC section 6): counted in every process, added up at ``/metrics``.

Counters and histograms use prometheus-client's multiprocess mode: each process writes its
own small files into one folder, and a scrape adds up every file there. So the gunicorn
workers and any separate ``flask --app app worker`` processes of one instance show as one.
The folder is ``PROMETHEUS_MULTIPROC_DIR`` if set, else ``metrics/`` in the instance folder.
prometheus_client decides at import whether it counts in memory or in files, so this module
imports it only inside functions, after the folder is set (``init_app``; gunicorn's master
in ``server_starting``): never import it at the top of a module.

A dead process's files stay, so a counter never goes down when a gunicorn worker is replaced;
when the server starts again, ``server_starting`` (gunicorn.conf.py's ``on_starting``) removes
the files of every process that is gone, keeping those of worker commands still running.

The gauges (pending deliveries, the oldest one's age, pushers) are not counted by processes
at all: the process answering a scrape reads them from the database (``DatabaseCollector``).
No process writes a gauge file, so none needs marking dead when it exits (gunicorn's
``child_exit`` hook would only matter for ``live*`` gauges) and a fresh process cannot count
a dead one's value twice.
"""

import contextlib
import functools
import glob
import logging
import os
import re
import secrets
import threading
import time
from types import SimpleNamespace

from flask import current_app, g, request
from flask_smorest import abort
from peewee import fn

from models import Delivery, Pusher

log = logging.getLogger("push.metrics")

FOLDER_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
HERE = os.path.dirname(os.path.abspath(__file__))

#: Methods counted by name; any other (a client may send anything) is counted as "other".
METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
#: Gateway hosts are chosen by users: past this many per process, the rest share "other".
MAX_GATEWAY_LABELS = 200
GATEWAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60)
#: Worker results as counted in push_deliveries_total; "released" (not tried) is not counted.
OUTCOMES = {"delivered": "delivered", "retry": "retried", "failed": "failed",
            "rejected": "rejected"}

_gateways = set()
_gateways_lock = threading.Lock()
_instruments_lock = threading.Lock()


def harmless(func):
    """Counting must never break what is counted (a request, a delivery): log and go on."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception:
            log.exception("could not count %s", func.__name__)

    return wrapper


def init_app(app):
    """Choose this process's metrics folder, count every request, serve ``/metrics``."""
    folder = os.environ.setdefault(FOLDER_VARIABLE, os.path.join(app.instance_path, "metrics"))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    # First of all hooks, so that a request another hook answers early (a bad token, a rate
    # limit) is timed and counted too.
    app.before_request_funcs.setdefault(None, []).insert(0, start_timer)
    app.after_request(count_request)
    app.add_url_rule("/metrics", "metrics", serve_metrics)


def instruments():
    """The counters and histograms, made at first use (after the folder is chosen)."""
    with _instruments_lock:  # sending threads may all ask first at once
        return make_instruments()


@functools.cache
def make_instruments():
    """Define the counters and histograms (once per process)."""
    from prometheus_client import Counter, Histogram

    return SimpleNamespace(
        http_requests=Counter("push_http_requests_total", "HTTP requests answered",
                              ["method", "route", "status"]),
        http_seconds=Histogram("push_http_request_duration_seconds",
                               "Time to answer an HTTP request", ["route"]),
        notifications=Counter("push_notifications_total",
                              "Notifications accepted by the sender API"),
        deliveries=Counter("push_deliveries_total", "Delivery attempts by outcome",
                           ["outcome"]),
        gateway_seconds=Histogram("push_gateway_request_duration_seconds",
                                  "Time of one request to a push gateway", ["gateway"],
                                  buckets=GATEWAY_BUCKETS),
    )


# --- what the app counts ----------------------------------------------------------------------


def start_timer():
    """Before a request: note when it started."""
    g.push_request_started = time.perf_counter()


def count_request(response):
    """After a request: count it under its URL rule, never its raw path (pushkeys)."""
    started = g.pop("push_request_started", None)
    if started is not None:
        request_answered(request, response.status_code, time.perf_counter() - started)
    return response


@harmless
def request_answered(req, status, seconds):
    """Count one answered request."""
    route = req.url_rule.rule if req.url_rule is not None else "unmatched"
    method = req.method if req.method in METHODS else "other"
    found = instruments()
    found.http_requests.labels(method, route, str(status)).inc()
    found.http_seconds.labels(route).observe(seconds)


@harmless
def notification_accepted():
    """The sender API stored a new notification."""
    instruments().notifications.inc()


@harmless
def delivery_outcome(result, count=1):
    """A worker recorded ``count`` deliveries with this result (delivered, retry, failed or
    rejected; a delivery handed back untried is not counted)."""
    outcome = OUTCOMES.get(result)
    if outcome is not None and count:
        instruments().deliveries.labels(outcome).inc(count)


@contextlib.contextmanager
def timed_gateway_request(host):
    """Time one request to a gateway, whether it answers or fails."""
    started = time.perf_counter()
    try:
        yield
    finally:
        gateway_answered(host, time.perf_counter() - started)


@harmless
def gateway_answered(host, seconds):
    """Count one gateway request and how long it took."""
    instruments().gateway_seconds.labels(gateway_label(host)).observe(seconds)


def gateway_label(host):
    """The host itself, unless this process has already seen MAX_GATEWAY_LABELS others."""
    with _gateways_lock:
        if host in _gateways or len(_gateways) < MAX_GATEWAY_LABELS:
            _gateways.add(host)
            return host
    return "other"


# --- the scrape -------------------------------------------------------------------------------


class DatabaseCollector:
    """The gauges, read from the database at each scrape."""

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        pending = Delivery.state == "pending"
        oldest = Delivery.select(fn.MIN(Delivery.created_at)).where(pending).scalar()
        yield GaugeMetricFamily("push_deliveries_pending", "Deliveries not yet sent",
                                value=Delivery.select().where(pending).count())
        yield GaugeMetricFamily("push_delivery_oldest_pending_seconds",
                                "Age of the oldest pending delivery (0 when none)",
                                value=max(0.0, time.time() - oldest) if oldest else 0.0)
        yield GaugeMetricFamily("push_pushers", "Registered pushers",
                                value=Pusher.select().count())


def serve_metrics():
    """GET /metrics: every process's counters and the database gauges, in the text format."""
    expected = current_app.config["METRICS_TOKEN"]
    if expected:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            abort(401, errcode="M_MISSING_TOKEN", message="Missing access token")
        if not secrets.compare_digest(token.encode(), expected.encode()):
            abort(401, errcode="M_UNKNOWN_TOKEN", message="Unknown access token")
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(DatabaseCollector())
    return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}


# --- the folder -------------------------------------------------------------------------------


def server_starting():
    """In gunicorn's master, before it forks: fix the folder for every worker and clear what
    processes that are gone left in it."""
    instance = os.path.abspath(os.environ.get("PUSH_INSTANCE_PATH")
                               or os.path.join(HERE, "instance"))
    os.makedirs(instance, mode=0o700, exist_ok=True)
    folder = os.environ.setdefault(FOLDER_VARIABLE, os.path.join(instance, "metrics"))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    clean_folder(folder)


PROCESS_FILE = re.compile(r"_(\d+)\.db$")


def clean_folder(folder):
    """Remove the metric files of processes that no longer run; return how many."""
    removed = 0
    for path in glob.glob(os.path.join(folder, "*.db")):
        match = PROCESS_FILE.search(path)
        if match and not process_alive(int(match.group(1))):
            os.remove(path)
            removed += 1
    return removed


def process_alive(pid):
    """Whether a process with this pid runs (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
