//! TensorBoard event files (`--report-to tensorboard`): every line of metrics.jsonl becomes
//! one event in `OUT/tensorboard/`, its numbers as scalars under the same names, written
//! as the line is.
//!
//! The format, as TensorFlow's record writer and `event.proto` define it:
//! - a file is a sequence of records: `u64` length, masked CRC-32C of those 8 bytes, the
//!   data, masked CRC-32C of the data (all little-endian); mask(c) = rotr(c, 15) + 0xa282ead8;
//! - a record's data is an `Event` protobuf: `wall_time` (field 1, double), `step` (2,
//!   int64), `file_version` (3, string; the first event of a file, "brain.Event:2") or
//!   `summary` (5): repeated `value` (1), each `tag` (1, string) and `simple_value` (2, float).
//!
//! An event's step is the line's `train/global_step`; a line without one (an evaluation)
//! takes the step of the update before it, 0 before any.
//!
//! Resume: metrics.jsonl is cut back to the state's length, and the event files are cut
//! back to as many events as it then has lines (a line written after the last event of a
//! killed process is written again), so each line has exactly one event. Each process
//! writes a new file; TensorBoard reads a folder's files in name order, and names begin
//! with a zero-padded time that never goes back.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The folder inside a run folder.
pub const DIR: &str = "tensorboard";
/// Every event file's name begins with this (TensorBoard looks for "tfevents").
const PREFIX: &str = "events.out.tfevents.";
const FILE_VERSION: &str = "brain.Event:2";

// --- the record format

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78) lookup table.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

pub fn crc32c(bytes: &[u8]) -> u32 {
    !bytes.iter().fold(!0u32, |c, &b| CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

fn masked_crc(bytes: &[u8]) -> u32 {
    crc32c(bytes).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

/// The records of a file's bytes, each with its byte offset; stops at the first record
/// that is cut short or fails its CRC, and says why and where.
fn records(bytes: &[u8]) -> (Vec<(usize, &[u8])>, Option<String>) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + 12) else {
            return (out, Some(format!("a record header cut short at byte {at}")));
        };
        let (len, len_crc) = head.split_at(8);
        if masked_crc(len) != u32::from_le_bytes(len_crc.try_into().expect("4 bytes")) {
            return (out, Some(format!("the length CRC of the record at byte {at} does not match")));
        }
        let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
        let Some(end) = usize::try_from(n).ok().and_then(|n| (at + 12).checked_add(n)) else {
            return (out, Some(format!("the record at byte {at} claims {n} bytes")));
        };
        let (Some(data), Some(crc)) = (bytes.get(at + 12..end), bytes.get(end..end + 4)) else {
            return (out, Some(format!("the record at byte {at} is cut short")));
        };
        if masked_crc(data) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return (out, Some(format!("the data CRC of the record at byte {at} does not match")));
        }
        out.push((at, data));
        at = end + 4;
    }
    (out, None)
}

// --- the Event protobuf

/// An event as this module writes and reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    /// Set on a file's first event only.
    pub file_version: Option<String>,
    /// The summary's scalars, in order.
    pub scalars: Vec<(String, f32)>,
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field.
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

