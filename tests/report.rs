//! The report page and the TensorBoard events of real (tiny) runs: every curve and bar of
//! the page turns back into the numbers of metrics.jsonl, the page is well-formed and
//! refers to nothing outside itself, and the event files hold one event per metrics line
//! with the same scalars.

use std::path::{Path, PathBuf};

use sdpo::demo::demo_data;
use sdpo::engine::cpu::CpuEngine;
use sdpo::engine::Engine;
use sdpo::partition::PartitionKind;
use sdpo::report::{load_runs, render, RunData};
use sdpo::sdpo::{run, ReferenceMode, SdpoOptions};
use sdpo::tensorboard::{event_files, read_events};
use sdpo::train::{Schedule, TrainOptions};
use sdpo::{AdamWConfig, LlamaConfig, LlamaWeights, LossConfig};
use serde_json::{Map, Value};

fn tiny_cfg() -> LlamaConfig {
    LlamaConfig::from_json(serde_json::json!({
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
        "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2
    }))
    .unwrap()
}

fn cpu(c: &LlamaConfig, w: LlamaWeights, adapter: Option<sdpo::lora::Adapter>) -> sdpo::Result<Box<dyn Engine>> {
    assert!(adapter.is_none(), "these runs train the whole model");
    Ok(Box::new(CpuEngine::new(c.clone(), w)?))
}

/// A tiny run into `out`: `steps` sDPO steps of random chunks, with TensorBoard events.
fn tiny_run(out: &Path, steps: usize, lr: f64) {
    let cfg = tiny_cfg();
    let d = demo_data(1, 16, 6, 0);
    let train = TrainOptions {
        loss: LossConfig::default(),
        adamw: AdamWConfig::default(),
        lr,
        warmup_ratio: 0.1,
        schedule: Schedule::Linear,
        epochs: 2,
        batch_pairs: 8,
        micro_batch_tokens: 60,
        layout: sdpo::Layout::Shared,
        seed: 5,
    };
    let opts = SdpoOptions {
        train,
        partition: PartitionKind::Random,
        steps: Some(steps),
        length_normalize: false,
        reference: ReferenceMode::Precomputed,
        carry_optimizer: false,
        carry_schedule: false,
        save_every: 0,
        out: out.to_path_buf(),
        resume: false,
        tokenizer_from: None,
        quiet: true,
        tensorboard: true,
        lora: None,
    };
    run(&opts, &cfg, LlamaWeights::random(&cfg, 3), &d.train, &d.eval, &cpu).unwrap();
    std::fs::write(out.join("run.toml"), "lr = 0.01\n# a <note> & more\n").unwrap();
}

fn metrics(dir: &Path) -> Vec<Map<String, Value>> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap().as_object().unwrap().clone()).collect()
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!(" {name}=\"");
    let i = tag.find(&pat)? + pat.len();
    Some(&tag[i..i + tag[i..].find('"')?])
}

/// An axis as a plot states it: value range, then the pixel range it spans.
struct Axis([f64; 4]);

impl Axis {
    fn parse(s: &str) -> Axis {
        let v: Vec<f64> = s.split(' ').map(|x| x.parse().unwrap()).collect();
        Axis([v[0], v[1], v[2], v[3]])
    }
    fn value(&self, px: f64) -> f64 {
        let [lo, hi, p0, p1] = self.0;
        lo + (px - p0) / (p1 - p0) * (hi - lo)
    }
    /// What 0.006 px (coordinates are written to 0.01 px) is worth in values.
    fn tolerance(&self) -> f64 {
        let [lo, hi, p0, p1] = self.0;
        0.006 * (hi - lo).abs() / (p1 - p0).abs()
    }
}

/// Each plot of the page: its axes and the tags inside it.
fn plots(page: &str) -> Vec<(Axis, Axis, Vec<&str>)> {
    let mut out = Vec::new();
    for part in page.split("<g class=\"plot\"").skip(1) {
        let head = &part[..part.find('>').unwrap()];
        let (x, y) = (Axis::parse(attr(head, "data-x").unwrap()), Axis::parse(attr(head, "data-y").unwrap()));
        let body = &part[..part.find("</g>").unwrap()];
        let tags = body.split('<').skip(1).map(|t| &t[..t.find('>').unwrap()]).collect();
        out.push((x, y, tags));
    }
    out
}

