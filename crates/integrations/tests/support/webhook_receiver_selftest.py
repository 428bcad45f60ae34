"""Checks webhook_receiver.py by hand (cargo does not run it):
`python3 webhook_receiver_selftest.py` starts the receiver, signs payloads
with the reference library's own Webhook(secret).sign and POSTs them with
urllib, and checks its answers and records. Prints `N passed, 0 failed`
and exits 0, or stops at the first failed check with an AssertionError."""

import base64
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from math import floor

from standardwebhooks import Webhook

HERE = os.path.dirname(os.path.abspath(__file__))
RECEIVER = os.path.join(HERE, "webhook_receiver.py")


def new_secret():
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


S0, S1, WRONG = new_secret(), new_secret(), new_secret()


class Receiver:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="webhook-receiver-selftest-")
        port_file = os.path.join(self.dir, "port")
        self.process = subprocess.Popen(
            [sys.executable, RECEIVER, "--port-file", port_file], stdin=subprocess.PIPE
        )
        deadline = time.time() + 10
        while not os.path.exists(port_file):
            assert self.process.poll() is None, "the receiver exited before listening"
            assert time.time() < deadline, "no port file after 10 s"
            time.sleep(0.02)
        with open(port_file) as f:
            text = f.read()
        assert text.endswith("\n") and text.strip().isdigit(), repr(text)
        self.port = int(text)
        self.base = f"http://127.0.0.1:{self.port}"

    def request(self, method, path, body=None, headers=None):
        """(status, body bytes); urllib raises on 4xx/5xx, caught here."""
        data = body if isinstance(body, bytes) or body is None else body.encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def control(self, method, path, value=None):
        body = None if value is None else json.dumps(value)
        status, answer = self.request(
            method, path, body, {"Content-Type": "application/json"} if body else None
        )
        assert status == 200, (path, status, answer)
        return json.loads(answer)

    def config(self, **values):
        assert self.control("POST", "/_control/config", values) == {}

    def reset(self):
        assert self.control("POST", "/_control/reset", {}) == {}

    def received(self):
        return self.control("GET", "/_control/received")["requests"]

    def verify(self, secret, headers, body):
        return self.control(
            "POST", "/_control/verify", {"secret": secret, "headers": headers, "body": body}
        )

    def stop(self):
        self.process.stdin.close()
        code = self.process.wait(timeout=10)
        assert code == 0, f"the receiver exited with {code} on stdin EOF"


def signed(secret, body, msg_id="msg_1", at=None):
    """The three Standard Webhooks headers for body, signed by the library."""
    at = at or datetime.now(timezone.utc)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(floor(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, at, body),
    }


def deliver(receiver, path, body, headers):
    return receiver.request(
        "POST", path, body, {"Content-Type": "application/json", **headers}
    )


checks = []


def check(fn):
    checks.append(fn)
    return fn


@check
def sign_returns_the_header_value(r):
    value = Webhook(S0).sign("msg_x", datetime.now(timezone.utc), "{}")
    assert value.startswith("v1,") and len(base64.b64decode(value[3:])) == 32, value


@check
def good_delivery_is_accepted_and_recorded(r):
    r.config(secrets=[S0, S1])
    body = json.dumps({"type": "connection.created", "data": {"id": 1}})
    h = signed(S1, body, "msg_good")
    status, answer = deliver(r, "/hooks/a?x=1", body, h)
    assert (status, answer) == (200, b"ok"), (status, answer)
    [rec] = r.received()
    assert rec["path"] == "/hooks/a?x=1", rec
    assert rec["webhook_id"] == "msg_good" and rec["webhook_timestamp"] == h["webhook-timestamp"]
    assert rec["webhook_signature"] == h["webhook-signature"] and rec["body"] == body
    assert rec["verified"] is True and rec["verified_with"] == 1, rec
    assert rec["status"] == 200 and rec["error"] is None, rec
    assert abs(rec["at"] - time.time()) < 5, rec
    assert r.verify(S1, h, body) == {"ok": True, "error": None}
    # The first secret that verifies is the one recorded.
    status, _ = deliver(r, "/hooks/a", body, signed(S0, body))
    assert status == 200 and r.received()[-1]["verified_with"] == 0


