//! The record of one connection (or, on the explicit listener, one request): it writes every
//! audit line and moves every metric of that connection, so that no listener writes its own.
//!
//! A `Conn` ends in exactly one decision line: `refused` (deny or fail) or `allowed`, which
//! returns the `CloseRecord` whose drop writes the close line. Both take the record. One that is
//! dropped undecided (hyper drops a request whose client left mid-way, a task is cancelled)
//! writes `fail` with `client_gone` as it goes, so that no connection passes without a line.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use http::Method;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::{Closed, Decided, LimitCrossed, Listener, ShadowDiffers, Verdict};
use crate::budgets::Crossed;
use crate::descriptors::At;
use crate::load::Shadow;
use crate::policy::{Decision, DenyReason, Destination, Host, HostName, Policy, Query, RuleId};
use crate::state::State;

use super::authorize::{
    authorize, authorize_redirected, authorize_redirected_reported, authorize_reported, Permit, Redirected,
};
use super::dial::{dial, DialError, Dialled, Upstream};
use super::refusal::Refusal;
use super::tunnel::meter::{Meter, OnCrossed, UpLimits};

/// What every request on one accepted client connection shares.
pub struct ConnCx {
    pub state: Arc<State>,
    pub client: SocketAddr,
    /// Tracks tunnels and upstream connections, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the shutdown grace period is over.
    pub stop: CancellationToken,
    /// Held by every task that serves this connection: the connection's slot in the limits.
    pub guard: Arc<dyn Send + Sync>,
    /// Requests served on this connection so far.
    pub requests: AtomicU64,
}

/// One connection to decide, with the policy snapshot it is decided under.
pub struct Conn {
    pub id: u64,
    pub client: SocketAddr,
    pub listener: Listener,
    /// Where a redirected connection was going (transparent listeners).
    pub original_dst: Option<SocketAddr>,
    /// The request method, on the explicit listener.
    method: Option<Method>,
    /// The destination as the client named it, as far as it is known yet.
    host: Option<String>,
    port: Option<u16>,
    /// The server name a ClientHello presented, where it is not `host` (`presented`).
    sni: Option<String>,
    /// The decision line is written.
    decided: bool,
    state: Arc<State>,
    policy: Arc<Policy>,
    /// The `[shadow]` candidate in force with `policy`, if any.
    shadow: Option<Arc<Shadow>>,
}

/// Writes the close line of an allowed connection when dropped: at the end of a tunnel, or when
/// a forwarded response body is done or abandoned. Its meter counts the bytes.
pub struct CloseRecord {
    conn: Conn,
    /// Why the exchange failed after it was allowed (a forwarded request's upstream broke).
    failed: Option<&'static str>,
    addr: SocketAddr,
    rule: RuleId,
    meter: Arc<Meter>,
    /// The cut at `max_upload_bytes` is reported (its `limit` line is written once).
    limit_reported: bool,
}

// === impl ConnCx ===

impl ConnCx {
    pub fn new(
        state: Arc<State>,
        client: SocketAddr,
        tracker: TaskTracker,
        stop: CancellationToken,
        guard: Arc<dyn Send + Sync>,
    ) -> Self {
        Self { state, client, tracker, stop, guard, requests: AtomicU64::new(0) }
    }
}

// === impl Conn ===

impl Conn {
    /// A new record with a fresh id, decided under the policy in force now.
    pub fn new(state: &Arc<State>, client: SocketAddr, listener: Listener, original_dst: Option<SocketAddr>) -> Self {
        Self {
            id: state.next_id(),
            client,
            listener,
            original_dst,
            method: None,
            host: None,
            port: None,
            sni: None,
            decided: false,
            shadow: state.shadow.load_full(),
            policy: state.policy.load_full(),
            state: Arc::clone(state),
        }
    }

    /// A record for a redirected connection: what it asked for is its original destination until
    /// a name it carries says more.
    pub fn redirected(state: &Arc<State>, client: SocketAddr, listener: Listener, original_dst: SocketAddr) -> Self {
        let mut conn = Self::new(state, client, listener, Some(original_dst));
        conn.asked(original_dst.ip().to_string(), Some(original_dst.port()));
        conn
    }

