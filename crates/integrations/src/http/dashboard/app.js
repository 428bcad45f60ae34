// The dashboard: asks once for an admin API key (kept in this tab's
// sessionStorage, sent only as `Authorization: Bearer`), then polls
// GET /v1/admin/pool every 2 s and shows it. No framework, nothing fetched
// from elsewhere.
"use strict";

const KEY = "integrations.adminKey";
const PERIOD_MS = 2000;
// The hints the service gives (crates/db-pool/src/error.rs).
const HINT_P2024 = "Connection pool exhausted: increase connection_limit, look for connection leaks (connections held across slow work), optimize slow queries, or raise pool_timeout.";
const HINT_P2037 = "The server refused a new connection: check max_connections on the server, reduce connection_limit per instance, or put PgBouncer in front (pgbouncer=true).";

let timer = null;
let generation = 0;
// The last minute of /metrics samples: [time, values].
const SAMPLES = 30;
let history = [];

const $ = (id) => document.getElementById(id);

function setText(id, value, bad) {
  const el = $(id);
  el.textContent = value === undefined || value === null ? "-" : String(value);
  el.classList.toggle("bad", Boolean(bad));
}

function alertBox(id, title, detail) {
  const box = document.createElement("div");
  box.className = "alert";
  box.id = id;
  const strong = document.createElement("strong");
  strong.textContent = title;
  box.appendChild(strong);
  if (detail) {
    const p = document.createElement("span");
    p.textContent = detail;
    box.appendChild(p);
  }
  return box;
}

function showAlerts(boxes) {
  $("alerts").replaceChildren(...boxes);
}

function askForKey(message) {
  generation += 1;
  clearTimeout(timer);
  sessionStorage.removeItem(KEY);
  $("report").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  $("status").textContent = "not connected";
  const err = $("login-error");
  err.hidden = !message;
  err.textContent = message || "";
  $("key").value = "";
  $("key").focus();
}

function start(key) {
  sessionStorage.setItem(KEY, key);
  $("login").hidden = true;
  $("forget").hidden = false;
  $("status").textContent = "connecting…";
  generation += 1;
  poll(generation);
}

async function poll(gen) {
  const key = sessionStorage.getItem(KEY);
  if (!key || gen !== generation) return;
  try {
    const response = await fetch("/v1/admin/pool", {
      headers: { Authorization: "Bearer " + key },
      cache: "no-store",
      credentials: "omit",
    });
    if (gen !== generation) return;
    if (response.status === 401) {
      askForKey("invalid API key (401): enter a key with the admin scope");
      return;
    }
    if (response.status === 403) {
      askForKey("this key lacks the admin scope (403): enter a key with the admin scope");
      return;
    }
    const body = await response.json().catch(() => null);
    if (gen !== generation) return;
    if (response.ok && body) {
      render(body);
      await renderMetrics(gen);
    } else {
      renderError(response.status, body);
    }
  } catch (e) {
    if (gen !== generation) return;
    $("report").hidden = false;
    $("status").textContent = "unreachable";
    showAlerts([alertBox("alert-unreachable", "the service did not answer", String(e))]);
  }
  timer = setTimeout(() => poll(gen), PERIOD_MS);
}

function renderError(status, body) {
  const error = (body && body.error) || {};
  $("report").hidden = false;
  $("report").classList.add("stale");
  $("status").textContent = "error " + status + ": the figures below are from the last report";
  if (error.code === "P2024") {
    showAlerts([alertBox("alert-pool-exhausted",
      "pool exhausted: the admin report itself got no connection (" + status + " P2024)",
      error.hint || HINT_P2024)]);
    return;
  }
  const title = "GET /v1/admin/pool answered " + status + (error.code ? " " + error.code : "") +
    (error.message ? ": " + error.message : "");
  showAlerts([alertBox("alert-api-error", title, error.hint || "")]);
}

