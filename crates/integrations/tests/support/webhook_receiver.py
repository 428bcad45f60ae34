"""A webhook receiver for the integration tests: an HTTP server on
127.0.0.1 that records every delivery and verifies its signature with the
Standard Webhooks reference library (the PyPI package `standardwebhooks`,
installed by `scripts/install-deps --test`), never with HMAC code of our
own, so the service's signing is checked against an independent
implementation. The Rust tests spawn it as a subprocess;
webhook_receiver_selftest.py beside it checks it by hand.

Run: `python3 webhook_receiver.py --port-file PATH`. It binds 127.0.0.1 on
an ephemeral port and, once listening, writes the port (decimal, then a
newline) to PATH atomically (a temporary file renamed). It exits (status 0)
when its standard input reaches EOF, so the parent stops it by closing the
pipe (or by killing it); give it a pipe, not /dev/null.

HTTP/1.1 with keep-alive, one thread per connection, every answer with a
Content-Length. It prints nothing.

Control routes (JSON in and out):
  POST /_control/config   {"secrets": ["whsec_..."], "fail_until": unix
                          seconds or null, "fail_status": 500, "delay_ms": 0};
                          each key optional, only the keys given change;
                          an unknown key or a wrong type is a 400. -> {}
  GET  /_control/received {"requests": [...]}: every delivery so far in
                          arrival order, each {"path", "webhook_id",
                          "webhook_timestamp", "webhook_signature", "body"
                          (UTF-8, undecodable bytes replaced), "verified",
                          "verified_with" (index in secrets of the first that
                          verifies, or null), "status" (null while the
                          delivery is still in its delay), "at" (unix seconds
                          when received), "error" (the verification error, or
                          null)}
  POST /_control/reset    forgets the deliveries; config back to defaults
                          (no secrets, not failing, status 500, no delay). -> {}
  POST /_control/verify   {"secret", "headers": {"webhook-id", ...}, "body":
                          "<raw body>"} -> {"ok": true, "error": null} or
                          {"ok": false, "error": "<Class>: <message>"}

Any other POST is a delivery: its body is read exactly; it sleeps delay_ms;
while now < fail_until it answers fail_status with `failing` (recorded with
verified false and error null: nothing was checked); otherwise it tries
each configured secret in order with Webhook(secret).verify(body, headers)
and answers 200 `ok` for the first that verifies, else 400 with the error
text (also with no secret configured). The library itself refuses a
webhook-timestamp more than 5 minutes from now, either way.

verify() is called with json_parse=False: by default the library also
parses the body as JSON after the signature matched, and would fail a
correctly signed body that is not JSON with a JSONDecodeError, which is
not a signature check.
"""

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from standardwebhooks import Webhook

DEFAULT_CONFIG = {"secrets": [], "fail_until": None, "fail_status": 500, "delay_ms": 0}

lock = threading.Lock()
config = dict(DEFAULT_CONFIG)
received = []


def error_text(exc):
    return f"{type(exc).__name__}: {exc}"


