// A thin client for the integrations service's HTTP API over `fetch`, typed
// by src/schema.d.ts (generated from the service's /openapi.json by
// scripts/generate.sh; never edit it by hand).

import { Webhook, WebhookVerificationError } from "standardwebhooks";
import type { components, paths } from "./schema.js";

export type { components, paths, operations } from "./schema.js";
export { WebhookVerificationError };

type Schemas = components["schemas"];

/** An integration as the API shows it (never a token). */
export type Integration = Schemas["IntegrationView"];
/** `GET /v1/users/{user_id}/integrations`: a user's integrations and health. */
export type IntegrationList = Schemas["IntegrationList"];
/** A token response as the provider returned it (`PUT .../{provider}/{account_id}`). */
export type TokenResponse = Schemas["TokenBody"];
/** `GET /v1/integrations/{provider}/{account_id}/token`. */
export type AccessToken = Schemas["TokenView"];
export type BatchItem = Schemas["BatchItem"];
/** One item of a batch refresh, in the order asked: `integration` when `ok`, else `error`. */
export type BatchResult = Omit<Schemas["BatchResult"], "integration" | "error"> & {
  integration?: Integration | null;
  error?: ErrorDetail | null;
};
export type ConnectStarted = Schemas["ConnectStarted"];
export type Disconnected = Schemas["DeletedBody"];
export type ErrorDetail = Schemas["ErrorDetail"];
export type IntegrationEvent = Schemas["Event"];
export type EventType = Schemas["EventType"];
export type EventList = Schemas["EventList"];
export type WebhookEndpoint = Schemas["Webhook"];
export type CreatedWebhook = Schemas["CreatedWebhook"];
export type RotatedSecret = Schemas["RotatedSecret"];
export type TestDelivery = Schemas["TestDelivery"];
export type Delivery = Schemas["Delivery"];
export type DeliveryList = Schemas["DeliveryList"];
export type DeliveryStatus = Schemas["DeliveryStatus"];

/** What `POST /v1/webhooks/{id}/test` sends: signed like an event, never stored. */
export interface WebhookTestEvent {
  id: string;
  type: "webhook.test";
  created_at: string;
  data: { endpoint: string };
}
/** What a webhook endpoint receives. */
export type WebhookEvent = IntegrationEvent | WebhookTestEvent;

export interface IntegrationsClientOptions {
  /** The service's address, e.g. `http://127.0.0.1:8080` (a trailing `/` is fine). */
  baseUrl: string;
  /** An API key from `integrations api-key create`; sent as `Authorization: Bearer`. */
  apiKey: string;
  /** A `fetch` to use instead of the global one (tests, proxies, retries). */
  fetch?: typeof globalThis.fetch;
}

/**
 * Any answer that is not 2xx: the service's error shape
 * `{"error": {"code", "message", "hint"}}`, its HTTP status, and
 * `Retry-After` in seconds when the service sent one (`P2024`/`P2037`
 * pool exhaustion, `request_timeout`).
 */
export class IntegrationsError extends Error {
  override readonly name = "IntegrationsError";
  readonly status: number;
  /** `not_found`, `invalid_request`, `reconnect_required`, `P2024`, ...; `http_<status>` when the body was not the service's error shape. */
  readonly code: string;
  readonly hint: string | null;
  /** Seconds to wait before trying again (from `Retry-After`), or null. */
  readonly retryAfter: number | null;
  /** The response's `x-request-id`, to find the request in the service's log. */
  readonly requestId: string | null;

  constructor(init: {
    status: number;
    code: string;
    message: string;
    hint?: string | null;
    retryAfter?: number | null;
    requestId?: string | null;
  }) {
    super(init.message);
    this.status = init.status;
    this.code = init.code;
    this.hint = init.hint ?? null;
    this.retryAfter = init.retryAfter ?? null;
    this.requestId = init.requestId ?? null;
  }
}

/** `Retry-After` as seconds: delta-seconds or an HTTP date; null when absent or unreadable. */
export function parseRetryAfter(value: string | null, now: number = Date.now()): number | null {
  if (value === null) return null;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed);
  const date = Date.parse(trimmed);
  if (Number.isNaN(date)) return null;
  return Math.max(0, Math.ceil((date - now) / 1000));
}

const seg = (value: string | number): string => encodeURIComponent(String(value));

type Query = Record<string, string | number | undefined | null>;

