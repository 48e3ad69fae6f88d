//! `table`: the results files' records, medians across runs, as two markdown tables (the figures,
//! and the proxy's CPU per unit of work), with ratios against the direct path and the best peer.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::Value;

/// Every record of the results files, by target, test and field.
pub struct Results {
    /// Targets in the order first met.
    pub order: Vec<String>,
    modes: BTreeMap<String, String>,
    values: BTreeMap<(String, String, String), Vec<f64>>,
    runs: BTreeSet<u64>,
    /// Our targets' names start with this; every other target but `direct` is a peer.
    ours: String,
}

impl Results {
    pub fn load(files: &[PathBuf], ours: &str) -> Result<Self, String> {
        let mut r = Results {
            order: Vec::new(),
            modes: BTreeMap::new(),
            values: BTreeMap::new(),
            runs: BTreeSet::new(),
            ours: ours.to_string(),
        };
        for file in files {
            let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line).map_err(|e| format!("{}: {e}", file.display()))?;
                r.add(&v);
            }
        }
        Ok(r)
    }

    fn add(&mut self, v: &Value) {
        let (Some(target), Some(test), Some(fields)) = (v["target"].as_str(), v["test"].as_str(), v.as_object()) else {
            return;
        };
        // The two bulk tests differ by their number of tunnels.
        let test = match test {
            "bulk" => format!("bulk{}", v["conns"].as_u64().unwrap_or(0)),
            t => t.to_string(),
        };
        if !self.order.iter().any(|t| t == target) {
            self.order.push(target.to_string());
        }
        if let Some(mode) = v["mode"].as_str() {
            self.modes.insert(target.to_string(), mode.to_string());
        }
        if let Some(run) = v["run"].as_u64() {
            self.runs.insert(run);
        }
        let mut put = |field: &str, x: f64| {
            if x.is_finite() {
                self.values.entry((target.to_string(), test.clone(), field.to_string())).or_default().push(x);
            }
        };
        for (k, x) in fields {
            if let Some(x) = x.as_f64() {
                put(k, x);
            }
        }
        // CPU per unit of work, within each record (then the median of those across runs).
        let num = |k: &str| v[k].as_f64().filter(|x| *x > 0.0);
        if let Some(cpu) = v["cpu_s"].as_f64() {
            if let Some(ok) = num("ok") {
                put("cpu_ms_per_1k", cpu * 1e6 / ok);
            }
            if let Some(bytes) = num("bytes") {
                put("cpu_s_per_gb", cpu * 1e9 / bytes);
            }
            if let Some(secs) = num("secs") {
                put("cpu_pct_core", cpu * 100.0 / secs);
            }
        }
    }

    pub fn median(&self, target: &str, test: &str, field: &str) -> Option<f64> {
        let mut xs = self.values.get(&(target.to_string(), test.to_string(), field.to_string()))?.clone();
        if xs.is_empty() {
            return None;
        }
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        Some(if n % 2 == 1 { xs[n / 2] } else { (xs[n / 2 - 1] + xs[n / 2]) / 2.0 })
    }

    pub fn mode(&self, target: &str) -> &str {
        self.modes.get(target).map(String::as_str).unwrap_or("?")
    }

    pub fn is_ours(&self, target: &str) -> bool {
        target.starts_with(&self.ours)
    }

    pub fn is_peer(&self, target: &str) -> bool {
        target != "direct" && !self.is_ours(target)
    }

    /// How many idle tunnels were asked for (the idle figure's N).
    pub fn idle_n(&self) -> Option<f64> {
        self.order.iter().filter_map(|t| self.median(t, "idle", "requested")).reduce(f64::max)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
    /// Shown, never ranked.
    Neither,
}

#[derive(Clone, Copy)]
pub enum Calc {
    /// The median of a test's field, times a factor.
    Field(&'static str, &'static str, f64),
    /// How much a target adds to the direct path's median of a test's field.
    OverDirect(&'static str, &'static str),
}

/// One figure: a column of a table, a panel of the plot.
#[derive(Clone, Copy)]
pub struct Figure {
    pub title: &'static str,
    pub calc: Calc,
    pub better: Better,
    /// Show the figure as a percentage of the direct path's too.
    pub vs_direct: bool,
    /// The test whose error count is shown beside the figure.
    pub errors_of: Option<&'static str>,
}

impl Figure {
    pub fn value(&self, r: &Results, target: &str) -> Option<f64> {
        match self.calc {
            Calc::Field(test, field, scale) => r.median(target, test, field).map(|x| x * scale),
            Calc::OverDirect(_, _) if target == "direct" => None,
            Calc::OverDirect(test, field) => Some(r.median(target, test, field)? - r.median("direct", test, field)?),
        }
    }

    /// The best peer's name and figure.
    pub fn best_peer(&self, r: &Results) -> Option<(String, f64)> {
        let peers = r.order.iter().filter(|t| r.is_peer(t));
        let scored = peers.filter_map(|t| Some((t.clone(), self.value(r, t)?)));
        match self.better {
            Better::Higher => scored.max_by(|a, b| a.1.total_cmp(&b.1)),
            Better::Lower => scored.min_by(|a, b| a.1.total_cmp(&b.1)),
            Better::Neither => None,
        }
    }
}

const fn field(title: &'static str, test: &'static str, name: &'static str, better: Better) -> Figure {
    Figure { title, calc: Calc::Field(test, name, 1.0), better, vs_direct: false, errors_of: None }
}