function render(report) {
  const pool = report.pool || {};
  const activity = report.activity || {};
  const cache = report.cache || {};
  $("report").hidden = false;
  $("report").classList.remove("stale");
  $("status").textContent = "live";

  const waiting = pool.waiting || 0;
  const timeouts = pool.checkout_timeouts || 0;
  const refused = pool.too_many_connections || 0;
  setText("pool-open", pool.open);
  setText("pool-in-use", pool.in_use, pool.max !== undefined && pool.in_use >= pool.max);
  setText("pool-idle", pool.idle);
  setText("pool-max", pool.max);
  setText("pool-waiting", pool.waiting, waiting > 0);
  setText("pool-oldest-wait",
    pool.oldest_wait_secs === undefined ? undefined : pool.oldest_wait_secs.toFixed(1), waiting > 0);
  setText("pool-p2024", pool.checkout_timeouts, timeouts > 0);
  setText("pool-p2037", pool.too_many_connections, refused > 0);

  setText("act-total", activity.total);
  setText("act-active", activity.active);
  setText("act-idle", activity.idle);
  setText("act-idle-in-transaction", activity.idle_in_transaction, activity.idle_in_transaction > 0);
  setText("act-aborted", activity.idle_in_transaction_aborted, activity.idle_in_transaction_aborted > 0);
  const locks = (activity.lock_waits || []).length;
  setText("act-lock-waits", locks, locks > 0);
  const longestTx = activity.longest_transaction;
  const longestQuery = activity.longest_query;
  setText("act-longest-transaction", longestTx ? longestTx.duration_secs.toFixed(1) : "none",
    longestTx && longestTx.duration_secs > 60);
  setText("act-longest-query", longestQuery ? longestQuery.duration_secs.toFixed(1) : "none",
    longestQuery && longestQuery.duration_secs > 10);
  setText("act-longest-query-text", longestQuery ? longestQuery.query : "-");
  const rows = (activity.applications || []).map((app) => {
    const tr = document.createElement("tr");
    for (const v of [app.application_name || app.name || "(none)", app.total, app.active, app.idle, app.idle_in_transaction]) {
      const td = document.createElement("td");
      td.textContent = v === undefined ? "-" : String(v);
      tr.appendChild(td);
    }
    return tr;
  });
  document.querySelector("#applications tbody").replaceChildren(...rows);

  const hits = cache.hits || 0;
  const misses = cache.misses || 0;
  setText("cache-entries", cache.entries);
  setText("cache-hits", cache.hits);
  setText("cache-misses", cache.misses);
  setText("cache-hit-ratio", hits + misses === 0 ? "-" : (100 * hits / (hits + misses)).toFixed(1) + " %");
  setText("sampled-at", activity.sampled_at);

  const failing = renderOverview(report.overview || {});
  const alerts = [];
  if (failing.length > 0) {
    alerts.push(alertBox("alert-webhooks",
      failing.length + " webhook endpoint(s) failing or disabled",
      "their receivers answer no 2xx: see GET /v1/webhooks/{id}/deliveries?status=failed; POST /v1/webhooks/{id}/enable once fixed"));
  }
  if (waiting > 0) {
    alerts.push(alertBox("alert-pool-exhausted",
      "pool exhausted: " + waiting + " waiting for a connection (all " + pool.max + " in use)", HINT_P2024));
  }
  if (timeouts > 0) {
    alerts.push(alertBox("alert-p2024", "P2024: " + timeouts + " checkouts timed out since start", HINT_P2024));
  }
  if (refused > 0) {
    alerts.push(alertBox("alert-p2037", "P2037: the server refused " + refused + " connections", HINT_P2037));
  }
  if (activity.idle_in_transaction > 0 && activity.longest_transaction) {
    alerts.push(alertBox("alert-idle-in-transaction",
      activity.idle_in_transaction + " connections idle in transaction",
      "they hold locks and snapshots: look for transactions left open across slow calls"));
  }
  showAlerts(alerts);
}

// Prometheus text: name{labels} value, for the series the page shows.
function parseMetrics(text) {
  const series = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    series.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return series;
}

function sum(series, name, keep) {
  return series
    .filter((s) => s.name === name && (!keep || keep(s.labels)))
    .reduce((total, s) => total + (Number.isFinite(s.value) ? s.value : 0), 0);
}

