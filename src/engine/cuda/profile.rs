//! Time per op category on the CUDA engine's stream while `Engine::set_profiling` is on,
//! measured where the work is launched, not between the engine's ops: every kernel
//! launcher and GEMM charges what it launches to its category (`Prof::launch`), a scope
//! (`Prof::scope`) charges a whole phase to one category (the LM head, GEMMs included)
//! and ends its section with it, and the host's waits on the stream (`Gpu::sync`) end the open section.
//!
//! The step is cut into sections, each charged to one category: a launch of category `c`
//! ends the open section and opens one for `c` (nothing when `c` is already open, so a run
//! of one family costs one cut), and a wait ends it, so the device's idle time is charged
//! to no one. Work outside every section (batch uploads, the loss on the host, waiting on
//! the stream) is what `sdpo-run bench` reports as "other". On a device the cuts are
//! events on the one stream, read by `collect` once the step has synchronised: a
//! section's time is the device's time from its first launch to its last, launch gaps
//! included. Events are kept for reuse, not created per cut. On the kernel simulator
//! (where every launch has finished when it returns) the cuts are the wall clock. Off, a
//! launch costs one relaxed atomic load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};

use crate::engine::profile::{Category, Profile};
use crate::error::{Error, Result};

/// The category of a kernel by its name: the `extern "C"` names of kernels/*.cu.
fn kernel_category(name: &str) -> Category {
    if name.starts_with("attention") {
        Category::Attention
    } else if name.starts_with("logprobs") {
        Category::LmHead
    } else if name.starts_with("adamw") || name.starts_with("grad_norm") {
        Category::Optimizer
    } else {
        Category::NormElementwise
    }
}

/// A handle on one engine's profiler, shared by its kernels, its GEMMs and its `Gpu`.
#[derive(Clone, Default)]
pub struct Prof(Arc<Shared>);

#[derive(Default)]
struct Shared {
    on: AtomicBool,
    timeline: Mutex<Timeline>,
}

impl Prof {
    /// A profiler (off) cutting the timeline of `stream` (`None`: the simulator's wall clock).
    pub fn new(stream: Option<Arc<CudaStream>>) -> Self {
        let timeline = Timeline { stream, ..Timeline::default() };
        Prof(Arc::new(Shared { on: AtomicBool::new(false), timeline: Mutex::new(timeline) }))
    }

    fn timeline(&self) -> MutexGuard<'_, Timeline> {
        self.0.timeline.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn on(&self) -> bool {
        self.0.on.load(Ordering::Relaxed)
    }

    /// Starts (or stops) profiling with empty totals.
    pub fn reset(&self, on: bool) {
        let mut t = self.timeline();
        let stream = t.stream.take();
        *t = Timeline { stream, ..Timeline::default() };
        self.0.on.store(on, Ordering::Relaxed);
    }

    pub fn is_on(&self) -> bool {
        self.on()
    }

    /// Charges what the stream runs from here on to `c` (or to the open scope's category).
    #[inline]
    pub fn launch(&self, c: Category) -> Result<()> {
        if !self.on() {
            return Ok(());
        }
        self.timeline().section(c)
    }

    /// `launch` for the kernel `name`, whose category is worked out only when profiling.
    #[inline]
    pub fn launch_kernel(&self, name: &str) -> Result<()> {
        if !self.on() {
            return Ok(());
        }
        self.timeline().section(kernel_category(name))
    }

    /// Charges every launch until the guard drops to `c`.
    pub fn scope(&self, c: Category) -> Scope {
        if self.on() {
            self.timeline().scope = Some(c);
        }
        Scope(self.clone())
    }

    /// Ends the open section (the host is about to wait on the stream).
    #[inline]
    pub fn pause(&self) -> Result<()> {
        if !self.on() {
            return Ok(());
        }
        self.timeline().pause()
    }

    /// Forgets a section left open by a step that failed half-way, so that the next step
    /// does not charge the time in between to it.
    pub fn drop_open(&self) {
        if self.on() {
            self.timeline().open = None;
        }
    }

