//! Forwarding one HTTP request (explicit absolute form, or a request on the transparent `plain`
//! listener), once authorized: dial → allow line → one upstream HTTP/1.1 exchange in origin form,
//! hop-by-hop headers removed → close line when both bodies are done: the response's, and the
//! request's, which an origin that answers early may still be taking.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::authorize::Permit;
use super::body::{BoxError, ProxyBody};
use super::conn::CloseRecord;
use super::conn::{Conn, ConnCx};
use super::refusal::Refusal;
use super::tunnel::meter::{Direction, Flow, Meter};
use crate::policy::DenyReason;

/// Forwards one request, already authorized, to an address of `permit`, with `authority` as its
/// Host. The allow line is written once the upstream is connected, before the first byte of the
/// request goes to it; a failure after that is the close line's `reason`, and the client's 502/504.
pub async fn forward(
    req: Request<Incoming>,
    cx: &ConnCx,
    conn: Conn,
    permit: &Permit,
    authority: &str,
) -> Response<ProxyBody> {
    let prepared = match origin_form(req, authority) {
        Ok(req) => req,
        Err(refusal) => return refuse(conn, refusal),
    };
    let upstream = match conn.dial(permit).await {
        Ok(u) => u,
        Err(refusal) => return refuse(conn, refusal),
    };
    let meter = Meter::new();
    let close = Arc::new(Mutex::new(conn.allowed(upstream.to, Arc::clone(&meter))));
    let idle = cx.state.limits.idle_timeout;
    match exchange(prepared, cx, upstream.stream, &meter, &close).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let body = Counted::new(body, meter.flow(Direction::Down), idle).closing(close).boxed();
            Response::from_parts(parts, body)
        }
        Err(refusal) => {
            let mut close = close.lock().unwrap_or_else(PoisonError::into_inner);
            // A request body cut at `max_upload_bytes` is refused as such, not as the upstream's fault.
            let refusal = match close.check_upload_limit() {
                true => Refusal::Policy { reason: DenyReason::UploadLimit, rule: Some(upstream.to.grant.rule) },
                false => refusal,
            };
            close.mark_failed(&refusal);
            refusal.response()
        }
    }
}

/// The close record of one forwarded exchange, which both bodies hold: the close line is
/// written when the last of them is done (`CloseRecord`'s drop).
type SharedClose = Arc<Mutex<CloseRecord>>;

fn refuse(conn: Conn, refusal: Refusal) -> Response<ProxyBody> {
    conn.refused(&refusal);
    refusal.response()
}

/// The request as the upstream gets it: origin form, Host from the request target (RFC 9112
/// §3.2.2), hop-by-hop headers removed.
fn origin_form(mut req: Request<Incoming>, authority: &str) -> Result<Request<Incoming>, Refusal> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
    *req.uri_mut() = Uri::try_from(path).map_err(|_| Refusal::BadRequest("malformed request target"))?;
    strip_hop_by_hop(req.headers_mut());
    let host_value = HeaderValue::from_str(authority).map_err(|_| Refusal::BadRequest("malformed authority"))?;
    req.headers_mut().insert(header::HOST, host_value);
    Ok(req)
}

/// Sends the request over `upstream`, its body through the meter; the response head.
async fn exchange(
    req: Request<Incoming>,
    cx: &ConnCx,
    upstream: TcpStream,
    meter: &Arc<Meter>,
    close: &SharedClose,
) -> Result<Response<Incoming>, Refusal> {
    let idle = cx.state.limits.idle_timeout;
    // The head carries bytes up as the body does (a URL, a header field): it passes the meter
    // first, so that `max_upload_bytes` and `upload_budget` count it. Over the limit, nothing is
    // sent, and `forward` refuses it as `upload_limit`.
    let up = meter.flow(Direction::Up);
    if up.pass(head_len(&req)).is_break() {
        return Err(Refusal::Policy { reason: DenyReason::UploadLimit, rule: None });
    }
    let req = req.map(|b| Counted::new(b, up, idle).holding(Arc::clone(close)).boxed());
    let (mut sender, conn_task) =
        hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await.map_err(|_| Refusal::UpstreamProtocol)?;
    let stop = cx.stop.clone();
    cx.tracker.spawn(async move {
        tokio::select! {
            r = conn_task => if let Err(e) = r { tracing::debug!(error = %e, "Upstream connection ended with an error") },
            () = stop.cancelled() => {}
        }
    });
    tokio::time::timeout(idle, sender.send_request(req))
        .await
        .map_err(|_| Refusal::UpstreamTimeout)?
        .map_err(|_| Refusal::UpstreamProtocol)
}

/// The size of `req`'s head as it goes upstream in origin form: request line, header fields,
/// blank line.
fn head_len<B>(req: &Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let fields: usize =
        req.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + ": \r\n".len()).sum();
    req.method().as_str().len() + " ".len() + target + " HTTP/1.1\r\n".len() + fields + "\r\n".len()
}

/// Removes the headers that belong to one hop (RFC 9110 §7.6.1), including those the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A body whose bytes pass the meter (`flow`), which ends in an error when no frame comes for the
/// idle timeout (a trickling peer must not hold a connection slot forever) or the meter cuts it,
/// and which holds the exchange's close record: the close line is written once both bodies are
/// dropped.
struct Counted<B> {
    inner: B,
    flow: Flow,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The response body's: its errors are the upstream's, and the close line says so.
    close: Option<SharedClose>,
    /// The request body's: only held, so that bytes it still carries are counted on the close
    /// line (its errors are the client's, or the meter's cut, which the record finds itself).
    _holds: Option<SharedClose>,
}

impl<B> Counted<B> {
    fn new(inner: B, flow: Flow, idle: Duration) -> Self {
        Self { inner, flow, idle, deadline: Box::pin(tokio::time::sleep(idle)), close: None, _holds: None }
    }

    fn closing(self, close: SharedClose) -> Self {
        Self { close: Some(close), ..self }
    }

    fn holding(self, close: SharedClose) -> Self {
        Self { _holds: Some(close), ..self }
    }

    fn mark_failed(&self, refusal: &Refusal) {
        if let Some(close) = &self.close {
            close.lock().unwrap_or_else(PoisonError::into_inner).mark_failed(refusal);
        }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if self.flow.pass(data.len()).is_break() {
                        return Poll::Ready(Some(Err("body cut".into())));
                    }
                }
                let next = tokio::time::Instant::now() + self.idle;
                self.deadline.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.mark_failed(&Refusal::UpstreamProtocol);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.mark_failed(&Refusal::UpstreamTimeout);
                    Poll::Ready(Some(Err("body idle for longer than idle_timeout".into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
