//! The proxy's side, read from /proc: its process tree, the CPU time it has used and its memory.

use std::collections::BTreeMap;
use std::fs;

/// `pid` and every process descended from it (nginx's workers, sniproxy's binder ...).
pub fn tree(pid: u32) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some(ppid) = stat_fields(p).and_then(|f| f.get(1).and_then(|s| s.parse::<u32>().ok())) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        if let Some(kids) = children.get(&all[i]) {
            all.extend(kids);
        }
        i += 1;
    }
    all
}

/// The fields of /proc/PID/stat after the command name: state, ppid, ... (so utime is index 11).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// User plus system CPU seconds used so far by `pid`'s whole tree (all threads of each process).
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks: u64 = tree(pid)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            let at = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            at(11) + at(12)
        })
        .sum();
    ticks as f64 / rustix::param::clock_ticks_per_second() as f64
}

/// Resident memory of `pid`'s whole tree, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.trim_start_matches("VmRSS:").trim().trim_end_matches("kB").trim().parse::<u64>().ok()
        })
        .sum()
}

/// CPU used by the proxy between two points of a test.
pub struct CpuMeter {
    pid: Option<u32>,
    start: f64,
}

impl CpuMeter {
    pub fn start(pid: Option<u32>) -> Self {
        CpuMeter { pid, start: pid.map(cpu_seconds).unwrap_or(0.0) }
    }

    /// Seconds of CPU since [`CpuMeter::start`]; None when no proxy process was named.
    pub fn used(&self) -> Option<f64> {
        self.pid.map(|p| cpu_seconds(p) - self.start)
    }
}
