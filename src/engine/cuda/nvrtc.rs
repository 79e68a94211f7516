//! A minimal NVRTC binding, loaded at run time from an explicit path or by name.
//!
//! cudarc's own NVRTC module only searches library names (and panics when none loads);
//! here the library can also be named by `SDPO_NVRTC_LIB` (the pip wheel
//! `nvidia-cuda-nvrtc-cu12` that CI installs is not on the loader path), absence is an
//! error, and the compiled image can be a cubin as well as PTX, with ptxas's
//! register/spill report in the log. The same code compiles the kernels in the
//! `cuda_compile` test (no GPU) and at first use in the engine (for the device's arch).

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

type Prog = *mut c_void;
type Status = c_int;

/// How to install NVRTC, shown whenever it is missing.
pub const INSTALL_HINT: &str = "install it with `python3 -m pip install --target .nvrtc \
nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79 nvidia-cuda-nvcc-cu12==12.9.86` \
and set SDPO_NVRTC_LIB=$PWD/.nvrtc/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 and \
SDPO_CUDA_INCLUDE=$PWD/.nvrtc/nvidia/cuda_runtime/include:$PWD/.nvrtc/nvidia/cuda_nvcc/include \
(as .ci/run does), or install a CUDA toolkit";

/// Where INSTALL_HINT's pip command puts the wheels.
const LOCAL_NVRTC: &str = ".nvrtc/nvidia";

/// What NVRTC should hand back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Ptx,
    Cubin,
}

pub struct Compiled {
    pub image: Vec<u8>,
    /// NVRTC's log: warnings, and with `--ptxas-options=-v` the per-kernel resource report.
    pub log: String,
}

