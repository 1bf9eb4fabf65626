"""Configuration (SPEC section 6): names nobody reads are reported, the README lists every
setting, and the test suite itself never inherits PUSH_* variables from the shell."""

import logging
import os
import re
import subprocess
import sys

from servers import ROOT

from app import DEFAULTS
from models import db


def test_an_environment_variable_no_setting_reads_is_reported(make_app, monkeypatch, caplog):
    monkeypatch.setenv("PUSH_HISTROY_DAYS", "3")
    monkeypatch.setenv("PUSH_HISTORY_DAYS", "3")
    with caplog.at_level(logging.WARNING, logger="push"):
        app = make_app()
    assert app.config["HISTORY_DAYS"] == 3.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["environment variable PUSH_HISTROY_DAYS is set, but no setting reads it"]


def test_a_config_file_name_no_setting_reads_is_reported(make_app, tmp_path, caplog):
    instance = tmp_path / "instance"
    instance.mkdir(mode=0o700)
    (instance / "config.py").write_text(
        "HISTORY_DAYS = 7\nHISTROY_DAYS = 3\nPUSH_RETRY_MAX_SECONDS = 5\nSECRET_KEY = 'x'\n")
    with caplog.at_level(logging.WARNING, logger="push"):
        app = make_app()
    assert app.config["HISTORY_DAYS"] == 7.0
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warnings == [
        "instance/config.py sets HISTROY_DAYS, but no setting reads it",
        "instance/config.py sets PUSH_RETRY_MAX_SECONDS (write RETRY_MAX_SECONDS), but no"
        " setting reads it",
    ]


def test_a_clean_configuration_reports_nothing(make_app, caplog):
    with caplog.at_level(logging.WARNING, logger="push"):
        make_app()
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_the_readme_configuration_table_lists_every_setting():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    documented = set(re.findall(r"^\| `PUSH_([A-Z_]+)`", readme, re.MULTILINE))
    assert sorted(set(DEFAULTS) - documented) == []


def test_the_suite_never_inherits_push_variables_from_the_shell():
    # A developer's exported settings: were they read, the app would try a PostgreSQL server
    # that is not there, and the instance folder would be somewhere else.
    env = {**os.environ, "PUSH_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nothing",
           "PUSH_INSTANCE_PATH": "/nonexistent/instance"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_storage.py"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\d+ passed in ", result.stdout, re.MULTILINE), result.stdout  # no skips


def test_the_suite_runs_on_the_engine_it_was_asked_for(app, request):
    expected = {"sqlite": "SqliteDatabase", "postgresql": "PostgresqlDatabase"}
    assert type(db.obj).__name__ == expected[request.config.getoption("engine")]
