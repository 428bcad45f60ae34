// The client against a real `integrations serve` (see server.mjs), one server
// for the whole file. Run: node --test test/*.test.mjs (after npm run build).
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createServer } from "node:http";
import { copyFile, mkdtemp, rm, appendFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";

import { IntegrationsClient, IntegrationsError, verifyWebhook } from "../dist/index.js";
import { packageDir, startServer } from "./server.mjs";

const run = promisify(execFile);

let server;
let api;

before(async () => {
  server = await startServer();
  api = new IntegrationsClient({ baseUrl: `${server.baseUrl}/`, apiKey: server.apiKey });
});
after(async () => {
  await server?.stop();
});

/** Asserts `promise` rejects with an IntegrationsError matching `expected`; returns it. */
async function rejectsWith(promise, expected) {
  let caught;
  await assert.rejects(promise, (e) => {
    caught = e;
    return true;
  });
  assert.ok(caught instanceof IntegrationsError, `not an IntegrationsError: ${caught}`);
  for (const [k, v] of Object.entries(expected)) {
    if (v instanceof RegExp) assert.match(caught[k], v, k);
    else assert.equal(caught[k], v, k);
  }
  assert.equal(typeof caught.message, "string");
  assert.ok(caught.message.length > 0);
  return caught;
}

// A user id and account id using characters that must be percent-encoded in a
// path segment (`|`), and ones that are legal as they are.
const USER = "auth0|user-1:x";
const ACCOUNT = "acct@one+1";
const token = (n) => ({
  access_token: `stored-at-${n}`,
  refresh_token: `stored-rt-${n}`,
  expires_in: 3600,
  token_type: "Bearer",
  scope: "read",
});

describe("schema", () => {
  test("the committed src/schema.d.ts is what the server's /openapi.json generates", async () => {
    const { stdout } = await run("bash", ["scripts/generate.sh", "--check"], {
      cwd: packageDir,
      env: { ...process.env, OPENAPI_URL: `${server.baseUrl}/openapi.json` },
    });
    assert.match(stdout, /matches/);
  });

  test("the check fails on a schema.d.ts that differs", async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), "schema-"));
    try {
      const copy = path.join(dir, "schema.d.ts");
      await copyFile(path.join(packageDir, "src/schema.d.ts"), copy);
      await appendFile(copy, "export type Stale = 1;\n");
      await assert.rejects(
        run("bash", ["scripts/generate.sh", "--check"], {
          cwd: packageDir,
          env: { ...process.env, OPENAPI_URL: `${server.baseUrl}/openapi.json`, SCHEMA_TS: copy },
        }),
        (e) => e.code === 1 && /stale/.test(e.stderr),
      );
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe("integrations", () => {
  test("a bad key is 401", async () => {
    const bad = new IntegrationsClient({ baseUrl: server.baseUrl, apiKey: "not-a-key" });
    await rejectsWith(bad.getStatus(USER), { status: 401, code: "unauthorized" });
  });

  test("a key without the scope is 403, before anything is looked up", async () => {
    const reader = new IntegrationsClient({ baseUrl: server.baseUrl, apiKey: await server.createKey("reader", "read") });
    assert.deepEqual((await reader.getStatus("nobody-yet")).integrations, []);
    await rejectsWith(reader.storeTokens("u1", "github", "a1", token(1)), { status: 403, code: "forbidden" });
    await rejectsWith(reader.getAccessToken("github", "no-such-account"), { status: 403, code: "forbidden" });
    await rejectsWith(reader.listWebhooks(), { status: 403, code: "forbidden" });
  });

  test("storeTokens, getStatus, getAccessToken, refresh, batchRefresh, disconnect", async () => {
    const stored = await api.storeTokens(USER, "github", ACCOUNT, token(1));
    assert.equal(stored.provider, "github");
    assert.equal(stored.account_id, ACCOUNT);
    assert.equal(stored.status, "connected");
    assert.equal(stored.healthy, true);
    assert.ok(!("access_token" in stored), "an integration never shows a token");

    const status = await api.getStatus(USER);
    assert.equal(status.user_id, USER);
    assert.deepEqual(
      status.integrations.map((i) => [i.provider, i.account_id, i.healthy]),
      [["github", ACCOUNT, true]],
    );

    const access = await api.getAccessToken("github", ACCOUNT);
    assert.equal(access.access_token, "stored-at-1");
    assert.equal(access.token_type, "Bearer");
    assert.ok(access.expires_at);

    const refreshed = await api.refresh("github", ACCOUNT);
    assert.equal(refreshed.status, "connected");
    assert.ok(refreshed.last_refresh_at);
    const after = await api.getAccessToken("github", ACCOUNT);
    assert.match(after.access_token, /^at-\d+$/, "the fake provider's token after a refresh");

    const results = await api.batchRefresh(
      [
        { provider: "github", account_id: ACCOUNT },
        { provider: "github", account_id: "nobody" },
      ],
      { concurrency: 2 },
    );
    assert.equal(results.length, 2);
    assert.equal(results[0].ok, true);
    assert.equal(results[0].account_id, ACCOUNT);
    assert.equal(results[0].integration.status, "connected");
    assert.equal(results[1].ok, false);
    assert.equal(results[1].account_id, "nobody");
    assert.equal(results[1].error.code, "not_found");

    const gone = await api.disconnect(USER, "github", ACCOUNT);
    assert.equal(gone.deleted, true);
    assert.equal(gone.revocation, "revoked");
    assert.equal(gone.revoked_at_provider, true);
    assert.deepEqual((await api.getStatus(USER)).integrations, []);
  });

  test("an expired token is refreshed by getAccessToken", async () => {
    await api.storeTokens("u-expired", "github", "acct-expired", {
      access_token: "old",
      refresh_token: "rt-old",
      expires_at: new Date(Date.now() - 60_000).toISOString(),
    });
    const access = await api.getAccessToken("github", "acct-expired");
    assert.match(access.access_token, /^at-\d+$/);
    assert.ok(Date.parse(access.expires_at) > Date.now());
  });

  test("unknown integration is 404 not_found", async () => {
    const e = await rejectsWith(api.getAccessToken("github", "no-such-account"), { status: 404, code: "not_found" });
    assert.ok(e.requestId, "x-request-id kept");
    assert.equal(e.retryAfter, null);
    await rejectsWith(api.refresh("github", "no-such-account"), { status: 404, code: "not_found" });
    await rejectsWith(api.disconnect("nobody", "github", "no-such-account"), { status: 404, code: "not_found" });
  });

  test("unknown provider is 404", async () => {
    await rejectsWith(api.storeTokens("u1", "nosuchprovider", "a1", token(1)), { status: 404 });
  });

  test("path segments are encoded: a `/` in a user id is a 400 naming user_id, not another route", async () => {
    const e = await rejectsWith(api.getStatus("a/b"), { status: 400, code: "invalid_request" });
    assert.match(e.message, /user_id/);
    await rejectsWith(api.storeTokens("u1", "github", "a/../../x", token(1)), {
      status: 400,
      code: "invalid_request",
      message: /account_id/,
    });
  });

  test("an invalid body is 400 invalid_request naming the field", async () => {
    const e = await rejectsWith(api.storeTokens("u1", "github", "a1", { refresh_token: "x" }), {
      status: 400,
      code: "invalid_request",
    });
    assert.match(e.message, /access_token/);
  });

  test("the account of another user is 409 conflict", async () => {
    await api.storeTokens("owner", "github", "shared-acct", token(2));
    await rejectsWith(api.storeTokens("intruder", "github", "shared-acct", token(3)), {
      status: 409,
      code: "conflict",
    });
  });
});

describe("connect flow", () => {
  test("startConnect, the provider's callback, completeConnect (single use)", async () => {
    const started = await api.startConnect("github", {
      userId: "connect-user",
      redirectUri: "https://app.example.com/connect/done?keep=1",
    });
    assert.ok(started.flow_id);
    assert.ok(started.expires_at);
    const authorize = new URL(started.authorize_url);
    assert.equal(authorize.origin, `http://127.0.0.1:${server.providerPort}`);
    const state = authorize.searchParams.get("state");
    assert.ok(state);

    // The browser coming back from the provider.
    const callback = await fetch(`${server.baseUrl}/v1/oauth/callback?state=${encodeURIComponent(state)}&code=c1`, {
      redirect: "manual",
    });
    assert.ok([302, 303, 307].includes(callback.status), `a redirect, not ${callback.status}`);
    const back = new URL(callback.headers.get("location"));
    assert.equal(back.origin, "https://app.example.com");
    assert.equal(back.searchParams.get("status"), "authorized");
    assert.equal(back.searchParams.get("keep"), "1");
    const accountId = back.searchParams.get("account_id");
    assert.equal(accountId, "12345", "the fake provider's userinfo id");

    const completionCode = back.searchParams.get("completion_code");
    const integration = await api.completeConnect({
      flowId: started.flow_id,
      completionCode,
      userId: "connect-user",
    });
    assert.equal(integration.provider, "github");
    assert.equal(integration.account_id, "12345");
    assert.equal(integration.status, "connected");

    await rejectsWith(api.completeConnect({ flowId: started.flow_id, completionCode }), {
      status: 400,
      code: "invalid_flow",
    });
    const access = await api.getAccessToken("github", "12345");
    assert.match(access.access_token, /^at-\d+$/);
  });

  test("a redirect_uri outside the allowed origins is 400", async () => {
    await rejectsWith(api.startConnect("github", { userId: "u", redirectUri: "https://evil.example/" }), {
      status: 400,
      code: "invalid_request",
    });
  });
});

describe("events", () => {
  test("listEvents pages with the cursor and filters by type", async () => {
    await api.storeTokens("events-user", "github", "events-acct", token(4));
    await api.disconnect("events-user", "github", "events-acct");

    const all = [];
    let cursor;
    for (;;) {
      const page = await api.listEvents({ after: cursor, limit: 2 });
      assert.ok(page.events.length <= 2);
      assert.equal(typeof page.next_cursor, "string");
      all.push(...page.events);
      cursor = page.next_cursor;
      if (page.events.length === 0) break;
    }
    const mine = all.filter((e) => e.data.user_id === "events-user").map((e) => e.type);
    assert.deepEqual(mine, ["integration.connected", "integration.deleted"]);
    const ids = all.map((e) => e.id);
    assert.equal(new Set(ids).size, ids.length, "every event once");

    const deleted = await api.listEvents({ type: "integration.deleted", limit: 1000 });
    assert.ok(deleted.events.length >= 1);
    assert.ok(deleted.events.every((e) => e.type === "integration.deleted"));
    assert.ok(deleted.events.some((e) => e.data.account_id === "events-acct" && e.data.status === null));
  });

  test("a bad limit is 400 naming it", async () => {
    const e = await rejectsWith(api.listEvents({ limit: 0 }), { status: 400, code: "invalid_request" });
    assert.match(e.message, /limit/);
  });
});

describe("webhooks", () => {
  let receiver;
  let receiverUrl;
  const received = [];
  const waiters = [];

  before(async () => {
    receiver = createServer((req, res) => {
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", () => {
        received.push({ body: Buffer.concat(chunks), headers: req.headers });
        for (const w of waiters.splice(0)) w();
        res.writeHead(204).end();
      });
    });
    await new Promise((r) => receiver.listen(0, "127.0.0.1", r));
    receiverUrl = `http://127.0.0.1:${receiver.address().port}/hooks`;
  });
  after(async () => {
    receiver.closeAllConnections();
    await new Promise((r) => receiver.close(r));
  });

  /** The first delivery received (now or within 15 s) whose verified event matches. */
  async function delivery(secret, match) {
    const deadline = Date.now() + 15_000;
    for (;;) {
      for (const d of received) {
        let event;
        try {
          event = verifyWebhook(secret, d.body, d.headers);
        } catch {
          continue;
        }
        if (match(event)) return { event, ...d };
      }
      if (Date.now() > deadline) throw new Error("no such delivery within 15 s");
      await new Promise((r) => {
        waiters.push(r);
        setTimeout(r, 500);
      });
    }
  }

  test("create, list, get, test, deliveries, redeliver, rotate, enable, delete", async () => {
    const created = await api.createWebhook({ url: receiverUrl, eventTypes: ["integration.connected"] });
    assert.match(created.secret, /^whsec_/);
    assert.equal(created.status, "enabled");
    assert.deepEqual(created.event_types, ["integration.connected"]);
    const id = created.id;

    assert.ok((await api.listWebhooks()).some((w) => w.id === id && !("secret" in w)));
    assert.equal((await api.getWebhook(id)).url, receiverUrl);

    // A signed test event, verified with the secret.
    const tested = await api.testWebhook(id);
    assert.equal(tested.delivered, true);
    assert.equal(tested.status, 204);
    const t = await delivery(created.secret, (e) => e.id === tested.message_id);
    assert.equal(t.event.type, "webhook.test");
    assert.equal(t.event.data.endpoint, id);

    // A real event, pushed by the dispatcher.
    await api.storeTokens("hook-user", "github", "hook-acct", token(5));
    const d = await delivery(created.secret, (e) => e.type === "integration.connected" && e.data.user_id === "hook-user");
    assert.equal(d.event.data.account_id, "hook-acct");
    assert.equal(d.headers["webhook-id"], String(d.event.id));

    // Its delivery record (succeeded once the receiver's 204 is recorded).
    let deliveries;
    for (let i = 0; i < 50; i++) {
      deliveries = await api.listWebhookDeliveries(id, { status: "succeeded", limit: 100 });
      if (deliveries.deliveries.some((x) => x.event_id === d.event.id)) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    const record = deliveries.deliveries.find((x) => x.event_id === d.event.id);
    assert.ok(record, "the delivery is listed as succeeded");
    assert.equal(record.event_type, "integration.connected");
    assert.equal(record.last_status, 204);

    // Redelivered: the same event again, same webhook-id.
    const before = received.length;
    assert.deepEqual(await api.redeliverEvent(d.event.id), { queued: 1 });
    const again = await (async () => {
      const deadline = Date.now() + 15_000;
      while (Date.now() < deadline) {
        const hit = received.slice(before).find((x) => x.headers["webhook-id"] === String(d.event.id));
        if (hit) return hit;
        await new Promise((r) => setTimeout(r, 200));
      }
      throw new Error("not redelivered within 15 s");
    })();
    assert.equal(verifyWebhook(created.secret, again.body, again.headers).id, d.event.id);

    // Rotated: deliveries carry both signatures for a while.
    const rotated = await api.rotateWebhookSecret(id);
    assert.match(rotated.secret, /^whsec_/);
    assert.notEqual(rotated.secret, created.secret);
    assert.ok(rotated.previous_secret_expires_at);
    const tested2 = await api.testWebhook(id);
    assert.equal(tested2.delivered, true);
    const t2 = await delivery(rotated.secret, (e) => e.id === tested2.message_id);
    assert.equal(verifyWebhook(created.secret, t2.body, t2.headers).id, tested2.message_id, "the old secret too");

    assert.equal((await api.enableWebhook(id)).status, "enabled");

    await api.deleteWebhook(id);
    await rejectsWith(api.getWebhook(id), { status: 404 });
  });

  test("a webhook url that is not a URL is 400", async () => {
    await rejectsWith(api.createWebhook({ url: "not a url" }), { status: 400, code: "invalid_request" });
  });

  test("redelivering an unknown event is 404", async () => {
    await rejectsWith(api.redeliverEvent(999_999_999), { status: 404 });
  });
});
