//! Progress lines on stderr for long passes over data (tokenizing, scoring). Quiet for
//! work that ends within `FIRST_AFTER`: a line appears only once the pass has run that
//! long, then every `EVERY`, and a last line when it ends. Plain lines, not a redrawn bar,
//! so they read the same in a terminal and in a log file. Safe to advance from many
//! threads.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const FIRST_AFTER: Duration = Duration::from_secs(2);
const EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    /// What is being done, e.g. "tokenizing".
    what: &'static str,
    /// What is counted, e.g. "pairs".
    unit: &'static str,
    total: usize,
    done: AtomicUsize,
    start: Instant,
    /// Milliseconds after `start` at which the next line is due; `u64::MAX` when off.
    next_ms: AtomicU64,
    /// Lines printed so far.
    lines: AtomicUsize,
}

impl Progress {
    /// A pass over `total` units; `show` false (e.g. `--quiet`) prints nothing.
    pub fn new(what: &'static str, unit: &'static str, total: usize, show: bool) -> Self {
        let first = if show { FIRST_AFTER.as_millis() as u64 } else { u64::MAX };
        Progress {
            what,
            unit,
            total,
            done: AtomicUsize::new(0),
            start: Instant::now(),
            next_ms: AtomicU64::new(first),
            lines: AtomicUsize::new(0),
        }
    }

    /// Counts `n` more units done, printing a line when one is due.
    pub fn add(&self, n: usize) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        let next = self.next_ms.load(Ordering::Relaxed);
        if next == u64::MAX {
            return;
        }
        let now = self.start.elapsed();
        let now_ms = now.as_millis() as u64;
        let later = now_ms + EVERY.as_millis() as u64;
        // One thread wins the line that is due.
        if now_ms >= next && self.next_ms.compare_exchange(next, later, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            let secs = now.as_secs_f64();
            let left = if done > 0 { secs * (self.total.saturating_sub(done)) as f64 / done as f64 } else { 0.0 };
            eprintln!(
                "{}: {done}/{} {} ({:.0}%), {secs:.0} s, about {left:.0} s left",
                self.what,
                self.total,
                self.unit,
                100.0 * done as f64 / self.total.max(1) as f64
            );
            self.lines.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether any line was printed (for tests and callers that want a closing line).
    pub fn printed(&self) -> bool {
        self.lines.load(Ordering::Relaxed) > 0
    }

    /// Ends the pass: a closing line if progress was shown.
    pub fn finish(&self) {
        if self.printed() {
            eprintln!(
                "{}: {} {} in {:.1} s",
                self.what,
                self.done.load(Ordering::Relaxed),
                self.unit,
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}
