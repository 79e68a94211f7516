//! The CUDA engine: hand-written bf16 kernels (kernels/*.cu) launched through cudarc,
//! cuBLASLt for the matrix multiplies.
//!
//! - `nvrtc`: run-time compilation of the embedded kernel sources (and the CI compile check);
//! - `kernels`: one launcher per kernel, in the order of the .cu files;
//! - `gemm`: cuBLASLt bf16 × bf16 → fp32/bf16 with fp32 compute;
//! - `model`: `CudaEngine`, the `Engine` on one GPU.
//!
//! Kernel images: the fatbins nvcc made at build time when it was available, else the
//! sources compiled by NVRTC for the device's arch at first use and cached in
//! `$SDPO_CACHE` or `~/.cache/sdpo/kernels`, keyed by a hash of source, headers, options,
//! NVRTC version and arch.

pub mod gemm;
pub mod kernels;
pub mod nvrtc;

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
        // A cache that cannot be written only costs a recompile next time.
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if p.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok()) && std::fs::write(&tmp, &out.image).is_ok() {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
    Ok(out.image)
}
