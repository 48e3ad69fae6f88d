//! The DNS filter on `[listen] dns` (UDP and TCP): the nodes' resolver, which answers only for
//! names the policy could ever let through, so that the DNS question itself cannot carry data to
//! an attacker's name server. Built on hickory: the wire format is hickory-proto's, and allowed
//! questions are asked through the proxy's own resolver (`resolve::Resolver`), whose cache the
//! proxy then uses for the same names.
//!
//! A question is answered when, in order: the client is within its rate, the name and its labels
//! are within their caps, the type is one the filter answers (A, AAAA, CNAME, HTTPS, SVCB, and a
//! rule's `dns_types`), some allow rule could match the name on some port and no deny rule
//! matches it, and every CNAME in the answer stays within allowed names or `[dns]
//! follow_cnames`. Everything else gets REFUSED (or NXDOMAIN, `[dns] refuse_with`) without
//! leaving the machine. Every decision is audited (`event: dns`) and counted. HTTPS and SVCB
//! answers lose their `ech` parameters, since Encrypted Client Hello is refused anyway.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_resolver::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::proto::rr::rdata::svcb::SvcParamKey;
use hickory_resolver::proto::rr::rdata::{HTTPS, SVCB};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::audit::{DnsAlarm, DnsDecided};
use crate::config::{DnsConfig, RefuseWith, TunnelAlarm};
use crate::policy::{fold_mapped, HostName, Policy, RuleId};
use crate::resolve::ResolveError;
use crate::state::State;

/// The filter: its settings (read at start) and what it remembers per client.
pub struct DnsFilter {
    state: Arc<State>,
    refuse_with: RefuseWith,
    follow_cnames: Vec<String>,
    max_name: usize,
    max_label: usize,
    rate: f64,
    alarm: TunnelAlarm,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    seen: Mutex<Watched>,
}

/// What the tunnelling alarm remembers: each (client, suffix) pair's window, at most
/// MAX_TRACKED of them.
#[derive(Default)]
struct Watched {
    pairs: HashMap<(IpAddr, String), Seen>,
    /// When ended windows were last forgotten: at most once a second, so that a full table does
    /// not cost a scan per question.
    pruned: Option<Instant>,
}

/// A client's token bucket.
struct Bucket {
    tokens: f64,
    at: Instant,
    /// When the last `dns_rate_limit` line was written for this client: at most one a second,
    /// so that a flood cannot fill the audit log (and, failing closed, stop every connection).
    logged: Option<Instant>,
}

/// A question let through: its answer, the rule that could allow its name, and, in report mode,
/// the refusal that enforcement would have made.
struct Answered {
    records: Vec<Record>,
    rule: Option<RuleId>,
    would_deny: Option<&'static str>,
}

/// The long names one client asked for under one suffix, in the current alarm window.
struct Seen {
    start: Instant,
    names: HashSet<String>,
    alarmed: bool,
}

/// Why a question was not answered.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Refused {
    Policy(&'static str, Option<RuleId>),
    /// Over the client's rate; `audit` for the first refusal of the second.
    RateLimit {
        audit: bool,
    },
    NameTooLong,
    TypeNotAllowed(Option<RuleId>),
    CnameEscape(Option<RuleId>),
    Upstream(ResponseCode),
}

impl DnsFilter {
    pub fn new(state: Arc<State>, cfg: &DnsConfig) -> Self {
        let follow_cnames = cfg
            .follow_cnames
            .iter()
            .map(|s| s.get_ref().trim_start_matches("*.").trim_end_matches('.').to_ascii_lowercase())
            .collect();
        Self {
            state,
            refuse_with: cfg.refuse_with,
            follow_cnames,
            max_name: cfg.max_name_length,
            max_label: cfg.max_label_length,
            rate: f64::from(cfg.rate_per_client.max(1)),
            alarm: cfg.tunnel_alarm,
            buckets: Mutex::default(),
            seen: Mutex::default(),
        }
    }

