"""The interactive API docs at ``/docs``, served whole by the app itself: no CDN, no other host.

Swagger UI's files come from the pinned ``flask-swagger-ui`` package (its ``dist`` folder; its
blueprint is not used, because its page holds an inline script). Our page loads the bundle and
a small start script of ours from this origin, and its Content-Security-Policy allows nothing
else: a page where people paste bearer tokens runs no code from anywhere but this server, and
works on a box without internet access.
"""

import importlib.resources

from flask import (
    Blueprint,
    Response,
    current_app,
    render_template_string,
    send_from_directory,
    url_for,
)

ASSETS = str(importlib.resources.files("flask_swagger_ui") / "dist")

#: Same origin only; images may also be data: URLs (Swagger UI draws some icons that way).
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self';"
                           " img-src 'self' data:; connect-src 'self'; font-src 'self';"
                           " base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{{ title }}</title>
  <link rel="stylesheet" href="{{ url_for('docs.asset', filename='swagger-ui.css') }}">
  <link rel="icon" type="image/png"
        href="{{ url_for('docs.asset', filename='favicon-32x32.png') }}">
</head>
<body>
  <div id="swagger-ui" data-spec="{{ spec }}"></div>
  <script src="{{ url_for('docs.asset', filename='swagger-ui-bundle.js') }}"></script>
  <script src="{{ url_for('docs.start') }}"></script>
</body>
</html>
"""

# validatorUrl null: Swagger UI would otherwise send the spec to validator.swagger.io.
START = """window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.spec,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null
  });
});
"""

docs = Blueprint("docs", __name__, url_prefix="/docs")


def init_app(app):
    """Serve the docs page and its assets."""
    app.register_blueprint(docs)


@docs.after_request
def restrict(response):
    """Every /docs answer carries the policy (the page is what it protects)."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return response


@docs.get("")
def page():
    """The Swagger UI page for /openapi.json."""
    spec = url_for("api-docs.openapi_json")
    return render_template_string(PAGE, title=current_app.config["API_TITLE"], spec=spec)


@docs.get("/start.js")
def start():
    """The script that starts Swagger UI (a file, since the policy forbids inline scripts)."""
    return Response(START, mimetype="text/javascript")


@docs.get("/swagger-ui/<path:filename>")
def asset(filename):
    """A file of the pinned Swagger UI distribution."""
    return send_from_directory(ASSETS, filename, max_age=86400)
