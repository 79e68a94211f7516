//! The report page (`sdpo-run report`, and `report.html` at the end of every train run):
//! one self-contained HTML file — inline SVG and CSS, no script, no external reference —
//! with, for one or more run folders: the training curves over updates, overlaid and per
//! run, with the sDPO step boundaries marked; mean γ per step (the paper's Figure 2); the
//! eval table per step; the partition and run.toml.
//!
//! Everything drawn comes from the run folder's metrics.jsonl. Each plot's `<g class="plot">`
//! carries its axes' mapping (`data-x`, `data-y`: the value range, then the pixel range it
//! spans), so a point can be turned back into the number it shows. The page is also
//! well-formed XML (every element closed, every attribute quoted, text escaped).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::partition::Partition;

/// The file a train run writes into its folder.
pub const FILE: &str = "report.html";
/// The files a report reads in a run folder (only metrics.jsonl must exist).
pub const INPUTS: [&str; 3] = ["metrics.jsonl", "run.toml", "partition.json"];

// --- the inputs

/// One run folder's inputs.
pub struct RunData {
    pub label: String,
    pub dir: PathBuf,
    /// metrics.jsonl, one object per line.
    pub lines: Vec<Map<String, Value>>,
    /// run.toml's text, when the folder has one.
    pub config: Option<String>,
    pub partition: Option<Partition>,
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

impl RunData {
    pub fn load(dir: &Path) -> Result<RunData> {
        let path = dir.join(INPUTS[0]);
        let Some(text) = read_optional(&path)? else {
            return Err(Error::file(
                &path,
                "not found: a report reads a run folder that `sdpo-run train` (or the demo) wrote",
            ));
        };
        let mut lines = Vec::new();
        let n = text.lines().count();
        for (i, line) in text.lines().enumerate() {
            match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(m)) => lines.push(m),
                // A last line without its newline is a write a killed process cut short.
                Err(_) if i + 1 == n && !text.ends_with('\n') => {}
                Ok(_) => return Err(Error::line(&path, i + 1, "expected a JSON object (one record per line)")),
                Err(e) => return Err(Error::line(&path, i + 1, format!("not JSON: {e}"))),
            }
        }
        let config = read_optional(&dir.join(INPUTS[1]))?;
        let part_path = dir.join(INPUTS[2]);
        let partition = match read_optional(&part_path)? {
            Some(t) => Some(
                serde_json::from_str(&t)
                    .map_err(|e| Error::file(&part_path, format!("not a partition sdpo-run wrote: {e}")))?,
            ),
            None => None,
        };
        let label = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok(RunData { label, dir: dir.to_path_buf(), lines, config, partition })
    }

    /// (update, value) of `key` over the update lines (those with `train/global_step`).
    fn series(&self, key: &str) -> Vec<(f64, f64)> {
        self.lines
            .iter()
            .filter_map(|l| Some((l.get("train/global_step")?.as_f64()?, l.get(key)?.as_f64()?)))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect()
    }

    /// Where each sDPO step after the first begins: half an update before its first.
    fn boundaries(&self) -> Vec<(f64, u64)> {
        let mut out = Vec::new();
        let mut prev = None;
        for l in &self.lines {
            let (Some(x), Some(t)) = (num(l, "train/global_step"), l.get("sdpo/step").and_then(Value::as_u64)) else {
                continue;
            };
            if prev.is_some_and(|p| p != t) {
                out.push((x - 0.5, t));
            }
            prev = Some(t);
        }
        out
    }

    /// The eval lines (M_0's and each M_t's), by step.
    fn evals(&self) -> Vec<&Map<String, Value>> {
        self.lines.iter().filter(|l| l.contains_key("eval/mean_gamma")).collect()
    }

    fn updates(&self) -> u64 {
        self.lines.iter().filter_map(|l| l.get("train/global_step")?.as_u64()).max().unwrap_or(0)
    }
}

fn num(l: &Map<String, Value>, key: &str) -> Option<f64> {
    l.get(key).and_then(Value::as_f64)
}

