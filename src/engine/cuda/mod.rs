//! The CUDA engine: hand-written bf16 kernels (kernels/*.cu) launched through cudarc,
//! cuBLASLt for the matrix multiplies.
//!
//! - `nvrtc`: run-time compilation of the embedded kernel sources (and the CI compile check);
//! - `kernels`: one launcher per kernel, in the order of the .cu files;
//! - `gemm`: cuBLASLt bf16 × bf16 → fp32/bf16 with fp32 compute;
//! - `model`: `CudaEngine`, the `Engine` on one GPU;
//! - `sim`: the kernels' own source compiled for the CPU and run thread by thread
//!   (`Gpu::sim`), so the kernels and the engine are tested where there is no GPU;
//! - `host`: the simulator's host memory and its stand-in for cuBLASLt.
//!
//! Kernel images: the fatbins nvcc made at build time when it was available, else the
//! sources compiled by NVRTC for the device's arch at first use and cached in
//! `$SDPO_CACHE` or `~/.cache/sdpo/kernels`, keyed by a hash of source, headers, options,
//! NVRTC version and arch.

mod buffers;
pub mod gemm;
pub mod host;
pub mod kernels;
mod memory;
pub mod model;
pub mod nvrtc;
mod params;
pub mod profile;
pub mod sim;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

use std::path::PathBuf;

use crate::error::{Error, Result};

/// The source of `file` (e.g. "attention.cu").
pub fn kernel_source(file: &str) -> Result<&'static str> {
    KERNEL_SOURCES
        .iter()
        .find(|(n, _)| *n == file)
        .map(|(_, s)| *s)
        .ok_or_else(|| Error::Cuda(format!("kernels/{file} is not embedded in this build")))
}

/// NVRTC's arch flag for a device of compute capability `major.minor`: sm_90a on Hopper
/// (its arch-specific instructions), sm_XY elsewhere.
pub fn arch_for(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".into()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// FNV-1a, 64 bits: a stable cache key (std's hasher is not stable across releases).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for &b in p.iter().chain(&[0xff]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SDPO_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("kernels"));
    }
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(home.join("sdpo").join("kernels"))
}

/// The loadable image (cubin or fatbin) of kernels/`file` for `arch`: the build-time
/// fatbin when there is one, else a cached or freshly NVRTC-compiled cubin.
pub fn kernel_image(file: &str, arch: &str) -> Result<Vec<u8>> {
    if let Some((_, bin)) = KERNEL_FATBINS.iter().find(|(n, _)| *n == file) {
        return Ok(bin.to_vec());
    }
    let src = kernel_source(file)?;
    let nv = nvrtc::Nvrtc::load()?;
    let include = nvrtc::include_dirs();
    let missing = nvrtc::missing_headers(&include);
    if !missing.is_empty() {
        return Err(Error::Cuda(format!(
            "cannot compile kernels/{file}: {} not found in {:?}; set SDPO_CUDA_INCLUDE to the CUDA \
             include directories (e.g. /usr/local/cuda/include)",
            missing.join(", "),
            include
        )));
    }
    let opts = nvrtc::options(arch, &include, false);
    let mut parts: Vec<&[u8]> = vec![src.as_bytes(), arch.as_bytes()];
    KERNEL_HEADERS.iter().for_each(|(_, h)| parts.push(h.as_bytes()));
    opts.iter().for_each(|o| parts.push(o.as_bytes()));
    let ver = format!("{:?}", nv.version);
    parts.push(ver.as_bytes());
    let key = fnv1a(&parts);
    let stem = file.trim_end_matches(".cu");
    let cached = cache_dir().map(|d| d.join(format!("{stem}-{arch}-{key:016x}.cubin")));
    if let Some(bin) = cached.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(bin);
    }
    let out = nv.compile(file, src, KERNEL_HEADERS, &opts, nvrtc::Output::Cubin)?;
    if let Some(p) = cached {
        // A cache that cannot be written only costs a recompile next time. The temporary
        // name is unique per call: threads of one process (parallel tests, each opening a
        // GPU on a cold cache) must not write into one file while another renames it.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = p.with_extension(format!("tmp{}-{n}", std::process::id()));
        let written =
            p.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok()) && std::fs::write(&tmp, &out.image).is_ok();
        if written && std::fs::rename(&tmp, &p).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(out.image)
}

// --- the device

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use host::HostMem;
use kernels::{Bf16, DPtr, Kernels};
use profile::Prof;

/// The CUDA engine computes no LoRA adapters yet; `engine::open_lora` answers this.
pub fn lora_unsupported() -> Error {
    Error::invalid("LoRA runs on the CPU engine for now; pass --device cpu")
}

