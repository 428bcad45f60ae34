//! Every series the alert rules (`deploy/prometheus/alerts.yml`) and the
//! Grafana dashboard (`deploy/grafana/integrations.json`) query is in the
//! first scrape of a freshly started server: nothing waits for a first
//! request, refresh, delivery or failure to exist (so `rate()` and absence
//! alerts work from the start, and a renamed metric breaks this test, not a
//! pager at night). And promtool (`scripts/install-deps --test`) accepts
//! the rules, their unit tests (`alerts_test.yml`) pass, and every dashboard
//! query parses.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::common::{TestApp, PROVIDERS};

/// The repository's `deploy/` directory.
fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// The service's metric names in a PromQL expression: identifiers starting
/// `integrations_`, `db_pool_` or `http_` followed by `{`, `[`, whitespace,
/// `)`, `,` or the end (a function name is followed by `(`; label names sit
/// inside braces and are followed by `=`).
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        // `[a-zA-Z_:]`, not inside a longer identifier.
        let starts = (bytes[i].is_ascii_alphabetic() || matches!(bytes[i], b'_' | b':'))
            && (i == 0 || !ident(bytes[i - 1]));
        if !starts {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && ident(bytes[i]) {
            i += 1;
        }
        let name = &expr[start..i];
        let follows = bytes.get(i).copied();
        let ends_selector = matches!(follows, None | Some(b'{' | b'[' | b')' | b','))
            || follows.is_some_and(|b| b.is_ascii_whitespace());
        if ends_selector
            && ["integrations_", "db_pool_", "http_"]
                .iter()
                .any(|p| name.starts_with(p))
        {
            into.insert(name.to_string());
        }
    }
}

/// The `expr:` values of a rules file (one line, or a `>-` block indented
/// below the key).
fn rule_expressions(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        i += 1;
        let Some(rest) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - trimmed.len();
        let mut expr = rest.trim().trim_start_matches(['>', '|', '-']).to_string();
        while i < lines.len() {
            let next = lines[i];
            let next_indent = next.len() - next.trim_start().len();
            if !next.trim().is_empty() && next_indent <= indent {
                break;
            }
            expr.push('\n');
            expr.push_str(next);
            i += 1;
        }
        exprs.push(expr);
    }
    exprs
}

/// Every `expr` and templating `query` string in a dashboard.
fn dashboard_expressions(v: &Value, into: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => into.push(s.clone()),
                    ("query", Value::String(s)) => into.push(s.clone()),
                    ("query", Value::Object(q)) => {
                        if let Some(Value::String(s)) = q.get("query") {
                            into.push(s.clone());
                        }
                    }
                    _ => dashboard_expressions(v, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_expressions(v, into)),
        _ => {}
    }
}

/// The metric names of a Prometheus text scrape (`_bucket`, `_count` and
/// `_sum` lines included as they are).
fn scraped_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Whether `name` is in the scrape, directly or as a histogram's or
/// summary's `_bucket`/`_count`/`_sum` series.
fn scraped(name: &str, scrape: &BTreeSet<String>) -> bool {
    scrape.contains(name)
        || ["_bucket", "_count", "_sum"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| scrape.contains(base))
        })
}

