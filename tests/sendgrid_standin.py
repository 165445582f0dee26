"""A SendGrid v3 mail/send stand-in: checks the key and the payload's shape, keeps the mail.

Like a deduplicating relay, it accepts a request whose ``Idempotency-Key`` it has seen
again without keeping a second copy (``repeats`` counts those).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API_KEY = "SG.test-key"


class SendGridStandIn:
    def __init__(self) -> None:
        self.mails: list[dict[str, Any]] = []
        self.fail_next: list[tuple[int, str]] = []
        self.repeats = 0
        seen: dict[str, str] = {}
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return

            def _reply(
                self, status: int, body: dict[str, Any] | None = None, **headers: str
            ) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                if self.path != "/v3/mail/send":
                    self._reply(404, {"errors": [{"message": "not found"}]})
                    return
                if self.headers.get("Authorization") != f"Bearer {API_KEY}":
                    self._reply(401, {"errors": [{"message": "authorization required"}]})
                    return
                mail = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if standin.fail_next:
                    status, message = standin.fail_next.pop(0)
                    self._reply(status, {"errors": [{"message": message}]})
                    return
                if not mail["personalizations"][0]["to"] or not mail["subject"]:
                    self._reply(400, {"errors": [{"message": "to and subject are required"}]})
                    return
                key = self.headers.get("Idempotency-Key", "")
                if key and key in seen:
                    standin.repeats += 1
                    self._reply(202, None, X_Message_Id=seen[key])
                    return
                standin.mails.append(mail)
                seen[key or f"none-{len(standin.mails)}"] = f"sg-{len(standin.mails)}"
                self._reply(202, None, X_Message_Id=f"sg-{len(standin.mails)}")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> SendGridStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