    /// Records the server name a ClientHello presented, for the lines to come, where it is not
    /// the host decided: a tunnel refused as `sni_mismatch` says where it was meant to go.
    pub fn presented(&mut self, sni: &HostName) {
        if self.host.as_deref() != Some(sni.as_str()) {
            self.sni = Some(sni.to_string());
        }
    }

    pub fn with_method(mut self, method: Method) -> Self {
        self.method = Some(method);
        self
    }

    /// Records what the client asked for, for the lines to come: the raw request target before it
    /// parses, then the destination; for a redirected connection, the name it carries.
    pub fn asked(&mut self, host: String, port: Option<u16>) {
        self.host = Some(host);
        self.port = port;
    }

    /// Decides a destination the client named (explicit listener). A refusal the policy only
    /// reports (report mode) becomes a permit that says so.
    pub async fn authorize(&self, dest: &Destination) -> Result<Permit, Refusal> {
        self.audit_available()?;
        let policy = &self.policy;
        let permit = match authorize(policy, &self.state.resolver, dest, self.client.ip()).await {
            Err(Refusal::Policy { reason, rule }) if policy.reports(reason, rule) => {
                authorize_reported(policy, &self.state.resolver, dest, reason, rule).await?
            }
            decided => decided?,
        };
        self.within_budget(permit)
    }

    /// Decides a redirected connection on the name it carries and its original destination.
    pub async fn authorize_redirected(&self, name: Option<&HostName>) -> Result<Permit, Refusal> {
        self.audit_available()?;
        let original_dst = self.original_dst.ok_or(Refusal::NoOriginalDst)?;
        let r = Redirected { name, original_dst, client: self.client.ip() };
        let policy = &self.policy;
        let permit = match authorize_redirected(policy, &self.state.resolver, &r, self.state.mismatch).await {
            Err(Refusal::Policy { reason, rule }) if policy.reports(reason, rule) => {
                authorize_redirected_reported(policy, &r, reason, rule)?
            }
            decided => decided?,
        };
        self.within_budget(permit)
    }

    /// A client that has sent its `upload_budget` through a rule in this window gets no new
    /// connection under that rule (`upload_budget`) until the window frees (in report mode: it
    /// does, as `would_deny`).
    fn within_budget(&self, mut permit: Permit) -> Result<Permit, Refusal> {
        let over = permit.addrs().find(|(_, grant)| {
            let rule = self.policy.rule_name(grant.rule);
            grant.tunnel.upload_budget.is_some_and(|b| self.state.budgets.exhausted(rule, self.client.ip(), b))
        });
        if let Some((_, grant)) = over {
            let (reason, rule) = (DenyReason::UploadBudget, Some(grant.rule));
            if !self.policy.reports(reason, rule) {
                return Err(Refusal::Policy { reason, rule });
            }
            permit.report(reason, rule);
        }
        Ok(permit)
    }

    /// Decides a server name met inside a tunnel that was allowed by address (`names = "listed"`):
    /// a host rule must allow it too.
    pub fn decide_name(&self, name: &HostName, port: u16) -> Result<(), Refusal> {
        let q = Query { name: Some(name), addr: None, port, source: Some(self.client.ip()) };
        match self.policy.decide(&q) {
            Decision::Allow { .. } => Ok(()),
            Decision::Deny { reason, rule } => Err(Refusal::Policy { reason, rule }),
        }
    }

    /// Nothing is let out that the log cannot record: while the audit log is stalled and
    /// `[audit] on_stall = "refuse"`, every connection is refused.
    fn audit_available(&self) -> Result<(), Refusal> {
        if self.state.audit.refuses_new() {
            return Err(Refusal::AuditUnavailable);
        }
        Ok(())
    }

    /// Dials a permit within the connect timeout, and times the connect. A lack of descriptors is
    /// noted as the proxy's shortage and refused as `local_resources`.
    pub async fn dial(&self, permit: &Permit) -> Result<Upstream, Refusal> {
        let started = std::time::Instant::now();
        let upstream = dial(permit, self.state.limits.connect_timeout).await.map_err(|e| match e {
            DialError::Upstream(refusal) => refusal,
            DialError::Shortage(e) => {
                self.state.shortage.note(At::Dial, &e);
                self.state.pipes.close_free();
                Refusal::LocalResources
            }
        })?;
        let seconds = started.elapsed().as_secs_f64();
        self.state.metrics.connect_duration.with_label_values(&[self.listener.as_str()]).observe(seconds);
        Ok(upstream)
    }

