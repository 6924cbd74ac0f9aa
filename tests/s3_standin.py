"""An S3-compatible server on 127.0.0.1 for tests: moto's server (its WSGI app) behind a request log.

``with serve_s3() as s3:`` runs it on a free port and points the usual AWS configuration at it
(``AWS_ENDPOINT_URL``, test credentials, a region) for the ``with`` block, so code under test
finds it the way it would find a real store: through the store's own configuration, never
through arguments of ours. ``s3.requests`` lists every request (method, path, Range header),
``s3.count(path, method="GET")`` counts them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote


@dataclass(frozen=True)
class S3Request:
    """One request as the server saw it."""

    method: str
    path: str  # /<bucket>/<key>, unquoted
    range: str | None


@dataclass
class S3StandIn:
    """A running server."""

    url: str
    requests: list[S3Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, path: str, *, method: str | None = None) -> int:
        """Requests for ``path`` (``/<bucket>/<key>``), optionally of one method."""
        with self.lock:
            return sum(1 for r in self.requests if r.path == path and (method is None or r.method == method))

    def clear(self) -> None:
        """Forget the requests so far."""
        with self.lock:
            self.requests.clear()


_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def serve_s3() -> Iterator[S3StandIn]:
    """Run moto's S3 on 127.0.0.1 with the AWS configuration pointed at it (see the module docstring)."""
    import s3fs
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    state = S3StandIn(url="")

    def logged(environ: dict[str, Any], start_response: Any) -> Any:
        with state.lock:
            state.requests.append(
                S3Request(environ["REQUEST_METHOD"], unquote(environ.get("PATH_INFO", "")), environ.get("HTTP_RANGE"))
            )
        return app(environ, start_response)

    class Quiet(MotoRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            return

    server = make_server("127.0.0.1", 0, logged, threaded=True, request_handler=Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    saved = {name: os.environ.get(name) for name in (*_ENVIRONMENT, "AWS_ENDPOINT_URL", "AWS_PROFILE")}
    os.environ.update(_ENVIRONMENT)
    os.environ["AWS_ENDPOINT_URL"] = state.url
    os.environ.pop("AWS_PROFILE", None)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made for another server must not be reused
    try:
        yield state
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.shutdown()
        thread.join(timeout=5)