@check
def tampered_body_is_refused(r):
    r.config(secrets=[S0])
    body = '{"amount":1}'
    h = signed(S0, body)
    status, answer = deliver(r, "/hooks/t", '{"amount":2}', h)
    assert status == 400 and b"No matching signature found" in answer, (status, answer)
    rec = r.received()[-1]
    assert rec["verified"] is False and rec["verified_with"] is None and rec["status"] == 400
    assert "WebhookVerificationError: No matching signature found" in rec["error"], rec
    v = r.verify(S0, h, '{"amount":2}')
    assert v["ok"] is False and "No matching signature" in v["error"], v


@check
def wrong_secret_is_refused(r):
    r.config(secrets=[S0, S1])
    body = '{"a":1}'
    h = signed(WRONG, body)
    status, answer = deliver(r, "/hooks/w", body, h)
    assert status == 400, (status, answer)
    assert answer.count(b"No matching signature found") == 2, answer
    assert r.received()[-1]["error"].startswith("secret 0: "), r.received()[-1]
    v = r.verify(S0, h, body)
    assert v["ok"] is False and "WebhookVerificationError" in v["error"], v
    assert r.verify(WRONG, h, body)["ok"] is True


@check
def old_timestamp_is_refused(r):
    r.config(secrets=[S0])
    body = '{"a":1}'
    h = signed(S0, body, at=datetime.now(timezone.utc) - timedelta(minutes=10))
    status, answer = deliver(r, "/hooks/old", body, h)
    assert status == 400 and b"Message timestamp too old" in answer, (status, answer)
    assert r.received()[-1]["verified"] is False
    v = r.verify(S0, h, body)
    assert v == {"ok": False, "error": "WebhookVerificationError: Message timestamp too old"}, v
    h = signed(S0, body, at=datetime.now(timezone.utc) + timedelta(minutes=10))
    v = r.verify(S0, h, body)
    assert v == {"ok": False, "error": "WebhookVerificationError: Message timestamp too new"}, v
    # Four minutes old is inside the 5-minute tolerance.
    h = signed(S0, body, at=datetime.now(timezone.utc) - timedelta(minutes=4))
    assert deliver(r, "/hooks/old", body, h)[0] == 200


@check
def two_signatures_one_good_is_accepted(r):
    r.config(secrets=[S0])
    body = '{"a":1}'
    h = signed(S0, body)
    h["webhook-signature"] = "v1,abc " + h["webhook-signature"]
    status, answer = deliver(r, "/hooks/two", body, h)
    assert (status, answer) == (200, b"ok"), (status, answer)
    assert r.received()[-1]["webhook_signature"].startswith("v1,abc v1,")
    assert r.verify(S0, h, body)["ok"] is True


@check
def missing_headers_and_no_secrets_are_refused(r):
    body = '{"a":1}'
    h = signed(S0, body)
    del h["webhook-id"]
    r.config(secrets=[S0])
    status, answer = deliver(r, "/hooks/m", body, h)
    assert status == 400 and b"Missing required headers" in answer, (status, answer)
    assert r.received()[-1]["webhook_id"] is None
    r.config(secrets=[])
    status, answer = deliver(r, "/hooks/m", body, signed(S0, body))
    assert (status, answer) == (400, b"no secrets configured"), (status, answer)


@check
def header_case_and_non_json_body(r):
    body = "not json at all"
    h = signed(S0, body)
    upper = {k.title(): v for k, v in h.items()}
    assert r.verify(S0, upper, body)["ok"] is True
    r.config(secrets=[S0])
    assert deliver(r, "/hooks/text", body, h)[0] == 200


@check
def fail_until_answers_the_fail_status_until_then(r):
    r.config(secrets=[S0], fail_until=time.time() + 1.5, fail_status=503)
    body = '{"a":1}'
    status, answer = deliver(r, "/hooks/f", body, signed(S0, body))
    assert (status, answer) == (503, b"failing"), (status, answer)
    rec = r.received()[-1]
    assert rec["status"] == 503 and rec["verified"] is False and rec["error"] is None, rec
    r.config(fail_status=500)
    assert deliver(r, "/hooks/f", body, signed(S0, body))[0] == 500
    time.sleep(1.6)
    assert deliver(r, "/hooks/f", body, signed(S0, body)) == (200, b"ok")
    r.config(fail_until=None)


