"""Error bodies (SPEC section 3), health check and API documentation.

Tests that call the client API run under /push/v1 and under the seed-era paths.
"""

import json
import logging

import pytest
from support import SEED_ERA, assert_error, pusher_body

from models import db

pytestmark = pytest.mark.client_api


def path_of(paths, endpoint):
    """Where an endpoint named as in support.Paths is; "device" is the device pk1."""
    return paths.device("pk1") if endpoint == "device" else getattr(paths, endpoint)


@pytest.mark.parametrize("raw", [
    b"nope",
    b"{",
    b'{"kind": "http",}',
    b"\xff\xfe{}",  # not UTF-8
    b'{"kind": NaN}',  # not JSON (and would come back out as invalid JSON)
    b'{"kind": Infinity}',
    b"[" * 50000,  # nesting deep enough to blow the parser's recursion limit
    b'{"kind": ' + b"1" * 5000 + b"}",  # an integer past Python's conversion limit
], ids=["word", "unclosed", "trailing-comma", "not-utf8", "nan", "infinity", "deep-nesting",
        "huge-integer"])
def test_body_that_is_not_json_is_400_not_json(client, paths, alice, raw):
    response = client.post(paths.pusher_set, data=raw, content_type="application/json",
                           headers=alice)
    assert_error(response, 400, "M_NOT_JSON")


@pytest.mark.parametrize("raw", [b"", b"   \n"])
def test_empty_body_is_400_not_json(client, paths, alice, raw):
    response = client.post(paths.pusher_set, data=raw, content_type="application/json",
                           headers=alice)
    assert_error(response, 400, "M_NOT_JSON")


