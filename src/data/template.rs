//! Chat templates: the Jinja `chat_template` of a Hugging Face tokenizer, rendered the way
//! transformers renders it (`apply_chat_template`).
//!
//! transformers compiles templates in a sandboxed Jinja2 environment with `trim_blocks` and
//! `lstrip_blocks`, the `loopcontrols` extension, a `tojson` that is Python's `json.dumps`
//! (no HTML escaping, `ensure_ascii=False`), and the globals `raise_exception` and
//! `strftime_now`. The context holds `messages`, `tools`, `documents`,
//! `add_generation_prompt` and the tokenizer's named special tokens (`bos_token`,
//! `eos_token`, ...). Messages are normalised first: keys whose value is null are dropped,
//! and a reasoning field is copied to `reasoning_content` and `thinking`. minijinja with
//! its Python-compatibility layer (`str.strip()`, `dict.items()`, ...) runs the same
//! templates.

use minijinja::value::{Kwargs, Rest};
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

/// The work one render may do, in minijinja fuel (about one instruction, or 64 bytes of
/// data made; each render starts with the whole allowance). Real chat templates copy
/// each message a few times: Llama 2/3, ChatML and Zephyr's render a 1 MB,
/// 64-turn conversation in under 1 M fuel (a unit test holds them to that). A template
/// that loops for minutes (two nested `range(10000)`) runs out in about a second and
/// fails with a clear error instead.
const FUEL: u64 = 20_000_000;

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, ... as template variables.
    special: Value,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`. `special_tokens` are (name, content) pairs such as
    /// `("bos_token", "<s>")`. The error is the template syntax error.
    pub fn new(source: &str, special_tokens: &[(String, String)]) -> Result<Self, String> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.map_err(|e| e.to_string())?);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string()).map_err(|e| describe(&e))?;
        env.set_fuel(Some(FUEL));
        let special = Value::from_pairs(special_tokens.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        Ok(ChatTemplate { env, special })
    }

    /// Renders a conversation (a list of message objects), as
    /// `tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=..., tokenize=False)`.
    /// The error carries the template's message (e.g. a `raise_exception` text).
    pub fn render(
        &self,
        messages: &[Json],
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let messages: Vec<Json> = messages.iter().map(normalize_message).collect();
        let ctx = minijinja::context! {
            messages => Value::from(messages.iter().map(to_value).collect::<Vec<_>>()),
            tools => tools.map(to_value),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            ..self.special.clone()
        };
        let tmpl = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        tmpl.render(ctx).map_err(|e| match e.kind() {
            ErrorKind::OutOfFuel => format!(
                "the template took too long: rendering stopped after {FUEL} steps; look for a loop that does \
                 not end soon in the template"
            ),
            _ => describe(&e),
        })
    }
}

/// A JSON value as a template value.
fn to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::from(()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (_, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(a) => Value::from(a.iter().map(to_value).collect::<Vec<_>>()),
        Json::Object(o) => Value::from_pairs(o.iter().map(|(k, v)| (Value::from(k.as_str()), to_value(v)))),
    }
}

/// transformers' `_normalize_chat_messages` and `_alias_reasoning_fields`.
fn normalize_message(m: &Json) -> Json {
    let Json::Object(obj) = m else { return m.clone() };
    let mut out: serde_json::Map<String, Json> =
        obj.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
    let reasoning = ["reasoning_content", "thinking", "reasoning"].iter().find_map(|k| out.get(*k).cloned());
    if let Some(r) = reasoning {
        out.entry("thinking").or_insert_with(|| r.clone());
        out.insert("reasoning_content".into(), r);
    }
    Json::Object(out)
}

/// The message of a minijinja error with its cause chain: the `raise_exception` text
/// comes through verbatim.
fn describe(e: &minijinja::Error) -> String {
    let mut msg = match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_string(),
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        if !msg.contains("line ") {
            msg.push_str(&format!(" (template line {line})"));
        }
    }
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)`.
fn tojson(value: Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let mut indent: Option<Value> = args.first().cloned();
    if let Some(i) = kwargs.get::<Option<Value>>("indent")? {
        indent = Some(i);
    }
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
        },
    };
    let (item_sep, key_sep) = match &separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json: Json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    let fmt = PyJson { indent: indent.as_deref(), item_sep: &item_sep, key_sep: &key_sep, sort_keys, ensure_ascii };
    fmt.write(&mut out, &json, 0);
    Ok(Value::from_safe_string(out))
}

/// Python's `json.dumps` layout.
struct PyJson<'a> {
    indent: Option<&'a str>,
    item_sep: &'a str,
    key_sep: &'a str,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson<'_> {
    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(ind) = self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, out: &mut String, v: &Json, depth: usize) {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => out.push_str(&i.to_string()),
                (_, Some(u), _) => out.push_str(&u.to_string()),
                (_, _, Some(f)) => out.push_str(&py_float(f)),
                _ => out.push_str(&n.to_string()),
            },
            Json::String(s) => self.string(out, s),
            Json::Array(a) => {
                if a.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.write(out, x, depth + 1);
                }
                self.newline(out, depth);
                out.push(']');
            }
            Json::Object(o) => {
                if o.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut items: Vec<(&String, &Json)> = o.iter().collect();
                if self.sort_keys {
                    items.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in items.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(self.item_sep);
                    }
                    self.newline(out, depth + 1);
                    self.string(out, k);
                    out.push_str(self.key_sep);
                    self.write(out, x, depth + 1);
                }
                self.newline(out, depth);
                out.push('}');
            }
        }
    }

    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: shortest round-trip digits, always with a `.` or exponent.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let s = format!("{f:?}");
    if s.contains('e') {
        // Rust prints 1e20 as "1e20", Python as "1e+20".
        let (m, e) = s.split_once('e').unwrap();
        let e: i32 = e.parse().unwrap_or(0);
        return format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    // Python switches to exponent notation at 1e16 and below 1e-4.
    let a = f.abs();
    if a >= 1e16 || (a != 0.0 && a < 1e-4) {
        let s = format!("{f:e}");
        let (m, e) = s.split_once('e').unwrap();
        let e: i32 = e.parse().unwrap_or(0);
        return format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
    }
    s
}

