//! The admin server (`[listen] admin`): `GET /metrics`, `/healthz`, `/readyz`, `/policy`,
//! `/denied`, `POST /reload` and `POST /shadow/promote`. Bind it to loopback, or to a network only Prometheus reaches.

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use ipnet::IpNet;
use serde::{Serialize, Serializer};

use crate::config::PortRange;
use crate::policy::{Pattern, Rule};
use crate::reload::{Promotion, Reloader};
use crate::state::State;

/// Answers one admin request. `server::run` accepts admin connections, within their own limit,
/// and tracks and drains them with every other connection.
pub async fn respond(
    req: Request<Incoming>,
    state: Arc<State>,
    reloader: Option<Arc<Reloader>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let r = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, "text/plain; version=0.0.4", state.metrics.render()),
        (&Method::GET, "/healthz") => reply(StatusCode::OK, TEXT, "ok\n".into()),
        (&Method::GET, "/readyz") if state.is_ready() => reply(StatusCode::OK, TEXT, "ready\n".into()),
        (&Method::GET, "/readyz") => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into()),
        (&Method::GET, "/policy") => reply(StatusCode::OK, JSON, policy_json(&state)),
        (&Method::GET, "/denied") => {
            let top = state.audit.top_denied(TOP_SHOWN);
            reply(StatusCode::OK, JSON, serde_json::to_string_pretty(&top).unwrap_or_default())
        }
        (&Method::POST, "/reload") => match (authorized(&req, &state).await, reloader) {
            (Err(refused), _) => refused,
            (Ok(()), Some(reloader)) => match reloader.request().await {
                Ok(hash) => reply(StatusCode::OK, TEXT, format!("reloaded {hash}\n")),
                Err(errors) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("reload failed, the old policy stays in force:\n{errors}\n"),
                ),
            },
            (Ok(()), None) => {
                reply(StatusCode::CONFLICT, TEXT, "this proxy was not started from files it can reload\n".into())
            }
        },
        (&Method::POST, "/shadow/promote") => match (authorized(&req, &state).await, reloader) {
            (Err(refused), _) => refused,
            (Ok(()), Some(reloader)) => match reloader.promote().await {
                Ok(hash) => reply(StatusCode::OK, TEXT, format!("promoted {hash}\n")),
                Err(Promotion::NoShadow) => {
                    reply(StatusCode::CONFLICT, TEXT, "no [shadow] candidate to promote\n".into())
                }
                Err(Promotion::Invalid(errors)) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("the candidate does not load, the policy in force stays:\n{errors}\n"),
                ),
            },
            (Ok(()), None) => {
                reply(StatusCode::CONFLICT, TEXT, "this proxy was not started from files it can reload\n".into())
            }
        },
        (_, "/metrics" | "/healthz" | "/readyz" | "/policy" | "/denied" | "/reload" | "/shadow/promote") => {
            reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n".into())
        }
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    };
    Ok(r)
}

/// A mutating request must carry `Authorization: Bearer <token>` with the token in
/// `[admin] token_file`; without a token file, mutating endpoints are refused outright.
async fn authorized(req: &Request<Incoming>, state: &State) -> Result<(), Response<Full<Bytes>>> {
    let Some(path) = &state.admin_token_file else {
        return Err(reply(StatusCode::FORBIDDEN, TEXT, "set [admin] token_file to use this endpoint\n".into()));
    };
    let token = match tokio::fs::read_to_string(path).await {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        Ok(_) | Err(_) => {
            tracing::error!(file = %path.display(), "The admin token file cannot be read, or is empty");
            return Err(reply(StatusCode::FORBIDDEN, TEXT, "the admin token file cannot be read\n".into()));
        }
    };
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_bytes(g.as_bytes(), token.as_bytes()) => Ok(()),
        _ => {
            let mut r = reply(StatusCode::UNAUTHORIZED, TEXT, "a bearer token is required\n".into());
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            Err(r)
        }
    }
}