pub struct Nvrtc {
    pub path: String,
    pub version: (i32, i32),
    create: unsafe extern "C" fn(
        *mut Prog,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Status,
    compile: unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> Status,
    destroy: unsafe extern "C" fn(*mut Prog) -> Status,
    log_size: unsafe extern "C" fn(Prog, *mut usize) -> Status,
    log: unsafe extern "C" fn(Prog, *mut c_char) -> Status,
    ptx_size: unsafe extern "C" fn(Prog, *mut usize) -> Status,
    ptx: unsafe extern "C" fn(Prog, *mut c_char) -> Status,
    cubin_size: unsafe extern "C" fn(Prog, *mut usize) -> Status,
    cubin: unsafe extern "C" fn(Prog, *mut c_char) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    // Keeps the function pointers above valid.
    _lib: libloading::Library,
    /// `libnvrtc-builtins` from beside a library loaded by path (see `builtins_beside`).
    _builtins: Vec<libloading::Library>,
}

/// Loads the `libnvrtc-builtins.so.*` found beside `lib_path`. NVRTC opens its builtins
/// by name at compile time, which finds them only on the loader path or through a
/// `$ORIGIN` run path — the CUDA 12 wheel has one, the CUDA 13 wheel (and a toolkit
/// outside ld.so.conf) does not, and every compile then fails with "failed to open
/// libnvrtc-builtins.so.13.0". An object already loaded under that name is used instead.
fn builtins_beside(lib_path: &Path) -> Vec<libloading::Library> {
    let Some(dir) = lib_path.parent().filter(|d| !d.as_os_str().is_empty()) else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libnvrtc-builtins.so.")))
        .collect();
    paths.sort();
    // SAFETY: the builtins library has no initialisers with preconditions; one that does
    // not load is skipped (NVRTC then reports what it could not open).
    paths.into_iter().filter_map(|p| unsafe { libloading::Library::new(&p) }.ok()).collect()
}

impl Nvrtc {
    /// Loads `SDPO_NVRTC_LIB` when set, else `.nvrtc/` (INSTALL_HINT's wheels) or the first
    /// of the usual names (CUDA 13, then 12) found on the loader path or under
    /// `$CUDA_HOME/lib64` and `/usr/local/cuda/lib64`.
    pub fn load() -> Result<Self> {
        let mut tried = Vec::new();
        let candidates: Vec<String> = match std::env::var("SDPO_NVRTC_LIB") {
            Ok(p) if !p.is_empty() => vec![p],
            _ => {
                let names = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];
                let mut c: Vec<String> = names.iter().map(|s| s.to_string()).collect();
                // The pip wheels installed as INSTALL_HINT says, relative to the working
                // directory (the crate root under `cargo test`).
                let local = Path::new(LOCAL_NVRTC).join("cuda_nvrtc/lib/libnvrtc.so.12");
                if local.is_file() {
                    c.insert(0, local.display().to_string());
                }
                for dir in cuda_roots() {
                    c.extend(names.iter().map(|n| dir.join("lib64").join(n).display().to_string()));
                }
                c
            }
        };
        for path in candidates {
            // SAFETY: loading NVRTC runs no initialisers with preconditions.
            match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => {
                    let builtins = if path.contains('/') { builtins_beside(Path::new(&path)) } else { Vec::new() };
                    return Self::from_lib(lib, path, builtins);
                }
                Err(e) => tried.push(format!("{path} ({e})")),
            }
        }
        Err(Error::Cuda(format!("the NVRTC library was not found (tried {}); {INSTALL_HINT}", tried.join(", "))))
    }

    fn from_lib(lib: libloading::Library, path: String, builtins: Vec<libloading::Library>) -> Result<Self> {
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the signature is NVRTC's, stable since CUDA 11.
                *unsafe { lib.get($name) }.map_err(|e| {
                    Error::Cuda(format!("{path} has no {}: {e}", String::from_utf8_lossy(&$name[..$name.len() - 1])))
                })?
            };
        }
        let version_fn: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status = sym!(b"nvrtcVersion\0");
        let mut nv = Nvrtc {
            version: (0, 0),
            create: sym!(b"nvrtcCreateProgram\0"),
            compile: sym!(b"nvrtcCompileProgram\0"),
            destroy: sym!(b"nvrtcDestroyProgram\0"),
            log_size: sym!(b"nvrtcGetProgramLogSize\0"),
            log: sym!(b"nvrtcGetProgramLog\0"),
            ptx_size: sym!(b"nvrtcGetPTXSize\0"),
            ptx: sym!(b"nvrtcGetPTX\0"),
            cubin_size: sym!(b"nvrtcGetCUBINSize\0"),
            cubin: sym!(b"nvrtcGetCUBIN\0"),
            error_string: sym!(b"nvrtcGetErrorString\0"),
            path,
            _lib: lib,
            _builtins: builtins,
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        unsafe { version_fn(&mut major, &mut minor) };
        nv.version = (major, minor);
        Ok(nv)
    }

    fn check(&self, status: Status, what: &str) -> Result<()> {
        if status == 0 {
            return Ok(());
        }
        // SAFETY: NVRTC returns a static string for every status.
        let msg = unsafe { std::ffi::CStr::from_ptr((self.error_string)(status)) }.to_string_lossy().into_owned();
        Err(Error::Cuda(format!("NVRTC {what}: {msg}")))
    }

    /// Compiles `src` (named `name` in messages) with in-memory `headers` (name, text).
    /// A compile error returns the whole log.
    pub fn compile(
        &self,
        name: &str,
        src: &str,
        headers: &[(&str, &str)],
        options: &[String],
        output: Output,
    ) -> Result<Compiled> {
        let cstr = |s: &str| CString::new(s).map_err(|_| Error::invalid(format!("NUL byte in NVRTC input {name}")));
        let c_src = cstr(src)?;
        let c_name = cstr(name)?;
        let h_text: Vec<CString> = headers.iter().map(|h| cstr(h.1)).collect::<Result<_>>()?;
        let h_name: Vec<CString> = headers.iter().map(|h| cstr(h.0)).collect::<Result<_>>()?;
        let h_text_p: Vec<*const c_char> = h_text.iter().map(|c| c.as_ptr()).collect();
        let h_name_p: Vec<*const c_char> = h_name.iter().map(|c| c.as_ptr()).collect();
        let opts: Vec<CString> = options.iter().map(|o| cstr(o)).collect::<Result<_>>()?;
        let opts_p: Vec<*const c_char> = opts.iter().map(|c| c.as_ptr()).collect();

        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: every pointer refers to a live NUL-terminated string; counts match.
        let st = unsafe {
            (self.create)(
                &mut prog,
                c_src.as_ptr(),
                c_name.as_ptr(),
                headers.len() as c_int,
                h_text_p.as_ptr(),
                h_name_p.as_ptr(),
            )
        };
        self.check(st, "create program")?;
        let result = (|| {
            // SAFETY: `prog` is a valid program; the option array lives across the call.
            let st = unsafe { (self.compile)(prog, opts_p.len() as c_int, opts_p.as_ptr()) };
            let log = self.read(prog, self.log_size, self.log)?;
            let log = String::from_utf8_lossy(log.split(|&b| b == 0).next().unwrap_or(&[])).into_owned();
            if st != 0 {
                return Err(Error::Cuda(format!("NVRTC could not compile {name} ({}):\n{log}", options.join(" "))));
            }
            let image = match output {
                Output::Ptx => self.read(prog, self.ptx_size, self.ptx)?,
                Output::Cubin => self.read(prog, self.cubin_size, self.cubin)?,
            };
            if image.is_empty() {
                return Err(Error::Cuda(format!("NVRTC produced no {output:?} for {name}: pass a real sm_ arch")));
            }
            Ok(Compiled { image, log })
        })();
        // SAFETY: destroys the program created above, once.
        unsafe { (self.destroy)(&mut prog) };
        result
    }

    fn read(
        &self,
        prog: Prog,
        size: unsafe extern "C" fn(Prog, *mut usize) -> Status,
        get: unsafe extern "C" fn(Prog, *mut c_char) -> Status,
    ) -> Result<Vec<u8>> {
        let mut n = 0usize;
        // SAFETY: valid program and out-pointer; the buffer has the size NVRTC reported.
        self.check(unsafe { size(prog, &mut n) }, "get size")?;
        let mut buf = vec![0u8; n];
        if n > 0 {
            self.check(unsafe { get(prog, buf.as_mut_ptr() as *mut c_char) }, "get output")?;
        }
        Ok(buf)
    }
}

