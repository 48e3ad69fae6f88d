//! The fuzz corpus, replayed, and a bounded stable-Rust fuzzer over the same invariant checks.
//!
//! `fuzz/corpus/<target>/` holds the seeds of each cargo-fuzz target; every `cargo test` runs each
//! seed through its target's checks in `egress_proxy::fuzz_logic`, the functions the cargo-fuzz
//! targets call.
//!
//! cargo-fuzz needs a nightly toolchain, which CI does not have. The `*_survives_mutation` tests are
//! the stable stand-in: they mutate the corpus with a seeded PRNG (bit flips, byte and length-field
//! arithmetic, inserts, deletes, splices, per-target dictionary tokens) and keep an input whenever
//! its outcome label is new. With no environment they run a fixed few hundred inputs per target;
//! `.ci/run` and longer runs bound them in time:
//!
//! ```text
//! FUZZ_SECONDS=300 cargo test --test fuzz_corpus survives_mutation -- --nocapture
//! ```
//!
//! `FUZZ_MAX_EXECS` caps the number of inputs and `FUZZ_SEED` picks the sequence. An input that
//! breaks an invariant is written to `target/tmp/fuzz-stable/`; copy it into the target's corpus
//! directory to keep it as a regression case.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use egress_proxy::fuzz_logic;

// === the corpus, replayed ===

#[test]
fn client_hello_corpus_holds_every_invariant() {
    replay("client_hello");
}

#[test]
fn host_corpus_holds_every_invariant() {
    replay("host");
}

#[test]
fn head_corpus_holds_every_invariant() {
    replay("head");
}

#[test]
fn config_corpus_holds_every_invariant() {
    replay("config");
}

#[test]
fn dns_corpus_holds_every_invariant() {
    replay("dns");
}