    /// The answer to one query packet, or `None` for bytes that are not a DNS query at all (the
    /// listener drops them). A packet with a readable id but no readable question gets FORMERR.
    pub async fn answer(&self, client: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
        // An IPv4 client of a dual-stack socket is known by its IPv4 address.
        let client = SocketAddr::new(fold_mapped(client.ip()), client.port());
        let (id, rd, question) = match screen(packet) {
            Screened::Drop => return None,
            Screened::Reply(bytes) => return Some(bytes),
            Screened::Question { id, rd, question } => (id, rd, question),
        };
        let question = &question;
        let qtype = question.query_type();
        let ascii = question.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
        let decided = self.decide(client, question, &ascii).await;
        // After the rate limit: a question refused as over the client's rate went nowhere, and
        // must not cost the alarm's memory either.
        if !matches!(decided, Err(Refused::RateLimit { .. })) {
            self.watch_for_tunnelling(client, &ascii);
        }
        let policy = self.state.policy.load();
        let (decision, reason, rule) = match &decided {
            Ok(Answered { rule, would_deny: None, .. }) => ("allow", None, *rule),
            Ok(Answered { rule, would_deny: Some(reason), .. }) => ("would_deny", Some(*reason), *rule),
            Err(refused) => ("deny", Some(refused.reason()), refused.rule()),
        };
        // The audit line names a type hickory does not know by its code (RFC 3597's `TYPE1234`);
        // the metric's label stays one of a bounded set (`Unknown`), so that a client choosing
        // codes cannot make a series of each.
        let type_label = <&'static str>::from(qtype);
        let qtype_text = match qtype {
            RecordType::Unknown(code) => format!("TYPE{code}"),
            known => known.to_string(),
        };
        if let Err(Refused::RateLimit { audit: false }) = decided {
            // Counted, not written: one line a second per client is enough to say it happened.
            let labels = [decision, type_label, reason.unwrap_or_default()];
            self.state.metrics.dns_queries.with_label_values(&labels).inc();
        } else {
            self.state.audit.dns_decided(&DnsDecided {
                client,
                name: &ascii,
                qtype: &qtype_text,
                type_label,
                decision,
                reason,
                rule: rule.map(|r| policy.rule_name(r)),
            });
        }
        match decided {
            Ok(Answered { records, .. }) => reply(id, rd, Some(question), ResponseCode::NoError, records),
            Err(Refused::Upstream(code)) => reply(id, rd, Some(question), code, Vec::new()),
            Err(_) => {
                let code = match self.refuse_with {
                    RefuseWith::Refused => ResponseCode::Refused,
                    RefuseWith::Nxdomain => ResponseCode::NXDomain,
                };
                reply(id, rd, Some(question), code, Vec::new())
            }
        }
    }

    async fn decide(&self, client: SocketAddr, question: &Query, ascii: &str) -> Result<Answered, Refused> {
        self.within_rate(client.ip())?;
        if ascii.len() > self.max_name || ascii.split('.').any(|l| l.len() > self.max_label) {
            return Err(Refused::NameTooLong);
        }
        let name = HostName::parse(ascii).map_err(|_| Refused::Policy("invalid_host", None))?;
        let policy = self.state.policy.load_full();
        // In report mode, what the policy would refuse is answered, and said to be `would_deny`.
        let (rule, would_deny) = match policy.name_could_be_allowed(&name, client.ip()) {
            Ok(rule) => (Some(rule), None),
            Err((reason, rule)) if policy.reports(reason, rule) => (rule, Some(reason.as_str())),
            Err((reason, rule)) => return Err(Refused::Policy(reason.as_str(), rule)),
        };
        let qtype = question.query_type();
        if !type_allowed(&policy, rule, qtype) {
            return Err(Refused::TypeNotAllowed(rule));
        }
        let started = std::time::Instant::now();
        let looked_up = self.state.resolver.lookup_records(&name, qtype).await;
        self.state.metrics.dns_upstream.observe(started.elapsed().as_secs_f64());
        let records = match looked_up {
            Ok(records) => records,
            Err(ResolveError::NoSuchName) => return Err(Refused::Upstream(ResponseCode::NXDomain)),
            Err(_) => return Err(Refused::Upstream(ResponseCode::ServFail)),
        };
        self.check_chain(&policy, client.ip(), &records).map_err(|_| Refused::CnameEscape(rule))?;
        Ok(Answered { records: records.into_iter().filter_map(without_ech).collect(), rule, would_deny })
    }

