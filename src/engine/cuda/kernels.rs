//! One launcher per kernel, in the order the data flows through them (the order of
//! `ops.rs`): embedding, rmsnorm, rope, attention, swiglu, logprobs, adamw, casts. Each
//! checks the shapes, lengths and alignment its kernel assumes and returns
//! `Error::Invalid` naming the argument instead of launching.
//!
//! Buffers are passed as `DPtr<T>`: a raw device address and a length in elements, so a
//! launcher can take a view into a larger allocation (a layer's slice of the fused weight
//! buffer, one chunk of the logits) without borrowing fights. The engine owns the memory
//! (`CudaSlice`) and runs everything on one stream with cudarc's event tracking off.
//! Argument order follows the kernels: outputs, inputs, sizes.
//!
//! Names: a launcher is named as its kernel's `extern "C"` name, which is
//! `<op>_<forward|backward>[_<variant>]` for the model's ops (`attention_forward` launches
//! `attention_forward_hd{D}`, the variant chosen by head_dim) and `<op>[_<variant>]` for
//! the ops outside the differentiated model, which have no direction: `adamw_step`,
//! `grad_norm` (then `grad_norm_reduce`), `cast_f32_bf16`, `cast_bf16_f32`. One launcher
//! runs another's kernel, named for what it does: `copy_strided_f32_bf16` (rope_backward
//! rotating by 0). A `_from_xhat` op takes the forward's normalized x̂ where its CPU twin
//! of the same op name takes x.

// Launchers mirror their kernels' argument lists (outputs, inputs, sizes).
#![allow(clippy::too_many_arguments)]

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use super::profile::Prof;
use super::sim::{declarations, KernelSim};
use super::{arch_for, host, kernel_image, KERNEL_SOURCES};
use crate::error::{Error, Result};

/// Every kernel a launcher uses: (file, `extern "C"` name). The `cuda_compile` test
/// checks that each one exists in the compiled file.
pub const KERNEL_NAMES: &[(&str, &str)] = &[
    ("elementwise.cu", "embedding_forward"),
    ("elementwise.cu", "embedding_backward"),
    ("rmsnorm.cu", "rmsnorm_forward"),
    ("rmsnorm.cu", "rmsnorm_forward_from_xhat"),
    ("rmsnorm.cu", "rmsnorm_backward_from_xhat"),
    ("rope.cu", "rope_forward"),
    ("rope.cu", "rope_backward"),
    ("attention.cu", "attention_forward_hd16"),
    ("attention.cu", "attention_forward_hd32"),
    ("attention.cu", "attention_forward_hd64"),
    ("attention.cu", "attention_forward_hd128"),
    ("attention.cu", "attention_backward_hd16"),
    ("attention.cu", "attention_backward_hd32"),
    ("attention.cu", "attention_backward_hd64"),
    ("attention.cu", "attention_backward_hd128"),
    ("attention.cu", "attention_backward_delta"),
    ("elementwise.cu", "swiglu_forward"),
    ("elementwise.cu", "swiglu_backward"),
    ("logprobs.cu", "logprobs_forward"),
    ("logprobs.cu", "logprobs_backward"),
    ("adamw.cu", "adamw_step"),
    ("adamw.cu", "grad_norm"),
    ("adamw.cu", "grad_norm_reduce"),
    ("elementwise.cu", "cast_f32_bf16"),
    ("elementwise.cu", "cast_bf16_f32"),
];

/// Head dims the attention kernels are instantiated for.
pub const ATTENTION_HEAD_DIMS: &[usize] = &[16, 32, 64, 128];

/// bf16 values live on the device as their 16 raw bits.
pub type Bf16 = u16;

/// A device address and a length in elements of `T`.
#[derive(Debug)]
pub struct DPtr<T> {
    pub ptr: u64,
    pub len: usize,
    _t: PhantomData<T>,
}

impl<T> Clone for DPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DPtr<T> {}

impl<T> DPtr<T> {
    /// # Safety
    /// `ptr` must address `len` valid elements of `T` on the engine's device for as long
    /// as the `DPtr` is used.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        DPtr { ptr, len, _t: PhantomData }
    }

    /// A view of a whole allocation.
    pub fn of(s: &CudaSlice<T>, stream: &CudaStream) -> Self {
        let (ptr, _sync) = s.device_ptr(stream);
        DPtr { ptr, len: s.len(), _t: PhantomData }
    }

    /// Elements `start..start + len`.
    pub fn slice(self, start: usize, len: usize) -> Result<Self> {
        if start + len > self.len {
            return Err(Error::invalid(format!(
                "device view {start}..{} is outside a buffer of {} elements",
                start + len,
                self.len
            )));
        }
        Ok(DPtr { ptr: self.ptr + (start * std::mem::size_of::<T>()) as u64, len, _t: PhantomData })
    }

    /// `len` elements of `U` from element `start` of this view: one allocation holding
    /// buffers of several types in turn (`start` must leave them aligned for `U`).
    pub fn cast<U>(self, start: usize, len: usize) -> Result<DPtr<U>> {
        let (from, bytes) = (start * std::mem::size_of::<T>(), len * std::mem::size_of::<U>());
        let ptr = self.ptr + from as u64;
        if from + bytes > self.len * std::mem::size_of::<T>() || !ptr.is_multiple_of(std::mem::align_of::<U>() as u64) {
            return Err(Error::invalid(format!(
                "device view of {bytes} bytes at byte {from} is outside or misaligned in a buffer of {} bytes",
                self.len * std::mem::size_of::<T>()
            )));
        }
        Ok(DPtr { ptr, len, _t: PhantomData })
    }

    fn aligned16(&self) -> bool {
        self.ptr.is_multiple_of(16)
    }
}

/// The null pointer (an optional output the kernel skips).
pub fn null<T>() -> DPtr<T> {
    DPtr { ptr: 0, len: 0, _t: PhantomData }
}

fn need(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(what()))
    }
}

fn need_len<T>(name: &str, p: &DPtr<T>, at_least: usize) -> Result<()> {
    need(p.len >= at_least, || format!("{name}: {} elements, the kernel needs at least {at_least}", p.len))
}