async function renderMetrics(gen) {
  let text;
  try {
    const response = await fetch("/metrics", { cache: "no-store", credentials: "omit" });
    if (!response.ok) return;
    text = await response.text();
  } catch (e) {
    return;
  }
  if (gen !== generation) return;
  const series = parseMetrics(text);
  const quantile = (q) => {
    const s = series.find((s) => s.name === "db_pool_checkout_wait_seconds" && s.labels.quantile === q);
    return s && Number.isFinite(s.value) ? s.value * 1000 : 0;
  };
  const now = {
    ok: sum(series, "integrations_refreshes_total", (l) => l.outcome === "ok"),
    failed: sum(series, "integrations_refreshes_total", (l) => l.outcome !== "ok"),
    p50: quantile("0.5"),
    p99: quantile("0.99"),
  };
  history.push([Date.now(), now]);
  history = history.slice(-SAMPLES);
  const first = history[0][1];
  setText("wait-p50", now.p50.toFixed(2));
  setText("wait-p99", now.p99.toFixed(2), now.p99 > 1000);
  const top = Math.max(1, ...history.map(([, v]) => v.p99));
  $("wait-line").setAttribute("points", history
    .map(([, v], i) => (i * 300 / (SAMPLES - 1)).toFixed(1) + "," + (58 - 56 * v.p99 / top).toFixed(1))
    .join(" "));
  setText("refresh-ok", now.ok - first.ok);
  const failed = now.failed - first.failed;
  setText("refresh-failed", failed, failed > 0);
  const listener = series.find((s) => s.name === "integrations_change_listener_connected");
  const down = listener !== undefined && listener.value === 0;
  setText("listener", listener === undefined ? "-" : (down ? "down" : "connected"), down);
  const pending = series.find((s) => s.name === "integrations_webhook_pending");
  const oldest = series.find((s) => s.name === "integrations_webhook_oldest_pending_seconds");
  setText("webhook-pending", pending ? pending.value : "-");
  setText("webhook-oldest", oldest ? oldest.value.toFixed(0) : "-", oldest && oldest.value > 300);
  if (down) {
    $("alerts").appendChild(alertBox("alert-listener",
      "change listener down: caches are bypassed",
      "every read goes to the database until it reconnects; check DIRECT_URL and the server's connection limit"));
  }
}

function cells(values, bad) {
  const tr = document.createElement("tr");
  values.forEach((v, i) => {
    const td = document.createElement("td");
    td.textContent = v === undefined || v === null ? "-" : String(v);
    if (bad && bad(i, v)) td.classList.add("bad");
    tr.appendChild(td);
  });
  return tr;
}

function renderOverview(overview) {
  const byProvider = new Map();
  for (const c of overview.integrations || []) {
    const row = byProvider.get(c.provider) || { connected: 0, expired: 0, error: 0, revoked: 0 };
    row[c.status] = c.count;
    byProvider.set(c.provider, row);
  }
  document.querySelector("#integrations tbody").replaceChildren(...[...byProvider].map(([provider, r]) =>
    cells([provider, r.connected, r.expired, r.error, r.revoked], (i, v) => i >= 3 && v > 0)));
  setText("next-expiry", overview.next_expiry || "none");
  document.querySelector("#events tbody").replaceChildren(...(overview.latest_events || []).map((e) =>
    cells([e.created_at, e.type, e.data.user_id, e.data.provider, e.data.account_id, e.data.status],
      (i) => i === 1 && (e.type === "integration.revoked" || e.type === "integration.error"))));
  const failing = overview.failing_webhooks || [];
  $("failing-section").hidden = failing.length === 0;
  document.querySelector("#failing-webhooks tbody").replaceChildren(...failing.map((w) =>
    cells([w.id, w.status, w.failing_since, w.disabled_reason || ""], () => true)));
  return failing;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    if (key) start(key);
  });
  $("forget").addEventListener("click", () => askForKey(""));
  const key = sessionStorage.getItem(KEY);
  if (key) start(key); else askForKey("");
});
