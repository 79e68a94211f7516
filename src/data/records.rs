//! Preference records: reading JSONL, JSON and parquet files, and the record formats TRL's
//! DPOTrainer accepts.
//!
//! Formats (decided per record):
//! - standard: `prompt`, `chosen`, `rejected` strings;
//! - conversational: `prompt` a list of `{role, content}` messages, `chosen` / `rejected`
//!   lists holding the assistant turn(s);
//! - implicit prompt: no `prompt`; `chosen` / `rejected` are whole conversations (the
//!   prompt is their shared leading turns) or strings (the prompt is their longest common
//!   prefix), exactly as TRL's `extract_prompt` splits them;
//! - pre-tokenized: `prompt_ids`, `chosen_ids`, `rejected_ids` (see `pretokenized`).
//!
//! Any record may carry `source`; the file's stem is the default. Field names can be
//! mapped (`Fields`); a `system` field turns a text record into a conversation with a
//! system turn, a user turn and assistant answers (Orca-style pairs).

use std::fs::File;
use std::path::Path;

use rayon::prelude::*;
use serde_json::Value;

use crate::data::{pretokenized, PairExample};
use crate::error::{Error, Result};

/// Text of one part of a pair: plain text, or a list of chat messages (JSON objects
/// with at least a `role`).
#[derive(Clone, Debug, PartialEq)]
pub enum Text {
    Plain(String),
    Chat(Vec<Value>),
}

/// A pair before tokenization, after field mapping and prompt extraction.
#[derive(Clone, Debug, PartialEq)]
pub struct TextPair {
    pub prompt: Text,
    pub chosen: Text,
    pub rejected: Text,
    /// The record's `tools` (passed to the chat template), if any.
    pub tools: Option<Value>,
    pub source: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RawPair {
    Text(TextPair),
    Ids(PairExample),
}

/// Names of the record fields.
#[derive(Clone, Debug)]
pub struct Fields {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// When set, a text record becomes a conversation: `[system (if non-empty), user: prompt]`
    /// with the answers as assistant turns.
    pub system: Option<String>,
    pub source: String,
}

impl Default for Fields {
    fn default() -> Self {
        Fields {
            prompt: "prompt".into(),
            chosen: "chosen".into(),
            rejected: "rejected".into(),
            system: None,
            source: "source".into(),
        }
    }
}

/// Where a record sits in its file, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// A JSONL line, from 1.
    Line(usize),
    /// An element of a JSON array, from 1.
    Record(usize),
    /// A parquet row, from 1.
    Row(usize),
}

impl Loc {
    /// An error about this record of `path`.
    pub fn error(self, path: &Path, msg: impl Into<String>) -> Error {
        match self {
            Loc::Line(l) => Error::line(path, l, msg),
            Loc::Record(r) => Error::file(path, format!("record {r}: {}", msg.into())),
            Loc::Row(r) => Error::file(path, format!("row {r}: {}", msg.into())),
        }
    }
}

// --- reading files ------------------------------------------------------------------------

/// Reads every record of a JSONL, JSON (one array of objects) or parquet file. The format
/// comes from the extension (`.parquet`, `.json`, otherwise JSONL); a `.json` file that
/// does not start with `[` is read as JSONL.
pub fn read_records(path: &Path) -> Result<Vec<(Loc, Value)>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext == "parquet" {
        return read_parquet(path);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // A UTF-8 byte order mark (some Windows editors write one) is not part of the JSON.
    let bytes = bytes.strip_prefix(UTF8_BOM).unwrap_or(&bytes);
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if ext == "json" && first == Some(b'[') {
        read_json_array(path, bytes)
    } else {
        read_jsonl(path, bytes)
    }
}

/// The byte order mark some editors put at the start of a UTF-8 file.
pub const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

