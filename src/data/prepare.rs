//! From preference records to tokenized pairs: the pipeline behind `sdpo-run prepare` and
//! `train --data`.
//!
//! Everything that can be checked is checked before any tokenization: every file is read
//! and every record validated first, so a bad record anywhere fails in the first seconds
//! with its file and line. Pairs are then tokenized in parallel (rayon), truncated as TRL
//! truncates, and counted: nothing is dropped or cut without appearing in the `Summary`.
//!
//! What the model cannot take is refused after tokenization, naming the record: ids at or
//! above config.json's `vocab_size`, and sequences longer than its
//! `max_position_embeddings`. Long sequences are refused rather than cut by default:
//! cutting changes what is trained on, so it happens only when asked for with
//! `--max-length`, whose cut is TRL's to the token.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

use crate::data::progress::Progress;
use crate::data::records::{self, Fields, Loc, RawPair, Text};
use crate::data::tokenize::{truncate, PairIds, PairTokenizer, Truncated};
use crate::data::PairExample;
use crate::error::{Error, Result};

/// How records are read and tokenized; `#[command(flatten)]` it into a subcommand.
#[derive(clap::Args, Clone, Debug)]
pub struct DataOptions {
    /// Chat template (a Jinja file) to use instead of the model's.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// TRL's max_length: prompt+chosen and prompt+rejected keep their first N tokens;
    /// pairs whose prompt alone has N tokens or more are dropped. Default: no cut, and a
    /// pair longer than the model's max_position_embeddings is an error.
    #[arg(long, value_name = "N")]
    pub max_length: Option<usize>,
    /// Prompts keep their last N tokens (before --max-length applies).
    #[arg(long, value_name = "N")]
    pub max_prompt_length: Option<usize>,
    /// Record field holding the prompt (e.g. `question` for Orca-style pairs).
    #[arg(long, default_value = "prompt", value_name = "NAME")]
    pub prompt_field: String,
    #[arg(long, default_value = "chosen", value_name = "NAME")]
    pub chosen_field: String,
    #[arg(long, default_value = "rejected", value_name = "NAME")]
    pub rejected_field: String,
    /// Record field holding a system prompt: records become conversations
    /// [system, user: prompt] -> assistant: answer, rendered with the chat template.
    #[arg(long, value_name = "NAME")]
    pub system_field: Option<String>,
    /// Record field naming the pair's source (default: the file's stem).
    #[arg(long, default_value = "source", value_name = "NAME")]
    pub source_field: String,
}

impl Default for DataOptions {
    fn default() -> Self {
        let f = Fields::default();
        DataOptions {
            chat_template: None,
            max_length: None,
            max_prompt_length: None,
            prompt_field: f.prompt,
            chosen_field: f.chosen,
            rejected_field: f.rejected,
            system_field: f.system,
            source_field: f.source,
        }
    }
}

impl DataOptions {
    pub fn fields(&self) -> Fields {
        Fields {
            prompt: self.prompt_field.clone(),
            chosen: self.chosen_field.clone(),
            rejected: self.rejected_field.clone(),
            system: self.system_field.clone(),
            source: self.source_field.clone(),
        }
    }
}

/// Length distribution of one part of the kept pairs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lengths {
    pub total: u64,
    pub p50: usize,
    pub p90: usize,
    pub p99: usize,
    pub max: usize,
}