/// `datetime.now().strftime(fmt)` for the directives templates use (Llama 3.1 writes
/// "%d %b %Y"). Local time is taken as UTC.
fn strftime_now(fmt: String) -> Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(Value::from(strftime(&fmt, secs as i64)))
}

fn strftime(fmt: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&MONTHS[month as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[month as usize - 1]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('j') => out.push_str(&format!("{:03}", doy_in_year(year, month, day))),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

fn doy_in_year(year: i64, month: i64, day: i64) -> i64 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    cum[month as usize - 1] + day + i64::from(leap && month > 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn special() -> Vec<(String, String)> {
        vec![("bos_token".into(), "<s>".into()), ("eos_token".into(), "</s>".into())]
    }

    /// The fuel the comment on `FUEL` promises: the shipped templates render a 1 MB
    /// conversation of 64 turns in under 1 M fuel, a twentieth of the allowance.
    #[test]
    fn real_templates_use_a_small_part_of_the_fuel() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/templates");
        let turn = |i: usize| {
            let role = if i.is_multiple_of(2) { "user" } else { "assistant" };
            json!({"role": role, "content": "many words here ".repeat(1 << 10)})
        };
        let conv: Vec<Json> = (0..64).map(turn).collect();
        let bytes: usize = conv.iter().map(|m| m.to_string().len()).sum();
        assert!(bytes > 1 << 20);
        for name in ["llama3", "llama2", "chatml", "zephyr"] {
            let src = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
            let mut t = ChatTemplate::new(&src, &special()).unwrap();
            t.env.set_fuel(Some(1_000_000));
            let out = t.env.get_template(NAME).unwrap().render(minijinja::context! {
                messages => Value::from(conv.iter().map(to_value).collect::<Vec<_>>()),
                add_generation_prompt => true,
                ..t.special.clone()
            });
            assert!(out.is_ok(), "{name}: {:?}", out.err());
        }
    }

    #[test]
    fn trim_and_lstrip_blocks_as_transformers() {
        // Zephyr's template only renders right with trim_blocks + lstrip_blocks.
        let src = "{% for m in messages %}\n  {% if m['role'] == 'user' %}\n{{ '<|user|>\\n' + m['content'] + eos_token }}\n{% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}";
        let t = ChatTemplate::new(src, &special()).unwrap();
        let out = t.render(&[json!({"role": "user", "content": "hi"})], None, true).unwrap();
        assert_eq!(out, "<|user|>\nhi</s>\n<|assistant|>\n");
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let src = "{% if messages|length > 1 %}{{ raise_exception('only one message, got ' + messages|length|string) }}{% endif %}{{ bos_token + messages[0]['content'].strip().upper() }}{% for k, v in messages[0].items() %}|{{ k }}{% endfor %}";
        let t = ChatTemplate::new(src, &special()).unwrap();
        let m = json!({"role": "user", "content": "  hi  ", "name": null});
        // null-valued keys are dropped before rendering, as transformers does
        assert_eq!(t.render(std::slice::from_ref(&m), None, false).unwrap(), "<s>HI|role|content");
        let e = t.render(&[m.clone(), m], None, false).unwrap_err();
        assert!(e.contains("only one message, got 2"), "{e}");
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let t = ChatTemplate::new("{{ messages[0] | tojson }}|{{ messages[0]['x'] | tojson(indent=2) }}", &[]).unwrap();
        let m = json!({"content": "é<\"a\">\n", "x": [1, 2.5, {"k": true}]});
        let out = t.render(&[m], None, false).unwrap();
        // json.dumps({"content": 'é<"a">\n', "x": [1, 2.5, {"k": True}]}, ensure_ascii=False)
        // (keys keep their order: serde_json and minijinja are built with preserve_order)
        let expected_first = r#"{"content": "é<\"a\">\n", "x": [1, 2.5, {"k": true}]}"#;
        let expected_second = "[\n  1,\n  2.5,\n  {\n    \"k\": true\n  }\n]";
        assert_eq!(out, format!("{expected_first}|{expected_second}"));
    }

    #[test]
    fn loop_controls_and_namespace() {
        let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}";
        let t = ChatTemplate::new(src, &[]).unwrap();
        let m = json!({"role": "user", "content": "x"});
        assert_eq!(t.render(&[m.clone(), m.clone(), m], None, false).unwrap(), "2");
    }

    #[test]
    fn syntax_errors_are_reported() {
        let e = ChatTemplate::new("{% for m in messages %}", &[]).err().unwrap();
        assert!(e.contains("endfor") || e.contains("unexpected end"), "{e}");
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-07-23 00:00:00 UTC = 1721692800; 2000-02-29 12:34:56 UTC = 951827696
        assert_eq!(strftime("%d %b %Y", 1_721_692_800), "23 Jul 2024");
        assert_eq!(strftime("%A %B %d %y %H:%M:%S %j", 951_827_696), "Tuesday February 29 00 12:34:56 060");
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.1), "0.1");
        assert_eq!(py_float(1e20), "1e+20");
        assert_eq!(py_float(1.5e-7), "1.5e-07");
    }
}