fn read_jsonl(path: &Path, bytes: &[u8]) -> Result<Vec<(Loc, Value)>> {
    let lines: Vec<(usize, &[u8])> = bytes.split(|&b| b == b'\n').enumerate().map(|(i, l)| (i + 1, l)).collect();
    let parsed: Vec<Option<Result<(Loc, Value)>>> = lines
        .par_iter()
        .map(|&(n, line)| {
            let line = std::str::from_utf8(line).map_err(|e| {
                Error::line(
                    path,
                    n,
                    format!("invalid UTF-8 at byte {} of the line: the file must be UTF-8", e.valid_up_to()),
                )
            });
            let line = match line {
                Ok(l) => l,
                Err(e) => return Some(Err(e)),
            };
            if line.trim().is_empty() {
                return None;
            }
            Some(
                serde_json::from_str::<Value>(line)
                    .map(|v| (Loc::Line(n), v))
                    .map_err(|e| Error::line(path, n, format!("malformed JSON: {e}"))),
            )
        })
        .collect();
    parsed.into_iter().flatten().collect()
}

fn read_json_array(path: &Path, bytes: &[u8]) -> Result<Vec<(Loc, Value)>> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            Error::line(path, e.line(), format!("malformed JSON: {e}"))
        }
        _ => Error::file(path, format!("malformed JSON (the file must be UTF-8): {e}")),
    })?;
    let Value::Array(items) = v else {
        return Err(Error::file(path, "expected a JSON array of records"));
    };
    Ok(items.into_iter().enumerate().map(|(i, v)| (Loc::Record(i + 1), v)).collect())
}

fn read_parquet(path: &Path) -> Result<Vec<(Loc, Value)>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| Error::file(path, format!("not a readable parquet file: {e}")))?;
    let rows = reader.get_row_iter(None).map_err(|e| Error::file(path, format!("cannot read rows: {e}")))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let loc = Loc::Row(i + 1);
        let row = row.map_err(|e| loc.error(path, format!("cannot read the row: {e}")))?;
        let mut obj = serde_json::Map::new();
        for (name, field) in row.get_column_iter() {
            obj.insert(
                name.clone(),
                field_to_json(field).map_err(|m| loc.error(path, format!("column `{name}`: {m}")))?,
            );
        }
        out.push((loc, Value::Object(obj)));
    }
    Ok(out)
}

/// The names of a parquet file's top-level columns.
pub fn parquet_columns(path: &Path) -> Result<Vec<String>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| Error::file(path, format!("not a readable parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr().root_schema().clone();
    Ok(schema.get_fields().iter().map(|f| f.name().to_string()).collect())
}

fn field_to_json(f: &parquet::record::Field) -> std::result::Result<Value, String> {
    use parquet::record::Field as F;
    Ok(match f {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(n) => (*n).into(),
        F::Short(n) => (*n).into(),
        F::Int(n) => (*n).into(),
        F::Long(n) => (*n).into(),
        F::UByte(n) => (*n).into(),
        F::UShort(n) => (*n).into(),
        F::UInt(n) => (*n).into(),
        F::ULong(n) => (*n).into(),
        F::Float(x) => serde_json::Number::from_f64(f64::from(*x)).map(Value::Number).unwrap_or(Value::Null),
        F::Double(x) => serde_json::Number::from_f64(*x).map(Value::Number).unwrap_or(Value::Null),
        F::Str(s) => Value::String(s.clone()),
        F::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(e) => return Err(format!("invalid UTF-8 at byte {}: text columns must be UTF-8", e.valid_up_to())),
        },
        F::Group(row) => {
            let mut obj = serde_json::Map::new();
            for (name, field) in row.get_column_iter() {
                obj.insert(name.clone(), field_to_json(field)?);
            }
            Value::Object(obj)
        }
        F::ListInternal(list) => {
            Value::Array(list.elements().iter().map(field_to_json).collect::<std::result::Result<_, _>>()?)
        }
        other => return Err(format!("unsupported parquet value {other}: expected text, lists, structs or integers")),
    })
}

// --- record formats -----------------------------------------------------------------------