export class IntegrationsClient {
  readonly baseUrl: string;
  readonly #apiKey: string;
  readonly #fetch: typeof globalThis.fetch;

  constructor(options: IntegrationsClientOptions) {
    if (!options.baseUrl) throw new TypeError("IntegrationsClient: baseUrl is required");
    if (!options.apiKey) throw new TypeError("IntegrationsClient: apiKey is required");
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.#apiKey = options.apiKey;
    this.#fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /** One request; a 2xx body parsed as JSON (undefined for 204), anything else thrown as IntegrationsError. */
  async request<T>(method: string, path: string, options: { query?: Query; body?: unknown } = {}): Promise<T> {
    let url = this.baseUrl + path;
    if (options.query) {
      const params = new URLSearchParams();
      for (const [name, value] of Object.entries(options.query)) {
        if (value !== undefined && value !== null) params.set(name, String(value));
      }
      const qs = params.toString();
      if (qs) url += `?${qs}`;
    }
    const headers: Record<string, string> = {
      authorization: `Bearer ${this.#apiKey}`,
      accept: "application/json",
    };
    let body: string | undefined;
    if (options.body !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(options.body);
    }
    const response = await this.#fetch(url, { method, headers, body });
    const text = await response.text();
    if (!response.ok) throw errorFrom(response, text);
    if (response.status === 204 || text === "") return undefined as T;
    return JSON.parse(text) as T;
  }

  // --- integrations -------------------------------------------------------

  /** A user's integrations and their health (`GET /v1/users/{user_id}/integrations`, read scope; cached by the service). */
  getStatus(userId: string): Promise<IntegrationList> {
    return this.request("GET", `/v1/users/${seg(userId)}/integrations`);
  }

  /** Store a token response the application obtained (`PUT`, write scope). */
  storeTokens(userId: string, provider: string, accountId: string, tokenResponse: TokenResponse): Promise<Integration> {
    return this.request("PUT", `/v1/users/${seg(userId)}/integrations/${seg(provider)}/${seg(accountId)}`, {
      body: tokenResponse,
    });
  }

  /** A usable access token, refreshed first when needed (credentials scope). */
  getAccessToken(provider: string, accountId: string): Promise<AccessToken> {
    return this.request("GET", `/v1/integrations/${seg(provider)}/${seg(accountId)}/token`);
  }

  /** Refresh now (write scope). */
  refresh(provider: string, accountId: string): Promise<Integration> {
    return this.request("POST", `/v1/integrations/${seg(provider)}/${seg(accountId)}/refresh`);
  }

  /** Refresh many; per-item results in the order asked (one failing item does not fail the call). */
  async batchRefresh(requests: BatchItem[], options: { concurrency?: number } = {}): Promise<BatchResult[]> {
    const answer = await this.request<{ results: BatchResult[] }>("POST", "/v1/integrations/refresh", {
      body: { requests, ...(options.concurrency !== undefined ? { concurrency: options.concurrency } : {}) },
    });
    return answer.results;
  }

  /** Delete an integration, revoking it at the provider (write scope). */
  disconnect(userId: string, provider: string, accountId: string): Promise<Disconnected> {
    return this.request("DELETE", `/v1/users/${seg(userId)}/integrations/${seg(provider)}/${seg(accountId)}`);
  }

  // --- OAuth connect flow -------------------------------------------------

  /** Step 1: keep `flow_id` in the user's session, send the browser to `authorize_url`. */
  startConnect(provider: string, options: { userId: string; redirectUri: string }): Promise<ConnectStarted> {
    return this.request("POST", `/v1/connect/${seg(provider)}`, {
      body: { user_id: options.userId, redirect_uri: options.redirectUri },
    });
  }

  /** Step 3: at `redirect_uri`, with the session's `flow_id` and the query's `completion_code`. */
  completeConnect(options: { flowId: string; completionCode: string; userId?: string }): Promise<Integration> {
    return this.request("POST", "/v1/connect/complete", {
      body: {
        flow_id: options.flowId,
        completion_code: options.completionCode,
        ...(options.userId !== undefined ? { user_id: options.userId } : {}),
      },
    });
  }

  // --- events -------------------------------------------------------------

  /** A page of events, oldest first; pass `next_cursor` as `after` for the next one (read scope). */
  listEvents(options: { after?: string; limit?: number; type?: EventType } = {}): Promise<EventList> {
    return this.request("GET", "/v1/events", {
      query: { after: options.after, limit: options.limit, type: options.type },
    });
  }

  /** Queue an event again to every enabled endpoint of its type (admin scope). */
  redeliverEvent(eventId: number): Promise<{ queued: number }> {
    return this.request("POST", `/v1/events/${seg(eventId)}/redeliver`);
  }

  // --- webhook endpoints (admin scope) ------------------------------------

  /** Register an endpoint; the answer holds its `secret`, shown only here. */
  createWebhook(options: { url: string; eventTypes?: EventType[] }): Promise<CreatedWebhook> {
    return this.request("POST", "/v1/webhooks", {
      body: { url: options.url, ...(options.eventTypes !== undefined ? { event_types: options.eventTypes } : {}) },
    });
  }

  async listWebhooks(): Promise<WebhookEndpoint[]> {
    return (await this.request<{ webhooks: WebhookEndpoint[] }>("GET", "/v1/webhooks")).webhooks;
  }

  getWebhook(id: string): Promise<WebhookEndpoint> {
    return this.request("GET", `/v1/webhooks/${seg(id)}`);
  }

  async deleteWebhook(id: string): Promise<void> {
    await this.request("DELETE", `/v1/webhooks/${seg(id)}`);
  }

  rotateWebhookSecret(id: string): Promise<RotatedSecret> {
    return this.request("POST", `/v1/webhooks/${seg(id)}/rotate-secret`);
  }

  testWebhook(id: string): Promise<TestDelivery> {
    return this.request("POST", `/v1/webhooks/${seg(id)}/test`);
  }

  enableWebhook(id: string): Promise<WebhookEndpoint> {
    return this.request("POST", `/v1/webhooks/${seg(id)}/enable`);
  }

  listWebhookDeliveries(
    id: string,
    options: { status?: DeliveryStatus; after?: number; limit?: number } = {},
  ): Promise<DeliveryList> {
    return this.request("GET", `/v1/webhooks/${seg(id)}/deliveries`, {
      query: { status: options.status, after: options.after, limit: options.limit },
    });
  }
}

function errorFrom(response: Response, text: string): IntegrationsError {
  let detail: Partial<ErrorDetail> | undefined;
  try {
    const parsed = JSON.parse(text) as { error?: Partial<ErrorDetail> };
    if (parsed && typeof parsed.error === "object" && parsed.error !== null) detail = parsed.error;
  } catch {
    // not the service's error shape (a proxy's page, say)
  }
  return new IntegrationsError({
    status: response.status,
    code: typeof detail?.code === "string" ? detail.code : `http_${response.status}`,
    message:
      typeof detail?.message === "string"
        ? detail.message
        : `${response.status} ${response.statusText}`.trim() + (text ? `: ${text.slice(0, 200)}` : ""),
    hint: typeof detail?.hint === "string" ? detail.hint : null,
    retryAfter: parseRetryAfter(response.headers.get("retry-after")),
    requestId: response.headers.get("x-request-id"),
  });
}

/** Headers as a fetch `Headers`, Node's `IncomingHttpHeaders` or a plain record. */
export type WebhookHeaders =
  | { get(name: string): string | null }
  | Record<string, string | string[] | undefined>;

const WEBHOOK_HEADERS = ["webhook-id", "webhook-timestamp", "webhook-signature"] as const;

/**
 * Verify a delivery with the endpoint's secret (`whsec_...`) and return the
 * event. `body` must be the raw body exactly as received (not re-serialized
 * JSON). Throws `WebhookVerificationError` when it is forged, altered, or
 * its timestamp is more than 5 minutes off. The event's `id` is the same on
 * every retry: de-duplicate on it.
 */
export function verifyWebhook(secret: string, body: string | Uint8Array, headers: WebhookHeaders): WebhookEvent {
  const picked: Record<string, string> = {};
  const get =
    typeof (headers as { get?: unknown }).get === "function"
      ? (name: string) => (headers as { get(name: string): string | null }).get(name) ?? undefined
      : (name: string) => {
          for (const [key, value] of Object.entries(headers as Record<string, string | string[] | undefined>)) {
            if (key.toLowerCase() === name) return Array.isArray(value) ? value.join(" ") : value;
          }
          return undefined;
        };
  for (const name of WEBHOOK_HEADERS) {
    const value = get(name);
    if (value === undefined) throw new WebhookVerificationError(`Missing required headers: ${name}`);
    picked[name] = value;
  }
  return new Webhook(secret).verify(body, picked) as WebhookEvent;
}