/// Every polyline's points turned back into (update, value), checked against the
/// metrics.jsonl series of its run and key; returns how many lines were checked per run.
fn check_curves(page: &str, runs: &[Vec<Map<String, Value>>]) -> Vec<usize> {
    let mut checked = vec![0; runs.len()];
    for (x, y, tags) in plots(page) {
        for tag in tags.iter().filter(|t| t.starts_with("polyline ")) {
            let r: usize = attr(tag, "data-run").unwrap().parse().unwrap();
            let key = attr(tag, "data-key").unwrap();
            let want: Vec<(f64, f64)> = runs[r]
                .iter()
                .filter_map(|l| Some((l.get("train/global_step")?.as_f64()?, l.get(key)?.as_f64()?)))
                .collect();
            let got: Vec<(f64, f64)> = attr(tag, "points")
                .unwrap()
                .split(' ')
                .map(|p| {
                    let (px, py) = p.split_once(',').unwrap();
                    (x.value(px.parse().unwrap()), y.value(py.parse().unwrap()))
                })
                .collect();
            assert_eq!(got.len(), want.len(), "run {r} {key}: one point per update");
            for ((gx, gy), (wx, wy)) in got.iter().zip(&want) {
                assert!((gx - wx).abs() <= x.tolerance(), "run {r} {key}: update {gx} vs {wx}");
                assert!((gy - wy).abs() <= y.tolerance(), "run {r} {key} at update {wx}: {gy} vs {wy}");
            }
            checked[r] += 1;
        }
    }
    checked
}

/// The mean-γ bars turned back into values, against the eval lines.
fn check_gamma_bars(page: &str, runs: &[Vec<Map<String, Value>>]) {
    let mut bars = 0;
    for (_, y, tags) in plots(page) {
        for tag in tags.iter().filter(|t| t.starts_with("rect class=\"bar\"")) {
            let r: usize = attr(tag, "data-run").unwrap().parse().unwrap();
            let t: u64 = attr(tag, "data-step").unwrap().parse().unwrap();
            let want = runs[r]
                .iter()
                .find(|l| l.contains_key("eval/mean_gamma") && l["sdpo/step"].as_u64() == Some(t))
                .unwrap()["eval/mean_gamma"]
                .as_f64()
                .unwrap();
            let top: f64 = attr(tag, "y").unwrap().parse().unwrap();
            let height: f64 = attr(tag, "height").unwrap().parse().unwrap();
            // The bar spans from zero to the value: the end away from zero is the value.
            let (a, b) = (y.value(top), y.value(top + height));
            let got = if a.abs() > b.abs() { a } else { b };
            assert!((got - want).abs() <= 2.0 * y.tolerance(), "run {r} M_{t}: bar {got} vs mean γ {want}");
            bars += 1;
        }
    }
    let evals: usize = runs.iter().map(|l| l.iter().filter(|l| l.contains_key("eval/mean_gamma")).count()).sum();
    assert_eq!(bars, evals, "one bar per evaluated model");
}

/// The page parses as XML: tags nest and close, attributes are quoted, text is escaped.
fn check_well_formed(page: &str) {
    fn check_text(s: &str) {
        let mut rest = s;
        while let Some(i) = rest.find('&') {
            let end = rest[i..].find(';').expect("an entity ends with ;") + i;
            let name = &rest[i + 1..end];
            assert!(["amp", "lt", "gt", "quot", "#39"].contains(&name), "unknown entity &{name};");
            rest = &rest[end + 1..];
        }
        assert!(!s.contains('>'), "a bare > in text: {s}");
    }
    let mut rest = page.strip_prefix("<!DOCTYPE html>").expect("a doctype first");
    let mut open: Vec<&str> = Vec::new();
    while let Some(lt) = rest.find('<') {
        check_text(&rest[..lt]);
        let gt = rest[lt..].find('>').unwrap() + lt;
        let tag = &rest[lt + 1..gt];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(open.pop(), Some(name), "closing tag </{name}>");
        } else {
            let body = tag.strip_suffix('/').unwrap_or(tag);
            let (name, mut attrs) = body.split_once(' ').unwrap_or((body, ""));
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric()), "tag name {name}");
            while !attrs.trim().is_empty() {
                let (key, after) = attrs.trim_start().split_once("=\"").expect("attributes are key=\"value\"");
                assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "attribute {key}");
                let end = after.find('"').unwrap();
                check_text(&after[..end]);
                assert!(!after[..end].contains('<'));
                attrs = &after[end + 1..];
            }
            if !tag.ends_with('/') {
                open.push(name);
            }
        }
        rest = &rest[gt + 1..];
    }
    check_text(rest);
    assert!(open.is_empty(), "unclosed: {open:?}");
}