fn need_vec<T>(name: &str, p: &DPtr<T>) -> Result<()> {
    need(p.aligned16(), || format!("{name}: device address {:#x} is not 16-byte aligned", p.ptr))
}

fn to_i32(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::invalid(format!("{name} = {v} does not fit the kernel's 32-bit index")))
}

fn blocks(work: usize, per_block: usize) -> u32 {
    work.div_ceil(per_block).max(1) as u32
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub n_tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Row strides (elements) of q, k/v (one stride for both), o / dO.
    pub q_stride: usize,
    pub kv_stride: usize,
    pub o_stride: usize,
}

/// The pair mask on the device: per token group and branch, and the group starts.
#[derive(Clone, Copy, Debug)]
pub struct AttnMaskDev {
    pub group: DPtr<u32>,
    pub branch: DPtr<u8>,
    pub group_start: DPtr<u32>,
}

/// Queries per block of `attention_forward_hd{D}` (kernels/attention.cu: FWD_BM).
const ATTENTION_FORWARD_BLOCK_QUERIES: usize = 128;

/// One of kernels/attention.cu's dynamic shared-memory tables (`ATTENTION_FORWARD_SMEM`,
/// `ATTENTION_BACKWARD_SMEM`: bytes per block, one entry per `ATTENTION_HEAD_DIMS`, in
/// order), read from its source line: the table is the one statement of these sizes, and
/// each kernel static_asserts that its layout ends where its entry says.
fn attention_smem_table(name: &str) -> Result<Vec<u32>> {
    let src = KERNEL_SOURCES.iter().find(|(f, _)| *f == "attention.cu").map(|(_, s)| *s);
    let src = src.ok_or_else(|| Error::Cuda("kernels/attention.cu is not embedded".into()))?;
    let prefix = format!("constexpr int {name}[{}] = {{", ATTENTION_HEAD_DIMS.len());
    let bad = || Error::Cuda(format!("kernels/attention.cu: expected one line `{prefix}n, ...}};` listing bytes"));
    let body = src.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|l| l.strip_suffix("};")).ok_or_else(bad)?;
    let sizes = body.split(',').map(|x| x.trim().parse::<u32>()).collect::<std::result::Result<Vec<_>, _>>();
    sizes.ok().filter(|v| v.len() == ATTENTION_HEAD_DIMS.len()).ok_or_else(bad)
}

/// Dynamic shared memory of an attention kernel at `head_dim` (one of ATTENTION_HEAD_DIMS),
/// from `attention_smem_table`, parsed once.
fn attention_smem(backward: bool, head_dim: usize) -> u32 {
    static TABLES: std::sync::OnceLock<std::result::Result<[Vec<u32>; 2], String>> = std::sync::OnceLock::new();
    let tables = TABLES.get_or_init(|| {
        let read = |name| attention_smem_table(name).map_err(|e| e.to_string());
        Ok([read("ATTENTION_FORWARD_SMEM")?, read("ATTENTION_BACKWARD_SMEM")?])
    });
    let tables = tables.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let i = ATTENTION_HEAD_DIMS.iter().position(|&d| d == head_dim);
    let i = i.unwrap_or_else(|| panic!("attention: head_dim {head_dim} is not one of {ATTENTION_HEAD_DIMS:?}"));
    tables[backward as usize][i]
}

/// Dynamic shared memory of `attention_forward_hd{D}`: two stages of the 64-key K and V
/// tiles, the 128-query Q tile where it stays in shared memory (D = 128), and the query and
/// key metadata (kernels/attention.cu).
pub fn attention_forward_smem(head_dim: usize) -> u32 {
    attention_smem(false, head_dim)
}

/// Dynamic shared memory of `attention_backward_hd{D}`: the 64-key K and V tiles, two
/// stages of the 32-query Q and dO tiles, the dS tile, and the query (lse, D, mask) and key
/// metadata (kernels/attention.cu).
pub fn attention_backward_smem(head_dim: usize) -> u32 {
    attention_smem(true, head_dim)
}

/// Largest hidden size `rmsnorm_backward_from_xhat` takes: its dw columns (one f32 each) live in
/// dynamic shared memory, 48 KB at most.
pub const RMSNORM_MAX_HIDDEN: usize = 12288;

/// Dynamic shared memory of `rmsnorm_backward_from_xhat` (kernels/rmsnorm.cu): one f32 per column.
pub fn rmsnorm_backward_from_xhat_smem(hidden: usize) -> u32 {
    (hidden * 4) as u32
}

/// Shared memory, static and dynamic together, a block may use without opting in.
pub const DEFAULT_DYNAMIC_SMEM: u32 = 48 << 10;

/// The most dynamic shared memory a launch of `kernel` asks for (0 for kernels without
/// any). `Kernels::load` opts a kernel in when this plus its static shared memory passes
/// 48 KB (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES; without it such a launch fails),
/// and `check_launch` refuses a launch asking for more.
pub fn dynamic_smem_limit(kernel: &str) -> u32 {
    let attention = |prefix: &str, smem: fn(usize) -> u32| {
        let hd = kernel.strip_prefix(prefix).and_then(|d| d.parse::<usize>().ok());
        hd.filter(|d| ATTENTION_HEAD_DIMS.contains(d)).map(smem)
    };
    attention("attention_forward_hd", attention_forward_smem)
        .or_else(|| attention("attention_backward_hd", attention_backward_smem))
        .unwrap_or(match kernel {
            "rmsnorm_backward_from_xhat" => rmsnorm_backward_from_xhat_smem(RMSNORM_MAX_HIDDEN),
            _ => 0,
        })
}

/// The loaded kernels of one device, or their stand-in on the CPU.
pub struct Kernels {
    /// `None`: no device; the kernels run on the simulator (`sim`).
    pub stream: Option<Arc<CudaStream>>,
    sim: Option<KernelSim>,
    pub arch: String,
    pub sm_count: u32,
    /// Blocks of 256 threads of `adamw_step` and `grad_norm` that fit on one SM
    /// at once (the driver's occupancy query): their grid-stride grids are one full wave.
    adamw_resident: u32,
    grad_norm_resident: u32,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Kernels this device cannot run, with why (more shared memory per block than it has):
    /// only a launch of one of them fails, not the whole load.
    unavailable: HashMap<&'static str, String>,
    _modules: Vec<Arc<CudaModule>>,
    /// Charged with every launch (`launch!`), by the kernel's category.
    pub prof: Prof,
}