impl Event {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![1 << 3 | 1];
        out.extend_from_slice(&self.wall_time.to_le_bytes());
        out.push(2 << 3);
        varint(&mut out, self.step as u64);
        if let Some(v) = &self.file_version {
            bytes_field(&mut out, 3, v.as_bytes());
        }
        if !self.scalars.is_empty() {
            let mut summary = Vec::new();
            for (tag, x) in &self.scalars {
                let mut value = Vec::new();
                bytes_field(&mut value, 1, tag.as_bytes());
                value.push(2 << 3 | 5);
                value.extend_from_slice(&x.to_le_bytes());
                bytes_field(&mut summary, 1, &value);
            }
            bytes_field(&mut out, 5, &summary);
        }
        out
    }

    /// Reads the fields this module writes, skipping any other.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Event, String> {
        let mut e = Event { wall_time: 0.0, step: 0, file_version: None, scalars: Vec::new() };
        for (field, value) in fields(bytes)? {
            match (field, value) {
                (1, Field::Fixed64(v)) => e.wall_time = f64::from_le_bytes(v),
                (2, Field::Varint(v)) => e.step = v as i64,
                (3, Field::Bytes(s)) => e.file_version = Some(utf8(s)?),
                (5, Field::Bytes(summary)) => {
                    for (field, value) in fields(summary)? {
                        if let (1, Field::Bytes(value)) = (field, value) {
                            let (mut tag, mut x) = (None, None);
                            for (field, v) in fields(value)? {
                                match (field, v) {
                                    (1, Field::Bytes(s)) => tag = Some(utf8(s)?),
                                    (2, Field::Fixed32(b)) => x = Some(f32::from_le_bytes(b)),
                                    _ => {}
                                }
                            }
                            if let (Some(tag), Some(x)) = (tag, x) {
                                e.scalars.push((tag, x));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(e)
    }
}

enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn utf8(b: &[u8]) -> std::result::Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "a string field is not UTF-8".to_string())
}

/// The (field number, value) pairs of one protobuf message.
fn fields(mut b: &[u8]) -> std::result::Result<Vec<(u32, Field<'_>)>, String> {
    fn read_varint(b: &mut &[u8]) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first().ok_or("a varint is cut short")?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(v);
            }
        }
        Err("a varint is longer than 10 bytes".into())
    }
    fn take<'a>(b: &mut &'a [u8], n: usize) -> std::result::Result<&'a [u8], String> {
        if b.len() < n {
            return Err("a field is cut short".into());
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = read_varint(&mut b)?;
        let field = (key >> 3) as u32;
        let value = match key & 7 {
            0 => Field::Varint(read_varint(&mut b)?),
            1 => Field::Fixed64(take(&mut b, 8)?.try_into().expect("8 bytes")),
            2 => {
                let n = read_varint(&mut b)?;
                Field::Bytes(take(&mut b, usize::try_from(n).map_err(|_| "a length overflows")?)?)
            }
            5 => Field::Fixed32(take(&mut b, 4)?.try_into().expect("4 bytes")),
            w => return Err(format!("field {field} has wire type {w}, which events do not use")),
        };
        out.push((field, value));
    }
    Ok(out)
}

// --- event files

/// The event files in `dir`, in the order TensorBoard reads them (by name).
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(Vec::new()) };
    let mut files = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        if e.file_name().to_string_lossy().starts_with(PREFIX) {
            files.push(e.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Every event of one file; an error names the file and the record that is not whole.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (recs, problem) = records(&bytes);
    if let Some(p) = problem {
        return Err(Error::file(path, format!("not a whole TensorBoard event file: {p}")));
    }
    recs.into_iter()
        .map(|(at, data)| Event::decode(data).map_err(|e| Error::file(path, format!("the event at byte {at}: {e}"))))
        .collect()
}

/// The scalars of one metrics.jsonl line: its numbers, under their names (strings such
/// as `sdpo/chunk` and nulls are not scalars).
pub fn scalars(line: &serde_json::Value) -> Vec<(String, f32)> {
    let Some(obj) = line.as_object() else { return Vec::new() };
    obj.iter().filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x as f32))).collect()
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Writes the events of one process into a file of its own.
pub struct EventWriter {
    file: File,
    path: PathBuf,
    /// The step of the last update line seen.
    step: i64,
}