/// `$CUDA_HOME`, `$CUDA_PATH`, `/usr/local/cuda`: where a toolkit may live.
pub fn cuda_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .collect();
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
}

/// Directories holding `cuda_bf16.h` and `mma.h`: `SDPO_CUDA_INCLUDE` (colon-separated)
/// when set, else the local pip wheels' include folders and `<root>/include` of every
/// CUDA root, those that exist.
pub fn include_dirs() -> Vec<PathBuf> {
    match std::env::var("SDPO_CUDA_INCLUDE") {
        Ok(v) if !v.is_empty() => v.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect(),
        _ => {
            let local = Path::new(LOCAL_NVRTC);
            let mut dirs: Vec<PathBuf> = vec![local.join("cuda_runtime/include"), local.join("cuda_nvcc/include")];
            // CUDA 13 keeps CCCL in include/cccl; NVRTC supplies what cuda_bf16.h needs from
            // it, but other headers may look there.
            dirs.extend(cuda_roots().into_iter().flat_map(|r| [r.join("include"), r.join("include/cccl")]));
            dirs.into_iter().filter(|p| p.is_dir()).collect()
        }
    }
}

/// The options every kernel is compiled with, for `arch` ("sm_80", "sm_90a", "compute_80").
pub fn options(arch: &str, include: &[PathBuf], verbose_ptxas: bool) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        // No --use_fast_math: AdamW and the log-sum-exps want IEEE division and sqrt;
        // kernels call the fast intrinsics (__expf) by name where they are safe.
        "--generate-line-info".to_string(),
    ];
    o.extend(include.iter().map(|d| format!("--include-path={}", d.display())));
    if verbose_ptxas {
        o.push("--ptxas-options=-v".to_string());
    }
    o
}

/// Checks that `dir` (from `include_dirs`) has the headers the kernels include.
pub fn missing_headers(include: &[PathBuf]) -> Vec<&'static str> {
    ["cuda_bf16.h", "mma.h"].into_iter().filter(|h| !include.iter().any(|d| Path::new(d).join(h).is_file())).collect()
}

/// One kernel's resources as ptxas reports them (`--ptxas-options=-v`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Static `__shared__` bytes ("N bytes smem"; absent from the line when 0). Dynamic
    /// shared memory is a launch parameter and does not appear here.
    pub static_smem: u32,
    /// Named barriers ("used N barriers"): on sm_90 they can cap blocks per SM.
    pub barriers: u32,
}