    /// Adds the ended sections to the totals (waits for their end events: call it after
    /// the step has synchronised) and recycles the events.
    pub fn collect(&self) -> Result<()> {
        if !self.on() {
            return Ok(());
        }
        self.timeline().collect()
    }

    /// The totals so far, leaving zeros.
    pub fn take(&self) -> Profile {
        std::mem::take(&mut self.timeline().total)
    }
}

/// While it lives, every launch is charged to its category (`Prof::scope`); its end ends
/// the open section.
pub struct Scope(Prof);

impl Drop for Scope {
    fn drop(&mut self) {
        if self.0.on() {
            let mut t = self.0.timeline();
            t.scope = None;
            // A failed cut here fails the next one too, which reports it.
            let _ = t.pause();
        }
    }
}

/// A cut on the engine's timeline: a CUDA event recorded on its stream, or, on the kernel
/// simulator, the wall clock.
enum Cut {
    Event(CudaEvent),
    Wall(Instant),
}

#[derive(Default)]
struct Timeline {
    stream: Option<Arc<CudaStream>>,
    /// Cuts since the last `collect`; sections refer to them by index.
    cuts: Vec<Cut>,
    /// Ended sections not yet read: (start cut, end cut, category).
    ended: Vec<(usize, usize, Category)>,
    open: Option<(usize, Category)>,
    /// The category of every launch while a `Scope` lives.
    scope: Option<Category>,
    /// Events already read, to record again.
    spare: Vec<CudaEvent>,
    total: Profile,
}

impl Timeline {
    fn cut(&mut self) -> Result<usize> {
        let cut = match &self.stream {
            None => Cut::Wall(Instant::now()),
            Some(stream) => {
                let event = match self.spare.pop() {
                    Some(e) => e,
                    // cudarc's default flags disable timing: ask for a timing event.
                    None => stream
                        .context()
                        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(|e| Error::Cuda(format!("profiling: creating an event: {e}")))?,
                };
                event.record(stream).map_err(|e| Error::Cuda(format!("profiling: recording an event: {e}")))?;
                Cut::Event(event)
            }
        };
        self.cuts.push(cut);
        Ok(self.cuts.len() - 1)
    }

    fn section(&mut self, c: Category) -> Result<()> {
        let c = self.scope.unwrap_or(c);
        if self.open.is_some_and(|(_, o)| o == c) {
            return Ok(());
        }
        let i = self.cut()?;
        if let Some((start, o)) = self.open.take() {
            self.ended.push((start, i, o));
        }
        self.open = Some((i, c));
        Ok(())
    }

    fn pause(&mut self) -> Result<()> {
        if let Some((start, o)) = self.open.take() {
            let i = self.cut()?;
            self.ended.push((start, i, o));
        }
        Ok(())
    }

    fn collect(&mut self) -> Result<()> {
        if self.cuts.is_empty() {
            return Ok(());
        }
        for (start, end, c) in std::mem::take(&mut self.ended) {
            let secs = match (&self.cuts[start], &self.cuts[end]) {
                (Cut::Event(a), Cut::Event(b)) => {
                    a.elapsed_ms(b).map_err(|e| Error::Cuda(format!("profiling: reading events: {e}")))? as f64 / 1e3
                }
                (Cut::Wall(a), Cut::Wall(b)) => b.duration_since(*a).as_secs_f64(),
                _ => unreachable!("one engine's cuts are all events or all instants"),
            };
            let total = &mut self.total;
            *match c {
                Category::Attention => &mut total.attention_s,
                Category::Gemm => &mut total.gemm_s,
                Category::LmHead => &mut total.lm_head_logprobs_s,
                Category::NormElementwise => &mut total.norm_elementwise_s,
                Category::Optimizer => &mut total.optimizer_s,
            } += secs;
        }
        // A section still open here started in a step that failed; it is dropped.
        self.open = None;
        for cut in self.cuts.drain(..) {
            if let Cut::Event(e) = cut {
                self.spare.push(e);
            }
        }
        Ok(())
    }
}
