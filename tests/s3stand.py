"""A real S3 API on 127.0.0.1 for tests: moto's server, behind a small proxy that counts
the bytes the store sends and can misbehave on purpose.

The proxy forwards every request to moto unchanged. It counts the body bytes of every
GET response (what a merge fetched), and ``faults`` makes it fail some ranged GETs of
``.safetensors`` objects the way real stores and networks do:

* ``"503"``: answer ``503 SlowDown`` (throttling) without forwarding;
* ``"cut"``: send the headers and half of the body, then drop the connection (a reset
  mid-body);
* ``"short"``: answer 206 with a body shorter than the range asked for, and a matching
  ``Content-Length`` (a response that looks whole but is not);
* ``"403"``: answer ``403 AccessDenied`` (a permanent error).

``delay_s`` slows every ranged GET of a ``.safetensors`` object (a slow store, so that a
test can stop a merge while it runs).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Stand:
    """moto's S3 server and a counting, fault-injecting proxy in front of it."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        self.moto_port = free_port()
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self.moto.start()
        self.lock = threading.Lock()
        self.bytes_sent = 0  # GET response bodies
        self.ranged_gets = 0
        self.faults: list[str] = []  # cycled over ranged .safetensors GETs
        self.fault_every = 0  # 0: none; n: every n-th such GET gets the next fault
        self.faults_injected = 0
        self.delay_s = 0.0
        self.requests: dict[str, int] = {}  # "GET range", "GET", "PUT part", "PUT", "HEAD", ... -> count
        stand = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                ranged = self.command == "GET" and "Range" in self.headers and ".safetensors" in self.path
                kind = self.command + (" range" if "Range" in self.headers else "")
                kind += " part" if "partNumber=" in self.path else ""
                with stand.lock:
                    stand.requests[kind] = stand.requests.get(kind, 0) + 1
                fault = stand._next_fault() if ranged else None
                if ranged and stand.delay_s:
                    time.sleep(stand.delay_s)
                if fault in ("503", "403"):
                    code = b"SlowDown" if fault == "503" else b"AccessDenied"
                    payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>' + code + b"</Code>"
                               b"<Message>injected by the test proxy</Message></Error>")
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", stand.moto_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "short" and resp.status == 206 and len(data) > 1:
                    data = data[: len(data) // 2]
                    out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_HEADERS
                                   and k.lower() not in ("content-length", "content-range")]
                else:
                    out_headers = [(k, v) for k, v in resp.getheaders()
                                   if k.lower() not in HOP_HEADERS and k.lower() != "content-length"]
                self.send_response(resp.status)
                for k, v in out_headers:
                    self.send_header(k, v)
                # a HEAD's Content-Length is the object's, not the (empty) body's
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if fault == "cut" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)
                    if self.command == "GET":
                        with stand.lock:
                            stand.bytes_sent += len(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.proxy = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.proxy.daemon_threads = True
        self._thread = threading.Thread(target=self.proxy.serve_forever, daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self.proxy.server_address[1]}"

    def _next_fault(self) -> str | None:
        with self.lock:
            self.ranged_gets += 1
            if not self.faults or not self.fault_every or self.ranged_gets % self.fault_every:
                return None
            fault = self.faults[self.faults_injected % len(self.faults)]
            self.faults_injected += 1
            return fault

    def reset_counts(self) -> None:
        with self.lock:
            self.bytes_sent = self.ranged_gets = self.faults_injected = 0
            self.requests = {}

    def options(self) -> dict:
        """fsspec options for s3fs through the proxy (as --storage-options would give)."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing",
                "client_kwargs": {"region_name": "us-east-1"}}

    def boto(self):
        """A boto3 client straight to moto (for checks the proxy should not see)."""
        import boto3

        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.moto_port}", aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def stop(self) -> None:
        self.proxy.shutdown()
        self.proxy.server_close()
        self.moto.stop()