    /// Writes the decision line of a refusal (`deny`, or `fail` when the upstream failed) before
    /// the client hears of it.
    pub fn refused(mut self, refusal: &Refusal) {
        self.decided(Outcome::Refused(refusal));
        let host = self.host.as_deref().unwrap_or("-");
        // The audit line is the record of a refusal; this is a diagnostic, off at the default
        // level (formatting it to stderr cost about a tenth of the CPU of each refusal).
        tracing::debug!(id = self.id, client.addr = %self.client, dst.host = host, reason = refusal.reason(), "Refused");
    }

    /// Writes the `allow` line and returns the close record that will pair with it. `meter` counts
    /// the connection's bytes (it may already have counted a request body).
    pub fn allowed(mut self, to: Dialled, meter: Arc<Meter>) -> CloseRecord {
        self.decided(Outcome::Allowed(to));
        self.limit_uploads(&to, &meter);
        CloseRecord { conn: self, failed: None, addr: to.addr, rule: to.grant.rule, meter, limit_reported: false }
    }

    /// Puts the rule's upload limits on the meter: `max_upload_bytes` cuts the connection, and
    /// every byte up counts against the client's `upload_budget` window, whose crossing is
    /// audited and counted at the moment it happens.
    fn limit_uploads(&self, to: &Dialled, meter: &Meter) {
        let opts = to.grant.tunnel;
        if opts.max_upload.is_none() && opts.upload_budget.is_none() {
            return;
        }
        let rule = self.policy.rule_name(to.grant.rule);
        let budget = opts.upload_budget.map(|budget| {
            let window = self.state.budgets.window(rule, self.client.ip(), budget);
            let (state, rule) = (Arc::clone(&self.state), rule.to_string());
            let (id, client, listener, host) = (self.id, self.client, self.listener, self.host.clone());
            let report = move |crossed: Crossed| {
                state.audit.limit_crossed(&LimitCrossed {
                    id,
                    client,
                    listener,
                    host: host.as_deref(),
                    rule: &rule,
                    reason: DenyReason::UploadBudget.as_str(),
                    bytes_up: crossed.used,
                    limit: crossed.budget.bytes,
                    per_s: Some(crossed.budget.per.as_secs()),
                });
            };
            (window, Box::new(report) as OnCrossed)
        });
        meter.limit_up(UpLimits { max: opts.max_upload, budget });
    }

    /// The one writer of this connection's decision line.
    fn decided(&mut self, outcome: Outcome<'_>) {
        if std::mem::replace(&mut self.decided, true) {
            return;
        }
        let enforced = match outcome {
            Outcome::Allowed(u) => Some((u.reported.is_none(), Some(u.addr))),
            // Only the policy's own refusals are compared: the candidate says nothing about a
            // malformed request or an upstream that failed.
            Outcome::Refused(Refusal::Policy { .. }) => Some((false, None)),
            Outcome::Refused(_) => None,
        };
        let (decision, dst_addr, rule, reason, note) = match outcome {
            Outcome::Allowed(u) => {
                let note = u.mismatch.then_some("original_dst_mismatch");
                match u.reported {
                    // Report mode: let through, and said to be what enforcement would refuse.
                    Some((reason, rule)) => (Verdict::WouldDeny, Some(u.addr), rule, Some(reason.as_str()), note),
                    None => (Verdict::Allow, Some(u.addr), Some(u.grant.rule), None, note),
                }
            }
            Outcome::Refused(r) => (r.verdict(), None, r.rule(), Some(r.reason()), None),
        };
        self.state.audit.decided(&Decided {
            id: self.id,
            client: self.client,
            listener: self.listener,
            // A method is a token the client chooses, as long as its request head: cut, as the
            // host is, so that an audit line (and the queue of them) stays small.
            method: self.method.as_ref().map(|m| m.as_str().get(..MAX_AUDIT_METHOD).unwrap_or(m.as_str())),
            host: self.host.as_deref(),
            port: self.port,
            dst_addr,
            decision,
            rule: rule.map(|r| self.policy.rule_name(r)),
            reason,
            original_dst: self.original_dst,
            note,
            sni: self.sni.as_deref(),
        });
        if let Some((allowed, dialled)) = enforced {
            self.compare_shadow(allowed, dialled);
        }
    }