/// Reads the run folders; labels that would repeat become the folders' paths.
pub fn load_runs(dirs: &[PathBuf]) -> Result<Vec<RunData>> {
    let mut runs = dirs.iter().map(|d| RunData::load(d)).collect::<Result<Vec<_>>>()?;
    let labels: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
    for r in &mut runs {
        if labels.iter().filter(|l| **l == r.label).count() > 1 {
            r.label = r.dir.display().to_string();
        }
    }
    Ok(runs)
}

/// Writes the page for `runs` to `out`, atomically.
pub fn write(runs: &[RunData], out: &Path) -> Result<()> {
    crate::weights::write_file_atomic(out, render(runs).as_bytes())
}

/// The report of one run folder, written into it (`report.html`).
pub fn write_for_run(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(FILE);
    write(&[RunData::load(dir)?], &path)?;
    Ok(path)
}

// --- the page

/// Run colours (Tableau 10), by run index.
const PALETTE: [&str; 10] =
    ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

fn color(run: usize) -> &'static str {
    PALETTE[run % PALETTE.len()]
}

/// The training charts: title, then the keys drawn (the second, if any, dashed).
const CHARTS: [(&str, &[&str]); 6] = [
    ("Loss", &["loss"]),
    ("Reward accuracy (training batches)", &["rewards/accuracies"]),
    ("Reward margin (training batches)", &["rewards/margins"]),
    ("Log-probs: chosen (solid), rejected (dashed)", &["logps/chosen", "logps/rejected"]),
    ("Gradient norm", &["train/grad_norm"]),
    ("Learning rate", &["train/learning_rate"]),
];