impl Kernels {
    /// Loads (compiling with NVRTC if needed) every kernel file for the context's device.
    pub fn load(ctx: &Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
        let cuda = |e: cudarc::driver::DriverError| Error::Cuda(e.to_string());
        let (major, minor) = ctx.compute_capability().map_err(cuda)?;
        if major < 8 {
            return Err(Error::NoGpu(format!(
                "compute capability {major}.{minor}: the bf16 tensor-core kernels need 8.0 (Ampere) or newer"
            )));
        }
        let arch = arch_for(major, minor);
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda)? as u32;
        let mut funcs = HashMap::new();
        let mut modules = Vec::new();
        for (file, _) in KERNEL_SOURCES {
            let image = kernel_image(file, &arch)?;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(image))
                .map_err(|e| Error::Cuda(format!("loading kernels/{file} for {arch}: {e}")))?;
            for (_, name) in KERNEL_NAMES.iter().filter(|(f, _)| f == file) {
                let f = module.load_function(name).map_err(|e| Error::Cuda(format!("kernel {name}: {e}")))?;
                funcs.insert(*name, f);
            }
            modules.push(module);
        }
        // Without an opt-in a block gets 48 KB of shared memory, static and dynamic together
        // (rmsnorm_backward_from_xhat: up to 48 KB dynamic plus 128 bytes static); with it, up to the
        // device's per-block maximum (227 KB on sm_90, 163 KB on sm_80, 99 KB on sm_86/89,
        // where the D = 128 attention forward's 102.75 KB does not fit).
        let smem_max = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(cuda)? as u32;
        let mut unavailable = HashMap::new();
        for (name, f) in &funcs {
            let limit = dynamic_smem_limit(name);
            let static_smem = f.shared_size_bytes().map_err(|e| Error::Cuda(format!("{name}: {e}")))? as u32;
            if limit + static_smem > smem_max {
                unavailable.insert(
                    *name,
                    format!(
                        "kernel {name} needs {} bytes of shared memory per block ({static_smem} static); this \
                         GPU ({arch}) allows {smem_max}",
                        limit + static_smem
                    ),
                );
            } else if limit + static_smem > DEFAULT_DYNAMIC_SMEM {
                f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, limit as i32)
                    .map_err(|e| Error::Cuda(format!("{name}: opting into {limit} bytes of shared memory: {e}")))?;
            }
        }
        funcs.retain(|name, _| !unavailable.contains_key(name));
        let resident = |name: &str| {
            funcs[name]
                .occupancy_max_active_blocks_per_multiprocessor(256, 0, None)
                .map_err(|e| Error::Cuda(format!("{name}: occupancy query: {e}")))
                .map(|b| b.max(1))
        };
        let (adamw_resident, grad_norm_resident) = (resident("adamw_step")?, resident("grad_norm")?);
        Ok(Kernels {
            stream: Some(stream),
            sim: None,
            arch,
            sm_count,
            adamw_resident,
            grad_norm_resident,
            funcs,
            unavailable,
            _modules: modules,
            prof: Prof::default(),
        })
    }

    /// Every launcher checks its arguments, then runs the kernel's own source on the CPU
    /// (`sim.rs`); buffers live in host memory (`host.rs`).
    pub fn sim(sim: KernelSim) -> Self {
        Kernels {
            stream: None,
            sim: Some(sim),
            arch: "sim".into(),
            sm_count: 4,
            adamw_resident: 2,
            grad_norm_resident: 2,
            funcs: HashMap::new(),
            unavailable: HashMap::new(),
            _modules: Vec::new(),
            prof: Prof::default(),
        }
    }

    /// Whether there is a device behind the kernels (not the simulator).
    pub fn on_device(&self) -> bool {
        self.stream.is_some()
    }

    fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs.get(name).ok_or_else(|| match self.unavailable.get(name) {
            Some(why) => Error::Cuda(why.clone()),
            None => Error::Cuda(format!("kernel {name} is not loaded")),
        })
    }

    fn cfg(grid: (u32, u32), block: u32, smem: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (grid.0, grid.1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem }
    }

    /// Zeroes `p` on the stream.
    pub fn zero<T>(&self, p: DPtr<T>) -> Result<()> {
        let Some(stream) = &self.stream else {
            // SAFETY: without a device a DPtr addresses `len` host elements.
            unsafe { host::zero(p) };
            return Ok(());
        };
        // SAFETY: `p` addresses `len` elements on this device (DPtr's contract).
        unsafe {
            cudarc::driver::result::memset_d8_async(p.ptr, 0, p.len * std::mem::size_of::<T>(), stream.cu_stream())
        }
        .map_err(|e| Error::Cuda(format!("memset: {e}")))
    }
}

/// Launches `$name` with the given config. On a device each argument is bound to a local
/// that lives until the launch is queued (the builder keeps references); on the simulator
/// the arguments go as 8-byte slots, once their kinds, the block size and the shared
/// memory match the kernel's declaration (`KernelSim::launch_checked`).
macro_rules! launch {
    ($k:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        $k.prof.launch_kernel($name)?;
        if let Some(sim) = &$k.sim {
            let args = [$( declarations::arg($arg) ),*];
            // SAFETY: as for the device launch below; host-mode pointers address host memory.
            unsafe { sim.launch_checked($name, &$cfg, &args) }?;
        } else {
            let f = $k.func($name)?;
            let stream = $k.stream.as_ref().ok_or_else(|| Error::Cuda(format!("{}: no device", $name)))?;
            let mut b = stream.launch_builder(f);
            $( let a = $arg; b.arg(&a); )*
            // SAFETY: the launcher checked every length and alignment the kernel relies on;
            // the arguments and config match the kernel's declaration (checked on the
            // simulator, which runs this same argument list).
            unsafe { b.launch($cfg) }.map_err(|e| Error::Cuda(format!("{}: {e}", $name)))?;
        }
    }};
}

