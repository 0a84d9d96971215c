"""An HTTP proxy in front of the moto server that injects the faults S3 is known for: 503
SlowDown, 500 InternalError, connections reset mid-request, responses slower than the client's
read timeout; or a permanent 403 on every write."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ERROR = "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
FLAKY = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error."),
}


class FaultyProxy:
    """Every `period`-th request fails, cycling through 503, 500, reset and a response delayed by
    slow_seconds (when set), each kind at most `each` times: a retry of the same request goes
    through. With forbid_writes, every PUT/POST/DELETE gets 403 AccessDenied."""

    def __init__(
        self, upstream: str, period: int = 5, slow_seconds: float = 0.0, each: int = 2, forbid_writes: bool = False
    ):
        self.upstream = urlsplit(upstream)
        self.period, self.slow_seconds, self.each, self.forbid_writes = period, slow_seconds, each, forbid_writes
        self.requests = 0
        self.injected: list[str] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._next_fault(self.command)
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    return
                if fault in (403, 500, 503):
                    code, message = ("AccessDenied", "Access Denied") if fault == 403 else FLAKY[fault]
                    self._reply(
                        fault, _ERROR.format(code=code, message=message).encode(), {"Content-Type": "application/xml"}
                    )
                    return
                if fault == "slow":
                    time.sleep(proxy.slow_seconds)
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "proxy-connection")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                skip = ("transfer-encoding", "connection") + (() if self.command == "HEAD" else ("content-length",))
                self._reply(response.status, data, {k: v for k, v in response.getheaders() if k.lower() not in skip})
                upstream.close()

            def _reply(self, status, data, headers):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if self.command != "HEAD" or "content-length" not in {k.lower() for k in headers}:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _next_fault(self, method: str):
        with self._lock:
            self.requests += 1
            if self.forbid_writes and method in ("PUT", "POST", "DELETE"):
                fault = 403
            elif self.period and self.requests % self.period == 0:
                kinds = [
                    k
                    for k in [503, 500, "reset"] + (["slow"] if self.slow_seconds else [])
                    if self.injected.count(str(k)) < self.each
                ]
                if not kinds:
                    return None
                fault = kinds[(self.requests // self.period) % len(kinds)]
            else:
                return None
            self.injected.append(str(fault))
            return fault

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