/// The eval table's columns: heading, metrics.jsonl key.
const EVAL_COLUMNS: [(&str, &str); 9] = [
    ("reward acc vs M_0", "eval/rewards/accuracies"),
    ("margin vs M_0", "eval/rewards/margins"),
    ("reward acc vs M_{t−1}", "eval/rewards/accuracies_vs_prev"),
    ("margin vs M_{t−1}", "eval/rewards/margins_vs_prev"),
    ("mean γ", "eval/mean_gamma"),
    ("γ > 0", "eval/gamma_accuracy"),
    ("log π chosen", "eval/logps/chosen"),
    ("log π rejected", "eval/logps/rejected"),
    ("pairs", "eval/n_pairs"),
];

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1240px}\
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:14px;margin:8px 0 2px}\
table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}\
th{background:#f4f4f4}td.l,th.l{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:8px 20px}\
.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}\
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto}svg{font-size:10px}.note{color:#666;font-size:12px}";

/// Text escaped for HTML/XML content and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A number for a label or a table: four significant digits, or an exponent when very
/// large or small.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.2e}");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

pub fn render(runs: &[RunData]) -> String {
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n<title>sdpo report</title>\n");
    let _ = writeln!(h, "<style>{STYLE}</style>\n</head>\n<body>\n<h1>sdpo report</h1>");
    h.push_str(&summary_table(runs));
    h.push_str("<h2>Training, every update</h2>\n");
    h.push_str(
        "<p class=\"note\">x: optimiser updates over the whole run; dashed verticals: where an sDPO step begins \
         (the policy and reference become the previous step's model).</p>\n",
    );
    h.push_str(&legend(runs));
    let all: Vec<usize> = (0..runs.len()).collect();
    h.push_str(&charts(runs, &all));
    h.push_str("<h2>Mean γ per step (the paper's Figure 2)</h2>\n");
    h.push_str(
        "<p class=\"note\">γ = log π(chosen) − log π(rejected) of M_t on the eval pairs; M_t is step t+1's \
         reference, so a rising γ is a stricter lower bound for the next step.</p>\n",
    );
    h.push_str(&gamma_chart(runs));
    for (i, r) in runs.iter().enumerate() {
        let _ = writeln!(
            h,
            "<h2><span class=\"swatch\" style=\"background:{}\"></span>{}</h2>\n<p class=\"note\">{}</p>",
            color(i),
            esc(&r.label),
            esc(&r.dir.display().to_string())
        );
        if runs.len() > 1 {
            h.push_str(&charts(runs, &[i]));
        }
        h.push_str("<h3>Evaluation after each step</h3>\n");
        h.push_str(&eval_table(r));
        if let Some(p) = &r.partition {
            h.push_str("<h3>Partition (partition.json)</h3>\n");
            h.push_str(&partition_table(p));
        }
        h.push_str("<h3>Configuration (run.toml)</h3>\n");
        match &r.config {
            Some(c) => {
                let _ = writeln!(h, "<pre>{}</pre>", esc(c));
            }
            None => h.push_str("<p class=\"note\">This folder has no run.toml.</p>\n"),
        }
    }
    h.push_str("</body>\n</html>\n");
    h
}

fn summary_table(runs: &[RunData]) -> String {
    let mut h = String::from(
        "<table>\n<tr><th class=\"l\">run</th><th>sDPO steps</th><th>updates</th><th>mean γ: M_0 → last</th>\
         <th>eval reward acc vs M_0</th><th>eval margin vs M_0</th><th>eval log π chosen: M_0 → last</th>\
         <th>eval log π rejected: M_0 → last</th></tr>\n",
    );
    for (i, r) in runs.iter().enumerate() {
        let evals = r.evals();
        let (first, last) = (evals.first(), evals.last().filter(|_| evals.len() > 1));
        let cell = |l: Option<&&Map<String, Value>>, k: &str| l.and_then(|l| num(l, k)).map_or("–".into(), fmt_num);
        let arrow = |k: &str| format!("{} → {}", cell(first, k), cell(last, k));
        let steps = r.lines.iter().filter_map(|l| l.get("sdpo/step")?.as_u64()).max().unwrap_or(0);
        let _ = writeln!(
            h,
            "<tr><td class=\"l\"><span class=\"swatch\" style=\"background:{}\"></span>{}</td><td>{steps}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            color(i),
            esc(&r.label),
            r.updates(),
            arrow("eval/mean_gamma"),
            cell(last, "eval/rewards/accuracies"),
            cell(last, "eval/rewards/margins"),
            arrow("eval/logps/chosen"),
            arrow("eval/logps/rejected"),
        );
    }
    h.push_str("</table>\n");
    h
}

fn eval_table(r: &RunData) -> String {
    let evals = r.evals();
    if evals.is_empty() {
        return "<p class=\"note\">No evaluation: the run had no eval pairs.</p>\n".into();
    }
    let mut h = String::from("<table>\n<tr><th>step</th><th class=\"l\">chunk</th><th>updates</th><th>train loss</th>");
    for (name, _) in EVAL_COLUMNS {
        let _ = write!(h, "<th>{}</th>", esc(name));
    }
    h.push_str("</tr>\n");
    for e in evals {
        let t = e.get("sdpo/step").and_then(Value::as_u64).unwrap_or(0);
        let chunk = if t == 0 { "M_0 (start)" } else { e.get("sdpo/chunk").and_then(Value::as_str).unwrap_or("") };
        // The step's updates, and their mean loss.
        let losses: Vec<f64> = r
            .lines
            .iter()
            .filter(|l| l.contains_key("train/global_step") && l.get("sdpo/step").and_then(Value::as_u64) == Some(t))
            .filter_map(|l| num(l, "loss"))
            .collect();
        let (updates, loss) = if losses.is_empty() {
            (String::new(), String::new())
        } else {
            (losses.len().to_string(), fmt_num(losses.iter().sum::<f64>() / losses.len() as f64))
        };
        let _ = write!(h, "<tr><td>{t}</td><td class=\"l\">{}</td><td>{updates}</td><td>{loss}</td>", esc(chunk));
        for (_, key) in EVAL_COLUMNS {
            let _ = write!(h, "<td>{}</td>", num(e, key).map(fmt_num).unwrap_or_default());
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    h
}

fn partition_table(p: &Partition) -> String {
    let mut h = String::from(
        "<table>\n<tr><th>step</th><th class=\"l\">chunk</th><th>pairs</th><th>M_0: share γ &gt; 0</th>\
         <th>M_0: mean γ</th></tr>\n",
    );
    for (t, c) in p.chunks.iter().enumerate() {
        let opt = |v: Option<f64>| v.map(fmt_num).unwrap_or_default();
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            t + 1,
            esc(&c.name),
            c.pairs.len(),
            opt(c.accuracy),
            opt(c.mean_gamma)
        );
    }
    h.push_str("</table>\n");
    h
}

// --- charts

const W: f64 = 580.0;
const H: f64 = 230.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 34.0;

/// A linear map from a value range to a pixel range.
struct Axis {
    lo: f64,
    hi: f64,
    p0: f64,
    p1: f64,
}

impl Axis {
    fn at(&self, v: f64) -> f64 {
        self.p0 + (v - self.lo) / (self.hi - self.lo) * (self.p1 - self.p0)
    }

    /// What a reader needs to invert it: "lo hi p0 p1".
    fn attr(&self) -> String {
        format!("{:e} {:e} {} {}", self.lo, self.hi, self.p0, self.p1)
    }

    /// Round tick values inside the range (about five).
    fn ticks(&self) -> Vec<f64> {
        let raw = (self.hi - self.lo) / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
        let first = (self.lo / step).ceil() as i64;
        let last = (self.hi / step).floor() as i64;
        (first..=last).map(|k| k as f64 * step).collect()
    }
}

/// A value range with a margin; a flat range is widened so it can be drawn.
fn padded(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(lo.abs()).max(1e-300) {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d, hi + d);
    }
    let m = (hi - lo) * pad;
    (lo - m, hi + m)
}

/// The frame, grid and tick labels of a plot.
fn frame(svg: &mut String, x: &Axis, y: &Axis, x_labels: bool) {
    let _ = writeln!(
        svg,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>",
        W - LEFT - RIGHT,
        H - TOP - BOTTOM
    );
    for v in y.ticks() {
        let py = y.at(v);
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{py:.2}\" y2=\"{py:.2}\" stroke=\"#eee\"/>\
             <text x=\"{}\" y=\"{:.2}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 4.0,
            py + 3.0,
            esc(&fmt_num(v))
        );
    }
    if x_labels {
        for v in x.ticks() {
            let px = x.at(v);
            let _ = writeln!(
                svg,
                "<text x=\"{px:.2}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                H - BOTTOM + 14.0,
                esc(&fmt_num(v))
            );
        }
    }
}

