"""A stand-in OAuth provider for scripts/schemathesis: answers the token
endpoint (code exchange and refresh), userinfo and revocation like a
provider that always agrees, so the routes that talk to a provider answer
2xx instead of 502. Usage: fake_provider.py PORT"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count

issued = count(1)


class Provider(BaseHTTPRequestHandler):
    def _json(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.startswith("/token"):
            n = next(issued)
            self._json(
                {
                    "access_token": f"at-{n}",
                    "refresh_token": f"rt-{n}",
                    "expires_in": 3600,
                    "token_type": "Bearer",
                    "scope": "read",
                }
            )
        elif self.path.startswith("/revoke"):
            self._json({})
        else:
            self.send_error(404)

    def do_GET(self):
        if self.path.startswith("/userinfo"):
            self._json({"id": "12345"})
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Provider).serve_forever()
