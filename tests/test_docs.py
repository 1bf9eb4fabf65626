"""/docs works offline: the page, its script and Swagger UI's assets all come from this server
(a pinned package), and a Content-Security-Policy allows nothing else."""

import importlib.resources
import re

URL_ATTRIBUTE = re.compile(r'(?:src|href|data-spec)="([^"]*)"')


def test_docs_page_names_no_other_host(client):
    response = client.get("/docs")
    assert response.status_code == 200 and response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert "//" not in html.replace("<!DOCTYPE html>", "")  # no http(s):// nor //host
    urls = URL_ATTRIBUTE.findall(html)
    assert len(urls) == 5, urls  # stylesheet, icon, spec, bundle, start script
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        asset.close()


def test_docs_scripts_come_from_the_pinned_package_and_start_offline(client):
    html = client.get("/docs").get_data(as_text=True)
    scripts = re.findall(r'<script src="([^"]+)"', html)
    bundle = client.get(scripts[0])
    packaged = importlib.resources.files("flask_swagger_ui") / "dist" / "swagger-ui-bundle.js"
    assert bundle.get_data() == packaged.read_bytes()
    bundle.close()
    start = client.get(scripts[1])
    assert start.mimetype == "text/javascript"
    script = start.get_data(as_text=True)
    assert "validatorUrl: null" in script  # else Swagger UI sends the spec to a validator
    assert "//" not in script
    spec = re.search(r'data-spec="([^"]+)"', html).group(1)
    assert client.get(spec).get_json()["info"]["title"] == "Push notification service"


def test_docs_carry_a_content_security_policy_of_this_origin_only(client):
    policy = client.get("/docs").headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in policy and "http" not in policy
    assert client.get("/docs/swagger-ui/../../app.py").status_code == 404  # nothing else