/// Why there is no usable GPU here, or `None` when libcuda loads and sees a device.
pub fn gpu_unavailable() -> Option<String> {
    // SAFETY: only probes whether the library loads.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("libcuda was not found (no NVIDIA driver on this machine)".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => None,
        Ok(_) => Some("the NVIDIA driver reports no devices".into()),
        Err(e) => Some(format!("the NVIDIA driver did not initialise: {e}")),
    }
}

/// A buffer on the device, or in host memory under the kernel simulator.
pub enum DBuf<T> {
    Dev(CudaSlice<T>),
    Host(HostMem<T>),
}

impl<T> DBuf<T> {
    pub fn len(&self) -> usize {
        match self {
            DBuf::Dev(s) => s.len(),
            DBuf::Host(h) => h.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One GPU: context, the stream everything runs on, the loaded kernels and cuBLASLt; or,
/// from `Gpu::sim`, the same interface on the CPU (`ctx` and `stream` `None`).
pub struct Gpu {
    pub ctx: Option<Arc<CudaContext>>,
    pub stream: Option<Arc<CudaStream>>,
    pub k: Kernels,
    pub gemm: gemm::Gemm,
    /// Time per op category (shared with `k` and `gemm`); the host's waits on the stream
    /// (`download`, `write`, `sync`) end its open section.
    pub prof: Prof,
    pub name: String,
    /// Device memory in use right after the context was created (the context itself and
    /// any other process's), which `mem_used` leaves out.
    mem_base: u64,
    /// Bytes requested through `alloc` so far (freed buffers included).
    allocated: AtomicU64,
}

fn driver_err(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

impl Gpu {
    /// Opens device `ordinal`; `Error::NoGpu` (with the reason) when there is none.
    pub fn open(ordinal: usize) -> Result<Self> {
        if let Some(why) = gpu_unavailable() {
            return Err(Error::NoGpu(why));
        }
        let cuda = |e: cudarc::driver::DriverError| Error::Cuda(e.to_string());
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoGpu(format!("device {ordinal}: {e}")))?;
        let mem_base = ctx.mem_get_info().map(|(free, total)| (total - free) as u64).map_err(cuda)?;
        // One stream: cudarc's per-buffer events would only add work.
        // SAFETY: no other stream uses the buffers of this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, _) = ctx.compute_capability().map_err(cuda)?;
        let prof = Prof::new(Some(stream.clone()));
        let mut k = Kernels::load(&ctx, stream.clone())?;
        let mut gemm = gemm::Gemm::new(stream.clone(), major)?;
        (k.prof, gemm.prof) = (prof.clone(), prof.clone());
        let name = ctx.name().map_err(cuda)?;
        Ok(Gpu { ctx: Some(ctx), stream: Some(stream), k, gemm, prof, name, mem_base, allocated: AtomicU64::new(0) })
    }

    /// The kernel simulator (see `sim.rs`): host memory, the kernels' own code, the GEMM
    /// computed on the host (`host.rs`).
    pub fn sim(sim: sim::KernelSim) -> Self {
        let prof = Prof::new(None);
        let (mut k, mut gemm) = (Kernels::sim(sim), gemm::Gemm::host());
        (k.prof, gemm.prof) = (prof.clone(), prof.clone());
        let name = "kernel simulator".into();
        Gpu { ctx: None, stream: None, k, gemm, prof, name, mem_base: 0, allocated: AtomicU64::new(0) }
    }

    pub fn alloc<T: DeviceRepr + ValidAsZeroBits + Clone + Default>(&self, len: usize) -> Result<DBuf<T>> {
        self.allocated.fetch_add((len * std::mem::size_of::<T>()) as u64, Ordering::Relaxed);
        match &self.stream {
            None => Ok(DBuf::Host(HostMem::zeroed(len))),
            Some(s) => s.alloc_zeros::<T>(len.max(1)).map(DBuf::Dev).map_err(|e| {
                let bytes = len * std::mem::size_of::<T>();
                if e.0 != cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                    return Error::Cuda(format!("allocating {bytes} bytes: {e}"));
                }
                let (used, total) = self.mem_used().unwrap_or((0, 0));
                Error::Cuda(format!(
                    "out of device memory allocating {} ({} already in use by this run, {} on the device); \
                     activations grow with the micro-batch: lower --micro-batch-tokens, or train a smaller model",
                    gb(bytes as u64),
                    gb(used),
                    gb(total)
                ))
            }),
        }
    }

    pub fn upload<T: DeviceRepr + Clone + Default>(&self, host: &[T]) -> Result<DBuf<T>> {
        match &self.stream {
            None => Ok(DBuf::Host(HostMem::from_slice(host))),
            Some(s) => s.clone_htod(host).map(DBuf::Dev).map_err(driver_err("upload")),
        }
    }

    /// Copies `p` to the host (synchronises the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, p: DPtr<T>) -> Result<Vec<T>> {
        self.prof.pause()?;
        let mut out = vec![T::default(); p.len];
        match &self.stream {
            // SAFETY: a host-mode DPtr addresses `len` host elements.
            None => out.clone_from_slice(unsafe { std::slice::from_raw_parts(p.ptr as *const T, p.len) }),
            Some(s) if p.len > 0 => {
                // SAFETY: `p` addresses `len` elements (DPtr's contract); `out` holds as many.
                unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut out[..], p.ptr, s.cu_stream()) }
                    .map_err(driver_err("download"))?;
            }
            Some(_) => {}
        }
        self.sync()?;
        Ok(out)
    }

    /// Copies `host` into the memory at `p` (same length).
    pub fn write<T: DeviceRepr + Clone>(&self, p: DPtr<T>, host: &[T]) -> Result<()> {
        self.prof.pause()?;
        if host.len() != p.len {
            return Err(Error::invalid(format!("write: {} host values into {} device elements", host.len(), p.len)));
        }
        match &self.stream {
            // SAFETY: as in `download`.
            None => unsafe { std::slice::from_raw_parts_mut(p.ptr as *mut T, p.len) }.clone_from_slice(host),
            // SAFETY: as in `download`; the copy completes before `sync` returns.
            Some(s) => unsafe { cudarc::driver::result::memcpy_htod_async(p.ptr, host, s.cu_stream()) }
                .map_err(driver_err("write"))?,
        }
        self.sync()
    }

    /// `dst = src`, `len` elements of `T`.
    pub fn copy<T>(&self, dst: DPtr<T>, src: DPtr<T>, len: usize) -> Result<()> {
        let (dst, src) = (dst.slice(0, len)?, src.slice(0, len)?);
        let bytes = len * std::mem::size_of::<T>();
        match &self.stream {
            // SAFETY: both host views hold `len` elements; `copy` allows overlap.
            None => unsafe { std::ptr::copy(src.ptr as *const u8, dst.ptr as *mut u8, bytes) },
            // SAFETY: both views hold `len` elements on this device.
            Some(s) => unsafe { cudarc::driver::result::memcpy_dtod_async(dst.ptr, src.ptr, bytes, s.cu_stream()) }
                .map_err(driver_err("device copy"))?,
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.prof.pause()?;
        match &self.stream {
            None => Ok(()),
            Some(s) => s.synchronize().map_err(driver_err("synchronize")),
        }
    }

    pub fn ptr<T>(&self, b: &DBuf<T>) -> DPtr<T> {
        match (b, &self.stream) {
            (DBuf::Dev(s), Some(stream)) => DPtr::of(s, stream),
            // SAFETY: the address and length of live host memory owned by `b`.
            (DBuf::Host(h), _) => unsafe { DPtr::from_raw(h.addr(), h.len()) },
            (DBuf::Dev(_), None) => unreachable!("device buffers exist only with a device"),
        }
    }

    /// Bytes requested through `alloc` since the `Gpu` was opened, freed buffers included
    /// (what `model::memory_plan` is checked against).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Free device memory in bytes; `None` on the simulator.
    pub fn mem_free(&self) -> Option<u64> {
        self.ctx.as_ref()?.mem_get_info().ok().map(|(free, _)| free as u64)
    }

    /// (used, total) device memory in bytes; `None` on the simulator.
    /// (bytes in use beyond those at context creation, the device's total): what this
    /// process allocated since (buffers, cuBLASLt's workspace, the kernel modules), the
    /// counterpart of `torch.cuda.max_memory_allocated`, which leaves the context out too.
    pub fn mem_used(&self) -> Option<(u64, u64)> {
        let (free, total) = self.ctx.as_ref()?.mem_get_info().ok()?;
        Some((((total - free) as u64).saturating_sub(self.mem_base), total as u64))
    }
}

/// Bytes as decimal gigabytes for messages ("1.25 GB").
pub(crate) fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// f32 → bf16 bits (round to nearest even), as the device stores them.
pub fn to_bf16(x: &[f32]) -> Vec<Bf16> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()
}

pub fn from_bf16(x: &[Bf16]) -> Vec<f32> {
    x.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect()
}

/// fp32 master weights as the device keeps them (kernels/adamw.cu): `hi`, the value
/// rounded to bf16 with ties away from zero (the GEMMs' working copy), and `lo`, the
/// signed 16-bit remainder of the bits, so that `join_master` gives every bit back.
pub fn split_master(x: &[f32]) -> (Vec<Bf16>, Vec<u16>) {
    x.iter()
        .map(|&v| {
            let bits = v.to_bits();
            let hi = bits.wrapping_add(0x8000) >> 16;
            (hi as u16, bits.wrapping_sub(hi << 16) as u16)
        })
        .unzip()
}

/// The fp32 values `split_master` split.
pub fn join_master(hi: &[Bf16], lo: &[u16]) -> Vec<f32> {
    hi.iter().zip(lo).map(|(&h, &l)| f32::from_bits(((h as u32) << 16).wrapping_add(l as i16 as i32 as u32))).collect()
}
