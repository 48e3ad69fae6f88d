//! Service-tag refresh against a local HTTPS server: ETag, validation, atomic write and reload.
#![allow(clippy::disallowed_methods)]

mod support;

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use egress_proxy::config::Config;
use egress_proxy::load::load;
use egress_proxy::policy::{Decision, Host, Query};
use egress_proxy::refresh::{Outcome, RefreshError, Refresher};
use egress_proxy::reload::Reloader;
use egress_proxy::state::State;

/// What the server sends: status, ETag and body; and the If-None-Match it last saw.
#[derive(Default)]
struct Served {
    status: u16,
    etag: String,
    body: String,
    seen_if_none_match: Option<String>,
}

async fn https_server(served: Arc<Mutex<Served>>) -> (std::net::SocketAddr, String) {
    let (ca_pem, acceptor) = support::tls_acceptor(&["127.0.0.1"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, served) = (acceptor.clone(), served.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let served = served.clone();
                    async move { Ok::<_, Infallible>(answer(&req, &mut served.lock().unwrap())) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    (addr, ca_pem)
}

fn answer(req: &Request<hyper::body::Incoming>, s: &mut Served) -> Response<Full<Bytes>> {
    let inm = req.headers().get("if-none-match").map(|v| v.to_str().unwrap().to_string());
    s.seen_if_none_match = inm.clone();
    let not_modified = inm.as_deref() == Some(s.etag.as_str());
    let body = if not_modified { Bytes::new() } else { Bytes::from(s.body.clone()) };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = if not_modified { StatusCode::NOT_MODIFIED } else { StatusCode::from_u16(s.status).unwrap() };
    r.headers_mut().insert("etag", s.etag.parse().unwrap());
    r
}

/// The subset file with a new changeNumber and, optionally, an extra AzureMachineLearning prefix.
fn tags_json(change_number: u64, extra_prefix: Option<&str>, drop_azureml: bool) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(support::TAGS).unwrap()).unwrap();
    v["changeNumber"] = change_number.into();
    let values = v["values"].as_array_mut().unwrap();
    if drop_azureml {
        values.retain(|t| t["name"] != "AzureMachineLearning");
    }
    if let Some(p) = extra_prefix {
        let aml = values.iter_mut().find(|t| t["name"] == "AzureMachineLearning").unwrap();
        aml["properties"]["addressPrefixes"].as_array_mut().unwrap().push(p.into());
    }
    serde_json::to_string_pretty(&v).unwrap()
}

fn decide(state: &State, ip: &str) -> Decision {
    let host = Host::from_ip(ip.parse::<IpAddr>().unwrap());
    state.policy.load().decide(&Query::new(&host, 443))
}

/// A local server to refresh from, and a directory holding the service-tag file (`tags.json`) and
/// its CA: the `[service_tags]` section that refreshes from it.
struct Setting {
    served: Arc<Mutex<Served>>,
    dir: tempfile::TempDir,
    tags_file: std::path::PathBuf,
    tags_section: String,
}

async fn setting() -> Setting {
    let served = Arc::new(Mutex::new(Served::default()));
    let (addr, ca_pem) = https_server(served.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let tags_file = dir.path().join("tags.json");
    std::fs::copy(support::TAGS, &tags_file).unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca_pem).unwrap();
    let tags_section = format!(
        "[service_tags]\nfile = \"tags.json\"\nurl = \"https://{addr}/tags.json\"\nrefresh = \"1h\"\nca_file = \"ca.pem\"\n"
    );
    Setting { served, dir, tags_file, tags_section }
}

/// The proxy's state, loaded from `cfg`, and a refresher for it.
fn refresher_for(cfg: &std::path::Path) -> (Arc<State>, Refresher) {
    let loaded = load(Some(cfg), &[]).unwrap();
    let (files, digest) = (loaded.files.clone(), loaded.digest.clone());
    let state = Arc::new(State::build(loaded).unwrap());
    let reloader = Arc::new(Reloader::new(Some(cfg.to_path_buf()), Vec::new(), state.clone(), files, digest));
    let config = Config::load(cfg).unwrap();
    let refresher = Refresher::from_config(&config, Some(cfg), &[], state.clone(), reloader).unwrap().unwrap();
    (state, refresher)
}

#[tokio::test]
async fn refresh_validates_writes_atomically_honours_etag_and_reloads() {
    let Setting { served, dir, tags_file, tags_section } = setting().await;
    let cfg = dir.path().join("p.toml");
    std::fs::write(
        &cfg,
        format!(
            "{tags_section}[audit]\npath = \"audit.jsonl\"\n\
             [[rule]]\nname = \"aml\"\naction = \"allow\"\nservice_tags = [\"AzureMachineLearning\"]\n"
        ),
    )
    .unwrap();
    let (state, refresher) = refresher_for(&cfg);

    assert!(!decide(&state, "203.0.113.5").is_allow());
    let newer = tags_json(375, Some("203.0.113.0/24"), false);
    *served.lock().unwrap() = Served { status: 200, etag: "\"v375\"".into(), body: newer.clone(), ..Served::default() };
    assert_eq!(refresher.fetch_once().await.unwrap(), Outcome::Updated { change_number: 375 });
    assert_eq!(std::fs::read_to_string(&tags_file).unwrap(), newer, "written over the configured file");
    assert!(decide(&state, "203.0.113.5").is_allow(), "the new prefix is in force");
    assert_eq!(state.info.load().service_tags_change_number, 375);

    assert_eq!(refresher.fetch_once().await.unwrap(), Outcome::NotModified);
    assert_eq!(served.lock().unwrap().seen_if_none_match.as_deref(), Some("\"v375\""));

    let bad_cases = [
        (200, tags_json(300, None, false)),
        (200, "{\"not\": \"service tags\"}".to_string()),
        (200, tags_json(376, None, true)),
        // Past the 32 MiB cap: refused unread (found in review: any size was read whole).
        (200, " ".repeat(33 * 1024 * 1024)),
        (500, String::new()),
    ];
    for (i, (status, body)) in bad_cases.into_iter().enumerate() {
        *served.lock().unwrap() = Served { status, etag: format!("\"bad{i}\""), body, ..Served::default() };
        let err = refresher.fetch_once().await.unwrap_err();
        match i {
            0 => assert!(matches!(err, RefreshError::Older { new: 300, current: 375 }), "{err}"),
            1 => assert!(matches!(err, RefreshError::Invalid(_)), "{err}"),
            2 => assert!(err.to_string().contains("AzureMachineLearning is missing"), "{err}"),
            3 => assert!(err.to_string().contains("larger than 33554432 bytes"), "{err}"),
            _ => assert!(matches!(err, RefreshError::Status(500)), "{err}"),
        }
        assert_eq!(std::fs::read_to_string(&tags_file).unwrap(), newer, "a failed fetch keeps the last good file");
        assert!(decide(&state, "203.0.113.5").is_allow());
    }
    let m = state.metrics.render();
    // Whole sample lines: a substring match would take `} 10` for `} 1`.
    let samples: Vec<&str> = m.lines().filter(|l| !l.starts_with('#')).collect();
    for want in [
        "egress_proxy_service_tags_refreshes_total{result=\"success\"} 1",
        "egress_proxy_service_tags_refreshes_total{result=\"not_modified\"} 1",
        "egress_proxy_service_tags_refreshes_total{result=\"failure\"} 5",
        "egress_proxy_service_tags_change_number 375",
        // The refresh's one reload, and no other: nothing else reloads this proxy.
        "egress_proxy_config_reloads_total{result=\"success\"} 1",
    ] {
        assert!(samples.contains(&want), "no `{want}` in\n{m}");
    }
    assert!(
        !m.contains("egress_proxy_config_reloads_total{result=\"failure\"}"),
        "bad data never reaches a reload: {m}"
    );
}

/// A `[shadow]` candidate that reads the same service-tag file must compile against new data too:
/// a download that drops a tag only the candidate uses is refused, and the file stays as it was,
/// so that neither the reload after it nor the next start fails. (Found in review: only the
/// config itself was checked, and the file was written before the reload failed.)
#[tokio::test]
async fn a_refresh_the_shadow_candidate_cannot_load_is_refused() {
    let Setting { served, dir, tags_file, tags_section } = setting().await;
    std::fs::write(
        dir.path().join("candidate.toml"),
        format!(
            "{tags_section}[[rule]]\nname = \"aml\"\naction = \"allow\"\nservice_tags = [\"AzureMachineLearning\"]\n"
        ),
    )
    .unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(
        &cfg,
        format!(
            "{tags_section}[shadow]\nconfig = \"candidate.toml\"\n[audit]\npath = \"audit.jsonl\"\n\
             [[rule]]\nname = \"ml\"\naction = \"allow\"\nhosts = [\"ml.azure.com\"]\n"
        ),
    )
    .unwrap();
    let (_state, refresher) = refresher_for(&cfg);

    let before = std::fs::read_to_string(&tags_file).unwrap();
    *served.lock().unwrap() =
        Served { status: 200, etag: "\"v376\"".into(), body: tags_json(376, None, true), ..Served::default() };
    let err = refresher.fetch_once().await.unwrap_err();
    assert!(matches!(err, RefreshError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("candidate.toml"), "the candidate is named: {err}");
    assert_eq!(std::fs::read_to_string(&tags_file).unwrap(), before, "the file is left as it was");
    assert!(load(Some(&cfg), &[]).is_ok(), "the next start still loads");
}