impl Kernels {
    /// The grid of the flat element-wise kernels (rmsnorm_forward_from_xhat, the casts):
    /// one thread per 8 consecutive elements, 256 threads a block.
    fn flat_cfg(count: usize) -> LaunchConfig {
        Self::cfg((blocks(count.div_ceil(8), 256), 1), 256, 0)
    }

    // --- embedding (elementwise.cu)

    /// `out[t] = table[tokens[t]]` (f32 rows from the bf16 table). Token ids are not
    /// checked on the device: the caller checks them against the vocabulary.
    pub fn embedding_forward(&self, out: DPtr<f32>, table: DPtr<Bf16>, tokens: DPtr<u32>, hidden: usize) -> Result<()> {
        let n = tokens.len;
        need(hidden.is_multiple_of(8), || format!("embedding: hidden {hidden} must be a multiple of 8"))?;
        need_len("embedding: out", &out, n * hidden)?;
        need(table.len.is_multiple_of(hidden), || "embedding: table length is not a multiple of hidden".into())?;
        need_vec("embedding: out", &out)?;
        need_vec("embedding: table", &table)?;
        let cfg = Self::cfg((blocks(n * hidden / 8, 256), 1), 256, 0);
        launch!(self, "embedding_forward", cfg; out.ptr, table.ptr, tokens.ptr, to_i32("n", n)?, hidden as i32);
        Ok(())
    }

    /// `dtable[tokens[t]] += dout[t]` for every token but `padding` (whose row gets
    /// nothing, as PyTorch's `nn.Embedding(padding_idx)`).
    pub fn embedding_backward(
        &self,
        dtable: DPtr<f32>,
        dout: DPtr<f32>,
        tokens: DPtr<u32>,
        hidden: usize,
        padding: Option<u32>,
    ) -> Result<()> {
        let n = tokens.len;
        need(hidden.is_multiple_of(8), || format!("embedding_backward: hidden {hidden} must be a multiple of 8"))?;
        need_len("embedding_backward: dout", &dout, n * hidden)?;
        need(dtable.len.is_multiple_of(hidden), || {
            "embedding_backward: table length is not a multiple of hidden".into()
        })?;
        need_vec("embedding_backward: dout", &dout)?;
        need_vec("embedding_backward: dtable", &dtable)?;
        let cfg = Self::cfg((blocks(n * hidden / 8, 256), 1), 256, 0);
        let padding = match padding {
            Some(p) => to_i32("padding", p as usize)?,
            None => -1,
        };
        launch!(self, "embedding_backward", cfg; dtable.ptr, dout.ptr, tokens.ptr, to_i32("n", n)?, hidden as i32,
            padding);
        Ok(())
    }

    // --- rmsnorm.cu

