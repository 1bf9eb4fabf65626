"""gunicorn settings for production: ``gunicorn -c gunicorn.conf.py``.

gunicorn also reads this file by itself when it is started from this folder. Settings given on
the command line win over the ones here.

Threaded workers: a client that sends its request slowly holds one thread, not a whole
process, so a few slow clients cannot stop the health checks (sync workers, one request per
process, could be blocked by as many slow clients as there are processes). A request-buffering
proxy in front (README, "Production") keeps slow clients away from gunicorn altogether.
"""

import os

from gunicorn.glogging import Logger

wsgi_app = "app:create_app()"
bind = "127.0.0.1:8000"
workers = 4
worker_class = "gthread"
# Requests per process at once. The work is short database calls under the GIL, so more
# threads buy little speed; they are there so that a slow client holds one of many.
threads = 8
# Seconds without a heartbeat before the master replaces a worker (a gthread worker beats from
# its main loop, so a slow request does not count), and the grace a stopping worker gets to
# finish its requests and let its delivery worker end its round (longer than a gateway
# request: PUSH_GATEWAY_CONNECT_TIMEOUT + PUSH_GATEWAY_READ_TIMEOUT, 15 s by default).
timeout = 30
graceful_timeout = 30
# Seconds an idle kept-alive connection stays open.
keepalive = 5
# Request line and header sizes: a pushkey path percent-encoded is at most ~1.6 KB.
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
# gunicorn's control socket lives under $HOME/.gunicorn/ by default, shared by every gunicorn
# on the machine; this service does not use it.
control_socket_disable = True


def post_worker_init(worker):
    """Start this process's embedded delivery worker at boot, not at its first request.

    One per process: the request threads that would start it too find it running
    (``delivery.start_embedded`` checks under a lock). Another app served with these settings
    (bench/hello.py, the benchmark's floor) has no delivery worker.
    """
    import delivery

    if "EMBEDDED_WORKER" in getattr(worker.wsgi, "config", {}):
        delivery.serving(worker.wsgi)


def worker_exit(server, worker):
    """A worker process stopping gracefully lets its delivery worker finish what is under way
    (each request ends within its deadline) and record it, so a restart does not send it
    again. ``graceful_timeout`` must exceed the gateway timeouts for that."""
    import delivery

    delivery.stop_embedded()


def on_starting(server):
    """Before the workers fork: the metrics folder they all share, cleared of dead processes."""
    import metrics

    metrics.server_starting()


class PushLogger(Logger):
    """gunicorn's own lines, as JSON objects too when PUSH_LOG_FORMAT=json (environment)."""

    def setup(self, cfg):
        super().setup(cfg)
        if os.environ.get("PUSH_LOG_FORMAT", "").strip().lower() == "json":
            from app import JsonFormatter

            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    handler.setFormatter(JsonFormatter())


logger_class = PushLogger