/// Interprets one record. `vocab_size` bounds pre-tokenized ids. The error is about a
/// field of this record; the caller adds the file and line.
pub fn parse_pair(
    v: &Value,
    fields: &Fields,
    default_source: &str,
    vocab_size: usize,
) -> std::result::Result<RawPair, String> {
    let obj = v.as_object().ok_or_else(|| format!("expected a JSON object, found {}", kind(v)))?;
    if obj.contains_key("prompt_ids") || obj.contains_key("chosen_ids") || obj.contains_key("rejected_ids") {
        let mut v = v.clone();
        if fields.source != "source" {
            if let Some(s) = obj.get(&fields.source) {
                v["source"] = s.clone();
            }
        }
        return pretokenized::parse_record(&v, vocab_size, default_source).map(RawPair::Ids);
    }
    let source = match obj.get(&fields.source) {
        None | Some(Value::Null) => default_source.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(format!("field `{}` must be a string, found {}", fields.source, kind(other))),
    };
    let get = |name: &str| -> std::result::Result<Option<Text>, String> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(Text::Plain(s.clone()))),
            Some(Value::Array(a)) => {
                if a.is_empty() {
                    return Err(format!("field `{name}` is an empty list: it needs at least one message"));
                }
                for (i, m) in a.iter().enumerate() {
                    let role = m.as_object().and_then(|o| o.get("role"));
                    if !matches!(role, Some(Value::String(_))) {
                        return Err(format!(
                            "`{name}[{i}]` must be a message object with a string `role` (and `content`), found {}",
                            kind(m)
                        ));
                    }
                }
                Ok(Some(Text::Chat(a.clone())))
            }
            Some(other) => Err(format!("field `{name}` must be a string or a list of messages, found {}", kind(other))),
        }
    };
    let missing = |name: &str| {
        let have: Vec<&str> = obj.keys().map(|k| k.as_str()).collect();
        format!(
            "missing field `{name}` (the record has: {}); map another field with --{}-field",
            have.join(", "),
            role_of(name, fields)
        )
    };
    let chosen = get(&fields.chosen)?.ok_or_else(|| missing(&fields.chosen))?;
    let rejected = get(&fields.rejected)?.ok_or_else(|| missing(&fields.rejected))?;
    for (name, t) in [(&fields.chosen, &chosen), (&fields.rejected, &rejected)] {
        if t == &Text::Plain(String::new()) {
            return Err(format!("field `{name}` is empty"));
        }
    }
    let mut prompt = get(&fields.prompt)?;
    let (mut chosen, mut rejected) = (chosen, rejected);

    if let Some(sys_field) = &fields.system {
        let system = match obj.get(sys_field) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(format!("field `{sys_field}` must be a string, found {}", kind(other))),
        };
        let p = prompt.take().ok_or_else(|| missing(&fields.prompt))?;
        let mut turns = Vec::new();
        if !system.is_empty() {
            turns.push(message("system", &system));
        }
        match p {
            Text::Plain(s) => turns.push(message("user", &s)),
            Text::Chat(m) => turns.extend(m),
        }
        prompt = Some(Text::Chat(turns));
        chosen = as_assistant(chosen);
        rejected = as_assistant(rejected);
    }

    let (prompt, chosen, rejected) = match prompt {
        Some(p) => (p, chosen, rejected),
        // A prompt field the user named must be there; only the default may be implicit.
        None if fields.prompt != "prompt" => return Err(missing(&fields.prompt)),
        None => extract_prompt(&chosen, &rejected, &fields.chosen, &fields.rejected)?,
    };
    match (&prompt, &chosen, &rejected) {
        (Text::Plain(_), Text::Plain(_), Text::Plain(_)) => {}
        (Text::Chat(p), Text::Chat(c), Text::Chat(r)) => {
            if p.is_empty() {
                return Err(format!(
                    "no prompt: `{}` and `{}` share no leading turn, so the implicit prompt is empty",
                    fields.chosen, fields.rejected
                ));
            }
            for (name, turns) in [(&fields.chosen, c), (&fields.rejected, r)] {
                if !turns.iter().any(|m| m.get("role").and_then(Value::as_str) == Some("assistant")) {
                    return Err(format!("conversation `{name}` has no assistant turn after the prompt"));
                }
            }
        }
        _ => {
            return Err(format!(
                "`{}`, `{}` and `{}` mix text and conversations: use all strings or all message lists",
                fields.prompt, fields.chosen, fields.rejected
            ))
        }
    }
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            Some(serde_json::from_str(s).map_err(|e| format!("field `tools` is a string but not JSON: {e}"))?)
        }
        Some(t) => Some(t.clone()),
    };
    Ok(RawPair::Text(TextPair { prompt, chosen, rejected, tools, source }))
}