@check
def delay_is_applied(r):
    r.config(secrets=[S0], delay_ms=400)
    body = '{"a":1}'
    started = time.time()
    assert deliver(r, "/hooks/d", body, signed(S0, body))[0] == 200
    assert time.time() - started >= 0.4
    r.config(delay_ms=0)
    started = time.time()
    assert deliver(r, "/hooks/d", body, signed(S0, body))[0] == 200
    assert time.time() - started < 0.4


@check
def received_is_in_arrival_order(r):
    r.config(secrets=[S0])
    for i in range(5):
        body = json.dumps({"n": i})
        assert deliver(r, f"/hooks/order/{i}", body, signed(S0, body, f"msg_{i}"))[0] == 200
    got = r.received()
    assert [x["path"] for x in got] == [f"/hooks/order/{i}" for i in range(5)], got
    assert [x["webhook_id"] for x in got] == [f"msg_{i}" for i in range(5)]
    assert all(a["at"] <= b["at"] for a, b in zip(got, got[1:]))


@check
def reset_clears_deliveries_and_config(r):
    r.config(secrets=[S0], fail_until=time.time() + 60, delay_ms=10)
    r.request("POST", "/hooks/x", "{}", signed(S0, "{}"))
    r.reset()
    assert r.received() == []
    status, answer = deliver(r, "/hooks/x", "{}", signed(S0, "{}"))
    assert (status, answer) == (400, b"no secrets configured"), (status, answer)


@check
def bad_control_requests_are_400(r):
    assert r.request("POST", "/_control/config", '{"secret": []}')[0] == 400
    assert r.request("POST", "/_control/config", '{"delay_ms": -1}')[0] == 400
    assert r.request("POST", "/_control/config", "{nope")[0] == 400
    assert r.request("POST", "/_control/verify", '{"secret": "x"}')[0] == 400
    assert r.request("GET", "/elsewhere")[0] == 404
    # A secret the library cannot use is a "no", not a crash.
    v = r.verify("whsec_", signed(S0, "{}"), "{}")
    assert v == {"ok": False, "error": "EmptyWebhookSecretError: webhook secret may not be empty"}, v


@check
def keep_alive_serves_several_requests_on_one_connection(r):
    r.config(secrets=[S0])
    conn = http.client.HTTPConnection("127.0.0.1", r.port, timeout=10)
    sockets = set()
    for i in range(3):
        body = json.dumps({"k": i})
        conn.request("POST", "/hooks/ka", body, signed(S0, body))
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b"ok"
        assert response.getheader("Content-Length") == "2"
        sockets.add(id(conn.sock))
    conn.request("GET", "/_control/received")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["requests"]
    assert len(sockets) == 1 and conn.sock is not None, "the connection was not kept"
    conn.close()


@check
def fifty_concurrent_connections(r):
    r.config(secrets=[S0], delay_ms=200)
    results = []
    barrier = threading.Barrier(50)

    def one(i):
        body = json.dumps({"c": i})
        h = signed(S0, body, f"msg_c{i}")
        barrier.wait()
        results.append(deliver(r, f"/hooks/c/{i}", body, h)[0])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - started
    r.config(delay_ms=0)
    assert results == [200] * 50, results
    # Served concurrently: 50 x 200 ms one after another would be 10 s.
    assert elapsed < 5, elapsed
    got = [x for x in r.received() if x["path"].startswith("/hooks/c/")]
    assert len(got) == 50 and all(x["verified"] for x in got)


def main():
    receiver = Receiver()
    passed = 0
    try:
        for fn in checks:
            receiver.reset()
            fn(receiver)
            print(f"ok  {fn.__name__}")
            passed += 1
    finally:
        if receiver.process.poll() is None:
            receiver.stop()
    print(f"{passed} passed, 0 failed")


if __name__ == "__main__":
    main()