    /// Decides the connection again with the `[shadow]` candidate, as enforcement decided it (by
    /// name, and by the address dialled once there is one), and audits a difference.
    fn compare_shadow(&self, allowed: bool, dialled: Option<SocketAddr>) {
        let Some(shadow) = &self.shadow else { return };
        let host = self.host.as_deref().and_then(|h| Host::parse(h).ok());
        let addr = match &host {
            Some(Host::Ip(ip)) => Some(*ip),
            _ => dialled.or(self.original_dst).map(|a| a.ip()),
        };
        let Some(port) = self.port.or(self.original_dst.map(|a| a.port())) else { return };
        let name = host.as_ref().and_then(Host::name);
        if name.is_none() && addr.is_none() {
            return;
        }
        let q = Query { name, addr, port, source: Some(self.client.ip()) };
        let (difference, rule, reason) = match (allowed, shadow.policy.decide(&q)) {
            (true, Decision::Deny { reason, rule }) => ("shadow_would_deny", rule, Some(reason.as_str())),
            (false, Decision::Allow { rule }) => ("shadow_would_allow", Some(rule), None),
            _ => return,
        };
        self.state.audit.shadow_differs(&ShadowDiffers {
            id: self.id,
            client: self.client,
            listener: self.listener,
            host: self.host.as_deref(),
            port: Some(port),
            shadow: difference,
            rule: rule.map(|r| shadow.policy.rule_name(r)),
            reason,
        });
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.decided {
            tracing::debug!(id = self.id, "Connection dropped before it was decided");
            self.decided(Outcome::Refused(&Refusal::ClientGone));
        }
    }
}

/// How a connection was decided.
enum Outcome<'a> {
    Allowed(Dialled),
    Refused(&'a Refusal),
}

// === impl CloseRecord ===

impl CloseRecord {
    pub fn meter(&self) -> &Arc<Meter> {
        &self.meter
    }

    pub fn id(&self) -> u64 {
        self.conn.id
    }

    /// As `Conn::presented`, for the close line.
    pub fn presented(&mut self, sni: &HostName) {
        self.conn.presented(sni);
    }

    /// Writes the close line now, with why the allowed exchange failed.
    pub fn failed(mut self, refusal: &Refusal) {
        self.mark_failed(refusal);
    }

    /// Records why the allowed exchange failed, for the close line to come (a response body the
    /// upstream cut, or let go idle).
    pub fn mark_failed(&mut self, refusal: &Refusal) {
        self.failed.get_or_insert(refusal.reason());
    }

    /// If the meter cut the connection at `max_upload_bytes`: the close line says
    /// `upload_limit`, and a `limit` line and the metric record the moment. True when it did.
    pub fn check_upload_limit(&mut self) -> bool {
        if !self.meter.over_limit() {
            return false;
        }
        if std::mem::replace(&mut self.limit_reported, true) {
            return true;
        }
        let c = &self.conn;
        let rule = c.policy.rule_name(self.rule);
        let limit = c.policy.rule(self.rule).and_then(|r| r.max_upload).unwrap_or_default();
        c.state.audit.limit_crossed(&LimitCrossed {
            id: c.id,
            client: c.client,
            listener: c.listener,
            host: c.host.as_deref(),
            rule,
            reason: DenyReason::UploadLimit.as_str(),
            bytes_up: self.meter.bytes().0,
            limit,
            per_s: None,
        });
        self.mark_failed(&Refusal::Policy { reason: DenyReason::UploadLimit, rule: Some(self.rule) });
        true
    }
}

impl Drop for CloseRecord {
    fn drop(&mut self) {
        // A cut no one looked at yet (a forwarded body cut after its response) is said now.
        self.check_upload_limit();
        let (up, down) = self.meter.bytes();
        let c = &self.conn;
        c.state.audit.closed(&Closed {
            id: c.id,
            client: c.client,
            listener: c.listener,
            host: c.host.as_deref(),
            port: c.port,
            dst_addr: Some(self.addr),
            rule: Some(c.policy.rule_name(self.rule)),
            reason: self.failed,
            sni: c.sni.as_deref(),
            bytes_up: up,
            bytes_down: down,
            duration_ms: u64::try_from(self.meter.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }
}

/// The most of a request method an audit line shows: the longest registered method
/// (`UPDATEREDIRECTREF`) is 17 characters.
const MAX_AUDIT_METHOD: usize = 32;