impl EventWriter {
    /// Opens a new event file in `dir` for a run whose metrics.jsonl (at `metrics`) holds
    /// the lines written so far: the events of files from earlier processes are cut back
    /// to one per line, and lines that have none yet get theirs in the new file.
    pub fn open(dir: &Path, metrics: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let text = match std::fs::read_to_string(metrics) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(metrics, e)),
        };
        let lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| Error::line(metrics, i + 1, format!("not JSON: {e}"))))
            .collect::<Result<Vec<serde_json::Value>>>()?;
        let (kept, newest) = cut_back(dir, lines.len())?;
        let secs = now() as u64;
        let (secs, seq) = if secs > newest.0 { (secs, 0) } else { (newest.0, newest.1 + 1) };
        let path = dir.join(format!("{PREFIX}{secs:010}.{seq:04}.sdpo"));
        let file = File::create_new(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { file, path, step: 0 };
        w.append(&Event { wall_time: now(), step: 0, file_version: Some(FILE_VERSION.into()), scalars: Vec::new() })?;
        for (i, line) in lines.iter().enumerate() {
            if i < kept {
                w.advance(line);
            } else {
                w.write(line)?;
            }
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn advance(&mut self, line: &serde_json::Value) {
        if let Some(s) = line.get("train/global_step").and_then(|v| v.as_i64()) {
            self.step = s;
        }
    }

    /// The event of one metrics.jsonl line.
    pub fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        self.advance(line);
        self.append(&Event { wall_time: now(), step: self.step, file_version: None, scalars: scalars(line) })
    }

    fn append(&mut self, e: &Event) -> Result<()> {
        self.file.write_all(&record(&e.encode())).and_then(|()| self.file.flush()).map_err(|e| Error::io(&self.path, e))
    }
}

/// Keeps the first `lines` line events of the event files in `dir` and removes the rest:
/// a file's tail, a file left with no line event, and, after a record that cannot be read
/// (a write cut short), everything from it on. Returns how many line events are kept and
/// the newest (time, sequence number) in a kept file's name.
fn cut_back(dir: &Path, lines: usize) -> Result<(usize, (u64, u64))> {
    let (mut kept, mut limit, mut newest) = (0, lines, (0, 0));
    for path in event_files(dir)? {
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let (recs, problem) = records(&bytes);
        let (mut end, mut own, mut whole) = (0, 0, true);
        for (at, data) in recs {
            let is_line = Event::decode(data).is_ok_and(|e| e.file_version.is_none());
            if is_line && kept == limit {
                whole = false;
                break;
            }
            end = at + 16 + data.len();
            if is_line {
                kept += 1;
                own += 1;
            }
        }
        if whole && problem.is_some() {
            limit = kept;
        }
        if own == 0 {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            continue;
        }
        if end < bytes.len() {
            let f = std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| Error::io(&path, e))?;
            f.set_len(end as u64).map_err(|e| Error::io(&path, e))?;
        }
        newest = newest.max(name_time(&path));
    }
    Ok((kept, newest))
}