impl Lengths {
    fn of(mut v: Vec<usize>) -> Self {
        if v.is_empty() {
            return Lengths::default();
        }
        v.sort_unstable();
        // nearest rank
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Lengths {
            total: v.iter().map(|&x| x as u64).sum(),
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// What happened to the records.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Records read, per file.
    pub files: Vec<(PathBuf, usize)>,
    pub read: usize,
    pub kept: usize,
    /// Records that were already tokenized.
    pub pretokenized: usize,
    /// Dropped pairs by reason.
    pub dropped: BTreeMap<&'static str, usize>,
    /// Kept pairs that lost tokens to truncation.
    pub truncated: usize,
    /// Kept pairs whose tokenized prompt was not a prefix of prompt+completion: the
    /// completion starts where they diverge, as in TRL (which warns about it).
    pub boundary_moved: usize,
    /// Kept pairs whose chosen and rejected tokens are identical (TRL keeps them; their
    /// DPO loss is log 2 with zero gradient).
    pub identical: usize,
    pub prompt: Lengths,
    pub chosen: Lengths,
    pub rejected: Lengths,
    /// prompt + chosen + rejected: what a pair occupies in the shared layout.
    pub pair: Lengths,
    /// Files whose pairs' default source is not the file's stem, because another file has
    /// the same stem: (file, source).
    pub renamed_sources: Vec<(PathBuf, String)>,
    /// Plain-text records read while `--chat-template` was given: the template is not
    /// applied to them (TRL renders only conversational records with it).
    pub template_not_applied: usize,
}

pub const DROP_PROMPT_FILLS: &str = "prompt fills --max-length";
pub const DROP_EMPTY_PROMPT: &str = "empty prompt after tokenization";
pub const DROP_EMPTY_ANSWER: &str = "empty chosen or rejected after tokenization";

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (path, n) in &self.files {
            writeln!(f, "  {}: {n} records", path.display())?;
        }
        for (path, source) in &self.renamed_sources {
            writeln!(
                f,
                "  {}: default source `{source}` (another file has the same stem; records with a source field keep theirs)",
                path.display()
            )?;
        }
        if self.template_not_applied > 0 {
            writeln!(
                f,
                "note: --chat-template is not applied to the {} plain-text records: as in TRL, a chat template renders \
                 only conversational records (prompt/chosen/rejected as lists of {{role, content}} messages, or text \
                 with --system-field); plain text is tokenized as it is",
                self.template_not_applied
            )?;
        }
        let dropped: usize = self.dropped.values().sum();
        writeln!(
            f,
            "pairs read {}, kept {}, dropped {dropped} ({} were pre-tokenized)",
            self.read, self.kept, self.pretokenized
        )?;
        for (why, n) in &self.dropped {
            writeln!(f, "  dropped {n}: {why}")?;
        }
        writeln!(f, "truncated (kept, tokens cut) {}", self.truncated)?;
        writeln!(f, "chosen == rejected (kept) {}", self.identical)?;
        if self.boundary_moved > 0 {
            writeln!(
                f,
                "prompt not a token prefix of prompt+answer (kept; the answer starts where they diverge, as in TRL) {}",
                self.boundary_moved
            )?;
        }
        writeln!(f, "tokens: {:>12} {:>8} {:>8} {:>8} {:>8}", "total", "p50", "p90", "p99", "max")?;
        for (name, l) in
            [("prompt", &self.prompt), ("chosen", &self.chosen), ("rejected", &self.rejected), ("pair", &self.pair)]
        {
            writeln!(f, "  {name:<9}{:>10} {:>8} {:>8} {:>8} {:>8}", l.total, l.p50, l.p90, l.p99, l.max)?;
        }
        Ok(())
    }
}

/// One record after validation.
struct Item {
    file: usize,
    loc: Loc,
    pair: RawPair,
}