    /// Every CNAME target must be a name the policy could allow, or under `follow_cnames`: a
    /// chain that leaves them could lead anywhere, an attacker's zone included.
    fn check_chain(&self, policy: &Policy, client: IpAddr, records: &[Record]) -> Result<(), ()> {
        for r in records {
            let Some(RData::CNAME(target)) = r.data() else { continue };
            let target = target.0.to_ascii().trim_end_matches('.').to_ascii_lowercase();
            let followed = self.follow_cnames.iter().any(|s| target == *s || target.ends_with(&format!(".{s}")));
            let allowed = HostName::parse(&target).is_ok_and(|n| policy.name_could_be_allowed(&n, client).is_ok());
            if !followed && !allowed {
                return Err(());
            }
        }
        Ok(())
    }

    fn within_rate(&self, client: IpAddr) -> Result<(), Refused> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() > MAX_TRACKED {
            buckets.retain(|_, b| now.duration_since(b.at) < Duration::from_secs(10));
        }
        let b = buckets.entry(client).or_insert(Bucket { tokens: self.rate, at: now, logged: None });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.rate);
        b.at = now;
        if b.tokens < 1.0 {
            let audit = b.logged.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
            if audit {
                b.logged = Some(now);
            }
            return Err(Refused::RateLimit { audit });
        }
        b.tokens -= 1.0;
        Ok(())
    }

    /// Counts the distinct long names a client asks for under one suffix (its last two labels);
    /// past the threshold within the window, raises the alarm once: the signature of data sent
    /// out as DNS questions, asked or refused.
    fn watch_for_tunnelling(&self, client: SocketAddr, name: &str) {
        if name.len() < self.alarm.min_length {
            return;
        }
        let suffix = name.rsplitn(3, '.').take(2).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(".");
        let now = Instant::now();
        let window = self.alarm.window.0;
        let mut watched = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let Watched { pairs, pruned } = &mut *watched;
        let key = (client.ip(), suffix.clone());
        if pairs.len() >= MAX_TRACKED && !pairs.contains_key(&key) {
            if pruned.is_none_or(|at| now.duration_since(at) >= PRUNE_EVERY) {
                pairs.retain(|_, s| now.duration_since(s.start) < window);
                *pruned = Some(now);
            }
            if pairs.len() >= MAX_TRACKED {
                // Full of live windows: a new pair waits until some end. Counted, so that an
                // operator sees the alarm was blind to it.
                self.state.metrics.dns_alarm_untracked.inc();
                return;
            }
        }
        let s = pairs.entry(key).or_insert_with(|| Seen { start: now, names: HashSet::new(), alarmed: false });
        if now.duration_since(s.start) >= window {
            *s = Seen { start: now, names: HashSet::new(), alarmed: false };
        }
        if s.alarmed {
            return;
        }
        s.names.insert(name.to_string());
        if s.names.len() >= self.alarm.unique_names {
            s.alarmed = true;
            s.names = HashSet::new();
            self.state.audit.dns_alarm(&DnsAlarm {
                client,
                suffix: &suffix,
                unique_names: self.alarm.unique_names,
                min_length: self.alarm.min_length,
                window_s: window.as_secs(),
            });
            tracing::warn!(client.addr = %client, suffix, "DNS tunnelling alarm: many unique long names under one suffix");
        }
    }
}