/// The (time, sequence number) of an event file named `PREFIX` + `TIME.SEQ.sdpo`.
fn name_time(path: &Path) -> (u64, u64) {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut parts = name[PREFIX.len()..].split('.').map(|s| s.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_values() {
        // RFC 3720 (iSCSI) B.4 and the CRC catalogue's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(&(0u8..32).collect::<Vec<_>>()), 0x46DD_794E);
    }

    #[test]
    fn an_event_encodes_as_protobuf_and_decodes_back() {
        let e = Event {
            wall_time: 1.5,
            step: 300,
            file_version: None,
            scalars: vec![("loss".into(), 0.25), ("train/grad_norm".into(), -3.0)],
        };
        let bytes = e.encode();
        // wall_time: key 0x09 + 8 bytes; step: key 0x10, varint 300 = ac 02
        assert_eq!(&bytes[..9], &[0x09, 0, 0, 0, 0, 0, 0, 0xf8, 0x3f]);
        assert_eq!(&bytes[9..12], &[0x10, 0xac, 0x02]);
        // summary (field 5) → value (field 1) → tag "loss", simple_value 0.25 (0x3e800000)
        assert_eq!(&bytes[12..16], &[0x2a, bytes.len() as u8 - 14, 0x0a, 11]);
        assert_eq!(&bytes[16..27], &[0x0a, 4, b'l', b'o', b's', b's', 0x15, 0, 0, 0x80, 0x3e]);
        assert_eq!(Event::decode(&bytes).unwrap(), e);
    }

    #[test]
    fn records_with_a_bad_crc_or_cut_short_are_refused() {
        let mut bytes = record(b"abc");
        bytes.extend(record(b"defg"));
        let (recs, problem) = records(&bytes);
        assert_eq!(recs, vec![(0, &b"abc"[..]), (19, &b"defg"[..])]);
        assert!(problem.is_none());
        let (recs, problem) = records(&bytes[..bytes.len() - 1]);
        assert_eq!(recs.len(), 1);
        assert!(problem.unwrap().contains("byte 19"));
        bytes[13] ^= 1; // a data byte of the first record
        let (recs, problem) = records(&bytes);
        assert!(recs.is_empty() && problem.unwrap().contains("data CRC"));
    }

    fn line(step: Option<i64>, loss: f64) -> serde_json::Value {
        match step {
            Some(s) => serde_json::json!({"loss": loss, "sdpo/chunk": "a", "train/global_step": s}),
            None => serde_json::json!({"eval/mean_gamma": loss}),
        }
    }

    fn all_events(dir: &Path) -> Vec<Event> {
        event_files(dir).unwrap().iter().flat_map(|p| read_events(p).unwrap()).collect()
    }

    #[test]
    fn each_process_writes_one_event_per_line_and_a_resume_cuts_back_to_the_kept_lines() {
        let d = tempfile::tempdir().unwrap();
        let (dir, metrics) = (d.path().join(DIR), d.path().join("metrics.jsonl"));
        let lines = [line(None, 9.0), line(Some(1), 0.5), line(Some(2), 0.4), line(None, 7.0), line(Some(3), 0.3)];
        let text = |n: usize| lines[..n].iter().map(|l| format!("{l}\n")).collect::<String>();
        // A first process writes four lines, then is killed.
        let mut w = EventWriter::open(&dir, &metrics).unwrap();
        for l in &lines[..4] {
            w.write(l).unwrap();
        }
        drop(w);
        let ev = all_events(&dir);
        assert_eq!(ev[0].file_version.as_deref(), Some(FILE_VERSION));
        let steps: Vec<i64> = ev[1..].iter().map(|e| e.step).collect();
        assert_eq!(steps, [0, 1, 2, 2], "an eval line takes the step of the update before it");
        assert_eq!(ev[2].scalars, [("loss".to_string(), 0.5), ("train/global_step".to_string(), 1.0)]);
        // Its last state kept two lines: a resume keeps two events and writes on from there.
        std::fs::write(&metrics, text(2)).unwrap();
        let mut w = EventWriter::open(&dir, &metrics).unwrap();
        for l in &lines[2..] {
            w.write(l).unwrap();
        }
        let first = w.path().to_path_buf();
        drop(w);
        let got: Vec<(i64, Vec<(String, f32)>)> =
            all_events(&dir).into_iter().filter(|e| e.file_version.is_none()).map(|e| (e.step, e.scalars)).collect();
        let want: Vec<(i64, Vec<(String, f32)>)> =
            lines.iter().zip([0, 1, 2, 2, 3]).map(|(l, s)| (s, scalars(l))).collect();
        assert_eq!(got, want);
        // A process killed after a line but before its event: the next one writes it.
        std::fs::write(&metrics, text(5) + &format!("{}\n", line(Some(4), 0.2))).unwrap();
        EventWriter::open(&dir, &metrics).unwrap();
        let ev: Vec<Event> = all_events(&dir).into_iter().filter(|e| e.file_version.is_none()).collect();
        assert_eq!((ev.len(), ev[5].step), (6, 4));
        // A process killed inside an event's record: the record is cut off and its line
        // written again.
        let last = event_files(&dir).unwrap().pop().unwrap();
        let len = std::fs::metadata(&last).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(len - 3).unwrap();
        EventWriter::open(&dir, &metrics).unwrap();
        let ev: Vec<Event> = all_events(&dir).into_iter().filter(|e| e.file_version.is_none()).collect();
        assert_eq!((ev.len(), ev[5].step, ev[5].scalars.clone()), (6, 4, scalars(&line(Some(4), 0.2))));
        // A fresh start (no lines) leaves no event of an earlier run.
        std::fs::write(&metrics, "").unwrap();
        let w = EventWriter::open(&dir, &metrics).unwrap();
        assert_eq!(event_files(&dir).unwrap(), [w.path().to_path_buf()]);
        assert!(!first.exists());
    }
}
