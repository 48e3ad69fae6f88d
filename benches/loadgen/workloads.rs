//! The tests. Each makes one JSON record; every loop stops at a count and at a deadline, whichever
//! comes first, and every network step has a timeout.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::task::{JoinError, JoinSet};

use crate::client::{err, short, Conn, Route, STEP_TIMEOUT};
use crate::procfs::{rss_kib, CpuMeter};

/// What one invocation measures, and against what.
pub struct Load {
    pub route: Route,
    pub target: String,
    pub run: u32,
    pub path: String,
    pub conns: usize,
    pub count: u64,
    pub window: Duration,
    pub pid: Option<u32>,
    pub hold: Duration,
}

impl Load {
    fn record(&self, test: &str) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("target".into(), json!(self.target));
        m.insert("mode".into(), json!(self.route.mode.name()));
        m.insert("test".into(), json!(test));
        m.insert("run".into(), json!(self.run));
        m.insert("conns".into(), json!(self.conns));
        m
    }

    /// A new tunnel, one GET through it, closed: what `rate` repeats.
    async fn one_tunnel(&self) -> io::Result<()> {
        let mut conn = self.route.open().await?;
        conn.get_timed(&self.path, None).await.map(drop)
    }

    /// Opens `conns` tunnels at once; those that failed are counted in the errors.
    async fn open_all(self: &Arc<Self>, errors: &mut Errors) -> Vec<Conn> {
        let mut set = JoinSet::new();
        for _ in 0..self.conns {
            let load = self.clone();
            set.spawn(async move { load.route.open().await });
        }
        gather(set, errors).await
    }
}

/// Error texts and how often each came.
#[derive(Default)]
struct Errors(BTreeMap<String, u64>);

