"""Logs never carry a whole pushkey (SPEC section 5)."""

import logging

import pytest

from app import RequestLogFilter
from gateway import redact


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
