"""A hello-world Flask app: the floor under the figures of bench/http_load.py.

It is served by the same gunicorn command as the service (``gunicorn ... 'bench.hello:app'``),
so an endpoint's req/s divided by this app's shows what the service itself costs beyond
gunicorn, Werkzeug and Flask.
"""

from flask import Flask

app = Flask(__name__)


@app.get("/")
def hello():
    """A small JSON answer, like the service's own."""
    return {"hello": "world"}
