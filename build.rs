//! Embeds the CUDA kernels into the crate. Never fails for lack of CUDA.
//!
//! Always: every `kernels/*.cu` and `kernels/*.cuh` source is embedded (`KERNEL_SOURCES`,
//! `KERNEL_HEADERS` in `$OUT_DIR/kernels.rs`), so the engine can compile them with NVRTC
//! at first use for whatever device it finds (cached on disk by source hash and arch).
//! When `nvcc` is found (`$NVCC`, `$CUDA_HOME/bin/nvcc`, `/usr/local/cuda/bin/nvcc` or on
//! PATH), each .cu is also compiled to a fatbin (sm_80 + sm_90a cubins and compute_80 PTX
//! for anything newer) and embedded (`KERNEL_FATBINS`); a failing nvcc is a warning, and
//! the engine falls back to NVRTC. `SDPO_NO_NVCC=1` skips nvcc.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=SDPO_NO_NVCC");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let dir = root.join("kernels");

    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    files.sort();
    let with_ext = |ext: &str| -> Vec<&PathBuf> {
        files.iter().filter(|p| p.extension().and_then(|e| e.to_str()) == Some(ext)).collect()
    };
    let (sources, headers) = (with_ext("cu"), with_ext("cuh"));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let entry = |p: &Path| {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        format!("    ({name:?}, include_str!({:?})),\n", p.display().to_string())
    };
    let mut code = String::from("/// Every kernels/*.cu file: (file name, source).\n");
    code += "pub const KERNEL_SOURCES: &[(&str, &str)] = &[\n";
    sources.iter().for_each(|p| code += &entry(p));
    code += "];\n/// Every kernels/*.cuh file, passed to NVRTC as in-memory headers.\n";
    code += "pub const KERNEL_HEADERS: &[(&str, &str)] = &[\n";
    headers.iter().for_each(|p| code += &entry(p));
    code += "];\n/// Fatbins compiled by nvcc at build time (empty when nvcc was not found).\n";
    code += "pub const KERNEL_FATBINS: &[(&str, &[u8])] = &[\n";

    if let Some(nvcc) = find_nvcc() {
        for src in &sources {
            let name = src.file_name().unwrap().to_string_lossy().into_owned();
            let fatbin = out.join(format!("{name}.fatbin"));
            let status = Command::new(&nvcc)
                .args(["--fatbin", "-std=c++17", "-lineinfo"])
                .args(["-gencode=arch=compute_80,code=[sm_80,compute_80]", "-gencode=arch=compute_90a,code=sm_90a"])
                .arg("-I")
                .arg(&dir)
                .arg("-o")
                .arg(&fatbin)
                .arg(src)
                .status();
            match status {
                Ok(s) if s.success() => {
                    code += &format!("    ({name:?}, include_bytes!({:?})),\n", fatbin.display().to_string());
                }
                other => println!(
                    "cargo:warning=nvcc could not compile {name} ({other:?}); the engine will compile it with NVRTC"
                ),
            }
        }
    }
    code += "];\n";
    std::fs::write(out.join("kernels.rs"), code).expect("write $OUT_DIR/kernels.rs");
}

fn find_nvcc() -> Option<PathBuf> {
    if std::env::var_os("SDPO_NO_NVCC").is_some_and(|v| v == "1") {
        return None;
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("NVCC").map(PathBuf::from).into_iter().collect();
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("bin/nvcc"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    candidates.push(PathBuf::from("nvcc"));
    candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}
