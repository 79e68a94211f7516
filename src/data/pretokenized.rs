//! Pre-tokenized preference pairs: one JSON object per line,
//! `{"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...], "source": "optional"}`.
//!
//! The whole file is validated before any work starts, so a bad line 90,000 fails in the
//! first second, not after an hour of training. Ids must be below the model's vocabulary
//! size: ids that are not were made by another model's tokenizer.

use std::path::Path;

use serde_json::Value;

use crate::data::PairExample;
use crate::error::{Error, Result};

/// One record as a pair; the error is a field-level message (the caller adds file:line).
/// `default_source` is used when the record has no `source`.
pub fn parse_record(v: &Value, vocab_size: usize, default_source: &str) -> std::result::Result<PairExample, String> {
    let obj = v.as_object().ok_or_else(|| format!("expected a JSON object, found {}", kind(v)))?;
    let ids = |field: &str| -> std::result::Result<Vec<u32>, String> {
        let arr = match obj.get(field) {
            None | Some(Value::Null) => return Err(format!("missing field `{field}` (a list of token ids)")),
            Some(Value::Array(a)) => a,
            Some(other) => return Err(format!("field `{field}` must be a list of token ids, found {}", kind(other))),
        };
        if arr.is_empty() {
            return Err(format!("field `{field}` is empty: it needs at least one token"));
        }
        arr.iter()
            .enumerate()
            .map(|(i, x)| {
                let id =
                    x.as_u64().ok_or_else(|| format!("`{field}[{i}]` is {x}: token ids are non-negative integers"))?;
                if id >= vocab_size as u64 {
                    return Err(format!(
                        "`{field}[{i}]` = {id} is outside the model's vocabulary (vocab_size {vocab_size}); \
                         the data was tokenized for another model"
                    ));
                }
                Ok(id as u32)
            })
            .collect()
    };
    let source = match obj.get("source") {
        None | Some(Value::Null) => default_source.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(format!("field `source` must be a string, found {}", kind(other))),
    };
    Ok(PairExample { prompt: ids("prompt_ids")?, chosen: ids("chosen_ids")?, rejected: ids("rejected_ids")?, source })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Reads a pre-tokenized JSONL file. Blank lines are skipped; a record without `source`
/// gets the file's stem. Errors name `file:line`.
pub fn read_pairs(path: &Path, vocab_size: usize) -> Result<Vec<PairExample>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| Error::line(path, i + 1, format!("malformed JSON: {e}")))?;
        out.push(parse_record(&v, vocab_size, &stem).map_err(|msg| Error::line(path, i + 1, msg))?);
    }
    if out.is_empty() {
        return Err(Error::file(path, "no pairs in this file"));
    }
    Ok(out)
}

/// Writes pairs as pre-tokenized JSONL, atomically (temporary sibling file, then rename).
pub fn write_pairs(path: &Path, pairs: &[PairExample]) -> Result<()> {
    let mut text = String::new();
    for p in pairs {
        let v = serde_json::json!({
            "prompt_ids": p.prompt, "chosen_ids": p.chosen, "rejected_ids": p.rejected, "source": p.source,
        });
        text.push_str(&v.to_string());
        text.push('\n');
    }
    crate::weights::write_file_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<PairExample, String> {
        parse_record(&serde_json::from_str(s).unwrap(), 100, "stem")
    }

    #[test]
    fn parses_a_record_and_defaults_the_source() {
        let p = parse(r#"{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 99]}"#).unwrap();
        assert_eq!((p.prompt, p.chosen, p.rejected, p.source.as_str()), (vec![1, 2], vec![3], vec![4, 99], "stem"));
        let p = parse(r#"{"prompt_ids": [1], "chosen_ids": [3], "rejected_ids": [4], "source": "x"}"#).unwrap();
        assert_eq!(p.source, "x");
    }

    #[test]
    fn field_errors_name_the_field() {
        let e = parse(r#"{"prompt_ids": [1], "chosen_ids": [3]}"#).unwrap_err();
        assert!(e.contains("missing field `rejected_ids`"), "{e}");
        let e = parse(r#"{"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [4]}"#).unwrap_err();
        assert!(e.contains("`chosen_ids` is empty"), "{e}");
        let e = parse(r#"{"prompt_ids": [1, -2], "chosen_ids": [3], "rejected_ids": [4]}"#).unwrap_err();
        assert!(e.contains("`prompt_ids[1]` is -2") && e.contains("non-negative"), "{e}");
        let e = parse(r#"{"prompt_ids": [1.5], "chosen_ids": [3], "rejected_ids": [4]}"#).unwrap_err();
        assert!(e.contains("`prompt_ids[0]`"), "{e}");
        let e = parse(r#"{"prompt_ids": [1], "chosen_ids": [100], "rejected_ids": [4]}"#).unwrap_err();
        assert!(e.contains("vocab_size 100") && e.contains("another model"), "{e}");
        let e = parse(r#"{"prompt_ids": "1 2", "chosen_ids": [3], "rejected_ids": [4]}"#).unwrap_err();
        assert!(e.contains("`prompt_ids` must be a list") && e.contains("a string"), "{e}");
        let e = parse(r#"[1, 2]"#).unwrap_err();
        assert!(e.contains("expected a JSON object"), "{e}");
    }
}