/// Reads, validates, tokenizes and truncates the records of `files` for the model in
/// `model_dir` (its tokenizer.json, tokenizer_config.json / chat template, and config.json's
/// vocab_size and max_position_embeddings); `progress`: progress lines on stderr for long
/// inputs (false for `--quiet`).
pub fn load_pairs(
    files: &[PathBuf],
    opts: &DataOptions,
    model_dir: &Path,
    progress: bool,
) -> Result<(Vec<PairExample>, Summary)> {
    if files.is_empty() {
        return Err(Error::invalid("no data files given"));
    }
    let fields = opts.fields();
    // A tokenizer.json that exists must load; a missing one is an error only if text needs it.
    let tokenizer = if model_dir.join("tokenizer.json").exists() {
        Some(PairTokenizer::load(model_dir, opts.chat_template.as_deref())?)
    } else {
        None
    };
    let limits = ModelLimits::read(model_dir)?;
    let vocab_size = limits.vocab_size.or(tokenizer.as_ref().map(|t| t.vocab_size));
    let mut summary = Summary::default();
    let sources = default_sources(files)?;
    for (path, source) in files.iter().zip(&sources) {
        if path.file_stem().map(|s| s.to_string_lossy()) != Some(source.as_str().into()) {
            summary.renamed_sources.push((path.clone(), source.clone()));
        }
    }

    // 1. Read and validate every record of every file.
    let mut items: Vec<Item> = Vec::new();
    for (fi, path) in files.iter().enumerate() {
        if path.extension().and_then(|e| e.to_str()).map(|e| e.eq_ignore_ascii_case("parquet")) == Some(true) {
            check_parquet_columns(path, &fields)?;
        }
        let records = records::read_records(path)?;
        if records.is_empty() {
            return Err(Error::file(path, "no records in this file"));
        }
        let stem = &sources[fi];
        let parsed: Vec<std::result::Result<Item, Error>> = records
            .par_iter()
            .map(|(loc, v)| {
                let vocab = if is_pretokenized(v) {
                    vocab_size.ok_or_else(|| {
                        loc.error(path, format!("pre-tokenized record, but {} has no config.json or tokenizer.json to check ids against", model_dir.display()))
                    })?
                } else {
                    usize::MAX
                };
                let pair = records::parse_pair(v, &fields, stem, vocab).map_err(|m| loc.error(path, m))?;
                Ok(Item { file: fi, loc: *loc, pair })
            })
            .collect();
        summary.files.push((path.clone(), records.len()));
        for p in parsed {
            items.push(p?);
        }
    }
    summary.read = items.len();
    let n_text = items.iter().filter(|i| matches!(i.pair, RawPair::Text(_))).count();
    summary.pretokenized = items.len() - n_text;
    if opts.chat_template.is_some() {
        summary.template_not_applied =
            items.iter().filter(|i| matches!(&i.pair, RawPair::Text(t) if matches!(t.prompt, Text::Plain(_)))).count();
    }
    let tokenizer = match (&tokenizer, n_text) {
        (_, 0) => None,
        (Some(t), _) => Some(t),
        (None, _) => {
            return Err(Error::file(
                model_dir.join("tokenizer.json"),
                "missing: text records need the model's tokenizer.json (or give pre-tokenized data)",
            ))
        }
    };

    // 2. Tokenize in parallel.
    let bar = Progress::new("tokenizing", "pairs", n_text, progress);
    let tokenized: Vec<std::result::Result<(PairIds, String, usize, Loc), Error>> = items
        .into_par_iter()
        .map(|it| {
            let path = &files[it.file];
            let (ids, source) = match it.pair {
                RawPair::Ids(p) => (
                    PairIds { prompt: p.prompt, chosen: p.chosen, rejected: p.rejected, prompt_tail_dropped: 0 },
                    p.source,
                ),
                RawPair::Text(t) => {
                    let ids = tokenizer.expect("checked above").tokenize(&t).map_err(|m| it.loc.error(path, m))?;
                    bar.add(1);
                    if let Some(v) = limits.vocab_size {
                        check_vocab(&ids, v, tokenizer.expect("checked above"))
                            .map_err(|m| it.loc.error(path, format!("{m} ({})", limits.config.display())))?;
                    }
                    (ids, t.source)
                }
            };
            Ok((ids, source, it.file, it.loc))
        })
        .collect();
    bar.finish();

    // 3. Truncate, drop what cannot train, count.
    let mut pairs = Vec::with_capacity(tokenized.len());
    let mut too_long: Vec<(usize, Loc, &'static str, usize)> = Vec::new();
    for r in tokenized {
        let (mut ids, source, file, loc) = r?;
        let reason = match truncate(&mut ids, opts.max_length, opts.max_prompt_length) {
            Truncated::PromptFills => Some(DROP_PROMPT_FILLS),
            _ if ids.prompt.is_empty() => Some(DROP_EMPTY_PROMPT),
            _ if ids.chosen.is_empty() || ids.rejected.is_empty() => Some(DROP_EMPTY_ANSWER),
            Truncated::Cut => {
                summary.truncated += 1;
                None
            }
            Truncated::No => None,
        };
        if let Some(why) = reason {
            *summary.dropped.entry(why).or_default() += 1;
            continue;
        }
        if let Some(max_pos) = limits.max_position_embeddings {
            let (what, len) = if ids.chosen.len() >= ids.rejected.len() {
                ("prompt + chosen", ids.prompt.len() + ids.chosen.len())
            } else {
                ("prompt + rejected", ids.prompt.len() + ids.rejected.len())
            };
            if len > max_pos {
                too_long.push((file, loc, what, len));
                continue;
            }
        }
        if ids.chosen == ids.rejected {
            summary.identical += 1;
        }
        if ids.prompt_tail_dropped > 0 {
            summary.boundary_moved += 1;
        }
        pairs.push(PairExample { prompt: ids.prompt, chosen: ids.chosen, rejected: ids.rejected, source });
    }
    if let Some(&(file, loc, what, len)) = too_long.first() {
        let max_pos = limits.max_position_embeddings.expect("set when a pair is too long");
        let advice = match opts.max_length {
            Some(ml) => format!("--max-length {ml} is above it: pass --max-length {max_pos} (or less)"),
            None => format!(
                "pass --max-length {max_pos} to keep the first {max_pos} tokens of each sequence (TRL's max_length \
                 truncation; pairs whose prompt alone fills it are dropped), or shorten these records"
            ),
        };
        return Err(loc.error(
            &files[file],
            format!(
                "{what} is {len} tokens, more than the model's max_position_embeddings ({max_pos}, in {}); {} of the \
                 {} pairs are longer than that. {advice}",
                limits.config.display(),
                too_long.len(),
                summary.read
            ),
        ));
    }
    summary.kept = pairs.len();
    summary.prompt = Lengths::of(pairs.iter().map(|p| p.prompt.len()).collect());
    summary.chosen = Lengths::of(pairs.iter().map(|p| p.chosen.len()).collect());
    summary.rejected = Lengths::of(pairs.iter().map(|p| p.rejected.len()).collect());
    summary.pair = Lengths::of(pairs.iter().map(|p| p.shared_len()).collect());
    Ok((pairs, summary))
}

/// An id the tokenizer produced that the model has no embedding for: the tokenizer and
/// config.json belong to different models, or tokens were added to the tokenizer without
/// resizing the model. The engines refuse such ids, so `prepare` refuses them too.
fn check_vocab(ids: &PairIds, vocab_size: usize, tok: &PairTokenizer) -> std::result::Result<(), String> {
    for (part, v) in [("prompt", &ids.prompt), ("chosen", &ids.chosen), ("rejected", &ids.rejected)] {
        if let Some(&id) = v.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(format!(
                "the tokenizer gives the {part} the id {id} ({}), outside the model's vocabulary (vocab_size \
                 {vocab_size}); tokenizer.json and config.json are from different models, or tokens were added to the \
                 tokenizer without resizing the model's embeddings",
                tok.token_name(id)
            ));
        }
    }
    Ok(())
}