impl Refused {
    fn reason(self) -> &'static str {
        match self {
            Self::Policy(reason, _) => reason,
            Self::RateLimit { .. } => "dns_rate_limit",
            Self::NameTooLong => "dns_name_too_long",
            Self::TypeNotAllowed(_) => "dns_type_not_allowed",
            Self::CnameEscape(_) => "cname_escape",
            Self::Upstream(ResponseCode::NXDomain) => "dns_nxdomain",
            Self::Upstream(_) => "dns_upstream_failed",
        }
    }

    fn rule(self) -> Option<RuleId> {
        match self {
            Self::Policy(_, rule) | Self::TypeNotAllowed(rule) => rule,
            Self::CnameEscape(rule) => rule,
            _ => None,
        }
    }
}

/// What a packet amounts to before any policy: nothing to answer, an answer already (FORMERR,
/// NOTIMP), or one question to decide. Pure, so that the fuzzer can run it on anything.
pub enum Screened {
    Drop,
    Reply(Vec<u8>),
    Question { id: u16, rd: bool, question: Query },
}

pub fn screen(packet: &[u8]) -> Screened {
    let query = match Message::from_vec(packet) {
        Ok(m) if m.message_type() == MessageType::Query => m,
        Ok(_) => return Screened::Drop,
        Err(_) => {
            let (Some(&hi), Some(&lo)) = (packet.first(), packet.get(1)) else { return Screened::Drop };
            return reply(u16::from_be_bytes([hi, lo]), false, None, ResponseCode::FormErr, Vec::new())
                .map_or(Screened::Drop, Screened::Reply);
        }
    };
    let (id, rd) = (query.id(), query.recursion_desired());
    let [question] = query.queries() else {
        return reply(id, rd, None, ResponseCode::FormErr, Vec::new()).map_or(Screened::Drop, Screened::Reply);
    };
    if query.op_code() != OpCode::Query {
        return reply(id, rd, Some(question), ResponseCode::NotImp, Vec::new()).map_or(Screened::Drop, Screened::Reply);
    }
    Screened::Question { id, rd, question: question.clone() }
}

/// A, AAAA, CNAME, HTTPS and SVCB for every allowed name; more where its rule lists them.
fn type_allowed(policy: &Policy, rule: Option<RuleId>, qtype: RecordType) -> bool {
    if matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::CNAME | RecordType::HTTPS | RecordType::SVCB) {
        return true;
    }
    let text = qtype.to_string();
    rule.and_then(|r| policy.rule(r)).is_some_and(|r| r.dns_types.iter().any(|t| **t == *text))
}

/// A record as handed to a client: HTTPS and SVCB without their `ech` parameter.
fn without_ech(mut r: Record) -> Option<Record> {
    let strip = |svcb: &SVCB| {
        let params = svcb.svc_params().iter().filter(|(k, _)| *k != SvcParamKey::EchConfig).cloned().collect();
        SVCB::new(svcb.svc_priority(), svcb.target_name().clone(), params)
    };
    let stripped = match r.data() {
        Some(RData::HTTPS(h)) => Some(RData::HTTPS(HTTPS(strip(&h.0)))),
        Some(RData::SVCB(s)) => Some(RData::SVCB(strip(s))),
        _ => None,
    };
    if let Some(data) = stripped {
        r.set_data(Some(data));
    }
    Some(r)
}

fn reply(id: u16, rd: bool, question: Option<&Query>, code: ResponseCode, answers: Vec<Record>) -> Option<Vec<u8>> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(rd)
        .set_recursion_available(true)
        .set_response_code(code);
    if let Some(q) = question {
        m.add_query(q.clone());
    }
    m.add_answers(answers);
    m.to_vec().ok()
}

/// Binds UDP and TCP on `addr`; with port 0, on one free port for both.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind(addr).await?;
        match TcpListener::bind(udp.local_addr()?).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for both UDP and TCP")))
}