fn check_self_contained(page: &str) {
    for bad in ["http", "src=", "href=", "url(", "@import", "<script", "<link", "<img", "<iframe"] {
        assert!(!page.contains(bad), "the page holds {bad:?}: it must need nothing outside itself");
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sdpo-report-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn the_page_draws_the_numbers_of_metrics_jsonl_and_needs_nothing_else() {
    let root = tmp("page");
    let (a, b) = (root.join("sdpo"), root.join("dpo"));
    tiny_run(&a, 3, 1e-2);
    tiny_run(&b, 1, 5e-3);
    let lines = [metrics(&a), metrics(&b)];

    // One run (what train writes into its folder): six charts of its curves.
    let page = std::fs::read_to_string(sdpo::report::write_for_run(&a).unwrap()).unwrap();
    check_well_formed(&page);
    check_self_contained(&page);
    assert_eq!(check_curves(&page, &lines[..1]), [7], "loss, accuracy, margin, 2 log-probs, grad norm, lr");
    check_gamma_bars(&page, &lines[..1]);
    assert!(page.contains("# a &lt;note&gt; &amp; more"), "run.toml is shown, escaped");

    // Two runs: overlaid, then each alone.
    let runs = load_runs(&[a.clone(), b.clone()]).unwrap();
    let page = render(&runs);
    check_well_formed(&page);
    check_self_contained(&page);
    assert_eq!(check_curves(&page, &lines), [14, 14]);
    check_gamma_bars(&page, &lines);

    // Step boundaries: between the last update of one step and the first of the next.
    let updates: Vec<(u64, f64)> = lines[0]
        .iter()
        .filter_map(|l| Some((l["sdpo/step"].as_u64()?, l.get("train/global_step")?.as_f64()?)))
        .collect();
    let firsts: Vec<(f64, f64)> = updates.windows(2).filter(|w| w[0].0 != w[1].0).map(|w| (w[0].1, w[1].1)).collect();
    assert_eq!(firsts.len(), 2, "three steps, two boundaries");
    let (x, _, tags) = &plots(&page)[0];
    let drawn: Vec<f64> = tags
        .iter()
        .filter(|t| t.starts_with("line class=\"boundary\" data-run=\"0\""))
        .map(|t| x.value(attr(t, "x1").unwrap().parse().unwrap()))
        .collect();
    assert_eq!(drawn.len(), 2);
    for (d, (last, first)) in drawn.iter().zip(&firsts) {
        assert!(
            last < d && d < first,
            "boundary at {d}: the step before ends at update {last}, the next begins at {first}"
        );
    }

    // The eval table has every evaluated model's mean γ.
    for l in lines[0].iter().filter(|l| l.contains_key("eval/mean_gamma")) {
        let g = sdpo::report::fmt_num(l["eval/mean_gamma"].as_f64().unwrap());
        assert!(page.contains(&format!("<td>{g}</td>")), "mean γ {g} in the eval table");
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn event_files_hold_one_event_per_metrics_line_with_its_numbers() {
    let root = tmp("events");
    tiny_run(&root, 2, 1e-2);
    let lines = metrics(&root);
    let files = event_files(&root.join("tensorboard")).unwrap();
    assert_eq!(files.len(), 1);
    let events = read_events(&files[0]).unwrap();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert_eq!(events.len(), lines.len() + 1, "the file version, then one event per line");
    let mut step = 0;
    for (e, l) in events[1..].iter().zip(&lines) {
        if let Some(s) = l.get("train/global_step") {
            step = s.as_i64().unwrap();
        }
        assert_eq!(e.step, step);
        let want: Vec<(&String, f64)> = l.iter().filter_map(|(k, v)| Some((k, v.as_f64()?))).collect();
        assert_eq!(e.scalars.len(), want.len(), "{:?} vs {want:?}", e.scalars);
        for ((tag, x), (key, w)) in e.scalars.iter().zip(&want) {
            // float32 of the logged number; the JSON parse may sit one f64 ulp away.
            assert!(tag == *key && (f64::from(*x) - w).abs() <= w.abs() * 2f64.powi(-23), "{tag} {x} vs {key} {w}");
        }
        assert!(e.scalars.iter().all(|(k, _)| k != "sdpo/chunk"), "strings are not scalars");
    }
    assert!(events[1..].iter().any(|e| e.scalars.iter().any(|(k, _)| k == "train/grad_norm")));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_folder_without_metrics_is_named_in_the_error() {
    let root = tmp("empty");
    std::fs::create_dir_all(&root).unwrap();
    let err = RunData::load(&root).err().unwrap().to_string();
    assert!(err.contains("metrics.jsonl") && err.contains("sdpo-run train"), "{err}");
    std::fs::write(root.join("metrics.jsonl"), "{\"loss\": 1}\nnot json\n").unwrap();
    let err = RunData::load(&root).err().unwrap().to_string();
    assert!(err.contains("metrics.jsonl:2"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}