impl Errors {
    fn add(&mut self, e: &io::Error) {
        *self.0.entry(short(e)).or_default() += 1;
    }
    fn merge(&mut self, other: Errors) {
        for (k, v) in other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }
    fn total(&self) -> u64 {
        self.0.values().sum()
    }
    fn put(self, m: &mut Map<String, Value>) {
        m.insert("err".into(), json!(self.total()));
        m.insert("errors".into(), json!(self.0));
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn put_micros(m: &mut Map<String, Value>, prefix: &str, nanos: &mut [u64]) {
    nanos.sort_unstable();
    for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
        m.insert(format!("{prefix}{name}_us"), json!(percentile(nanos, q).map(|n| n as f64 / 1e3)));
    }
}

fn put_cpu(m: &mut Map<String, Value>, cpu: &CpuMeter) {
    if let Some(s) = cpu.used() {
        m.insert("cpu_s".into(), json!(s));
    }
}

/// `rate`: new tunnels per second, each a TCP connection, CONNECT (or SNI), a full TLS handshake
/// and one small GET. `deny`: refusals per second for the denied name.
pub async fn rate(load: Arc<Load>, deny: bool) -> Value {
    let issued = Arc::new(AtomicU64::new(0));
    let cpu = CpuMeter::start(load.pid);
    let started = Instant::now();
    let deadline = started + load.window;
    let mut set = JoinSet::new();
    for _ in 0..load.conns {
        let (load, issued) = (load.clone(), issued.clone());
        set.spawn(async move {
            let mut times = Vec::new();
            let mut errors = Errors::default();
            let mut endings: BTreeMap<String, u64> = BTreeMap::new();
            while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < load.count {
                let t0 = Instant::now();
                let outcome = if deny {
                    load.route.refused().await.map(|r| Some(r.key()))
                } else {
                    load.one_tunnel().await.map(|()| None)
                };
                match outcome {
                    Ok(ending) => {
                        times.push(t0.elapsed().as_nanos() as u64);
                        if let Some(k) = ending {
                            *endings.entry(k).or_default() += 1;
                        }
                    }
                    Err(e) => {
                        errors.add(&e);
                        // Do not spin on a proxy that is down.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            (times, errors, endings)
        });
    }
    let mut times = Vec::new();
    let mut errors = Errors::default();
    let mut endings: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok((t, e, k)) => {
                times.extend(t);
                errors.merge(e);
                for (key, n) in k {
                    *endings.entry(key).or_default() += n;
                }
            }
            Err(e) => errors.add(&err(e.to_string())),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let test = if deny { "deny" } else { "rate" };
    let mut m = load.record(test);
    put_cpu(&mut m, &cpu);
    m.insert("ok".into(), json!(times.len()));
    m.insert("secs".into(), json!(secs));
    m.insert("per_sec".into(), json!(times.len() as f64 / secs));
    put_micros(&mut m, "", &mut times);
    if deny {
        m.insert("endings".into(), json!(endings));
    }
    errors.put(&mut m);
    Value::Object(m)
}

/// Joins the tasks of `set` that end before `deadline`; the others go on.
async fn join_until<T: 'static>(set: &mut JoinSet<T>, deadline: Instant) -> Vec<Result<T, JoinError>> {
    let mut done = Vec::new();
    let _ = tokio::time::timeout_at(deadline.into(), async {
        while let Some(r) = set.join_next().await {
            done.push(r);
        }
    })
    .await;
    done
}

/// `bulk`: MB/s (10^6 bytes) of the large file, GET after GET, over `conns` kept-alive tunnels.
pub async fn bulk(load: Arc<Load>) -> Value {
    let mut errors = Errors::default();
    let conns = load.open_all(&mut errors).await;
    let opened = conns.len();
    let bytes = Arc::new(AtomicU64::new(0));
    let gets = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cpu = CpuMeter::start(load.pid);
    let started = Instant::now();
    let mut set = JoinSet::new();
    for mut conn in conns {
        let (load, bytes, gets, stop) = (load.clone(), bytes.clone(), gets.clone(), stop.clone());
        set.spawn(async move {
            while !stop.load(Ordering::Relaxed) && gets.fetch_add(1, Ordering::Relaxed) < load.count {
                // A large body takes longer than one step: bounded by the window (the task is
                // aborted at its end) and by this.
                let get = conn.get(&load.path, Some(&bytes));
                match tokio::time::timeout(STEP_TIMEOUT * 12, get).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(err("GET: timed out")),
                }
            }
            Ok(())
        });
    }
    let mut ended = join_until(&mut set, started + load.window).await;
    let moved = bytes.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let mut m = load.record("bulk");
    put_cpu(&mut m, &cpu);
    stop.store(true, Ordering::Relaxed);
    set.abort_all();
    while let Some(r) = set.join_next().await {
        ended.push(r);
    }
    for r in ended {
        if let Ok(Err(e)) = r {
            errors.add(&e);
        }
    }
    m.insert("opened".into(), json!(opened));
    m.insert("bytes".into(), json!(moved));
    m.insert("secs".into(), json!(secs));
    m.insert("mb_per_sec".into(), json!(moved as f64 / secs / 1e6));
    errors.put(&mut m);
    Value::Object(m)
}

/// `karps`: small GETs per second, back to back, on `conns` kept-alive tunnels.
pub async fn karps(load: Arc<Load>) -> Value {
    let mut errors = Errors::default();
    let conns = load.open_all(&mut errors).await;
    let opened = conns.len();
    let issued = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cpu = CpuMeter::start(load.pid);
    let started = Instant::now();
    let mut set = JoinSet::new();
    for mut conn in conns {
        let (load, issued, stop) = (load.clone(), issued.clone(), stop.clone());
        set.spawn(async move {
            let mut times = Vec::new();
            while !stop.load(Ordering::Relaxed) && issued.fetch_add(1, Ordering::Relaxed) < load.count {
                let t0 = Instant::now();
                if let Err(e) = conn.get_timed(&load.path, None).await {
                    return (times, Some(e));
                }
                times.push(t0.elapsed().as_nanos() as u64);
            }
            (times, None)
        });
    }
    let mut ended = join_until(&mut set, started + load.window).await;
    stop.store(true, Ordering::Relaxed);
    // The requests in flight finish (each within a step's timeout) and are counted.
    while let Some(r) = set.join_next().await {
        ended.push(r);
    }
    let mut times = Vec::new();
    for r in ended {
        match r {
            Ok((t, e)) => {
                times.extend(t);
                if let Some(e) = e {
                    errors.add(&e);
                }
            }
            Err(e) => errors.add(&err(e.to_string())),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let mut m = load.record("karps");
    put_cpu(&mut m, &cpu);
    m.insert("opened".into(), json!(opened));
    m.insert("ok".into(), json!(times.len()));
    m.insert("secs".into(), json!(secs));
    m.insert("per_sec".into(), json!(times.len() as f64 / secs));
    put_micros(&mut m, "", &mut times);
    errors.put(&mut m);
    Value::Object(m)
}

/// `latency`, unloaded and one thing at a time: the setup time of a new tunnel (with its first
/// GET), then the time of each GET on one kept-alive tunnel.
pub async fn latency(load: Arc<Load>) -> Value {
    let mut errors = Errors::default();
    let mut m = load.record("latency");
    let setup_deadline = Instant::now() + (load.window / 3).max(Duration::from_millis(500));
    let mut setups = Vec::new();
    while setups.len() < 200 && Instant::now() < setup_deadline {
        let t0 = Instant::now();
        match load.one_tunnel().await {
            Ok(()) => setups.push(t0.elapsed().as_nanos() as u64),
            Err(e) => errors.add(&e),
        }
    }
    m.insert("setups".into(), json!(setups.len()));
    put_micros(&mut m, "setup_", &mut setups);
    let mut times = Vec::new();
    let per_request: io::Result<()> = async {
        let mut conn = load.route.open().await?;
        for _ in 0..50 {
            conn.get_timed(&load.path, None).await?;
        }
        let deadline = Instant::now() + load.window;
        while (times.len() as u64) < load.count && Instant::now() < deadline {
            let t0 = Instant::now();
            conn.get_timed(&load.path, None).await?;
            times.push(t0.elapsed().as_nanos() as u64);
        }
        Ok(())
    }
    .await;
    if let Err(e) = per_request {
        errors.add(&e);
    }
    m.insert("ok".into(), json!(times.len()));
    if !times.is_empty() {
        m.insert("mean_us".into(), json!(times.iter().sum::<u64>() as f64 / times.len() as f64 / 1e3));
    }
    put_micros(&mut m, "", &mut times);
    errors.put(&mut m);
    Value::Object(m)
}

/// The tunnels the tasks of `set` opened; those that failed are counted in the errors.
async fn gather(mut set: JoinSet<io::Result<Conn>>, errors: &mut Errors) -> Vec<Conn> {
    let mut conns = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(c)) => conns.push(c),
            Ok(Err(e)) => errors.add(&e),
            Err(e) => errors.add(&err(e.to_string())),
        }
    }
    conns
}

/// `idle`: the proxy's resident memory before and while `conns` tunnels (each used for one GET)
/// stay open and idle.
pub async fn idle(load: Arc<Load>) -> Value {
    let mut m = load.record("idle");
    let mut errors = Errors::default();
    let Some(pid) = load.pid else {
        errors.add(&err("idle needs --pid"));
        errors.put(&mut m);
        return Value::Object(m);
    };
    let before = rss_kib(pid);
    let deadline = Instant::now() + load.window;
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut set = JoinSet::new();
    for _ in 0..load.conns {
        let (load, gate) = (load.clone(), gate.clone());
        set.spawn(async move {
            let _permit = gate.acquire().await.map_err(|e| err(e.to_string()))?;
            if Instant::now() >= deadline {
                return Err(err("not opened before the deadline"));
            }
            let mut conn = load.route.open().await?;
            conn.get_timed(&load.path, None).await?;
            Ok(conn)
        });
    }
    let open = gather(set, &mut errors).await;
    // Let the proxy settle (buffers given back, tasks parked) before reading its memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = rss_kib(pid);
    tokio::time::sleep(load.hold).await;
    let opened = open.len();
    drop(open);
    m.insert("requested".into(), json!(load.conns));
    m.insert("opened".into(), json!(opened));
    m.insert("rss_before_kib".into(), json!(before));
    m.insert("rss_idle_kib".into(), json!(during));
    if opened > 0 {
        m.insert("kib_per_tunnel".into(), json!((during as f64 - before as f64) / opened as f64));
    }
    errors.put(&mut m);
    Value::Object(m)
}