/// Parses ptxas's verbose report: the "Function properties for NAME" block (stack frame
/// and spills) and the "Used N registers, used B barriers, S bytes smem, …" line of each
/// entry function.
pub fn ptxas_report(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    let mut props_of: Option<String> = None;
    let mut entry: Option<String> = None;
    let number_before = |line: &str, word: &str| -> u32 {
        line.find(word).and_then(|i| line[..i].split_whitespace().last()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let quoted = |line: &str| line.split('\'').nth(1).map(str::to_string);
    for line in log.lines() {
        if line.contains("Compiling entry function") {
            entry = quoted(line);
            if let Some(name) = &entry {
                if !out.iter().any(|k| &k.name == name) {
                    out.push(KernelResources { name: name.clone(), ..Default::default() });
                }
            }
        } else if let Some(i) = line.find("Function properties for ") {
            props_of = Some(line[i + "Function properties for ".len()..].trim().to_string());
        } else if line.contains("bytes stack frame") {
            if let Some(k) = props_of.as_ref().and_then(|p| out.iter_mut().find(|k| &k.name == p)) {
                k.stack_bytes = number_before(line, "bytes stack frame");
                k.spill_stores = number_before(line, "bytes spill stores");
                k.spill_loads = number_before(line, "bytes spill loads");
            }
        } else if line.contains("Used ") && line.contains(" registers") {
            if let Some(k) = entry.as_ref().and_then(|e| out.iter_mut().find(|k| &k.name == e)) {
                k.registers = number_before(line, "registers");
                k.barriers = number_before(line, "barriers");
                k.static_smem = number_before(line, "bytes smem");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'k' for 'sm_80'\n\
            ptxas info    : Function properties for k\n\
            ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
            ptxas info    : Used 20 registers, used 0 barriers, 368 bytes cmem[0]\n\
            ptxas info    : Compiling entry function 'j' for 'sm_80'\n\
            ptxas info    : Function properties for j\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 255 registers, used 1 barriers, 368 bytes cmem[0]\n";
        let r = ptxas_report(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            KernelResources {
                name: "k".into(),
                registers: 20,
                stack_bytes: 16,
                spill_stores: 8,
                spill_loads: 4,
                static_smem: 0,
                barriers: 0,
            }
        );
        assert_eq!((r[1].registers, r[1].stack_bytes, r[1].spill_stores, r[1].barriers), (255, 0, 0, 1));
    }

    /// Lines copied from NVRTC 12.9's log for kernels/attention.cu and kernels/rope.cu
    /// (sm_80 prints cmem after smem, sm_90a omits cmem; rope's "cumulative stack size"
    /// must not be read as shared memory).
    #[test]
    fn parses_static_shared_memory_and_barriers() {
        let log = "ptxas info    : Compiling entry function 'attention_forward_hd128' for 'sm_80'\n\
            ptxas info    : Function properties for attention_forward_hd128\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 171 registers, used 1 barriers, 35328 bytes smem, 444 bytes cmem[0], 24 bytes cmem[2]\n\
            ptxas info    : Compiling entry function 'logprobs_forward' for 'sm_90a'\n\
            ptxas info    : Function properties for logprobs_forward\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 17 registers, used 1 barriers, 256 bytes smem\n\
            ptxas info    : Compiling entry function 'rope_forward' for 'sm_90a'\n\
            ptxas info    : Function properties for rope_forward\n\
            ptxas         .     32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 38 registers, used 0 barriers, 32 bytes cumulative stack size\n";
        let r = ptxas_report(log);
        let got: Vec<(&str, u32, u32, u32, u32)> =
            r.iter().map(|k| (k.name.as_str(), k.registers, k.barriers, k.static_smem, k.stack_bytes)).collect();
        assert_eq!(
            got,
            [
                ("attention_forward_hd128", 171, 1, 35328, 0),
                ("logprobs_forward", 17, 1, 256, 0),
                ("rope_forward", 38, 0, 0, 32)
            ]
        );
    }

    #[test]
    fn fnv_key_depends_on_every_part() {
        let a = super::super::fnv1a(&[b"ab", b"c"]);
        assert_ne!(a, super::super::fnv1a(&[b"a", b"bc"]));
        assert_eq!(a, super::super::fnv1a(&[b"ab", b"c"]));
    }
}