fn role_of<'a>(name: &str, f: &'a Fields) -> &'a str {
    if name == f.prompt {
        "prompt"
    } else if name == f.chosen {
        "chosen"
    } else {
        "rejected"
    }
}

fn message(role: &str, content: &str) -> Value {
    serde_json::json!({"role": role, "content": content})
}

fn as_assistant(t: Text) -> Text {
    match t {
        Text::Plain(s) => Text::Chat(vec![message("assistant", &s)]),
        chat => chat,
    }
}

/// TRL's `extract_prompt`, quirks included: the prompt is the longest common prefix of
/// `chosen` and `rejected` (characters of strings, whole turns of conversations); a
/// string prefix gives its last space back to the completions; when one side is a prefix
/// of the other (or they are equal) the split is before the last element of the shorter.
fn extract_prompt(
    chosen: &Text,
    rejected: &Text,
    cname: &str,
    rname: &str,
) -> std::result::Result<(Text, Text, Text), String> {
    match (chosen, rejected) {
        (Text::Plain(c), Text::Plain(r)) => {
            let cc: Vec<char> = c.chars().collect();
            let rc: Vec<char> = r.chars().collect();
            let idx = split_index(&cc, &rc, |a, b| a == b, |x| *x == ' ');
            let (p, c1) = py_split(&cc, idx);
            let (_, r1) = py_split(&rc, idx);
            let s = |v: &[char]| v.iter().collect::<String>();
            Ok((Text::Plain(s(p)), Text::Plain(s(c1)), Text::Plain(s(r1))))
        }
        (Text::Chat(c), Text::Chat(r)) => {
            let idx = split_index(c, r, |a, b| a == b, |_| false);
            let (p, c1) = py_split(c, idx);
            let (_, r1) = py_split(r, idx);
            Ok((Text::Chat(p.to_vec()), Text::Chat(c1.to_vec()), Text::Chat(r1.to_vec())))
        }
        _ => Err(format!("`{cname}` and `{rname}` must both be strings or both be conversations")),
    }
}

/// The `idx` TRL's loop ends with (may be -1: Python then slices from the end).
fn split_index<T>(c: &[T], r: &[T], eq: impl Fn(&T, &T) -> bool, is_space: impl Fn(&T) -> bool) -> isize {
    let m = c.len().min(r.len());
    // `for idx in range(m)` leaves idx = m - 1 when no element differs.
    let mut idx = m as isize - 1;
    for i in 0..m {
        if !eq(&c[i], &r[i]) {
            idx = i as isize;
            // `example["chosen"][idx - 1] == " "`, with Python's negative indexing
            let prev = if i == 0 { c.len() - 1 } else { i - 1 };
            if is_space(&c[prev]) {
                idx -= 1;
            }
            break;
        }
    }
    idx
}

