"""A stand-in for the Kubernetes API server, serving one namespaced custom object over real HTTP.

No API server can run here, so the scaler's tests talk to this one through the real `kubernetes`
client. It answers the two calls the scaler makes the way the API server does:

- GET  /apis/{group}/{version}/namespaces/{ns}/{plural}/{name}: the object, or a 404 Status;
- PATCH the same path with `application/json-patch+json`: applies the RFC 6902 operations to a copy
  (a failed `test` or a missing path: 422); if the patched object's metadata.resourceVersion is not
  the stored one: 409 Conflict ("the object has been modified"), as the API server's optimistic
  concurrency check does; else stores it under a new resourceVersion and answers it. Other patch
  types: 415. Any other method: 405.

Every request is recorded (method, path, content type, authorization, parsed body). `on_patch`
runs before a PATCH is applied: a test writes there as a concurrent client would.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    content_type: str | None
    authorization: str | None
    body: Any


class PatchError(Exception):
    """An operation the API server would refuse with 422 Unprocessable Entity."""


class FakeApiServer:
    def __init__(self, obj: Manifest, path: str):
        self.object = copy.deepcopy(obj)
        self.path = path  # /apis/ray.io/v1/namespaces/<ns>/rayclusters/<name>
        self.requests: list[Request] = []
        self.on_patch: Callable[[FakeApiServer], None] | None = None
        self.forbid = False  # answer 403 to everything, as a missing RBAC rule would
        self.lock = threading.Lock()

    def write(self, change: Callable[[Manifest], None]) -> None:
        """A write by another client: change the stored object and give it a new resourceVersion."""
        change(self.object)
        self.object["metadata"]["resourceVersion"] = str(int(self.object["metadata"]["resourceVersion"]) + 1)

    def patches(self) -> list[Request]:
        return [r for r in self.requests if r.method == "PATCH"]

    def handle(self, method: str, path: str, content_type: str | None, body: Any) -> tuple[int, Manifest]:
        if self.forbid:
            return 403, status(403, "Forbidden", f"{method} {path} is forbidden")
        if path.split("?")[0] != self.path:
            return 404, status(404, "NotFound", f"{path} not found")
        if method == "GET":
            return 200, self.object
        if method != "PATCH":
            return 405, status(405, "MethodNotAllowed", f"{method} is not served here")
        if content_type != "application/json-patch+json":
            return 415, status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: "
                               f"{content_type}")
        if self.on_patch is not None:
            self.on_patch(self)
        return self.apply(body)

    def apply(self, ops: Any) -> tuple[int, Manifest]:
        patched = copy.deepcopy(self.object)
        try:
            for op in ops:
                apply_op(patched, op)
        except PatchError as err:
            return 422, status(422, "Invalid", str(err))
        stored = self.object["metadata"]["resourceVersion"]
        if patched["metadata"].get("resourceVersion") not in (None, stored):
            name = self.object["metadata"]["name"]
            return 409, status(409, "Conflict", f'Operation cannot be fulfilled on rayclusters.ray.io "{name}": '
                               "the object has been modified; please apply your changes to the latest version "
                               "and try again")
        patched["metadata"]["resourceVersion"] = str(int(stored) + 1)
        self.object = patched
        return 200, self.object


def status(code: int, reason: str, message: str) -> Manifest:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def apply_op(doc: Manifest, op: Manifest) -> None:
    """One RFC 6902 operation (test, replace, add, remove) on `doc`, in place."""
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
    node: Any = doc
    for part in parents:
        node = _child(node, part, op)
    key: Any = int(last) if isinstance(node, list) else last
    exists = (0 <= key < len(node)) if isinstance(node, list) else key in node
    if op["op"] == "test":
        if not exists or node[key] != op["value"]:
            raise PatchError(f"testing value {op['path']} failed")
    elif op["op"] in ("replace", "remove"):
        if not exists:
            raise PatchError(f"{op['op']} operation does not apply: doc is missing path: {op['path']}")
        if op["op"] == "replace":
            node[key] = op["value"]
        else:
            del node[key]
    elif op["op"] == "add":
        if isinstance(node, list):
            node.insert(key, op["value"])
        else:
            node[key] = op["value"]
    else:
        raise PatchError(f"unexpected op {op['op']!r}")


def _child(node: Any, part: str, op: Manifest) -> Any:
    try:
        return node[int(part)] if isinstance(node, list) else node[part]
    except (KeyError, IndexError, ValueError):
        raise PatchError(f"doc is missing path: {op['path']}") from None


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _serve(self) -> None:
        api = self.server.api
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        content_type = self.headers.get("Content-Type")
        with api.lock:
            api.requests.append(Request(self.command, self.path, content_type, self.headers.get("Authorization"),
                                        body))
            code, answer = api.handle(self.command, self.path, content_type, body)
            data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_PUT = do_POST = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the requests are recorded instead
        return


class _Server(ThreadingHTTPServer):
    api: FakeApiServer


@contextmanager
def serving(api: FakeApiServer) -> Iterator[str]:
    """Serve `api` on 127.0.0.1 on a free port; yields its URL."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.api = api
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