@pytest.mark.parametrize("raw", [b"[]", b"[{}]", b'"text"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_400_bad_json(client, paths, alice, raw):
    response = client.post(paths.pusher_set, data=raw, content_type="application/json",
                           headers=alice)
    assert_error(response, 400, "M_BAD_JSON")


def test_nan_in_data_is_refused_and_not_stored(api, alice):
    raw = json.dumps(pusher_body(data={"url": "https://gw.example/push/v1/notify",
                                       "x": float("nan")}))
    response = api.client.post(api.paths.pusher_set, data=raw, content_type="application/json",
                               headers=alice)
    assert_error(response, 400, "M_NOT_JSON")
    assert api.pushers(alice) == []


def test_json_body_is_read_whatever_the_content_type(api, alice):
    response = api.client.post(api.paths.pusher_set, data=json.dumps(pusher_body()),
                               content_type="text/plain", headers=alice)
    assert response.status_code == 200
    assert api.pushkeys(alice) == ["pk1"]


def test_validation_errors_are_400_not_422(api, alice):
    assert_error(api.set_pusher(alice, {"kind": "http"}), 400, "M_MISSING_PARAM")


@pytest.mark.parametrize("path", ["/push/v1/nope", "/nope", "/pushers", "/pushers/v2",
                                  "/channels", "/notifications/v1", "/history/v1/abc"])
def test_unknown_route_is_404_unrecognized_json(client, alice, path):
    assert_error(client.get(path, headers=alice), 404, "M_UNRECOGNIZED")


@pytest.mark.parametrize("endpoint, extra", [("pusher_set", "/extra"), ("pushers", "/"),
                                             ("channels", "/")])
def test_unknown_route_beside_a_client_path_is_404_unrecognized_json(client, paths, alice,
                                                                     endpoint, extra):
    path = path_of(paths, endpoint) + extra
    assert_error(client.get(path, headers=alice), 404, "M_UNRECOGNIZED")


@pytest.mark.parametrize("method, endpoint, allowed", [
    ("delete", "pushers", "GET"),
    ("get", "pusher_set", "POST"),
    ("put", "channels", "GET"),
    ("delete", "device", "POST"),
    ("get", "notifications", "POST"),
])
def test_wrong_method_is_405_unrecognized_json(client, paths, alice, method, endpoint, allowed):
    response = getattr(client, method)(path_of(paths, endpoint), headers=alice)
    assert_error(response, 405, "M_UNRECOGNIZED")
    assert allowed in response.headers["Allow"]


def test_body_over_max_body_bytes_is_413_too_large(make_app, paths, alice):
    client = make_app(MAX_BODY_BYTES=1000).test_client()
    body = pusher_body()
    filler = 1000 - len(json.dumps({**body, "x": ""}))
    exactly = json.dumps({**body, "x": "a" * filler})
    assert len(exactly) == 1000
    response = client.post(paths.pusher_set, data=exactly, content_type="application/json",
                           headers=alice)
    assert response.status_code == 200, response.get_json()
    too_big = json.dumps({**body, "x": "a" * (filler + 1)})
    response = client.post(paths.pusher_set, data=too_big, content_type="application/json",
                           headers=alice)
    assert_error(response, 413, "M_TOO_LARGE")


def test_default_body_limit_is_64_kib(client, paths, alice):
    body = json.dumps({**pusher_body(), "x": "a" * 65536})
    response = client.post(paths.pusher_set, data=body, content_type="application/json",
                           headers=alice)
    assert_error(response, 413, "M_TOO_LARGE")


def test_unexpected_exception_in_a_route_is_500_unknown_without_traceback(make_app, caplog):
    app = make_app(TESTING=False)

    def explode():
        raise RuntimeError("secret internals 1234")

    app.add_url_rule("/explode", "explode", explode)
    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/explode")
    assert_error(response, 500, "M_UNKNOWN")
    assert set(response.get_json()) == {"errcode", "error"}
    text = response.get_data(as_text=True)
    assert "Traceback" not in text and "secret internals" not in text
    assert "Traceback" in caplog.text and "RuntimeError: secret internals 1234" in caplog.text


def test_unexpected_database_failure_is_500_unknown(make_app, paths, alice, monkeypatch,
                                                    caplog):
    client = make_app(TESTING=False).test_client()
    execute_sql = db.obj.execute_sql

    def broken(sql, params=None):
        if "pusher" in sql:  # every statement on the pushers fails; the token lookup works
            raise RuntimeError("disk on fire")
        return execute_sql(sql, params)

    monkeypatch.setattr(db.obj, "execute_sql", broken)
    with caplog.at_level(logging.ERROR):
        response = client.get(paths.pushers, headers=alice)
    assert_error(response, 500, "M_UNKNOWN")
    assert "disk on fire" not in response.get_data(as_text=True)
    assert "RuntimeError: disk on fire" in caplog.text


def test_healthz_reports_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_openapi_lists_every_endpoint_with_the_error_shape(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.get_json()
    paths = {path: set(ops) for path, ops in spec["paths"].items()}
    expected = {
        "/push/v1/pushers": {"get"},
        "/push/v1/pushers/set": {"post"},
        "/push/v1/channels": {"get"},
        "/push/v1/channels/{pushkey}": {"get", "post"},
        "/push/v1/notifications": {"post"},
        "/push/v1/history/{notification_id}": {"get"},
        "/push/v1/history/device/{pushkey}": {"get"},
    }
    for path, methods in expected.items():
        assert methods <= paths.get(path, set()), path
    set_responses = spec["paths"]["/push/v1/pushers/set"]["post"]["responses"]
    assert {"200", "400", "401"} <= set(set_responses)
    error_schema = spec["components"]["schemas"]["Error"]
    assert {"errcode", "error"} <= set(error_schema["properties"])


def test_openapi_documents_the_client_api_once_under_push_v1(client):
    # The seed-era aliases are served but not documented: each operation once, under /push/v1.
    spec = client.get("/openapi.json").get_json()
    assert all(path.startswith("/push/v1/") for path in spec["paths"]), list(spec["paths"])
    for alias in (SEED_ERA.pushers, SEED_ERA.pusher_set, SEED_ERA.channels):
        assert alias not in spec["paths"]
        assert client.options(alias).status_code == 200  # yet the route is there


def test_docs_page_answers(client):
    response = client.get("/docs")
    assert response.status_code == 200
    assert b"swagger" in response.get_data().lower()


def test_every_error_response_is_json_with_errcode_and_error(client, paths, alice, service):
    responses = [
        client.get(paths.pushers),
        client.get(paths.pushers, headers={"Authorization": "Bearer nope"}),
        client.get(paths.pushers, headers=service),
        client.post(paths.pusher_set, data=b"x", headers=alice),
        client.post(paths.pusher_set, json=[], headers=alice),
        client.post(paths.pusher_set, json={"kind": "http"}, headers=alice),
        client.post(paths.pusher_set, json=pusher_body(kind="email"), headers=alice),
        client.get(paths.device("unknown"), headers=alice),
        client.get("/push/v1/missing", headers=alice),
        client.patch(paths.pushers, headers=alice),
    ]
    for response in responses:
        assert response.status_code >= 400
        assert response.mimetype == "application/json"
        body = response.get_json()
        assert isinstance(body["errcode"], str) and body["errcode"].startswith("M_")
        assert isinstance(body["error"], str) and body["error"]


def test_every_answer_forbids_sniffing_and_caching(make_app, paths, alice, service, channel,
                                                   register):
    channel("erp.task", default="enabled")
    register(alice)
    app = make_app(TESTING=False, MAX_BODY_BYTES=2000, RATE_LIMIT_ENABLED=True,
                   RATE_LIMIT_PER_MINUTE=5)  # alice's sixth counted request is a 429
    app.add_url_rule("/explode", "explode", lambda: 1 / 0)
    client = app.test_client()
    responses = {
        "200 list": client.get(paths.pushers, headers=alice),
        "200 set": client.post(paths.pusher_set, json=pusher_body("pk2"), headers=alice),
        "200 channels": client.get(paths.device("pk1"), headers=alice),
        "202 send": client.post("/push/v1/notifications", headers=service,
                                json={"user_id": "alice", "channel": "erp.task", "payload": {}}),
        "200 healthz": client.get("/healthz"),
        "401": client.get(paths.pushers),
        "403": client.get(paths.pushers, headers=service),
        "400": client.post(paths.pusher_set, data=b"x", headers=alice),
        "404": client.get("/push/v1/missing", headers=alice),
        "405": client.patch(paths.pushers, headers=alice),
        "413": client.post(paths.pusher_set, data=b" " * 3000, headers=alice),
        "429": client.get(paths.pushers, headers=alice),
        "500": client.get("/explode"),
    }
    for name, response in responses.items():
        assert str(response.status_code) == name.split()[0], (name, response.get_json())
        assert response.headers["X-Content-Type-Options"] == "nosniff", name
        assert response.headers["Cache-Control"] == "no-store", name


def test_openapi_declares_bearer_auth_once_and_its_errors_on_every_operation(client):
    spec = client.get("/openapi.json").get_json()
    assert spec["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            assert "security" not in operation, (path, method)
            assert {"401", "403", "429"} <= set(operation["responses"]), (path, method)