/// Serves DNS over UDP until `shutdown`: each datagram is one query, answered to its sender.
pub async fn serve_udp(socket: UdpSocket, filter: Arc<DnsFilter>, shutdown: CancellationToken, tracker: TaskTracker) {
    let socket = Arc::new(socket);
    let in_flight = Admission::new(IN_FLIGHT, IN_FLIGHT_PER_CLIENT);
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let (n, from) = tokio::select! {
            () = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "DNS receive failed");
                    continue;
                }
            },
        };
        // Beyond this many questions in flight (in all, or from one client), a datagram is
        // dropped, as a busy resolver does.
        let Some(permit) = in_flight.admit(fold_mapped(from.ip())) else { continue };
        let packet = buf.get(..n).unwrap_or_default().to_vec();
        let (socket, filter) = (Arc::clone(&socket), Arc::clone(&filter));
        tracker.spawn(async move {
            if let Some(answer) = filter.answer(from, &packet).await {
                // The answer goes back to the asker, on the socket it asked on.
                #[allow(clippy::disallowed_methods)]
                let _ = socket.send_to(&answer, from).await;
            }
            drop(permit);
        });
    }
}

/// Serves one DNS-over-TCP connection (`server` accepts them, within `TCP_CONNECTIONS`): two-byte
/// length, message, answered in order, with a timeout on each message.
pub async fn serve_tcp_conn(mut stream: TcpStream, from: SocketAddr, filter: &DnsFilter) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let mut packet = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut packet)).await {
            Ok(Ok(_)) => {}
            // A length promised and not delivered (truncated framing): the connection is closed.
            _ => return Ok(()),
        }
        let Some(answer) = filter.answer(from, &packet).await else { return Ok(()) };
        let Ok(n) = u16::try_from(answer.len()) else { return Ok(()) };
        stream.write_all(&n.to_be_bytes()).await?;
        stream.write_all(&answer).await?;
    }
}