/// The default source of each file's pairs: its stem, or where two files share a stem
/// (`a/train.jsonl`, `b/train.jsonl`), the shortest path ending that tells them apart
/// (`a/train`, `b/train`), so pairs of different files never merge into one source.
pub fn default_sources(files: &[PathBuf]) -> Result<Vec<String>> {
    let parts = |p: &Path, k: usize, ext: bool| -> Option<String> {
        let comps: Vec<String> = p.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        if k > comps.len() {
            return None;
        }
        let last = if ext {
            p.file_name()?.to_string_lossy().into_owned()
        } else {
            p.file_stem()?.to_string_lossy().into_owned()
        };
        let mut v = comps[comps.len() - k..comps.len() - 1].to_vec();
        v.push(last);
        Some(v.join("/"))
    };
    let mut out: Vec<String> = files.iter().map(|p| parts(p, 1, false).unwrap_or_default()).collect();
    let stems = out.clone();
    for (i, stem) in stems.iter().enumerate() {
        let group: Vec<usize> = (0..files.len()).filter(|&j| &stems[j] == stem).collect();
        if group.len() < 2 || group[0] != i {
            continue;
        }
        let depth = group.iter().map(|&j| files[j].components().count()).max().unwrap_or(1);
        let names = (1..=depth)
            .flat_map(|k| [(k, false), (k, true)])
            .map(|(k, ext)| group.iter().map(|&j| parts(&files[j], k, ext)).collect::<Option<Vec<String>>>())
            .find(|names| {
                names.as_ref().is_some_and(|n| n.iter().collect::<std::collections::HashSet<_>>().len() == n.len())
            })
            .flatten();
        let Some(names) = names else {
            return Err(Error::file(
                &files[group[1]],
                "given twice in --data: each file's pairs would be read twice; name each file once",
            ));
        };
        for (&j, n) in group.iter().zip(names) {
            out[j] = n;
        }
    }
    Ok(out)
}

