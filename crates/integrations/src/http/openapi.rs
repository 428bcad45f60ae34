//! The parts of `/openapi.json` that every route shares, added in one
//! place after the routes are merged, so a new route cannot forget them:
//! the path parameters' limits (from `domain`'s own constants) and the
//! error answers the middleware, the extractors and the API key check give
//! on any route. A route's own entry for a status wins over these.

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};

use crate::domain::{AccountId, ProviderName, UserId, WebhookId};

/// 503 for a provider route: the database, the deadline, or a provider
/// without credentials.
pub(crate) const PROVIDER_UNAVAILABLE: &str = "`provider_not_configured`: the provider's client id or secret is not set; the message names the environment variable to set. \
`provider_paused`: the provider answered 429 or `Retry-After` (or its circuit breaker is open) and the pause outlasts what the call waits; nothing was sent and nothing changed; `Retry-After` says when. \
Or the database is unavailable (`P2024` pool timeout, `P2037` too many connections, `P1001` unreachable, `P1008` socket timeout; `Retry-After` says when to retry), \
or the request took longer than INTEGRATIONS_REQUEST_TIMEOUT (`request_timeout`)";

/// 503 on every route that reads the database (the API key check does).
const DATABASE_UNAVAILABLE: &str = "The database is unavailable (`P2024` pool timeout, `P2037` too many connections, `P1001` unreachable, `P1008` socket timeout; `Retry-After` says when to retry), \
or the request took longer than INTEGRATIONS_REQUEST_TIMEOUT (`request_timeout`)";

/// 503 on every route: the request deadline covers them all.
const DEADLINE: &str =
    "The request took longer than INTEGRATIONS_REQUEST_TIMEOUT (`request_timeout`)";

/// Applies the shared parts to every operation of `doc`.
pub(crate) fn complete(doc: &mut OpenApi) {
    for (path, item) in doc.paths.paths.iter_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
            &mut item.head,
            &mut item.options,
            &mut item.trace,
        ];
        for op in operations.into_iter().flatten() {
            limit_path_parameters(op);
            add_common_responses(path, op);
            spell_links(op);
        }
    }
}

/// Lists the providers this server's registry knows as the values of every
/// `provider` path parameter: any other name is answered 404.
pub(crate) fn name_providers(doc: &mut OpenApi, names: &[&str]) {
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
        ];
        for op in operations.into_iter().flatten() {
            for param in op.parameters.iter_mut().flatten() {
                if param.name != "provider" || !matches!(param.parameter_in, ParameterIn::Path) {
                    continue;
                }
                if let Some(RefOr::T(utoipa::openapi::schema::Schema::Object(schema))) =
                    &mut param.schema
                {
                    schema.enum_values = Some(names.iter().map(|n| (*n).into()).collect());
                    if let Some(first) = names.first() {
                        schema.examples = vec![(*first).into()];
                    }
                }
                param.description = Some(
                    "A provider of this server's registry (INTEGRATIONS_PROVIDERS); any other name is answered 404"
                        .to_string(),
                );
            }
        }
    }
}

/// Writes each response's links as OpenAPI spells them: utoipa 5.5
/// serializes `Link` with Rust's field names (`operation_id`,
/// `request_body`), which tools do not read. The links move, spelled
/// `operationId` and `requestBody`, into the response's extensions, which
/// are written as they are.
fn spell_links(op: &mut Operation) {
    for response in op.responses.responses.values_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        if response.links.is_empty() {
            continue;
        }
        let links: serde_json::Map<String, serde_json::Value> = std::mem::take(&mut response.links)
            .into_iter()
            .filter_map(|(name, link)| {
                let serde_json::Value::Object(fields) = serde_json::to_value(link).ok()? else {
                    return None;
                };
                let fields = fields
                    .into_iter()
                    .map(|(k, v)| {
                        let k = match k.as_str() {
                            "operation_id" => "operationId".to_string(),
                            "operation_ref" => "operationRef".to_string(),
                            "request_body" => "requestBody".to_string(),
                            _ => k,
                        };
                        (k, v)
                    })
                    .collect();
                Some((name, serde_json::Value::Object(fields)))
            })
            .collect();
        response
            .extensions
            .get_or_insert_with(Default::default)
            .insert("links".to_string(), links.into());
    }
}

/// `user_id`, `provider` and `account_id` as the domain types accept them.
fn limit_path_parameters(op: &mut Operation) {
    for param in op.parameters.iter_mut().flatten() {
        if !matches!(param.parameter_in, ParameterIn::Path) {
            continue;
        }
        let (max, pattern, example) = match param.name.as_str() {
            "user_id" => (UserId::MAX_LEN, UserId::PATTERN, "user-1"),
            "provider" => (ProviderName::MAX_LEN, ProviderName::PATTERN, "github"),
            "account_id" => (AccountId::MAX_LEN, AccountId::PATTERN, "12345"),
            "webhook_id" => (27, WebhookId::PATTERN, "wh_0123456789abcdef01234567"),
            // Whole numbers that fit an i64 (18 digits at most).
            "event_id" => (18, "^[1-9][0-9]{0,17}$", "42"),
            _ => continue,
        };
        param.schema = Some(RefOr::T(id_schema(max, pattern, example).into()));
    }
}

/// A string schema for one of the domain's ids.
pub(crate) fn id_schema(max: usize, pattern: &str, example: &str) -> utoipa::openapi::Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(max))
        .pattern(Some(pattern))
        .examples([serde_json::Value::from(example)])
        .build()
}

fn add_common_responses(path: &str, op: &mut Operation) {
    let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
    let has_body = op.request_body.is_some();
    let has_params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
    let has_path_params = op
        .parameters
        .iter()
        .flatten()
        .any(|p| matches!(p.parameter_in, ParameterIn::Path));
    let mut add = |status: &str, description: &str| {
        op.responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| error_response(description));
    };
    if has_body || has_params {
        add(
            "400",
            "A path parameter, the query or the body is invalid (`invalid_request`, naming the field)",
        );
    }
    if has_path_params {
        add(
            "404",
            "No route matches: a path segment is empty (`not_found`)",
        );
    }
    if secured {
        add(
            "401",
            "No valid API key (`unauthorized`; `WWW-Authenticate: Bearer`)",
        );
        add(
            "403",
            "The API key lacks the scope this operation needs (`forbidden`, naming the scope)",
        );
    }
    if has_body {
        add(
            "413",
            &format!(
                "The body is larger than {} bytes (`payload_too_large`)",
                super::BODY_LIMIT
            ),
        );
        add(
            "415",
            "The body is not sent as JSON: send `Content-Type: application/json` (`invalid_request`)",
        );
    }
    if secured || path.starts_with("/v1/") {
        add(
            "500",
            "An internal error (`internal`); the request id finds it in the logs",
        );
        add("503", DATABASE_UNAVAILABLE);
    } else {
        add("503", DEADLINE);
    }
}

/// An error answer: the `ErrorBody` schema.
fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}
