//! Tokenizing a preference pair exactly as TRL 1.16's `DPOTrainer` does.
//!
//! The tokenizer is the model directory's `tokenizer.json` (the `tokenizers` library, as
//! transformers' fast tokenizers use it: transformers 5 keeps tokenizer.json's
//! post-processor and ignores `add_bos_token` when that file exists), with the named
//! special tokens of `tokenizer_config.json` (or the legacy `special_tokens_map.json`).
//! The pad token defaults to the EOS token, as `DPOTrainer.__init__` sets it.
//!
//! Per pair (`DPOTrainer._prepare_dataset`):
//! - text: EOS text is appended to `chosen` and `rejected` unless they end with it; then
//!   `prompt`, `prompt + chosen` and `prompt + rejected` are tokenized with the special
//!   tokens of the post-processor (a BOS for Llama);
//! - conversations: the chat template renders `prompt` with `add_generation_prompt=True`,
//!   and `prompt + chosen`, `prompt + rejected` without it; each text is tokenized with
//!   no special tokens added (the template writes them);
//! - the completion starts where the tokenized prompt and the tokenized prompt+completion
//!   first differ, taking the smaller of the two (chosen, rejected) common prefixes; the
//!   prompt keeps that many tokens. This is exact at the token level even when a template
//!   renders the prompt differently alone or tokens merge across the boundary.
//!
//! Speed: the tokenizers pipeline cuts its input at added (special) tokens first and
//! tokenizes the pieces independently. So when the rendered prompt and prompt+answer share
//! text up to the end of such a token, that shared head is tokenized once and only the
//! tails are tokenized per answer. This is used only where it is exact: tokens that no
//! other added token contains or overlaps, that do not strip or check their right side,
//! and pre-tokenizers that do not depend on the absolute position (Metaspace with
//! `prepend_scheme: first` does, and turns this off).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::data::records::{Text, TextPair};
use crate::data::template::ChatTemplate;
use crate::error::{Error, Result};

/// The names of the special tokens transformers passes to chat templates.
const SPECIAL_NAMES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A model's tokenizer and chat template, ready to tokenize pairs.
pub struct PairTokenizer {
    tokenizer: tokenizers::Tokenizer,
    template: Option<ChatTemplate>,
    /// Where the template came from, for error messages.
    template_path: PathBuf,
    eos_token: Option<String>,
    /// Added tokens after which a text can be cut and tokenized in two pieces with the
    /// same result, grouped by first byte; empty when that does not hold.
    split_tokens: Vec<Vec<String>>,
    /// The model maps a pre-tokenized piece to the same ids every time (no BPE dropout), so
    /// piece -> ids can be cached.
    deterministic_model: bool,
    /// Identifies this tokenizer in the per-thread piece cache.
    id: u64,
    /// Tokens in the vocabulary, added tokens included.
    pub vocab_size: usize,
}

/// Token ids of one pair, split at TRL's prompt/completion boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairIds {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    /// Tokens at the end of the tokenized prompt that are not in prompt+completion (TRL
    /// warns about these: the template renders the prompt differently alone, or tokens
    /// merge across the boundary). They are left out, as TRL leaves them out.
    pub prompt_tail_dropped: usize,
}