/// What config.json says about the sequences the model takes, if the file exists.
struct ModelLimits {
    config: PathBuf,
    vocab_size: Option<usize>,
    max_position_embeddings: Option<usize>,
}

impl ModelLimits {
    fn read(model_dir: &Path) -> Result<Self> {
        let config = model_dir.join("config.json");
        let mut limits = ModelLimits { config: config.clone(), vocab_size: None, max_position_embeddings: None };
        if !config.exists() {
            return Ok(limits);
        }
        let text = std::fs::read_to_string(&config).map_err(|e| Error::io(&config, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::file(&config, format!("malformed JSON: {e}")))?;
        let field = |name: &str| -> Result<Option<usize>> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(n) => n
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| Error::file(&config, format!("`{name}` must be a positive integer"))),
            }
        };
        limits.vocab_size = field("vocab_size")?;
        // Absent, it is LlamaConfig's default, as the engines read it.
        limits.max_position_embeddings =
            Some(field("max_position_embeddings")?.unwrap_or(crate::config::DEFAULT_MAX_POSITION_EMBEDDINGS));
        Ok(limits)
    }
}

fn is_pretokenized(v: &Value) -> bool {
    v.as_object()
        .is_some_and(|o| o.contains_key("prompt_ids") || o.contains_key("chosen_ids") || o.contains_key("rejected_ids"))
}

/// A parquet file must have the columns of some record format.
fn check_parquet_columns(path: &Path, f: &Fields) -> Result<()> {
    let cols = records::parquet_columns(path)?;
    let has = |c: &str| cols.iter().any(|x| x == c);
    if has("prompt_ids") || has("chosen_ids") {
        for c in ["prompt_ids", "chosen_ids", "rejected_ids"] {
            if !has(c) {
                return Err(Error::file(
                    path,
                    format!("pre-tokenized columns need `{c}`; the file has: {}", cols.join(", ")),
                ));
            }
        }
        return Ok(());
    }
    let mut need = vec![(&f.chosen, "chosen"), (&f.rejected, "rejected")];
    if let Some(s) = &f.system {
        need.push((s, "system"));
    }
    // Only the default prompt field may be absent (implicit prompts).
    if f.system.is_some() || f.prompt != "prompt" {
        need.push((&f.prompt, "prompt"));
    }
    for (c, flag) in need {
        if !has(c) {
            return Err(Error::file(
                path,
                format!("no column `{c}`; the file has: {}. Map another column with --{flag}-field", cols.join(", ")),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let l = Lengths::of((1..=100).collect());
        assert_eq!((l.total, l.p50, l.p90, l.p99, l.max), (5050, 50, 90, 99, 100));
        let l = Lengths::of(vec![7]);
        assert_eq!((l.p50, l.p99, l.max), (7, 7, 7));
    }
}
