"""Logs never carry a whole pushkey (SPEC section 5); PUSH_LOG_FORMAT=json makes every line
one JSON object."""

import json
import logging
import sys

import pytest
from servers import Gunicorn, wait_until
from support import Api, bearer, cli_token

from app import JsonFormatter, RequestLogFilter
from gateway import redact
from models import Pusher, db


def access_record(line):
    return logging.LogRecord("werkzeug", logging.INFO, __file__, 1, '%s - - [%s] %s',
                             ("127.0.0.1", "24/Nov/2026", line), None)


def test_access_log_lines_shorten_pushkeys_in_paths():
    for path in ("/push/v1/channels/Xp%2FMzCt8%2F9DcSNE9cuia%3D",
                 "/channels/v1/Xp%2FMzCt8%2F9DcSNE9cuia%3D",
                 "/channels/v1/Xp/MzCt8/9DcSNE9cuia=",
                 "/push/v1/history/device/Xp/MzCt8/9DcSNE9cuia="):
        record = access_record(f'"GET {path} HTTP/1.1" 200 -')
        assert RequestLogFilter().filter(record)
        message = record.getMessage()
        assert "9DcSNE9cuia" not in message and "MzCt8" not in message
        assert "HTTP/1.1\" 200" in message


def test_seed_era_paths_keep_as_much_of_the_pushkey_as_the_others():
    def redacted(path):
        record = access_record(f'"GET {path}Xp%2FMzCt8%2F9DcSNE9cuia%3D HTTP/1.1" 200 -')
        RequestLogFilter().filter(record)
        return record.getMessage()

    assert redacted("/channels/v1/") == redacted("/push/v1/channels/").replace(
        "/push/v1/channels/", "/channels/v1/")
    assert "/channels/v1/Xp%2FM…" in redacted("/channels/v1/")


@pytest.mark.parametrize("path", ["/push/v1/pushers", "/channels/v1", "/pushers/v1/set"])
def test_other_lines_pass_unchanged(path):
    record = access_record(f'"GET {path} HTTP/1.1" 200 -')
    RequestLogFilter().filter(record)
    assert record.getMessage().endswith(f'"GET {path} HTTP/1.1" 200 -')


def test_redact_keeps_only_a_prefix():
    assert redact("abcdefghijklmnop") == "abcdef…"
    assert redact("abc") == "…"


def test_access_log_lines_escape_control_characters():
    record = access_record('"GET /push/v1/pushers\x1b[2J\r\n127.0.0.1 forged HTTP/1.1" 401 -')
    assert RequestLogFilter().filter(record)
    message = record.getMessage()
    assert "\r" not in message and "\n" not in message and "\x1b" not in message
    assert "pushers\\x1b[2J\\r\\n127.0.0.1 forged" in message


def test_an_exception_log_names_the_path_on_one_line(make_app, caplog):
    app = make_app(TESTING=False)

    def explode(rest):
        raise RuntimeError("boom")

    app.add_url_rule("/explode/<rest>", "explode", explode)
    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/explode/x%0A2026-01-01 INFO forged")
    assert response.status_code == 500
    [record] = [r for r in caplog.records if r.getMessage().startswith("Exception on")]
    assert record.getMessage() == "Exception on /explode/x\\n2026-01-01 INFO forged [GET]"


# --- PUSH_LOG_FORMAT=json -----------------------------------------------------------------------


def test_json_format_is_one_object_per_line_with_the_exception():
    try:
        1 / 0
    except ZeroDivisionError:
        record = logging.LogRecord("push.delivery", logging.ERROR, __file__, 1,
                                   "could not build delivery %s", (42,), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "logger", "message", "exception"}
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "ERROR", "push.delivery", "could not build delivery 42")
    assert entry["time"].endswith("+00:00")
    assert "Traceback" in entry["exception"] and "ZeroDivisionError" in entry["exception"]


def test_an_unknown_log_format_stops_the_app(make_app):
    with pytest.raises(RuntimeError, match="PUSH_LOG_FORMAT"):
        make_app(LOG_FORMAT="xml")


def test_gunicorn_and_the_app_log_only_json_lines(make_app, tmp_path, gateway, server_env):
    app = make_app()
    api, runner = Api(app.test_client()), app.test_cli_runner()
    alice = bearer(cli_token(runner, "users", "create", "alice"))
    service = bearer(cli_token(runner, "services", "create", "erp"))
    runner.invoke(args=["channels", "add", "erp.task", "--default", "enabled"])
    api.register(alice, "phone-1", url=gateway.url())
    with db.connection_context():  # a row the worker cannot build: it logs the exception
        Pusher.update(data="{not json").execute()
    assert api.send(service).status_code == 202
    env = server_env(app.instance_path, LOG_FORMAT="json", EMBEDDED_WORKER=True,
                     ALLOW_HTTP_GATEWAYS=True, ALLOW_PRIVATE_GATEWAYS=True, TYPO_SETTING=1)
    with Gunicorn(env, workers=1, log_dir=tmp_path) as server:
        wait_until(lambda: "could not build delivery" in server.log(), 30, "the worker's error")
    lines = [line for line in server.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    loggers = {e["logger"] for e in entries}
    assert {"gunicorn.error", "push"} <= loggers, loggers
    assert any(e["message"].startswith("Starting gunicorn") for e in entries)
    assert any("PUSH_TYPO_SETTING is set" in e["message"] and e["level"] == "WARNING"
               for e in entries)
    failure = [e for e in entries if e["message"].startswith("could not build delivery")]
    assert "JSONDecodeError" in failure[0]["exception"]