#[test]
fn every_target_has_a_corpus_and_every_corpus_a_target() {
    let dirs: Vec<String> = std::fs::read_dir(corpus_root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for t in fuzz_logic::TARGETS {
        assert!(dirs.iter().any(|d| d == t.name), "no corpus for {}", t.name);
    }
    for d in &dirs {
        assert!(fuzz_logic::target(d).is_some(), "corpus {d} has no target");
    }
}

// === bounded stable fuzzing ===

#[test]
fn client_hello_survives_mutation() {
    fuzz(
        "client_hello",
        4096,
        &[
            b"\x16\x03\x01",
            b"\x16\x03\x03",
            b"\x01\x00\x00",
            b"\xfe\x0d",
            b"\xff\xce",
            b"\x00\x00\x00\x0b\x00\x09\x00\x00\x06x.test",
            b"\x00\x10\x00\x05\x00\x03\x02h2",
            b"\x00\x00",
            b"\xff\xff",
        ],
    );
}

#[test]
fn host_survives_mutation() {
    fuzz(
        "host",
        512,
        &[
            b".",
            b"..",
            b":",
            b"[",
            b"]",
            b"::",
            b"::ffff:",
            b"%",
            b"%25",
            b"@",
            b"0x",
            b"xn--",
            b"-",
            b"_",
            b"http://",
            b"https://",
            b"HTTP://",
            b":443",
            b":0",
            b":65536",
            b"127.0.0.1",
            b"[::1]",
            b"2130706433",
            b"\0",
            b"\xc3\xa9",
            b"/",
            b"?",
            b"#",
        ],
    );
}

#[test]
fn head_survives_mutation() {
    fuzz(
        "head",
        4096,
        &[
            b"\r\n",
            b"\n",
            b"\r\n\r\n",
            b" ",
            b"\t",
            b"\r\n ",
            b"\r\n\t",
            b"Host: ",
            b"host:",
            b"Host : ",
            b"http://",
            b"HTTP://",
            b"https://",
            b" HTTP/1.1\r\n",
            b" HTTP/1.0\r\n",
            b"GET ",
            b"CONNECT ",
            b"*",
            b":80",
            b"[::1]",
            b"@",
            b"Content-Length: 5\r\n",
            b"Transfer-Encoding: chunked\r\n",
        ],
    );
}

#[test]
fn dns_survives_mutation() {
    fuzz(
        "dns",
        1024,
        &[
            b"\x00",
            b"\xc0\x0c",
            b"\xc0\x00",
            b"\x3f",
            b"\x00\x01\x00\x01",
            b"\x00\x10\x00\x01",
            b"\x00\xff\x00\x01",
            b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",
            b"\x07allowed\x07example\x00",
            b"\x02no\x07allowed\x07example\x00",
        ],
    );
}

#[test]
fn config_survives_mutation() {
    fuzz(
        "config",
        16 * 1024,
        &[
            b"\n",
            b"[[rule]]\n",
            b"name = \"r\"\n",
            b"action = \"allow\"\n",
            b"action = \"deny\"\n",
            b"hosts = [\"a.example.com\"]\n",
            b"\"*.example.com\"",
            b"cidrs = [\"10.0.0.0/8\"]\n",
            b"service_tags = [\"Storage\"]\n",
            b"ports = [443, \"8000-8100\"]\n",
            b"sources = [\"192.168.0.0/16\"]\n",
            b"enabled = false\n",
            b"protocol = \"udp\"\n",
            b"regions = [\"westus2\"]\n",
            b"storage_accounts = [\"acct1\"]\n",
            b"<region>",
            b"<storage_account>",
            b"[limits]\n",
            b"connect_timeout = \"0s\"\n",
            b"[resolve.static]\n\"a.example.com\" = [\"10.0.0.1\"]\n",
            b"[safety]\nallow_internal = [\"10.0.0.0/8\"]\n",
            b"[listen]\nhttp = \"127.0.0.1:3128\"\n",
            b"\"",
            b"'",
            b"=",
            b"[",
            b"]",
            b"{",
            b"}",
            b",",
            b"#",
        ],
    );
}

// === helpers ===

/// Runs every seed of `name` through its checks, naming the file that breaks one.
fn replay(name: &str) {
    let target = fuzz_logic::target(name).unwrap();
    let seeds = corpus(name);
    assert!(seeds.len() >= MIN_SEEDS, "{name}: {} seeds", seeds.len());
    let mut outcomes = HashSet::new();
    for (path, bytes) in &seeds {
        match catch_unwind(|| (target.check)(bytes)) {
            Ok(label) => outcomes.insert(label),
            Err(e) => panic!("{}: {}", path.display(), message(&*e)),
        };
    }
    assert!(outcomes.len() >= MIN_OUTCOMES, "{name}: the corpus reaches only {outcomes:?}");
}

/// Mutates the corpus of `name` within the budget the environment gives, and fails on the first
/// few inputs that break an invariant, each saved to a file.
fn fuzz(name: &str, max_len: usize, dict: &[&[u8]]) {
    let target = fuzz_logic::target(name).unwrap();
    let budget = Budget::from_env();
    let mut rng = Rng(budget.seed ^ fnv(name.as_bytes()));
    let mut pool: Vec<Vec<u8>> = corpus(name).into_iter().map(|(_, b)| b).collect();
    let mut seen: HashSet<String> = pool.iter().map(|b| (target.check)(b)).collect();
    let seeds = pool.len();
    let mut crashes: Vec<PathBuf> = Vec::new();
    let start = Instant::now();
    let mut execs = 0u64;
    while execs < budget.max_execs && budget.time.is_none_or(|t| start.elapsed() < t) {
        // One pick in four starts from a seed, so that the pool cannot drift to inputs that are
        // refused at the first byte and stay there.
        let from = if rng.below(SEED_ONE_IN) == 0 { rng.below(seeds) } else { rng.below(pool.len()) };
        let mut input = pool[from].clone();
        for _ in 0..=rng.below(MAX_STACK) {
            mutate(&mut rng, &mut input, &pool, dict);
        }
        input.truncate(max_len);
        execs += 1;
        match catch_unwind(AssertUnwindSafe(|| (target.check)(&input))) {
            Ok(label) => {
                if seen.insert(label) || rng.below(KEEP_ONE_IN) == 0 {
                    keep(&mut rng, &mut pool, seeds, input);
                }
            }
            Err(e) => {
                crashes.push(save(name, &input));
                eprintln!("{name}: {} on input {:?}", message(&*e), String::from_utf8_lossy(&input));
                if crashes.len() >= MAX_CRASHES {
                    break;
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz {name}: {execs} execs in {secs:.1} s ({:.0}/s), {} crashes, {} outcomes, pool {} from {seeds} seeds, seed {:#x}",
        execs as f64 / secs.max(1e-9),
        crashes.len(),
        seen.len(),
        pool.len(),
        budget.seed,
    );
    assert!(crashes.is_empty(), "{name}: inputs that break an invariant, saved as {crashes:?}");
}

/// One random change to `input`.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, pool: &[Vec<u8>], dict: &[&[u8]]) {
    let len = input.len();
    let at = rng.below(len + 1); // a place to insert; a byte index when `at < len`
    match rng.below(11) {
        0 if at < len => input[at] ^= 1 << rng.below(8),
        1 if at < len => input[at] = INTERESTING[rng.below(INTERESTING.len())],
        2 if at < len => input[at] = input[at].wrapping_add(rng.below(33) as u8).wrapping_sub(16),
        3 if at + 1 < len => {
            // A big-endian length field, nudged or set to an edge.
            let v = u16::from_be_bytes([input[at], input[at + 1]]);
            let v = match rng.below(3) {
                0 => v.wrapping_add(rng.below(17) as u16),
                1 => v.wrapping_sub(rng.below(17) as u16),
                _ => [0, 1, 0x7f, 0x80, 0xff, 0x100, 0x3fff, 0x4000, 0x4001, 0xffff][rng.below(10)],
            };
            input[at..at + 2].copy_from_slice(&v.to_be_bytes());
        }
        4 if at < len => {
            let n = 1 + rng.below((len - at).min(64));
            input.drain(at..at + n);
        }
        5 if at < len => {
            let n = 1 + rng.below((len - at).min(64));
            let chunk = input[at..at + n].to_vec();
            let to = rng.below(len + 1);
            input.splice(to..to, chunk);
        }
        6 => {
            let other = &pool[rng.below(pool.len())];
            if !other.is_empty() {
                let from = rng.below(other.len());
                let n = 1 + rng.below((other.len() - from).min(256));
                input.splice(at..at, other[from..from + n].iter().copied());
            }
        }
        7 => {
            // Crossover: this input's start, another's end.
            let other = &pool[rng.below(pool.len())];
            let from = rng.below(other.len() + 1);
            input.truncate(at);
            input.extend_from_slice(&other[from..]);
        }
        8 if at < len && !dict.is_empty() => {
            let token = dict[rng.below(dict.len())];
            let end = (at + token.len()).min(len);
            input.splice(at..end, token.iter().copied());
        }
        9 if !dict.is_empty() => {
            let token = dict[rng.below(dict.len())];
            input.splice(at..at, token.iter().copied());
        }
        _ => {
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            input.splice(at..at, bytes);
        }
    }
}

/// Adds `input` to the pool, or once the pool is full, puts it in place of an input that is not a
/// seed: the pool stays bounded however many outcomes a long run finds.
fn keep(rng: &mut Rng, pool: &mut Vec<Vec<u8>>, seeds: usize, input: Vec<u8>) {
    if pool.len() < MAX_POOL {
        pool.push(input);
    } else if let Some(slot) = pool.get_mut(seeds + rng.below(MAX_POOL.saturating_sub(seeds))) {
        *slot = input;
    }
}

/// The files of a target's corpus, in name order.
fn corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut paths: Vec<PathBuf> =
        std::fs::read_dir(corpus_root().join(name)).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

fn corpus_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus"))
}

/// Writes an input that broke an invariant where it survives the test run.
fn save(name: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-stable");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-crash-{:016x}", fnv(input)));
    std::fs::write(&path, input).unwrap();
    path
}

fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// FNV-1a: a stable name for an input.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// How long to fuzz each target, from `FUZZ_SECONDS`, `FUZZ_MAX_EXECS` and `FUZZ_SEED`.
struct Budget {
    time: Option<Duration>,
    max_execs: u64,
    seed: u64,
}

impl Budget {
    fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().map(|v| v.parse::<u64>().unwrap_or_else(|_| panic!("{k}={v:?}")));
        let time = var("FUZZ_SECONDS").map(Duration::from_secs);
        let max_execs = var("FUZZ_MAX_EXECS").unwrap_or(if time.is_some() { u64::MAX } else { DEFAULT_EXECS });
        Self { time, max_execs, seed: var("FUZZ_SEED").unwrap_or(0x5eed) }
    }
}

/// splitmix64: small, seeded, and the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`; `n` is at least 1.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that sit at the edges of the grammars fuzzed here.
const INTERESTING: &[u8] = b"\0\x01\x7f\x80\xff\r\n \t:.[]@/%-_0x9Zz\"=#";
/// Inputs per target when no time is given: enough to run every mutation, quick in a debug build.
const DEFAULT_EXECS: u64 = 500;
const MIN_SEEDS: usize = 2;
const MIN_OUTCOMES: usize = 2;
const MAX_STACK: usize = 4;
const MAX_POOL: usize = 4096;
const KEEP_ONE_IN: usize = 64;
const SEED_ONE_IN: usize = 4;
const MAX_CRASHES: usize = 5;