/// The figures table's columns.
pub const FIGURES: [Figure; 9] = [
    Figure { vs_direct: true, errors_of: Some("rate"), ..field("new tunnels/s", "rate", "per_sec", Better::Higher) },
    Figure {
        calc: Calc::Field("latency", "setup_p50_us", 1e-3),
        ..field("setup p50 ms", "latency", "setup_p50_us", Better::Lower)
    },
    Figure { vs_direct: true, ..field("1-tunnel MB/s", "bulk1", "mb_per_sec", Better::Higher) },
    Figure { vs_direct: true, ..field("32-tunnel MB/s", "bulk32", "mb_per_sec", Better::Higher) },
    Figure {
        vs_direct: true,
        errors_of: Some("karps"),
        ..field("kept-alive req/s (32 tunnels)", "karps", "per_sec", Better::Higher)
    },
    Figure {
        calc: Calc::OverDirect("latency", "p50_us"), ..field("added p50 µs", "latency", "p50_us", Better::Lower)
    },
    Figure {
        calc: Calc::OverDirect("latency", "p99_us"), ..field("added p99 µs", "latency", "p99_us", Better::Lower)
    },
    field("KiB per idle tunnel", "idle", "kib_per_tunnel", Better::Lower),
    Figure { errors_of: Some("deny"), ..field("refusals/s", "deny", "per_sec", Better::Higher) },
];

/// The CPU table's columns: the proxy's own CPU time (user + system, its whole process tree).
pub const CPU: [Figure; 6] = [
    field("CPU ms / 1k tunnels", "rate", "cpu_ms_per_1k", Better::Lower),
    field("CPU s / GB, 1 tunnel", "bulk1", "cpu_s_per_gb", Better::Lower),
    field("CPU s / GB, 32 tunnels", "bulk32", "cpu_s_per_gb", Better::Lower),
    field("CPU ms / 1k kept-alive req", "karps", "cpu_ms_per_1k", Better::Lower),
    field("CPU ms / 1k refusals", "deny", "cpu_ms_per_1k", Better::Lower),
    field("% of a core, new tunnels", "rate", "cpu_pct_core", Better::Neither),
];

/// Three significant-ish digits: 2183, 44.7, 0.52.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn cell(r: &Results, fig: &Figure, target: &str) -> String {
    let Some(x) = fig.value(r, target) else { return "–".into() };
    let mut s = num(x);
    if matches!(fig.calc, Calc::OverDirect(..)) && x > 0.0 {
        s.insert(0, '+');
    }
    if fig.vs_direct && target != "direct" {
        if let Some(d) = fig.value(r, "direct").filter(|d| *d > 0.0) {
            let _ = write!(s, " ({:.0} %)", 100.0 * x / d);
        }
    }
    if let Some(test) = fig.errors_of {
        if let Some(e) = r.median(target, test, "err").filter(|e| *e > 0.0) {
            let _ = write!(s, " ({e:.0} err)");
        }
    }
    if fig.title.starts_with("KiB per idle") {
        if let (Some(open), Some(asked)) = (r.median(target, "idle", "opened"), r.median(target, "idle", "requested")) {
            if open < asked {
                let _ = write!(s, " ({open:.0} of {asked:.0} open)");
            }
        }
    }
    s
}

/// Ours against the best peer in the column: a percentage of its figure, and its name.
fn vs_best(r: &Results, fig: &Figure, target: &str) -> String {
    match (fig.value(r, target), fig.best_peer(r)) {
        (Some(x), Some((name, best))) if best.abs() > f64::EPSILON && !matches!(fig.calc, Calc::OverDirect(..)) => {
            format!("{:.0} % of {name}", 100.0 * x / best)
        }
        (Some(x), Some((name, best))) => {
            // Rounded first, so that a difference under 0.5 µs does not print as "-0".
            let d = (x - best).round();
            if d == 0.0 {
                format!("same as {name}")
            } else {
                format!("{d:+.0} µs vs {name}")
            }
        }
        _ => "–".into(),
    }
}

fn markdown(r: &Results, figs: &[Figure], titles: &[String], targets: &[&String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| target | mode | {} |", titles.join(" | "));
    let _ = writeln!(out, "| --- | --- |{}", " ---: |".repeat(figs.len()));
    let any_peer = r.order.iter().any(|t| r.is_peer(t));
    for t in targets {
        let name = if r.is_ours(t) { format!("**{t}**") } else { t.to_string() };
        let cells: Vec<String> = figs.iter().map(|f| cell(r, f, t)).collect();
        let _ = writeln!(out, "| {name} | {} | {} |", r.mode(t), cells.join(" | "));
        if r.is_ours(t) && any_peer {
            let cells: Vec<String> = figs.iter().map(|f| vs_best(r, f, t)).collect();
            let _ = writeln!(out, "| ↳ vs best peer | | {} |", cells.join(" | "));
        }
    }
    out
}

/// Both tables, as markdown.
pub fn tables(r: &Results) -> String {
    let mut out = String::new();
    let all: Vec<&String> = r.order.iter().collect();
    let titles: Vec<String> = FIGURES
        .iter()
        .map(|f| match (f.title.starts_with("KiB per idle"), r.idle_n()) {
            (true, Some(n)) => format!("KiB per idle tunnel ({n:.0} open)"),
            _ => f.title.to_string(),
        })
        .collect();
    out.push_str(&markdown(r, &FIGURES, &titles, &all));
    out.push('\n');
    let proxies: Vec<&String> = r.order.iter().filter(|t| t.as_str() != "direct").collect();
    let titles: Vec<String> = CPU.iter().map(|f| f.title.to_string()).collect();
    out.push_str(&markdown(r, &CPU, &titles, &proxies));
    let runs = r.runs.len();
    let _ = writeln!(
        out,
        "\n{} The \"vs best peer\" rows give ours as a percentage of the best peer's figure in that \
         column (the highest rate or throughput; the lowest time, memory or CPU), or for added latency \
         the difference in µs.",
        if runs > 1 { format!("Medians of {runs} runs.") } else { "One run.".to_string() }
    );
    out
}
