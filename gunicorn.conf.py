"""gunicorn settings for production: ``gunicorn -c gunicorn.conf.py``.

gunicorn also reads this file by itself when it is started from this folder. Settings given on
the command line win over the ones here.
"""

import os

from gunicorn.glogging import Logger

wsgi_app = "app:create_app()"
bind = "127.0.0.1:8000"
workers = 4
# gunicorn's control socket lives under $HOME/.gunicorn/ by default, shared by every gunicorn
# on the machine; this service does not use it.
control_socket_disable = True


def post_worker_init(worker):
    """Start this process's embedded delivery worker at boot, not at its first request."""
    import delivery

    delivery.serving(worker.wsgi)


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