/// Clients and (client, suffix) pairs remembered before old ones are forgotten.
const MAX_TRACKED: usize = 10_000;
/// How often, at most, a full table of (client, suffix) pairs is pruned of ended windows.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// UDP questions answered at once.
const IN_FLIGHT: usize = 256;
/// UDP questions answered at once for one client address: a quarter, as for TCP.
const IN_FLIGHT_PER_CLIENT: usize = IN_FLIGHT / 4;
/// The largest datagram read (EDNS0 allows up to 4096; more is not DNS we answer).
const MAX_UDP: usize = 4096;
/// TCP connections served at once.
pub const TCP_CONNECTIONS: usize = 64;
/// TCP connections served at once for one client address: a quarter, so that one client cannot
/// shut the others out.
pub const TCP_CONNECTIONS_PER_CLIENT: usize = TCP_CONNECTIONS / 4;
/// A TCP connection with no whole message for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use hickory_resolver::proto::rr::rdata::svcb::{Alpn, EchConfig, SvcParamValue};
    use hickory_resolver::proto::rr::Name;

    use super::*;

    /// A filter on a policy of no rules, with `dns` as its `[dns]` section; the directory holds
    /// its audit log.
    fn filter_with(dns: &str) -> (DnsFilter, Arc<State>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, audit) = (dir.path().join("p.toml"), dir.path().join("audit.jsonl"));
        std::fs::write(&cfg, format!("[audit]\npath = {:?}\n[dns]\n{dns}\n", audit.display().to_string())).unwrap();
        let mut loaded = crate::load::load(Some(&cfg), &[]).unwrap();
        let dns_config = std::mem::take(&mut loaded.config.dns);
        let state = Arc::new(State::build(loaded).unwrap());
        (DnsFilter::new(Arc::clone(&state), &dns_config), state, dir)
    }

    /// Asks `n` long names, each under a suffix of its own, from one client.
    async fn ask_long_names(filter: &DnsFilter, n: usize) {
        let client: SocketAddr = "10.1.2.3:5353".parse().unwrap();
        for i in 0..n {
            let name = Name::from_ascii(format!("{}.s{i}.x{i}.", "d".repeat(60))).unwrap();
            let mut m = Message::new();
            m.set_id(1).set_message_type(MessageType::Query);
            m.add_query(Query::query(name, RecordType::A));
            filter.answer(client, &m.to_vec().unwrap()).await;
        }
    }

    /// The tunnelling alarm's table stays within MAX_TRACKED pairs, and a full one costs no scan
    /// per question: one client asking long names under ever new suffixes, far over its rate,
    /// once grew it without bound, each question scanning all of it under the lock (found in
    /// review). Those past a full table are counted.
    #[tokio::test]
    async fn the_alarm_table_stays_within_its_cap() {
        let (filter, state, _dir) = filter_with("rate_per_client = 100000");
        ask_long_names(&filter, MAX_TRACKED + 2_000).await;
        let tracked = filter.seen.lock().unwrap().pairs.len();
        assert_eq!(tracked, MAX_TRACKED, "every window is live: the table is full, and no bigger");
        assert_eq!(state.metrics.dns_alarm_untracked.get(), 2_000);
    }

    /// A type hickory does not name is audited by its code (`TYPE4660`), and counted under one
    /// bounded label, `Unknown`, however many codes a client tries.
    #[tokio::test]
    async fn an_unknown_type_is_audited_by_its_code_and_counted_under_one_label() {
        let (filter, state, dir) = filter_with("rate_per_client = 100000");
        let client: SocketAddr = "10.1.2.3:5353".parse().unwrap();
        for code in 4660..4760u16 {
            let mut m = Message::new();
            m.set_id(1).set_message_type(MessageType::Query);
            m.add_query(Query::query(Name::from_ascii("x.example.").unwrap(), RecordType::Unknown(code)));
            filter.answer(client, &m.to_vec().unwrap()).await;
        }
        assert!(state.audit.flush(Duration::from_secs(5)));
        let log = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert!(log.contains(r#""type":"TYPE4660""#) && log.contains(r#""type":"TYPE4759""#), "{log}");
        let series =
            state.metrics.render().lines().filter(|l| l.starts_with("egress_proxy_dns_queries_total{")).count();
        assert_eq!(series, 1, "{}", state.metrics.render());
    }

    /// Questions refused as over the client's rate go nowhere, and cost the alarm nothing.
    #[tokio::test]
    async fn questions_over_the_rate_are_not_watched() {
        let (filter, _state, _dir) = filter_with("rate_per_client = 10");
        ask_long_names(&filter, 1_000).await;
        let tracked = filter.seen.lock().unwrap().pairs.len();
        assert!(tracked <= 20, "{tracked} pairs watched for about 10 questions within the rate");
    }

    #[test]
    fn https_answers_lose_their_ech_parameter_and_keep_the_rest() {
        let params = vec![
            (SvcParamKey::Alpn, SvcParamValue::Alpn(Alpn(vec!["h2".into()]))),
            (SvcParamKey::EchConfig, SvcParamValue::EchConfig(EchConfig(vec![0xfe, 0x0d, 0, 1]))),
        ];
        let name = Name::from_ascii("ml.azure.com.").unwrap();
        let record = Record::from_rdata(name.clone(), 60, RData::HTTPS(HTTPS(SVCB::new(1, Name::root(), params))));
        let stripped = without_ech(record).unwrap();
        let Some(RData::HTTPS(https)) = stripped.data() else { panic!("still HTTPS: {stripped:?}") };
        let keys: Vec<SvcParamKey> = https.0.svc_params().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, [SvcParamKey::Alpn], "ech is gone, alpn stays");
        assert_eq!((stripped.name(), stripped.ttl()), (&name, 60));
    }

    #[test]
    fn screen_answers_formerr_to_an_unreadable_question_with_its_id_and_drops_what_has_none() {
        assert!(matches!(screen(b"\x01"), Screened::Drop));
        let Screened::Reply(bytes) = screen(b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c") else {
            panic!("a reply")
        };
        let m = Message::from_vec(&bytes).unwrap();
        assert_eq!((m.id(), m.response_code()), (0xabcd, ResponseCode::FormErr));
    }
}
