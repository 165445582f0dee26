"""A Kubernetes API stand-in: just enough of server-side apply and namespace deletion.

It speaks real HTTP and checks what a real API server would reject: the apply
content type, the field manager, that the body names the object of the URL.
Tests can make the next requests fail with a chosen status.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class KubeStandIn:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], str]] = []
        self.fail_next: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                return

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, message: str) -> None:
                self._reply(
                    code, {"kind": "Status", "status": "Failure", "code": code, "message": message}
                )

            def _begin(self) -> tuple[str, dict[str, list[str]]] | None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                with standin._lock:
                    standin.requests.append(
                        (self.command, url.path, query, self.headers.get("Content-Type", ""))
                    )
                    failure = standin.fail_next.pop(0) if standin.fail_next else None
                if failure is not None:
                    self._status(*failure)
                    return None
                return url.path, query

            def do_PATCH(self) -> None:
                begun = self._begin()
                if begun is None:
                    return
                path, query = begun
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Content-Type") != "application/apply-patch+yaml":
                    self._status(415, "server-side apply needs application/apply-patch+yaml")
                    return
                if not query.get("fieldManager"):
                    self._status(422, "fieldManager is required for apply requests")
                    return
                if not path.endswith("/" + body["metadata"]["name"]):
                    self._status(400, "the name in the body does not match the URL")
                    return
                with standin._lock:
                    created = path not in standin.objects
                    standin.objects[path] = body
                self._reply(201 if created else 200, body)

            def do_DELETE(self) -> None:
                begun = self._begin()
                if begun is None:
                    return
                path, _ = begun
                with standin._lock:
                    existed = standin.objects.pop(path, None)
                    if existed is not None:  # a namespace takes its objects with it
                        prefix = "/namespaces/" + path.rsplit("/", 1)[1] + "/"
                        for other in [p for p in standin.objects if prefix in p]:
                            standin.objects.pop(other)
                if existed is None:
                    self._status(404, f"namespaces {path.rsplit('/', 1)[1]!r} not found")
                    return
                self._reply(200, {"kind": "Status", "status": "Success"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> KubeStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def kinds(self) -> list[str]:
        with self._lock:
            return sorted(obj["kind"] for obj in self.objects.values())
