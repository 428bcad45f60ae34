// What needs no server: the webhook verifier (signed with standardwebhooks'
// own `sign`), and errors built from answers a test server cannot be made to
// give on demand (503 with Retry-After), through the `fetch` option.
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { Webhook } from "standardwebhooks";

import {
  IntegrationsClient,
  IntegrationsError,
  WebhookVerificationError,
  parseRetryAfter,
  verifyWebhook,
} from "../dist/index.js";

const SECRET = "whsec_" + Buffer.from("0123456789abcdef0123456789abcdef").toString("base64");

function signed(body, { secret = SECRET, id = "42", at = new Date() } = {}) {
  const signature = new Webhook(secret).sign(id, at, body);
  return {
    "webhook-id": id,
    "webhook-timestamp": String(Math.floor(at.getTime() / 1000)),
    "webhook-signature": signature,
  };
}

const EVENT = {
  id: 42,
  type: "integration.revoked",
  created_at: "2026-12-06T01:02:03.000000Z",
  data: {
    user_id: "u1",
    provider: "google",
    account_id: "1234",
    status: "revoked",
    previous_status: "connected",
    refresh_failures: 1,
    error: { code: "invalid_grant", message: "no longer accepted" },
    expires_at: null,
  },
};

describe("verifyWebhook", () => {
  const body = JSON.stringify(EVENT);

  test("returns the event signed with the secret (string, Buffer, Headers, node headers)", () => {
    const headers = signed(body);
    assert.deepEqual(verifyWebhook(SECRET, body, headers), EVENT);
    assert.deepEqual(verifyWebhook(SECRET, Buffer.from(body), headers), EVENT);
    assert.deepEqual(verifyWebhook(SECRET, body, new Headers(headers)), EVENT);
    const upper = Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toUpperCase(), v]));
    assert.deepEqual(verifyWebhook(SECRET, body, upper), EVENT);
  });

  test("accepts either of two signatures (a rotated secret)", () => {
    const other = "whsec_" + Buffer.from("another secret of 32 bytes......").toString("base64");
    const headers = signed(body);
    headers["webhook-signature"] = `${signed(body, { secret: other })["webhook-signature"]} ${headers["webhook-signature"]}`;
    assert.equal(verifyWebhook(SECRET, body, headers).id, 42);
    assert.equal(verifyWebhook(other, body, headers).id, 42);
  });

  test("rejects a tampered body, a wrong secret, an old timestamp, a missing header", () => {
    const headers = signed(body);
    const tampered = body.replace('"u1"', '"u2"');
    assert.throws(() => verifyWebhook(SECRET, tampered, headers), WebhookVerificationError);
    const wrong = "whsec_" + Buffer.from("not the secret, not the secret!!").toString("base64");
    assert.throws(() => verifyWebhook(wrong, body, headers), WebhookVerificationError);
    const old = signed(body, { at: new Date(Date.now() - 10 * 60_000) });
    assert.throws(() => verifyWebhook(SECRET, body, old), WebhookVerificationError);
    const { "webhook-signature": _, ...missing } = headers;
    assert.throws(() => verifyWebhook(SECRET, body, missing), WebhookVerificationError);
    const swapped = { ...headers, "webhook-id": "43" };
    assert.throws(() => verifyWebhook(SECRET, body, swapped), WebhookVerificationError);
  });
});

describe("IntegrationsError", () => {
  const answering = (status, body, headers = {}) => {
    const calls = [];
    const fetch = async (url, init) => {
      calls.push({ url, init });
      return new Response(typeof body === "string" ? body : JSON.stringify(body), { status, headers });
    };
    return { calls, api: new IntegrationsClient({ baseUrl: "http://ims.test/", apiKey: "k1", fetch }) };
  };

  test("503 P2024 carries code, message, hint and Retry-After in seconds", async () => {
    const { api, calls } = answering(
      503,
      { error: { code: "P2024", message: "Timed out fetching a new connection", hint: "pool exhausted" } },
      { "retry-after": "2", "x-request-id": "req-1", "content-type": "application/json" },
    );
    await assert.rejects(api.getStatus("u 1/ä"), (e) => {
      assert.ok(e instanceof IntegrationsError);
      assert.ok(e instanceof Error);
      assert.equal(e.name, "IntegrationsError");
      assert.equal(e.status, 503);
      assert.equal(e.code, "P2024");
      assert.equal(e.message, "Timed out fetching a new connection");
      assert.equal(e.hint, "pool exhausted");
      assert.equal(e.retryAfter, 2);
      assert.equal(e.requestId, "req-1");
      return true;
    });
    assert.equal(calls[0].url, "http://ims.test/v1/users/u%201%2F%C3%A4/integrations");
    assert.equal(calls[0].init.headers.authorization, "Bearer k1");
  });

  test("a body that is not the error shape still throws, with http_<status>", async () => {
    const { api } = answering(502, "<html>bad gateway</html>");
    await assert.rejects(api.refresh("github", "a"), (e) => {
      assert.equal(e.code, "http_502");
      assert.equal(e.status, 502);
      assert.match(e.message, /502/);
      assert.equal(e.hint, null);
      assert.equal(e.retryAfter, null);
      return true;
    });
  });

  test("Retry-After as an HTTP date", () => {
    const now = Date.parse("2026-12-06T00:00:00Z");
    assert.equal(parseRetryAfter("Sun, 06 Dec 2026 00:00:05 GMT", now), 5);
    assert.equal(parseRetryAfter("garbage", now), null);
    assert.equal(parseRetryAfter(null, now), null);
  });

  test("query and body: listEvents drops unset parameters; batchRefresh sends concurrency", async () => {
    const { api, calls } = answering(200, { events: [], next_cursor: "c" });
    await api.listEvents({ limit: 5, type: "integration.error" });
    assert.equal(calls[0].url, "http://ims.test/v1/events?limit=5&type=integration.error");
    const b = answering(200, { results: [] });
    await b.api.batchRefresh([{ provider: "github", account_id: "a" }], { concurrency: 3 });
    assert.deepEqual(JSON.parse(b.calls[0].init.body), {
      requests: [{ provider: "github", account_id: "a" }],
      concurrency: 3,
    });
    assert.equal(b.calls[0].init.headers["content-type"], "application/json");
  });
});