/// `(v[:idx], v[idx:])` with Python's meaning of a negative index.
fn py_split<T>(v: &[T], idx: isize) -> (&[T], &[T]) {
    let at = if idx < 0 { (v.len() as isize + idx).max(0) as usize } else { (idx as usize).min(v.len()) };
    v.split_at(at)
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> std::result::Result<RawPair, String> {
        parse_pair(&v, &Fields::default(), "stem", 100)
    }

    fn text(v: Value) -> TextPair {
        match parse(v).unwrap() {
            RawPair::Text(t) => t,
            other => panic!("{other:?}"),
        }
    }

    fn plain(s: &str) -> Text {
        Text::Plain(s.into())
    }

    #[test]
    fn implicit_text_prompt_as_trl() {
        // Values from TRL's extract_prompt (trl 1.16) on the same inputs.
        let t = text(json!({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}));
        assert_eq!((t.prompt, t.chosen, t.rejected), (plain("Q: sky? A:"), plain(" blue"), plain(" green")));
        // equal strings: split before the last character
        let t = text(json!({"chosen": "yes", "rejected": "yes"}));
        assert_eq!((t.prompt, t.chosen, t.rejected), (plain("ye"), plain("s"), plain("s")));
        // first characters differ and chosen ends with a space: idx = -1
        let t = text(json!({"chosen": "ab ", "rejected": "xy"}));
        assert_eq!((t.prompt, t.chosen, t.rejected), (plain("ab"), plain(" "), plain("y")));
        // code points, not bytes
        let t = text(json!({"chosen": "日本語 a", "rejected": "日本語 b"}));
        assert_eq!((t.prompt, t.chosen, t.rejected), (plain("日本語"), plain(" a"), plain(" b")));
    }

    #[test]
    fn implicit_conversation_prompt() {
        let u = json!({"role": "user", "content": "q"});
        let a = json!({"role": "assistant", "content": "a"});
        let b = json!({"role": "assistant", "content": "b"});
        let t = text(json!({"chosen": [u, a], "rejected": [u, b]}));
        assert_eq!(t.prompt, Text::Chat(vec![u.clone()]));
        assert_eq!(t.chosen, Text::Chat(vec![a.clone()]));
        let e = parse(json!({"chosen": [a], "rejected": [b]})).unwrap_err();
        assert!(e.contains("share no leading turn"), "{e}");
        let e = parse(json!({"prompt": [u], "chosen": [u], "rejected": [a]})).unwrap_err();
        assert!(e.contains("`chosen` has no assistant turn"), "{e}");
    }

    #[test]
    fn system_field_makes_a_conversation() {
        let f = Fields { prompt: "question".into(), system: Some("system".into()), ..Fields::default() };
        let v = json!({"system": "", "question": "q", "chosen": "a", "rejected": "b", "source": "s"});
        let RawPair::Text(t) = parse_pair(&v, &f, "stem", 10).unwrap() else { panic!() };
        assert_eq!(t.prompt, Text::Chat(vec![json!({"role": "user", "content": "q"})]));
        assert_eq!(t.rejected, Text::Chat(vec![json!({"role": "assistant", "content": "b"})]));
        assert_eq!(t.source, "s");
    }

    #[test]
    fn field_errors() {
        let e = parse(json!({"prompt": "p", "chosen": "c"})).unwrap_err();
        assert!(e.contains("missing field `rejected`") && e.contains("--rejected-field"), "{e}");
        let e = parse(json!({"prompt": "p", "chosen": 3, "rejected": "r"})).unwrap_err();
        assert!(e.contains("`chosen` must be a string or a list of messages, found a number"), "{e}");
        let e = parse(json!({"prompt": "p", "chosen": "", "rejected": "r"})).unwrap_err();
        assert!(e.contains("`chosen` is empty"), "{e}");
        let e = parse(json!({"prompt": "p", "chosen": [], "rejected": "r"})).unwrap_err();
        assert!(e.contains("`chosen` is an empty list"), "{e}");
        let e = parse(json!({"prompt": "p", "chosen": [{"content": "x"}], "rejected": "r"})).unwrap_err();
        assert!(e.contains("`chosen[0]` must be a message object"), "{e}");
        let e = parse(json!({"prompt": "p", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "r"}))
            .unwrap_err();
        assert!(e.contains("mix text and conversations"), "{e}");
        let e = parse(json!({"prompt_ids": [1], "chosen_ids": [200], "rejected_ids": [2]})).unwrap_err();
        assert!(e.contains("outside the model's vocabulary"), "{e}");
    }
}