/// Keeps a line drawable at any length: per pixel column, its first, lowest, highest and
/// last points, in order, so every spike stays visible.
fn thin(points: &[(f64, f64)], x: &Axis) -> Vec<(f64, f64)> {
    if points.len() <= 2 * (x.p1 - x.p0) as usize {
        return points.to_vec();
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < points.len() {
        let col = x.at(points[start].0).floor();
        let mut end = start;
        while end < points.len() && x.at(points[end].0).floor() == col {
            end += 1;
        }
        let group = &points[start..end];
        let lowest = (0..group.len()).min_by(|&a, &b| group[a].1.total_cmp(&group[b].1)).expect("non-empty");
        let highest = (0..group.len()).max_by(|&a, &b| group[a].1.total_cmp(&group[b].1)).expect("non-empty");
        let mut keep = vec![0, lowest, highest, group.len() - 1];
        keep.sort_unstable();
        keep.dedup();
        out.extend(keep.into_iter().map(|k| group[k]));
        start = end;
    }
    out
}

/// One drawn line: run `run`'s series of `keys[key]`.
struct Curve {
    run: usize,
    key: usize,
    points: Vec<(f64, f64)>,
}

/// One training chart: `keys` of `runs[shown]` over updates, with step boundaries.
fn line_chart(runs: &[RunData], shown: &[usize], title: &str, keys: &[&str]) -> String {
    let lines: Vec<Curve> = shown
        .iter()
        .flat_map(|&run| {
            keys.iter().enumerate().map(move |(key, name)| Curve { run, key, points: runs[run].series(name) })
        })
        .filter(|c| !c.points.is_empty())
        .collect();
    let mut svg = format!("<div><h3>{}</h3>\n", esc(title));
    if lines.is_empty() {
        svg.push_str("<p class=\"note\">No values in metrics.jsonl.</p></div>\n");
        return svg;
    }
    let (x0, x1) = padded(lines.iter().flat_map(|c| c.points.iter().map(|p| p.0)), 0.0);
    let (y0, y1) = padded(lines.iter().flat_map(|c| c.points.iter().map(|p| p.1)), 0.05);
    let x = Axis { lo: x0.min(0.0), hi: x1, p0: LEFT, p1: W - RIGHT };
    let y = Axis { lo: y0, hi: y1, p0: H - BOTTOM, p1: TOP };
    let _ = writeln!(
        svg,
        "<svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\">\n\
         <g class=\"plot\" data-x=\"{}\" data-y=\"{}\">",
        x.attr(),
        y.attr()
    );
    frame(&mut svg, &x, &y, true);
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">update</text>",
        (LEFT + W - RIGHT) / 2.0,
        H - 4.0
    );
    // Runs whose steps begin at the same update share one label.
    let mut labelled: Vec<(f64, u64)> = Vec::new();
    for &r in shown {
        for (bx, t) in runs[r].boundaries() {
            let px = x.at(bx);
            let _ = write!(
                svg,
                "<line class=\"boundary\" data-run=\"{r}\" data-step=\"{t}\" x1=\"{px:.2}\" x2=\"{px:.2}\" y1=\"{TOP}\" \
                 y2=\"{}\" stroke=\"{}\" stroke-dasharray=\"4 3\"/>",
                H - BOTTOM,
                color(r)
            );
            if !labelled.contains(&(bx, t)) {
                labelled.push((bx, t));
                let _ = write!(
                    svg,
                    "<text x=\"{:.2}\" y=\"{}\" fill=\"{}\">step {t}</text>",
                    px + 2.0,
                    TOP - 4.0,
                    color(r)
                );
            }
            svg.push('\n');
        }
    }
    for Curve { run: r, key: k, points: pts } in &lines {
        let mut points = String::new();
        for (i, &(px, py)) in thin(pts, &x).iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            let _ = write!(points, "{sep}{:.2},{:.2}", x.at(px), y.at(py));
        }
        let dash = if *k > 0 { " stroke-dasharray=\"5 3\"" } else { "" };
        let _ = writeln!(
            svg,
            "<polyline class=\"series\" data-run=\"{r}\" data-key=\"{}\" fill=\"none\" stroke=\"{}\" \
             stroke-width=\"1.3\"{dash} points=\"{points}\"><title>{}: {}</title></polyline>",
            esc(keys[*k]),
            color(*r),
            esc(&runs[*r].label),
            esc(keys[*k])
        );
    }
    svg.push_str("</g>\n</svg></div>\n");
    svg
}