impl PairTokenizer {
    /// Loads `model_dir/tokenizer.json`, `tokenizer_config.json` and the chat template
    /// (`chat_template` if given, else `chat_template.jinja`, else the config's
    /// `chat_template`).
    pub fn load(model_dir: &Path, chat_template: Option<&Path>) -> Result<Self> {
        let tok_path = model_dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::file(
                &tok_path,
                "missing: the model directory needs the fast tokenizer's tokenizer.json (save it with \
                 `AutoTokenizer.from_pretrained(...).save_pretrained(dir)`), or give pre-tokenized data",
            ));
        }
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| {
            Error::file(&tok_path, format!("not a valid tokenizer.json ({e}); re-download or re-save the tokenizer"))
        })?;

        let cfg_path = model_dir.join("tokenizer_config.json");
        let config: serde_json::Map<String, Value> = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            match serde_json::from_str(&text) {
                Ok(Value::Object(m)) => m,
                Ok(_) => return Err(Error::file(&cfg_path, "expected a JSON object")),
                Err(e) => return Err(Error::file(&cfg_path, format!("malformed JSON: {e}"))),
            }
        } else {
            serde_json::Map::new()
        };

        // Named special tokens: the config, overridden by the legacy special_tokens_map.json
        // when the config has no added_tokens_decoder (as transformers 5 reads them).
        let mut special: Vec<(String, String)> = Vec::new();
        let mut set = |name: &str, v: &Value| {
            if let Some(content) = token_content(v) {
                special.retain(|(k, _)| k != name);
                special.push((name.to_string(), content));
            }
        };
        for name in SPECIAL_NAMES {
            if let Some(v) = config.get(name) {
                set(name, v);
            }
        }
        let map_path = model_dir.join("special_tokens_map.json");
        if !config.contains_key("added_tokens_decoder") && map_path.exists() {
            let text = std::fs::read_to_string(&map_path).map_err(|e| Error::io(&map_path, e))?;
            let map: Value =
                serde_json::from_str(&text).map_err(|e| Error::file(&map_path, format!("malformed JSON: {e}")))?;
            for name in SPECIAL_NAMES {
                if let Some(v) = map.get(name) {
                    set(name, v);
                }
            }
        }
        let get =
            |special: &[(String, String)], name: &str| special.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let eos_token = get(&special, "eos_token");
        if get(&special, "pad_token").is_none() {
            if let Some(eos) = &eos_token {
                special.push(("pad_token".into(), eos.clone()));
            }
        }
        // transformers adds named special tokens missing from the vocabulary.
        let missing: Vec<tokenizers::AddedToken> = special
            .iter()
            .filter(|(_, t)| tokenizer.token_to_id(t).is_none())
            .map(|(_, t)| tokenizers::AddedToken::from(t.clone(), true))
            .collect();
        if !missing.is_empty() {
            tokenizer
                .add_special_tokens(missing)
                .map_err(|e| Error::file(&tok_path, format!("cannot add the special tokens of the config: {e}")))?;
        }

        let jinja_path = model_dir.join("chat_template.jinja");
        let (template_src, template_path) = if let Some(p) = chat_template {
            (Some(std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?), p.to_path_buf())
        } else if jinja_path.exists() {
            (Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?), jinja_path)
        } else {
            (config_template(&config).map_err(|m| Error::file(&cfg_path, m))?, cfg_path.clone())
        };
        let template = match template_src {
            Some(src) => Some(
                ChatTemplate::new(&src, &special)
                    .map_err(|m| Error::file(&template_path, format!("the chat template does not compile: {m}")))?,
            ),
            None => None,
        };
        let vocab_size = tokenizer.get_vocab_size(true);
        let split_tokens = composable_split_tokens(&tokenizer);
        // transformers tokenizes with truncation and padding off (DO_NOT_TRUNCATE, DO_NOT_PAD),
        // whatever tokenizer.json says.
        tokenizer.with_truncation(None).map_err(|e| Error::file(&tok_path, e.to_string()))?;
        tokenizer.with_padding(None);
        let deterministic_model = serde_json::to_value(tokenizer.get_model())
            .map(|m| m.get("dropout").is_none_or(Value::is_null))
            .unwrap_or(false);
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(PairTokenizer {
            tokenizer,
            template,
            template_path,
            eos_token,
            split_tokens,
            deterministic_model,
            id,
            vocab_size,
        })
    }

    /// Whether rendered conversations are tokenized in pieces cut after special tokens
    /// (the shared head once); see the module comment.
    pub fn splits_at_special_tokens(&self) -> bool {
        !self.split_tokens.is_empty()
    }

    /// The token's text for messages, e.g. `` `<|im_start|>` ``, or "no token" when the id
    /// is not in the vocabulary.
    pub fn token_name(&self, id: u32) -> String {
        match self.tokenizer.id_to_token(id) {
            Some(t) => format!("`{t}`"),
            None => "no token of the tokenizer".into(),
        }
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Tokenizes one pair as TRL does. The error names what failed (the template's own
    /// message included); the caller adds file and line.
    pub fn tokenize(&self, pair: &TextPair) -> std::result::Result<PairIds, String> {
        let (p, pc, pr) = match (&pair.prompt, &pair.chosen, &pair.rejected) {
            (Text::Plain(p), Text::Plain(c), Text::Plain(r)) => {
                let eos = self.eos_token.as_deref().ok_or(
                    "text records need the tokenizer's eos_token (TRL appends it to the answers), \
                     and tokenizer_config.json has none",
                )?;
                let with_eos = |s: &str| if s.ends_with(eos) { format!("{p}{s}") } else { format!("{p}{s}{eos}") };
                (self.encode(p, true)?, self.encode(&with_eos(c), true)?, self.encode(&with_eos(r), true)?)
            }
            (Text::Chat(p), Text::Chat(c), Text::Chat(r)) => {
                let t = self.template.as_ref().ok_or_else(|| {
                    format!(
                        "conversational records need a chat template and {} has none: pass --chat-template FILE",
                        self.template_path.display()
                    )
                })?;
                let tools = pair.tools.as_ref();
                let render = |answer: &[Value]| -> std::result::Result<String, String> {
                    let mut conv = p.clone();
                    conv.extend_from_slice(answer);
                    t.render(&conv, tools, false)
                };
                let err = |what: &str, e: String| {
                    format!("the chat template ({}) failed on the {what}: {e}", self.template_path.display())
                };
                let prompt_text = t.render(p, tools, true).map_err(|e| err("prompt", e))?;
                let chosen_text = render(c).map_err(|e| err("prompt + chosen", e))?;
                let rejected_text = render(r).map_err(|e| err("prompt + rejected", e))?;
                self.encode_three(&prompt_text, &chosen_text, &rejected_text)?
            }
            _ => return Err("prompt, chosen and rejected mix text and conversations".into()),
        };
        let n = common_prefix(&p, &pc).min(common_prefix(&p, &pr));
        let mut prompt = p;
        let prompt_tail_dropped = prompt.len() - n;
        prompt.truncate(n);
        Ok(PairIds { prompt, chosen: pc[n..].to_vec(), rejected: pr[n..].to_vec(), prompt_tail_dropped })
    }

    /// `encode(p)`, `encode(pc)`, `encode(pr)` without special tokens, tokenizing the head
    /// the three texts share (up to the end of a split token) once.
    fn encode_three(&self, p: &str, pc: &str, pr: &str) -> std::result::Result<ThreeIds, String> {
        let shared = common_prefix_bytes(p, pc).min(common_prefix_bytes(p, pr));
        let cut = self.last_split_end(&p[..shared]);
        if cut == 0 {
            return Ok((self.encode(p, false)?, self.encode(pc, false)?, self.encode(pr, false)?));
        }
        let head = self.encode(&p[..cut], false)?;
        let join = |tail: &str| -> std::result::Result<Vec<u32>, String> {
            let mut ids = head.clone();
            ids.extend(self.encode(tail, false)?);
            Ok(ids)
        };
        Ok((join(&p[cut..])?, join(&pc[cut..])?, join(&pr[cut..])?))
    }

    /// End of the last occurrence of a split token in `s` (0 if none).
    fn last_split_end(&self, s: &str) -> usize {
        if self.split_tokens.is_empty() {
            return 0;
        }
        let bytes = s.as_bytes();
        for i in (0..bytes.len()).rev() {
            for tok in &self.split_tokens[bytes[i] as usize] {
                if bytes[i..].starts_with(tok.as_bytes()) {
                    return i + tok.len();
                }
            }
        }
        0
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> std::result::Result<Vec<u32>, String> {
        if !add_special_tokens && self.deterministic_model {
            return self.encode_cached(text);
        }
        let enc = self.tokenizer.encode_fast(text, add_special_tokens).map_err(|e| format!("tokenizer failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }
}

/// Ids of prompt, prompt+chosen, prompt+rejected.
type ThreeIds = (Vec<u32>, Vec<u32>, Vec<u32>);

/// Piece -> ids, per thread, for the tokenizer with the given id.
type PieceCache = std::cell::RefCell<(u64, std::collections::HashMap<String, Vec<u32>>)>;

thread_local! {
    static PIECES: PieceCache = std::cell::RefCell::new((0, std::collections::HashMap::new()));
}

/// Pieces cached per thread; beyond this the cache starts over (bounded memory).
const PIECE_CACHE_MAX: usize = 1 << 18;

impl PairTokenizer {
    /// The tokenizers pipeline without post-processing (`add_special_tokens=False`):
    /// split at added tokens and normalize, pre-tokenize, then the model on each piece —
    /// with the model's ids for a piece cached. Same ids as `encode_fast(text, false)`
    /// (truncation and padding are off), without building an `Encoding` with a string per
    /// token.
    fn encode_cached(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        use tokenizers::{Model, OffsetReferential, OffsetType, PreTokenizer};
        let tok = &self.tokenizer;
        let mut pre = tok.get_added_vocabulary().extract_and_normalize(tok.get_normalizer(), text);
        if let Some(p) = tok.get_pre_tokenizer() {
            p.pre_tokenize(&mut pre).map_err(|e| format!("tokenizer failed: {e}"))?;
        }
        let mut ids = Vec::with_capacity(text.len() / 3);
        PIECES.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.0 != self.id || cache.1.len() > PIECE_CACHE_MAX {
                *cache = (self.id, std::collections::HashMap::new());
            }
            for (piece, _, tokens) in pre.get_splits(OffsetReferential::Original, OffsetType::None) {
                if let Some(t) = tokens {
                    ids.extend(t.iter().map(|t| t.id));
                } else if let Some(v) = cache.1.get(piece) {
                    ids.extend_from_slice(v);
                } else {
                    let t = tok.get_model().tokenize(piece).map_err(|e| format!("tokenizer failed: {e}"))?;
                    let v: Vec<u32> = t.iter().map(|t| t.id).collect();
                    ids.extend_from_slice(&v);
                    cache.1.insert(piece.to_string(), v);
                }
            }
            Ok(ids)
        })
    }
}

/// Length in bytes of the common prefix of two strings, at a character boundary.
fn common_prefix_bytes(a: &str, b: &str) -> usize {
    let mut n = a.as_bytes().iter().zip(b.as_bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    n
}

/// The added tokens at whose end a text can be cut, tokenized in two pieces and the ids
/// concatenated, with the same ids as tokenizing it whole (see the module comment), by
/// first byte. Empty when the tokenizer gives no such guarantee.
fn composable_split_tokens(tok: &tokenizers::Tokenizer) -> Vec<Vec<String>> {
    if tok.get_encode_special_tokens() {
        return Vec::new();
    }
    if let Some(pre) = tok.get_pre_tokenizer() {
        match serde_json::to_value(pre) {
            Ok(v) if !depends_on_position(&v) => {}
            _ => return Vec::new(),
        }
    }
    let added: Vec<tokenizers::AddedToken> = tok.get_added_tokens_decoder().into_values().collect();
    // Tokens matched on the raw text, before normalization: the first cut the pipeline makes.
    let raw: Vec<&str> = added.iter().filter(|t| !t.normalized).map(|t| t.content.as_str()).collect();
    let mut by_byte: Vec<Vec<String>> = vec![Vec::new(); 256];
    let mut any = false;
    for x in &added {
        if x.normalized || x.rstrip || x.single_word || x.content.is_empty() {
            continue;
        }
        let x = x.content.as_str();
        // Every occurrence of x in a text must be matched as x, whatever follows it: no other
        // added token contains x or ends inside it, and x does not overlap itself.
        let safe = raw.iter().all(|&z| if z == x { !overlaps(z, x) } else { !z.contains(x) && !overlaps(z, x) });
        if safe {
            by_byte[x.as_bytes()[0] as usize].push(x.to_string());
            any = true;
        }
    }
    if any {
        by_byte
    } else {
        Vec::new()
    }
}

/// Whether a proper suffix of `a` is a proper prefix of `b`.
fn overlaps(a: &str, b: &str) -> bool {
    (1..a.len()).any(|i| a.is_char_boundary(i) && a.len() - i < b.len() && b.starts_with(&a[i..]))
}

/// Whether a pre-tokenizer (as tokenizer.json writes it) treats the start of the input
/// differently from the start of a piece after an added token.
fn depends_on_position(v: &Value) -> bool {
    match v {
        Value::Object(o) => {
            let metaspace_first = o.get("type").and_then(Value::as_str) == Some("Metaspace")
                && o.get("prepend_scheme").and_then(Value::as_str) != Some("always")
                && o.get("prepend_scheme").and_then(Value::as_str) != Some("never");
            metaspace_first || o.values().any(depends_on_position)
        }
        Value::Array(a) => a.iter().any(depends_on_position),
        _ => false,
    }
}

/// A special token as the config writes it: a string or an AddedToken object.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The config's `chat_template`: a string, or a list of `{name, template}` of which the
/// one named "default" is used.
fn config_template(config: &serde_json::Map<String, Value>) -> std::result::Result<Option<String>, String> {
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            for t in list {
                if t.get("name").and_then(Value::as_str) == Some("default") {
                    if let Some(s) = t.get("template").and_then(Value::as_str) {
                        return Ok(Some(s.to_string()));
                    }
                }
            }
            Err("`chat_template` is a list without a template named \"default\": pass --chat-template FILE".into())
        }
        Some(_) => Err("`chat_template` must be a string or a list of {name, template}".into()),
    }
}

/// Number of leading tokens the two sequences share (TRL's `common_prefix_length`).
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// What truncation did to one pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Truncated {
    /// Nothing was cut.
    No,
    /// Tokens were cut (prompt start and/or completion ends); the pair is kept.
    Cut,
    /// The prompt alone fills `max_length`: no completion token would remain.
    PromptFills,
}

/// Truncation as TRL defines it. `max_prompt_length` keeps the last tokens of the prompt
/// (TRL ≤ 0.2x's `max_prompt_length`, which left-truncated prompts). `max_length` is TRL
/// 1.16's: `prompt + chosen` and `prompt + rejected` each keep their first `max_length`
/// tokens ("keep_start"), and a pair whose prompt has `max_length` tokens or more is
/// dropped (TRL filters those out).
pub fn truncate(ids: &mut PairIds, max_length: Option<usize>, max_prompt_length: Option<usize>) -> Truncated {
    let mut cut = false;
    if let Some(mp) = max_prompt_length {
        if ids.prompt.len() > mp {
            ids.prompt.drain(..ids.prompt.len() - mp);
            cut = true;
        }
    }
    if let Some(ml) = max_length {
        if ids.prompt.len() >= ml {
            return Truncated::PromptFills;
        }
        let room = ml - ids.prompt.len();
        for answer in [&mut ids.chosen, &mut ids.rejected] {
            if answer.len() > room {
                answer.truncate(room);
                cut = true;
            }
        }
    }
    if cut {
        Truncated::Cut
    } else {
        Truncated::No
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(p: &[u32], c: &[u32], r: &[u32]) -> PairIds {
        PairIds { prompt: p.to_vec(), chosen: c.to_vec(), rejected: r.to_vec(), prompt_tail_dropped: 0 }
    }

    #[test]
    fn truncation_rules() {
        let mut x = ids(&[1, 2, 3], &[4, 5, 6], &[7]);
        assert_eq!(truncate(&mut x, Some(5), None), Truncated::Cut);
        assert_eq!(x, ids(&[1, 2, 3], &[4, 5], &[7]));
        let mut x = ids(&[1, 2, 3], &[4], &[7]);
        assert_eq!(truncate(&mut x, Some(3), None), Truncated::PromptFills);
        let mut x = ids(&[1, 2, 3], &[4], &[7]);
        assert_eq!(truncate(&mut x, Some(4), None), Truncated::No);
        // max_prompt_length keeps the end of the prompt, then max_length applies
        let mut x = ids(&[1, 2, 3, 4], &[5, 6, 7], &[8]);
        assert_eq!(truncate(&mut x, Some(4), Some(2)), Truncated::Cut);
        assert_eq!(x, ids(&[3, 4], &[5, 6], &[8]));
    }

    #[test]
    fn split_token_safety() {
        assert!(overlaps("ab", "bc") && !overlaps("ab", "cd") && !overlaps("<x>", "<x>") && overlaps("aa", "aa"));
        let meta = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true}]});
        assert!(depends_on_position(&meta));
        let bl = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true});
        assert!(!depends_on_position(&bl));
    }

    #[test]
    fn common_prefix_length() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
    }
}