/// Runs `promtool` (Debian's prometheus package, installed by
/// `scripts/install-deps --test`) and returns its output when it succeeds.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool runs (scripts/install-deps --test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The rules without their `annotations:` blocks: the unit tests check
/// when each alert fires and with which labels, not its wording (promtool
/// compares annotations whole).
fn without_annotations(yaml: &str) -> String {
    let mut out = String::new();
    let mut skipping_below: Option<usize> = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(at) = skipping_below {
            if line.trim().is_empty() || indent > at {
                continue;
            }
            skipping_below = None;
        }
        if line.trim() == "annotations:" {
            skipping_below = Some(indent);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let rules = deploy_dir().join("prometheus/alerts.yml");
    let checked = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(checked.contains("SUCCESS"), "{checked}");

    // alerts_test.yml next to a copy of the rules without annotations.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text = std::fs::read_to_string(&rules).unwrap();
    let stripped = without_annotations(&text);
    assert!(!stripped.contains("description:") && stripped.contains("expr:"));
    std::fs::write(dir.join("alerts.yml"), stripped).unwrap();
    std::fs::copy(
        deploy_dir().join("prometheus/alerts_test.yml"),
        dir.join("alerts_test.yml"),
    )
    .unwrap();
    let tested = promtool(&[
        "test",
        "rules",
        dir.join("alerts_test.yml").to_str().unwrap(),
    ]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy_dir().join("grafana/integrations.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    dashboard_expressions(&dashboard, &mut exprs);
    // As recording rules, Grafana's variables replaced, for promtool to
    // parse (the templating query, label_values(), is Grafana's own).
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut count = 0;
    for e in exprs.iter().filter(|e| !e.starts_with("label_values(")) {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$instance", ".*");
        count += 1;
        rules.push_str(&format!(
            "      - record: dashboard:query_{count}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    assert!(count > 20, "{rules}");
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("dashboard.yml");
    std::fs::write(&file, &rules).unwrap();
    let checked = promtool(&["check", "rules", file.to_str().unwrap()]);
    assert!(
        checked.contains(&format!("SUCCESS: {count} rules found")),
        "{checked}"
    );
}

#[test]
fn metric_names_are_read_from_selectors_only() {
    let mut names = BTreeSet::new();
    metric_names(
        r#"sum by (instance) (rate(http_requests_total{route="/readyz"}[5m])) / db_pool_waiting > 0
           histogram_quantile(0.99, rate(integrations_refresh_seconds_bucket[5m]))
           label_values(db_pool_connections_max, instance) x_db_pool_waiting"#,
        &mut names,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "db_pool_connections_max",
            "db_pool_waiting",
            "http_requests_total",
            "integrations_refresh_seconds_bucket"
        ]
    );
    let scrape = scraped_names("# TYPE x summary\nx{quantile=\"0.5\"} 1\nx_sum 2\ny 0\n");
    assert!(scraped("x_bucket", &scrape) && scraped("x_count", &scrape) && scraped("y", &scrape));
    assert!(!scraped("z_count", &scrape));
}

#[tokio::test]
async fn every_series_in_the_alerts_and_the_dashboard_is_in_the_first_scrape() {
    let rules = std::fs::read_to_string(deploy_dir().join("prometheus/alerts.yml")).unwrap();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy_dir().join("grafana/integrations.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = rule_expressions(&rules);
    assert!(
        exprs.len() >= 9,
        "expressions found in alerts.yml: {exprs:?}"
    );
    let rule_count = exprs.len();
    dashboard_expressions(&dashboard, &mut exprs);
    assert!(
        exprs.len() > rule_count + 20,
        "expressions found in the dashboard: {}",
        exprs.len() - rule_count
    );
    let mut wanted = BTreeSet::new();
    for e in &exprs {
        metric_names(e, &mut wanted);
    }

    let app = TestApp::spawn().await;
    let metrics = app.get("/metrics", None).await;
    assert_eq!(metrics.status, 200);
    let scrape = scraped_names(&metrics.text);

    let missing: Vec<&String> = wanted.iter().filter(|n| !scraped(n, &scrape)).collect();
    assert!(
        missing.is_empty(),
        "queried by deploy/ but not in a fresh server's first scrape: {missing:?}\n(checked {} names: {wanted:?})",
        wanted.len()
    );
    // Labelled counters start with each of their fixed values (providers:
    // the registry's), at zero (the invalidations, counted already: the
    // test's API keys were written by another connection).
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        metrics.text.lines().find_map(|l| {
            let matches = l.starts_with(&format!("{name}{{"))
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| l.rsplit(' ').next().unwrap().parse().unwrap())
        })
    };
    let zero = |name: &str, labels: &[(&str, &str)]| value(name, labels) == Some(0.0);
    for provider in PROVIDERS {
        for outcome in ["ok", "revoked", "transient", "rejected"] {
            let labels = [("provider", *provider), ("outcome", outcome)];
            assert!(zero("integrations_refreshes_total", &labels), "{labels:?}");
        }
    }
    for outcome in ["delivered", "retry", "failed"] {
        let labels = [("outcome", outcome)];
        assert!(
            zero("integrations_webhook_deliveries_total", &labels),
            "{labels:?}"
        );
    }
    for kind in ["integration", "api_key", "unknown"] {
        let labels = [("kind", kind)];
        assert!(
            value("integrations_invalidations_received_total", &labels).is_some(),
            "{labels:?}"
        );
    }
    assert!(zero("db_pool_connect_failures_total", &[("code", "P2037")]));
    assert!(zero(
        "db_pool_connections_closed_total",
        &[("reason", "too_many_connections")]
    ));
    for status in ["200", "503"] {
        let labels = [("route", "/readyz"), ("status", status)];
        assert!(zero("http_requests_total", &labels), "{labels:?}");
    }
    // The ones every pager rule leans on, in case the parsing above lost
    // them.
    for name in [
        "db_pool_checkout_timeouts_total",
        "db_pool_waiting",
        "db_pool_connect_failures_total",
        "integrations_change_listener_connected",
        "integrations_refreshes_total",
        "integrations_webhook_pending",
        "integrations_webhook_oldest_pending_seconds",
        "http_requests_total",
    ] {
        assert!(
            wanted.contains(name),
            "{name} not found in deploy/: {wanted:?}"
        );
    }
}