fn charts(runs: &[RunData], shown: &[usize]) -> String {
    let mut h = String::from("<div class=\"grid\">\n");
    for (title, keys) in CHARTS {
        h.push_str(&line_chart(runs, shown, title, keys));
    }
    h.push_str("</div>\n");
    h
}

/// Mean γ of M_0 … M_T on the eval pairs, a group of bars per step, one bar per run.
fn gamma_chart(runs: &[RunData]) -> String {
    let bars: Vec<(usize, u64, f64)> = runs
        .iter()
        .enumerate()
        .flat_map(|(r, run)| {
            run.evals()
                .into_iter()
                .filter_map(move |e| Some((r, e.get("sdpo/step")?.as_u64()?, num(e, "eval/mean_gamma")?)))
        })
        .filter(|b| b.2.is_finite())
        .collect();
    if bars.is_empty() {
        return "<p class=\"note\">No evaluation in these runs.</p>\n".into();
    }
    let steps = bars.iter().map(|b| b.1).max().unwrap_or(0) + 1;
    let (y0, y1) = padded(bars.iter().map(|b| b.2).chain([0.0]), 0.12);
    let y = Axis { lo: y0, hi: y1, p0: H - BOTTOM, p1: TOP };
    let width = W - LEFT - RIGHT;
    let x = Axis { lo: 0.0, hi: steps as f64, p0: LEFT, p1: W - RIGHT };
    let group = width / steps as f64;
    let bar = group * 0.8 / runs.len() as f64;
    let mut svg = format!(
        "<svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\">\n<g class=\"plot\" data-x=\"{}\" data-y=\"{}\">\n",
        x.attr(),
        y.attr()
    );
    frame(&mut svg, &x, &y, false);
    let zero = y.at(0.0);
    let _ =
        writeln!(svg, "<line x1=\"{LEFT}\" x2=\"{}\" y1=\"{zero:.2}\" y2=\"{zero:.2}\" stroke=\"#555\"/>", W - RIGHT);
    for t in 0..steps {
        let label = if t == 0 { "M_0 (start)".to_string() } else { format!("M_{t}") };
        let _ = writeln!(
            svg,
            "<text x=\"{:.2}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            x.at(t as f64 + 0.5),
            H - BOTTOM + 14.0
        );
    }
    for &(r, t, v) in &bars {
        let left = LEFT + group * t as f64 + group * 0.1 + bar * r as f64;
        let top = y.at(v).min(zero);
        let height = (y.at(v) - zero).abs();
        let label_y = if v >= 0.0 { top - 3.0 } else { top + height + 10.0 };
        let _ = writeln!(
            svg,
            "<rect class=\"bar\" data-run=\"{r}\" data-step=\"{t}\" x=\"{left:.2}\" y=\"{top:.2}\" width=\"{bar:.2}\" \
             height=\"{height:.2}\" fill=\"{}\"><title>{}: M_{t} mean γ {}</title></rect>\
             <text x=\"{:.2}\" y=\"{label_y:.2}\" text-anchor=\"middle\">{}</text>",
            color(r),
            esc(&runs[r].label),
            fmt_num(v),
            left + bar / 2.0,
            fmt_num(v)
        );
    }
    svg.push_str("</g>\n</svg>\n");
    svg + &legend(runs)
}

