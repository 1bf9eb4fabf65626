"""Logs never carry a whole pushkey (SPEC section 5)."""

import logging

import pytest

from app import RedactPushkeys
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
        assert RedactPushkeys().filter(record)
        message = record.getMessage()
        assert "9DcSNE9cuia" not in message and "MzCt8" not in message
        assert "HTTP/1.1\" 200" in message


def test_seed_era_paths_keep_as_much_of_the_pushkey_as_the_others():
    def redacted(path):
        record = access_record(f'"GET {path}Xp%2FMzCt8%2F9DcSNE9cuia%3D HTTP/1.1" 200 -')
        RedactPushkeys().filter(record)
        return record.getMessage()

    assert redacted("/channels/v1/") == redacted("/push/v1/channels/").replace(
        "/push/v1/channels/", "/channels/v1/")
    assert "/channels/v1/Xp%2FM…" in redacted("/channels/v1/")


@pytest.mark.parametrize("path", ["/push/v1/pushers", "/channels/v1", "/pushers/v1/set"])
def test_other_lines_pass_unchanged(path):
    record = access_record(f'"GET {path} HTTP/1.1" 200 -')
    RedactPushkeys().filter(record)
    assert record.getMessage().endswith(f'"GET {path} HTTP/1.1" 200 -')


def test_redact_keeps_only_a_prefix():
    assert redact("abcdefghijklmnop") == "abcdef…"
    assert redact("abc") == "…"
