//! The admin server (`[listen] admin`): `GET /metrics`, `/healthz`, `/readyz`, `/policy`,
//! `/denied`, and `POST /reload`. Bind it to loopback, or to a network only Prometheus reaches.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::proxy::State;
use crate::reload::Reloader;

/// Serves the admin endpoints until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    reloader: Option<Arc<Reloader>>,
    shutdown: CancellationToken,
) {
    while let Some((stream, _)) = crate::server::accept_next(&listener, &shutdown).await {
        let (state, reloader) = (state.clone(), reloader.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| respond(req, state.clone(), reloader.clone()));
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(std::time::Duration::from_secs(10));
            let _ = b.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn respond(
    req: Request<Incoming>,
    state: Arc<State>,
    reloader: Option<Arc<Reloader>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let r = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(StatusCode::OK, "text/plain; version=0.0.4", state.metrics.render()),
        (&Method::GET, "/healthz") => reply(StatusCode::OK, TEXT, "ok\n".into()),
        (&Method::GET, "/readyz") if state.ready.load(std::sync::atomic::Ordering::Relaxed) => {
            reply(StatusCode::OK, TEXT, "ready\n".into())
        }
        (&Method::GET, "/readyz") => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into()),
        (&Method::GET, "/policy") => reply(StatusCode::OK, JSON, policy_json(&state)),
        (&Method::GET, "/denied") => {
            let top = state.audit.top_denied(TOP_SHOWN);
            reply(StatusCode::OK, JSON, serde_json::to_string_pretty(&top).unwrap_or_default())
        }
        (&Method::POST, "/reload") => match reloader.map(|r| r.reload()) {
            Some(Ok(hash)) => reply(StatusCode::OK, TEXT, format!("reloaded {hash}\n")),
            Some(Err(errors)) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("reload failed, the old policy stays in force:\n{errors}\n"),
            ),
            None => reply(StatusCode::CONFLICT, TEXT, "this proxy was not started from files it can reload\n".into()),
        },
        (_, "/metrics" | "/healthz" | "/readyz" | "/policy" | "/denied" | "/reload") => {
            reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "method not allowed\n".into())
        }
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    };
    Ok(r)
}

/// The effective, expanded policy, with the config's hash and load time.
fn policy_json(state: &State) -> String {
    let policy = state.policy.load();
    let info = state.info.load();
    let rules: Vec<serde_json::Value> = policy
        .rules()
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name.as_ref(),
                "action": r.action.as_str(),
                "protocol": r.protocol.as_str(),
                "ports": r.ports.ranges().iter().map(ToString::to_string).collect::<Vec<_>>(),
                "hosts": r.patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                "service_tags": r.tags.iter().map(|(t, n)| serde_json::json!({"name": t, "prefixes": n})).collect::<Vec<_>>(),
                "cidrs": r.cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                "sources": r.sources.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = serde_json::json!({ "info": &**info, "rules": rules });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
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
