//! `plot`: the main figures as an SVG of horizontal bar charts, one panel per figure, two columns.

use std::fmt::Write as _;

use crate::report::{num, Better, Figure, Results, CPU, FIGURES};

const PANEL_W: f64 = 450.0;
const LABEL_W: f64 = 120.0;
const BAR_W: f64 = 250.0;
const ROW_H: f64 = 17.0;
const PANEL_HEAD: f64 = 38.0;
const PANEL_GAP: f64 = 22.0;
const MARGIN: f64 = 16.0;
const TOP: f64 = 64.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Bar colour by mode; ours darker.
fn colour(r: &Results, target: &str) -> &'static str {
    match (r.mode(target), r.is_ours(target)) {
        ("direct", _) => "#a0a0a0",
        ("connect", false) => "#f0b45c",
        ("connect", true) => "#b35f00",
        ("sni", false) => "#7fa9e0",
        ("sni", true) => "#1d4f9c",
        _ => "#888888",
    }
}

/// The figures plotted, in order (panels fill the left column, then the right).
fn panels() -> Vec<Figure> {
    let pick = |figs: &[Figure], title: &str| figs.iter().find(|f| f.title == title).copied();
    [
        pick(&FIGURES, "new tunnels/s"),
        pick(&FIGURES, "kept-alive req/s (32 tunnels)"),
        pick(&FIGURES, "1-tunnel MB/s"),
        pick(&FIGURES, "32-tunnel MB/s"),
        pick(&FIGURES, "refusals/s"),
        pick(&CPU, "CPU ms / 1k tunnels"),
        pick(&CPU, "CPU s / GB, 32 tunnels"),
        pick(&FIGURES, "KiB per idle tunnel"),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn panel(out: &mut String, r: &Results, fig: &Figure, x0: f64, y0: f64) -> f64 {
    let rows: Vec<(&String, f64)> = r.order.iter().filter_map(|t| Some((t, fig.value(r, t)?))).collect();
    let hint = match fig.better {
        Better::Higher => "higher is better",
        Better::Lower => "lower is better",
        Better::Neither => "",
    };
    let _ = writeln!(
        out,
        "<text x=\"{x0}\" y=\"{y}\" font-weight=\"bold\">{}</text><text x=\"{xr}\" y=\"{y}\" text-anchor=\"end\" fill=\"#666\">{hint}</text>",
        escape(fig.title),
        y = y0 + 14.0,
        xr = x0 + PANEL_W - 10.0,
    );
    let max = rows.iter().map(|(_, v)| *v).fold(0.0_f64, f64::max);
    let mut y = y0 + PANEL_HEAD - 14.0;
    if rows.is_empty() {
        let _ = writeln!(out, "<text x=\"{x0}\" y=\"{}\" fill=\"#666\">no figures</text>", y + 12.0);
        return PANEL_HEAD + ROW_H;
    }
    let bar_x = x0 + LABEL_W;
    for (target, v) in &rows {
        let w = if max > 0.0 { (BAR_W * v / max).max(0.0) } else { 0.0 };
        let weight = if r.is_ours(target) { " font-weight=\"bold\"" } else { "" };
        let _ = writeln!(
            out,
            "<text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\"{weight}>{name}</text>\
             <rect x=\"{bar_x}\" y=\"{y}\" width=\"{w:.1}\" height=\"{h}\" fill=\"{c}\"/>\
             <text x=\"{vx:.1}\" y=\"{ty}\"{weight}>{val}</text>",
            lx = bar_x - 6.0,
            ty = y + ROW_H - 5.0,
            name = escape(target),
            h = ROW_H - 3.0,
            c = colour(r, target),
            vx = bar_x + w + 4.0,
            val = num(*v),
        );
        y += ROW_H;
    }
    PANEL_HEAD + ROW_H * rows.len() as f64
}

/// The whole picture; `title` heads it.
pub fn plot(r: &Results, title: &str) -> String {
    let figs = panels();
    let half = figs.len().div_ceil(2);
    let mut body = String::new();
    let mut bottom: f64 = TOP;
    for (col, figs) in figs.chunks(half.max(1)).enumerate() {
        let x = MARGIN + col as f64 * (PANEL_W + MARGIN);
        let mut y = TOP;
        for fig in figs {
            y += panel(&mut body, r, fig, x, y) + PANEL_GAP;
        }
        bottom = bottom.max(y);
    }
    let width = 2.0 * PANEL_W + 3.0 * MARGIN;
    let legend = [
        ("#a0a0a0", "direct (no proxy)"),
        ("#f0b45c", "CONNECT peer"),
        ("#b35f00", "egress-proxy, CONNECT"),
        ("#7fa9e0", "SNI peer"),
        ("#1d4f9c", "egress-proxy, SNI"),
    ];
    let mut head = String::new();
    let _ =
        writeln!(head, "<text x=\"{MARGIN}\" y=\"24\" font-size=\"15\" font-weight=\"bold\">{}</text>", escape(title));
    let mut lx = MARGIN;
    for (c, label) in legend {
        let _ = writeln!(
            head,
            "<rect x=\"{lx}\" y=\"36\" width=\"12\" height=\"12\" fill=\"{c}\"/><text x=\"{tx}\" y=\"46\">{label}</text>",
            tx = lx + 16.0
        );
        lx += 30.0 + 7.0 * label.len() as f64;
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{head}{body}</svg>\n",
        height = bottom,
    )
}
