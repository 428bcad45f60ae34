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

  const alerts = [];
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