    /// `y = x·rstd·w` (bf16), `rstd` kept and, unless `xhat` is `null()`, `xhat = x·rstd`
    /// (bf16, for the backward); x f32 `[n, hidden]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_forward(
        &self,
        y: DPtr<Bf16>,
        rstd: DPtr<f32>,
        xhat: DPtr<Bf16>,
        x: DPtr<f32>,
        w: DPtr<Bf16>,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        need(hidden.is_multiple_of(8), || format!("rmsnorm: hidden {hidden} must be a multiple of 8"))?;
        need_len("rmsnorm: y", &y, n * hidden)?;
        need_len("rmsnorm: x", &x, n * hidden)?;
        need_len("rmsnorm: w", &w, hidden)?;
        need_len("rmsnorm: rstd", &rstd, n)?;
        for (name, ok) in [("y", y.aligned16()), ("x", x.aligned16()), ("w", w.aligned16())] {
            need(ok, || format!("rmsnorm: {name} is not 16-byte aligned"))?;
        }
        if xhat.ptr != 0 {
            need_len("rmsnorm: xhat", &xhat, n * hidden)?;
            need_vec("rmsnorm: xhat", &xhat)?;
        }
        let cfg = Self::cfg((blocks(n, 8), 1), 256, 0);
        launch!(self, "rmsnorm_forward", cfg; y.ptr, rstd.ptr, xhat.ptr, x.ptr, w.ptr, to_i32("n", n)?,
            hidden as i32, eps);
        Ok(())
    }

    /// `y = xhat·w` (bf16) from the forward's `xhat`: its `y` again, up to the last bit.
    pub fn rmsnorm_forward_from_xhat(
        &self,
        y: DPtr<Bf16>,
        xhat: DPtr<Bf16>,
        w: DPtr<Bf16>,
        n: usize,
        hidden: usize,
    ) -> Result<()> {
        need(hidden.is_multiple_of(8), || {
            format!("rmsnorm_forward_from_xhat: hidden {hidden} must be a multiple of 8")
        })?;
        for (name, p) in [("y", &y), ("xhat", &xhat)] {
            need_len(&format!("rmsnorm_forward_from_xhat: {name}"), p, n * hidden)?;
            need_vec(&format!("rmsnorm_forward_from_xhat: {name}"), p)?;
        }
        need_len("rmsnorm_forward_from_xhat: w", &w, hidden)?;
        need_vec("rmsnorm_forward_from_xhat: w", &w)?;
        launch!(self, "rmsnorm_forward_from_xhat", Self::flat_cfg(n * hidden); y.ptr, xhat.ptr, w.ptr, to_i32("n", n)?,
            hidden as i32);
        Ok(())
    }

    /// `dx (=|+=) rstd·(w∘dy − x̂·mean(w∘dy∘x̂))`, `dw += Σ dy∘x̂`; dy f32, x̂ the forward's
    /// bf16 `xhat`. Unless `dx16` is `null()`, also `dx16 = bf16(dx)` of the final dx, the
    /// same bits `cast_f32_bf16` would give.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_backward_from_xhat(
        &self,
        dx: DPtr<f32>,
        dx16: DPtr<Bf16>,
        dw: DPtr<f32>,
        dy: DPtr<f32>,
        xhat: DPtr<Bf16>,
        w: DPtr<Bf16>,
        rstd: DPtr<f32>,
        n: usize,
        hidden: usize,
        accumulate: bool,
    ) -> Result<()> {
        need(hidden.is_multiple_of(8) && hidden <= RMSNORM_MAX_HIDDEN, || {
            format!("rmsnorm_backward_from_xhat: hidden {hidden} must be a multiple of 8 and ≤ {RMSNORM_MAX_HIDDEN} (its shared memory)")
        })?;
        for (name, p) in [("dx", &dx), ("dy", &dy)] {
            need_len(&format!("rmsnorm_backward_from_xhat: {name}"), p, n * hidden)?;
            need_vec(&format!("rmsnorm_backward_from_xhat: {name}"), p)?;
        }
        need_len("rmsnorm_backward_from_xhat: xhat", &xhat, n * hidden)?;
        need_vec("rmsnorm_backward_from_xhat: xhat", &xhat)?;
        need_len("rmsnorm_backward_from_xhat: dw", &dw, hidden)?;
        need_len("rmsnorm_backward_from_xhat: w", &w, hidden)?;
        need_vec("rmsnorm_backward_from_xhat: w", &w)?;
        need_len("rmsnorm_backward_from_xhat: rstd", &rstd, n)?;
        if dx16.ptr != 0 {
            need_len("rmsnorm_backward_from_xhat: dx16", &dx16, n * hidden)?;
            need_vec("rmsnorm_backward_from_xhat: dx16", &dx16)?;
        }
        // A few blocks per SM: each adds its partial dw once.
        let grid = blocks(n, 8).min(self.sm_count * 2);
        let cfg = Self::cfg((grid, 1), 256, rmsnorm_backward_from_xhat_smem(hidden));
        launch!(self, "rmsnorm_backward_from_xhat", cfg; dx.ptr, dx16.ptr, dw.ptr, dy.ptr, xhat.ptr, w.ptr, rstd.ptr, to_i32("n", n)?,
            hidden as i32, accumulate as i32);
        Ok(())
    }

    // --- rope.cu

    fn check_rope(
        n: usize,
        n_heads: usize,
        head_dim: usize,
        stride: usize,
        positions: &DPtr<u32>,
        inv_freq: &DPtr<f32>,
    ) -> Result<()> {
        need(head_dim.is_multiple_of(2) && stride >= n_heads * head_dim, || {
            format!("rope: head_dim {head_dim} must be even and stride {stride} ≥ n_heads·head_dim")
        })?;
        need_len("rope: positions", positions, n)?;
        need_len("rope: inv_freq", inv_freq, head_dim / 2)
    }

    fn rope_threads(n: usize, n_heads: usize, head_dim: usize) -> usize {
        let half = head_dim / 2;
        n * n_heads * if half.is_multiple_of(8) { half / 8 } else { half }
    }

    /// Rotates heads `0..n_heads` of every row of x (bf16, row stride `stride`) in place.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_forward(
        &self,
        x: DPtr<Bf16>,
        positions: DPtr<u32>,
        inv_freq: DPtr<f32>,
        n: usize,
        n_heads: usize,
        head_dim: usize,
        stride: usize,
    ) -> Result<()> {
        Self::check_rope(n, n_heads, head_dim, stride, &positions, &inv_freq)?;
        need_len("rope: x", &x, (n - 1) * stride + n_heads * head_dim)?;
        if (head_dim / 2).is_multiple_of(8) {
            need(x.aligned16() && stride.is_multiple_of(8), || {
                "rope: x must be 16-byte aligned with stride % 8 == 0".into()
            })?;
        }
        let cfg = Self::cfg((blocks(Self::rope_threads(n, n_heads, head_dim), 256), 1), 256, 0);
        launch!(self, "rope_forward", cfg; x.ptr, positions.ptr, inv_freq.ptr, to_i32("n", n)?, n_heads as i32,
            head_dim as i32, stride as i32);
        Ok(())
    }

    /// dx (bf16, stride `out_stride`) = rotation by −θ of dy (f32, stride `in_stride`).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_backward(
        &self,
        dx: DPtr<Bf16>,
        dy: DPtr<f32>,
        positions: DPtr<u32>,
        inv_freq: DPtr<f32>,
        n: usize,
        n_heads: usize,
        head_dim: usize,
        out_stride: usize,
        in_stride: usize,
    ) -> Result<()> {
        Self::check_rope(n, n_heads, head_dim, out_stride.min(in_stride), &positions, &inv_freq)?;
        need_len("rope_backward: dx", &dx, (n - 1) * out_stride + n_heads * head_dim)?;
        need_len("rope_backward: dy", &dy, (n - 1) * in_stride + n_heads * head_dim)?;
        if (head_dim / 2).is_multiple_of(8) {
            need(
                dx.aligned16() && dy.aligned16() && out_stride.is_multiple_of(8) && in_stride.is_multiple_of(4),
                || "rope_backward: dx/dy must be 16-byte aligned with strides % 8 / % 4 == 0".into(),
            )?;
        }
        let cfg = Self::cfg((blocks(Self::rope_threads(n, n_heads, head_dim), 256), 1), 256, 0);
        launch!(self, "rope_backward", cfg; dx.ptr, dy.ptr, positions.ptr, inv_freq.ptr, to_i32("n", n)?,
            n_heads as i32, head_dim as i32, out_stride as i32, in_stride as i32);
        Ok(())
    }

    /// dx (bf16, stride `out_stride`) = bf16(dy) (f32, stride `in_stride`) over heads
    /// `0..n_heads` of every row: a strided copy with one rounding. It runs the
    /// `rope_backward` kernel with `zero_freq` (`head_dim / 2` zeros, which the caller
    /// keeps): a rotation by 0 multiplies by cos 0 = 1 and adds sin 0 = 0 times the other
    /// half, so every value is dy exactly before it is rounded; `positions` only needs `n`
    /// readable entries.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_strided_f32_bf16(
        &self,
        dx: DPtr<Bf16>,
        dy: DPtr<f32>,
        positions: DPtr<u32>,
        zero_freq: DPtr<f32>,
        n: usize,
        n_heads: usize,
        head_dim: usize,
        out_stride: usize,
        in_stride: usize,
    ) -> Result<()> {
        self.rope_backward(dx, dy, positions, zero_freq, n, n_heads, head_dim, out_stride, in_stride)
    }

    // --- attention.cu

    fn check_attn(&self, d: &AttnDims, mask: &AttnMaskDev) -> Result<()> {
        need(ATTENTION_HEAD_DIMS.contains(&d.head_dim), || {
            format!("attention: head_dim {} is not one of the compiled {:?}", d.head_dim, ATTENTION_HEAD_DIMS)
        })?;
        need(d.n_kv_heads > 0 && d.n_heads.is_multiple_of(d.n_kv_heads), || {
            format!("attention: n_heads {} is not a multiple of n_kv_heads {}", d.n_heads, d.n_kv_heads)
        })?;
        need(d.n_tokens > 0, || "attention: no tokens".into())?;
        for (name, s, min) in [
            ("q_stride", d.q_stride, d.n_heads * d.head_dim),
            ("kv_stride", d.kv_stride, d.n_kv_heads * d.head_dim),
            ("o_stride", d.o_stride, d.n_heads * d.head_dim),
        ] {
            need(s >= min && s.is_multiple_of(8), || {
                format!("attention: {name} {s} must be ≥ {min} and a multiple of 8")
            })?;
        }
        need_len("attention: group", &mask.group, d.n_tokens)?;
        need_len("attention: branch", &mask.branch, d.n_tokens)?;
        need_len("attention: group_start", &mask.group_start, 2)
    }

    /// `o`, `lse [n, n_heads]` from q, k, v under the pair mask.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward(
        &self,
        o: DPtr<Bf16>,
        lse: DPtr<f32>,
        q: DPtr<Bf16>,
        k: DPtr<Bf16>,
        v: DPtr<Bf16>,
        mask: &AttnMaskDev,
        d: &AttnDims,
    ) -> Result<()> {
        self.check_attn(d, mask)?;
        let n = d.n_tokens;
        need_len("attention: q", &q, (n - 1) * d.q_stride + d.n_heads * d.head_dim)?;
        need_len("attention: k", &k, (n - 1) * d.kv_stride + d.n_kv_heads * d.head_dim)?;
        need_len("attention: v", &v, (n - 1) * d.kv_stride + d.n_kv_heads * d.head_dim)?;
        need_len("attention: o", &o, (n - 1) * d.o_stride + d.n_heads * d.head_dim)?;
        need_len("attention: lse", &lse, n * d.n_heads)?;
        for (name, p) in [("q", &q), ("k", &k), ("v", &v), ("o", &o)] {
            need_vec(&format!("attention: {name}"), p)?;
        }
        let name = format!("attention_forward_hd{}", d.head_dim);
        let grid = (blocks(n, ATTENTION_FORWARD_BLOCK_QUERIES), d.n_heads as u32);
        let cfg = Self::cfg(grid, 128, attention_forward_smem(d.head_dim));
        let scale = 1.0f32 / (d.head_dim as f32).sqrt();
        launch!(self, &name, cfg; o.ptr, lse.ptr, q.ptr, k.ptr, v.ptr, mask.group.ptr, mask.branch.ptr,
            mask.group_start.ptr, to_i32("n_tokens", n)?, d.n_heads as i32, d.n_kv_heads as i32,
            d.q_stride as i32, d.kv_stride as i32, d.o_stride as i32, scale);
        Ok(())
    }

    /// `delta [n, n_heads] = Σ_d dO·O` (the backward pass's row term).
    pub fn attention_backward_delta(
        &self,
        delta: DPtr<f32>,
        dout: DPtr<Bf16>,
        o: DPtr<Bf16>,
        d: &AttnDims,
    ) -> Result<()> {
        let n = d.n_tokens;
        need(ATTENTION_HEAD_DIMS.contains(&d.head_dim) && d.o_stride.is_multiple_of(8), || {
            format!(
                "attention_backward_delta: head_dim {} must be one of {ATTENTION_HEAD_DIMS:?} and o_stride {} a \
                 multiple of 8",
                d.head_dim, d.o_stride
            )
        })?;
        need_len("attention_backward_delta: delta", &delta, n * d.n_heads)?;
        need_len("attention_backward_delta: dO", &dout, (n - 1) * d.o_stride + d.n_heads * d.head_dim)?;
        need_len("attention_backward_delta: O", &o, (n - 1) * d.o_stride + d.n_heads * d.head_dim)?;
        need_vec("attention_backward_delta: dO", &dout)?;
        need_vec("attention_backward_delta: O", &o)?;
        // head_dim / 8 lanes per (token, head) row (kernels/attention.cu).
        let cfg = Self::cfg((blocks(n * d.n_heads, 256 / (d.head_dim / 8)), 1), 256, 0);
        launch!(self, "attention_backward_delta", cfg; delta.ptr, dout.ptr, o.ptr, to_i32("n_tokens", n)?,
            d.n_heads as i32, d.head_dim as i32, d.o_stride as i32, d.o_stride as i32);
        Ok(())
    }

    /// dq (zeroed here, then accumulated), dk, dv (=) in f32 with row strides
    /// `dq_stride` and `dkv_stride`; `delta` from `attention_backward_delta`. dO uses
    /// `o_stride`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        dq: DPtr<f32>,
        dk: DPtr<f32>,
        dv: DPtr<f32>,
        dq_stride: usize,
        dkv_stride: usize,
        dout: DPtr<Bf16>,
        q: DPtr<Bf16>,
        k: DPtr<Bf16>,
        v: DPtr<Bf16>,
        lse: DPtr<f32>,
        delta: DPtr<f32>,
        mask: &AttnMaskDev,
        d: &AttnDims,
    ) -> Result<()> {
        self.check_attn(d, mask)?;
        let n = d.n_tokens;
        let (qd, kvd) = (d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim);
        need(
            dq_stride >= qd && dkv_stride >= kvd && dq_stride.is_multiple_of(2) && dkv_stride.is_multiple_of(2),
            || format!("attention_backward: dq_stride {dq_stride} / dkv_stride {dkv_stride} too small or odd"),
        )?;
        need_len("attention_backward: q", &q, (n - 1) * d.q_stride + qd)?;
        need_len("attention_backward: k", &k, (n - 1) * d.kv_stride + kvd)?;
        need_len("attention_backward: v", &v, (n - 1) * d.kv_stride + kvd)?;
        need_len("attention_backward: dO", &dout, (n - 1) * d.o_stride + qd)?;
        need_len("attention_backward: dq", &dq, n * dq_stride)?;
        need_len("attention_backward: dk", &dk, (n - 1) * dkv_stride + kvd)?;
        need_len("attention_backward: dv", &dv, (n - 1) * dkv_stride + kvd)?;
        need_len("attention_backward: lse", &lse, n * d.n_heads)?;
        need_len("attention_backward: delta", &delta, n * d.n_heads)?;
        for (name, p) in [("q", &q), ("k", &k), ("v", &v), ("dO", &dout)] {
            need_vec(&format!("attention_backward: {name}"), p)?;
        }
        need(dq.ptr.is_multiple_of(8) && dk.ptr.is_multiple_of(8) && dv.ptr.is_multiple_of(8), || {
            "attention_backward: dq/dk/dv must be 8-byte aligned".into()
        })?;
        self.zero(dq.slice(0, n * dq_stride)?)?;
        let name = format!("attention_backward_hd{}", d.head_dim);
        let cfg = Self::cfg((blocks(n, 64), d.n_kv_heads as u32), 128, attention_backward_smem(d.head_dim));
        let scale = 1.0f32 / (d.head_dim as f32).sqrt();
        launch!(self, &name, cfg; dq.ptr, dk.ptr, dv.ptr, dout.ptr, q.ptr, k.ptr, v.ptr, lse.ptr, delta.ptr,
            mask.group.ptr, mask.branch.ptr, mask.group_start.ptr, to_i32("n_tokens", n)?, d.n_heads as i32,
            d.n_kv_heads as i32, d.q_stride as i32, d.kv_stride as i32, d.o_stride as i32, dq_stride as i32,
            dkv_stride as i32, scale);
        Ok(())
    }

    // --- swiglu (elementwise.cu)

    /// SwiGLU's grid: one block row per token row, 256 threads of 8 columns each across
    /// the `inter` columns; checks the `[rows, 2·inter]` gate|up and `[rows, inter]` views.
    fn swiglu_cfg(
        what: &str,
        rows: usize,
        inter: usize,
        wide: &[(&str, &DPtr<Bf16>)],
        narrow: &[(&str, &DPtr<Bf16>)],
    ) -> Result<LaunchConfig> {
        need(inter > 0 && inter.is_multiple_of(8), || {
            format!("{what}: inter {inter} must be a positive multiple of 8")
        })?;
        for (list, width) in [(wide, 2 * inter), (narrow, inter)] {
            for (name, p) in list {
                need_len(&format!("{what}: {name}"), p, rows * width)?;
                need_vec(&format!("{what}: {name}"), p)?;
            }
        }
        Ok(Self::cfg((rows.max(1) as u32, blocks(inter / 8, 256)), 256, 0))
    }

    /// `out = silu(gate)·up` (bf16 `[rows, inter]`) from `gu` = [gate | up] (bf16
    /// `[rows, 2·inter]`, gate in each row's first `inter` columns: the output of one
    /// GEMM with [Wg; Wu]).
    pub fn swiglu_forward(&self, out: DPtr<Bf16>, gu: DPtr<Bf16>, rows: usize, inter: usize) -> Result<()> {
        let cfg = Self::swiglu_cfg("swiglu_forward", rows, inter, &[("gu", &gu)], &[("out", &out)])?;
        launch!(self, "swiglu_forward", cfg; out.ptr, gu.ptr, to_i32("rows", rows)?, to_i32("inter", inter)?);
        Ok(())
    }

    /// `dgu` = [dgate | dup] (the layout of `gu`), and `out` = the forward's output again
    /// (bit for bit), from `dout` `[rows, inter]`.
    pub fn swiglu_backward(
        &self,
        dgu: DPtr<Bf16>,
        out: DPtr<Bf16>,
        dout: DPtr<Bf16>,
        gu: DPtr<Bf16>,
        rows: usize,
        inter: usize,
    ) -> Result<()> {
        let (wide, narrow) = ([("dgu", &dgu), ("gu", &gu)], [("out", &out), ("dout", &dout)]);
        let cfg = Self::swiglu_cfg("swiglu_backward", rows, inter, &wide, &narrow)?;
        launch!(self, "swiglu_backward", cfg; dgu.ptr, out.ptr, dout.ptr, gu.ptr, to_i32("rows", rows)?,
            to_i32("inter", inter)?);
        Ok(())
    }

    // --- logprobs.cu

    /// Per row: `logp[2r + j] = logits[r, t_j] − lse_r` for targets `[rows, 2]` (−1 =
    /// none) and, unless `lse` is `null()`, `lse_r`; logits f32 `[rows, ld]`. Training
    /// passes `probs` (bf16 `[rows, ld_p]`, the row's softmax, for `logprobs_backward`);
    /// `null()` skips it.
    #[allow(clippy::too_many_arguments)]
    pub fn logprobs_forward(
        &self,
        logp: DPtr<f32>,
        lse: DPtr<f32>,
        probs: DPtr<Bf16>,
        logits: DPtr<f32>,
        targets: DPtr<i32>,
        rows: usize,
        vocab: usize,
        ld: usize,
        ld_p: usize,
    ) -> Result<()> {
        need(ld >= vocab && rows > 0, || format!("logprobs: ld {ld} < vocab {vocab}, or no rows"))?;
        need_len("logprobs: logits", &logits, (rows - 1) * ld + vocab)?;
        need_len("logprobs: targets", &targets, 2 * rows)?;
        need_len("logprobs: logp", &logp, 2 * rows)?;
        if lse.ptr != 0 {
            need_len("logprobs: lse", &lse, rows)?;
        }
        if ld.is_multiple_of(4) {
            need_vec("logprobs: logits", &logits)?;
        }
        if probs.ptr != 0 {
            need(ld_p >= vocab, || format!("logprobs: ld_p {ld_p} < vocab {vocab}"))?;
            need_len("logprobs: probs", &probs, (rows - 1) * ld_p + vocab)?;
            if ld.is_multiple_of(8) && ld_p.is_multiple_of(8) {
                need_vec("logprobs: probs", &probs)?;
            }
        }
        let cfg = Self::cfg((rows as u32, 1), 512, 0);
        launch!(self, "logprobs_forward", cfg; logp.ptr, lse.ptr, probs.ptr, logits.ptr, targets.ptr,
            to_i32("rows", rows)?, to_i32("vocab", vocab)?, to_i32("ld", ld)?, to_i32("ld_p", ld_p)?);
        Ok(())
    }

    /// In place: the forward's `probs [rows, ld]` (bf16) become `dlogits`, from the
    /// forward's `logp [rows, 2]` and the loss's `dlogp [rows, 2]`.
    #[allow(clippy::too_many_arguments)]
    pub fn logprobs_backward(
        &self,
        probs_to_dlogits: DPtr<Bf16>,
        logp: DPtr<f32>,
        targets: DPtr<i32>,
        dlogp: DPtr<f32>,
        rows: usize,
        vocab: usize,
        ld: usize,
    ) -> Result<()> {
        need(ld >= vocab && rows > 0, || format!("logprobs_backward: ld {ld} < vocab {vocab}, or no rows"))?;
        need_len("logprobs_backward: probs", &probs_to_dlogits, (rows - 1) * ld + vocab)?;
        need_len("logprobs_backward: targets", &targets, 2 * rows)?;
        need_len("logprobs_backward: logp", &logp, 2 * rows)?;
        need_len("logprobs_backward: dlogp", &dlogp, 2 * rows)?;
        if ld.is_multiple_of(8) {
            need_vec("logprobs_backward: probs", &probs_to_dlogits)?;
        }
        let cfg = Self::cfg((rows as u32, 1), 512, 0);
        launch!(self, "logprobs_backward", cfg; probs_to_dlogits.ptr, logp.ptr, targets.ptr, dlogp.ptr,
            to_i32("rows", rows)?, to_i32("vocab", vocab)?, to_i32("ld", ld)?);
        Ok(())
    }

    // --- adamw.cu

    /// One AdamW step over the fp32 master weights held as `p_hi` (the bf16 working copy)
    /// and `p_lo` (the 16-bit remainder; kernels/adamw.cu, `split_master`), and `m`, `v`,
    /// `g` (f32, all the same length); zeroes `g`. `step` counts from 1; the scalars are
    /// folded to f32 as torch does (see the CPU `adamw_step`).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        &self,
        p_hi: DPtr<Bf16>,
        p_lo: DPtr<u16>,
        m: DPtr<f32>,
        v: DPtr<f32>,
        g: DPtr<f32>,
        grad_scale: f32,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        step: u64,
    ) -> Result<()> {
        let n = m.len;
        need(p_hi.len == n && p_lo.len == n && v.len == n && g.len == n, || {
            format!("adamw: lengths differ (hi {}, lo {}, m {n}, v {}, g {})", p_hi.len, p_lo.len, v.len, g.len)
        })?;
        need(step >= 1, || "adamw: step counts from 1".into())?;
        for (name, ok) in [("m", m.aligned16()), ("v", v.aligned16()), ("g", g.aligned16())] {
            need(ok, || format!("adamw: {name} is not 16-byte aligned"))?;
        }
        for (name, ptr) in [("hi", p_hi.ptr), ("lo", p_lo.ptr)] {
            need(ptr.is_multiple_of(8), || format!("adamw: the master's {name} half must be 8-byte aligned"))?;
        }
        let decay = (1.0 - lr * weight_decay) as f32;
        let (w1, b2, w2) = ((1.0 - beta1) as f32, beta2 as f32, (1.0 - beta2) as f32);
        let bc1 = 1.0 - beta1.powi(step as i32);
        let bc2_sqrt = (1.0 - beta2.powi(step as i32)).sqrt() as f32;
        let step_size = (lr / bc1) as f32;
        let grid = blocks(n.div_ceil(4), 256).min(self.sm_count * self.adamw_resident);
        let cfg = Self::cfg((grid, 1), 256, 0);
        launch!(self, "adamw_step", cfg; p_hi.ptr, p_lo.ptr, m.ptr, v.ptr, g.ptr, n as i64, grad_scale, decay, w1,
            b2, w2, step_size, bc2_sqrt, eps as f32);
        Ok(())
    }

    /// `out[0] (+)= Σ g²` in f64: `grad_norm` writes one partial sum per block into
    /// `partial` (`grad_norm_blocks()` elements), `grad_norm_reduce` adds them.
    pub fn grad_norm(&self, out: DPtr<f64>, partial: DPtr<f64>, g: DPtr<f32>, accumulate: bool) -> Result<()> {
        let grid = self.grad_norm_blocks();
        need_len("grad_norm: partial", &partial, grid)?;
        need_len("grad_norm: out", &out, 1)?;
        need_vec("grad_norm: g", &g)?;
        launch!(self, "grad_norm", Self::cfg((grid as u32, 1), 256, 0); partial.ptr, g.ptr, g.len as i64);
        launch!(self, "grad_norm_reduce", Self::cfg((1, 1), 256, 0); out.ptr, partial.ptr, grid as i32,
            accumulate as i32);
        Ok(())
    }

    /// Blocks of `grad_norm` (one wave: every SM full) and so f64 partial sums.
    pub fn grad_norm_blocks(&self) -> usize {
        (self.sm_count * self.grad_norm_resident) as usize
    }

    // --- casts (elementwise.cu)

    /// `out = bf16(input)` (round to nearest even), `count` elements.
    pub fn cast_f32_bf16(&self, out: DPtr<Bf16>, input: DPtr<f32>, count: usize) -> Result<()> {
        need_len("cast: out", &out, count)?;
        need_len("cast: in", &input, count)?;
        need_vec("cast: out", &out)?;
        need_vec("cast: in", &input)?;
        launch!(self, "cast_f32_bf16", Self::flat_cfg(count); out.ptr, input.ptr, count as i64);
        Ok(())
    }

    /// `out = f32(input)` (exact), `count` elements.
    pub fn cast_bf16_f32(&self, out: DPtr<f32>, input: DPtr<Bf16>, count: usize) -> Result<()> {
        need_len("cast: out", &out, count)?;
        need_len("cast: in", &input, count)?;
        need_vec("cast: out", &out)?;
        need_vec("cast: in", &input)?;
        launch!(self, "cast_bf16_f32", Self::flat_cfg(count); out.ptr, input.ptr, count as i64);
        Ok(())
    }
}