/// The runs' colours and names, in one line.
fn legend(runs: &[RunData]) -> String {
    let mut h = String::from("<p>");
    for (r, run) in runs.iter().enumerate() {
        let _ = write!(h, "<span class=\"swatch\" style=\"background:{}\"></span>{} ", color(r), esc(&run.label));
    }
    h + "</p>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_four_significant_digits_or_an_exponent() {
        assert_eq!(fmt_num(0.512345), "0.5123");
        assert_eq!(fmt_num(-15.04), "-15.04");
        assert_eq!(fmt_num(1e-4), "1.00e-4");
        assert_eq!(fmt_num(32.0), "32");
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(123456.0), "1.23e5");
    }

    #[test]
    fn thinning_keeps_every_column_extreme() {
        let x = Axis { lo: 0.0, hi: 10_000.0, p0: 0.0, p1: 100.0 };
        let pts: Vec<(f64, f64)> = (0..10_000).map(|i| (i as f64, ((i * 7919) % 101) as f64)).collect();
        let thin = thin(&pts, &x);
        assert!(thin.len() <= 400, "{}", thin.len());
        for col in 0..100 {
            let group = &pts[col * 100..(col + 1) * 100];
            let kept: Vec<&(f64, f64)> = thin.iter().filter(|p| (p.0 / 100.0).floor() as usize == col).collect();
            let max = group.iter().map(|p| p.1).fold(f64::MIN, f64::max);
            let min = group.iter().map(|p| p.1).fold(f64::MAX, f64::min);
            assert!(kept.iter().any(|p| p.1 == max) && kept.iter().any(|p| p.1 == min), "column {col}");
        }
        assert!(thin.windows(2).all(|w| w[0].0 < w[1].0), "in order");
    }

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        let a = Axis { lo: -0.07, hi: 1.07, p0: 0.0, p1: 1.0 };
        assert_eq!(a.ticks(), [0.0, 0.25, 0.5, 0.75, 1.0]);
        let a = Axis { lo: 3e-6, hi: 1.1e-4, p0: 0.0, p1: 1.0 };
        assert!(a.ticks().iter().all(|t| (3e-6..=1.1e-4).contains(t)) && a.ticks().len() >= 4);
    }
}