/// Compares without stopping at the first difference, so that the time taken does not tell how
/// much of a guessed token was right.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The effective, expanded policy, with the config's hash and load time.
fn policy_json(state: &State) -> String {
    let policy = state.policy.load();
    let info = state.info.load();
    let view = PolicyView { info: &**info, rules: policy.rules().iter().map(RuleView::from).collect() };
    serde_json::to_string_pretty(&view).unwrap_or_default()
}

/// What `/policy` shows: how the policy in force was loaded (`info`), and its rules.
#[derive(Serialize)]
struct PolicyView<'a, Info> {
    info: &'a Info,
    rules: Vec<RuleView<'a>>,
}

/// One compiled rule as `/policy` shows it: its placeholders expanded, each value as text.
#[derive(Serialize)]
struct RuleView<'a> {
    name: &'a str,
    action: &'static str,
    protocol: &'static str,
    #[serde(serialize_with = "strings")]
    ports: &'a [PortRange],
    #[serde(serialize_with = "strings")]
    hosts: &'a [Pattern],
    service_tags: Vec<TagView<'a>>,
    #[serde(serialize_with = "strings")]
    cidrs: &'a [IpNet],
    #[serde(serialize_with = "strings")]
    sources: &'a [IpNet],
    /// `enforce`, or `report`: what the rule would refuse is let through as `would_deny`.
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_upload_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upload_budget: Option<BudgetView>,
}

/// A rule's `upload_budget`, as `/policy` shows it.
#[derive(Serialize)]
struct BudgetView {
    bytes: u64,
    per_s: u64,
}

/// A service tag of a rule, as Azure spells it, with the number of its prefixes.
#[derive(Serialize)]
struct TagView<'a> {
    name: &'a str,
    prefixes: usize,
}

impl<'a> From<&'a Rule> for RuleView<'a> {
    fn from(r: &'a Rule) -> Self {
        Self {
            name: &r.name,
            action: r.action.as_str(),
            protocol: r.protocol.as_str(),
            ports: r.ports.ranges(),
            hosts: &r.patterns,
            service_tags: r.tags.iter().map(|(name, prefixes)| TagView { name, prefixes: *prefixes }).collect(),
            cidrs: &r.cidrs,
            sources: &r.sources,
            mode: if r.report { "report" } else { "enforce" },
            max_upload_bytes: r.max_upload,
            upload_budget: r.upload_budget.map(|b| BudgetView { bytes: b.bytes, per_s: b.per.as_secs() }),
        }
    }
}

/// A list as JSON strings, each item in its text form (`Display`).
fn strings<T: fmt::Display, S: Serializer>(items: &&[T], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(items.iter().map(ToString::to_string))
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const TOP_SHOWN: usize = 50;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Origin};

    #[test]
    fn a_rule_is_shown_with_every_field_as_text() {
        let text = "[[rule]]\nname = \"web\"\naction = \"deny\"\nhosts = [\"*.example.org\"]\n\
                    cidrs = [\"192.0.2.0/24\"]\nports = [80, \"8000-8080\"]\nsources = [\"10.0.0.0/8\"]\n\
                    mode = \"report\"\nmax_upload_bytes = 1000\nupload_budget = { bytes = 5000, per = \"1h\" }\n";
        let config = Config::from_str(text, Origin::Embedded).unwrap();
        let compiled = crate::policy::compile(&config, &Default::default()).unwrap();
        let rule = serde_json::to_value(RuleView::from(&compiled.policy.rules()[0])).unwrap();
        let want = serde_json::json!({
            "name": "web",
            "action": "deny",
            "protocol": "tcp",
            "ports": ["80", "8000-8080"],
            "hosts": ["*.example.org"],
            "service_tags": [],
            "cidrs": ["192.0.2.0/24"],
            "sources": ["10.0.0.0/8"],
            "mode": "report",
            "max_upload_bytes": 1000,
            "upload_budget": { "bytes": 5000, "per_s": 3600 },
        });
        assert_eq!(rule, want);
    }
}