def verify(secret, body, headers):
    """None if the library verifies body and headers with secret, else the
    error text (also for a secret the library refuses)."""
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
        return None
    except Exception as exc:  # the library's and any other: all are a "no"
        return error_text(exc)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config(update):
    """The error text for a config update that is not well formed, or None."""
    if not isinstance(update, dict):
        return "config must be a JSON object"
    for key, value in update.items():
        if key == "secrets":
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                return "secrets must be a list of strings"
        elif key == "fail_until":
            if value is not None and not is_number(value):
                return "fail_until must be unix seconds or null"
        elif key == "fail_status":
            if not isinstance(value, int) or isinstance(value, bool) or not 100 <= value <= 599:
                return "fail_status must be an HTTP status (100-599)"
        elif key == "delay_ms":
            if not is_number(value) or value < 0:
                return "delay_ms must be a number >= 0"
        else:
            return f"unknown config key {key!r}"
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def answer(self, status, body, content_type="text/plain; charset=utf-8"):
        data = body.encode() if isinstance(body, str) else body
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            # The client went away (e.g. it timed out during delay_ms).
            self.close_connection = True

    def answer_json(self, status, value):
        self.answer(status, json.dumps(value), "application/json")

    def read_body(self):
        """The request body, exactly: Content-Length bytes, or the chunks of
        a chunked body."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def read_json(self):
        """The body as JSON, or None after answering 400."""
        body = self.read_body()
        try:
            return json.loads(body or b"{}")
        except ValueError as exc:
            self.answer_json(400, {"error": f"invalid JSON: {exc}"})
            return None

    def do_GET(self):
        path = urlsplit(self.path).path
        self.read_body()
        if path == "/_control/received":
            with lock:
                requests = [dict(r) for r in received]
            self.answer_json(200, {"requests": requests})
        else:
            self.answer_json(404, {"error": f"no route GET {path}"})

    def do_POST(self):
        path = urlsplit(self.path).path
        if path == "/_control/config":
            update = self.read_json()
            if update is None:
                return
            problem = check_config(update)
            if problem:
                self.answer_json(400, {"error": problem})
                return
            with lock:
                config.update(update)
                if "secrets" in update:
                    config["secrets"] = list(update["secrets"])
            self.answer_json(200, {})
        elif path == "/_control/reset":
            self.read_body()
            with lock:
                received.clear()
                config.clear()
                config.update(DEFAULT_CONFIG)
                config["secrets"] = []
            self.answer_json(200, {})
        elif path == "/_control/verify":
            request = self.read_json()
            if request is None:
                return
            if (
                not isinstance(request, dict)
                or not isinstance(request.get("secret"), str)
                or not isinstance(request.get("headers"), dict)
                or not isinstance(request.get("body"), str)
            ):
                self.answer_json(
                    400, {"error": 'expected {"secret": str, "headers": object, "body": str}'}
                )
                return
            error = verify(request["secret"], request["body"], request["headers"])
            self.answer_json(200, {"ok": error is None, "error": error})
        elif path.startswith("/_control/"):
            self.read_body()
            self.answer_json(404, {"error": f"no route POST {path}"})
        else:
            self.deliver()

    def deliver(self):
        body = self.read_body()
        headers = {
            name: self.headers.get(name)
            for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
        }
        record = {
            "path": self.path,
            "webhook_id": headers["webhook-id"],
            "webhook_timestamp": headers["webhook-timestamp"],
            "webhook_signature": headers["webhook-signature"],
            "body": body.decode("utf-8", errors="replace"),
            "verified": False,
            "verified_with": None,
            "status": None,
            "at": time.time(),
            "error": None,
        }
        with lock:
            received.append(record)
            delay_ms = config["delay_ms"]
        if delay_ms:
            time.sleep(delay_ms / 1000)
        with lock:
            secrets = list(config["secrets"])
            fail_until = config["fail_until"]
            fail_status = config["fail_status"]
        if fail_until is not None and time.time() < fail_until:
            with lock:
                record["status"] = fail_status
            self.answer(fail_status, "failing")
            return
        present = {name: value for name, value in headers.items() if value is not None}
        errors = []
        for index, secret in enumerate(secrets):
            error = verify(secret, body, present)
            if error is None:
                with lock:
                    record.update(verified=True, verified_with=index, status=200)
                self.answer(200, "ok")
                return
            errors.append(error if len(secrets) == 1 else f"secret {index}: {error}")
        error = "; ".join(errors) if errors else "no secrets configured"
        with lock:
            record.update(status=400, error=error)
        self.answer(400, error)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: ~50 connections arrive at once

    def handle_error(self, request, client_address):
        pass  # quiet: a client that hung up mid-request is not our failure


def watch_stdin():
    try:
        while sys.stdin.buffer.read(65536):
            pass
    finally:
        os._exit(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()

    server = Server(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    temporary = f"{args.port_file}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        f.write(f"{port}\n")
    os.replace(temporary, args.port_file)

    threading.Thread(target=watch_stdin, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
