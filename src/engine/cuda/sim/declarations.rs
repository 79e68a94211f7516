//! The kernels' declarations in kernels/*.cu, read for the simulator: before a simulated
//! launch, `check_launch` compares the launcher's arguments, block size and dynamic shared
//! memory with what the kernel declares, which a device would refuse or run wrong and the
//! simulator would not notice. tests/cuda_compile.rs reads the declarations' launch bounds.

use cudarc::driver::LaunchConfig;

use crate::engine::cuda::kernels::dynamic_smem_limit;
use crate::engine::cuda::KERNEL_SOURCES;
use crate::error::{Error, Result};

/// A kernel parameter as the launch passes it: the driver copies as many bytes from each
/// argument as the kernel's parameter has, so an `i32` given for a `long long` leaves four
/// bytes of garbage in it, silently, on a device (the simulator's 8-byte slots hide it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// Any pointer (passed as a `u64` device address).
    Ptr,
    /// `long long`, `size_t`.
    I64,
    /// `int`, `unsigned int`.
    I32,
    F32,
    F64,
}

/// A launcher argument: its kind, and its value as the 8-byte slot the simulator passes
/// (little-endian: the kernel reads its parameter's size from the slot's start).
pub trait KernelArg: Copy {
    const KIND: ArgKind;
    fn slot(self) -> u64;
}
impl KernelArg for u64 {
    const KIND: ArgKind = ArgKind::Ptr;
    fn slot(self) -> u64 {
        self
    }
}
impl KernelArg for i64 {
    const KIND: ArgKind = ArgKind::I64;
    fn slot(self) -> u64 {
        self as u64
    }
}
impl KernelArg for i32 {
    const KIND: ArgKind = ArgKind::I32;
    fn slot(self) -> u64 {
        self as u32 as u64
    }
}
impl KernelArg for f32 {
    const KIND: ArgKind = ArgKind::F32;
    fn slot(self) -> u64 {
        self.to_bits() as u64
    }
}

/// A launcher argument as the simulator takes it: its kind (for `check_launch`) and its slot.
pub fn arg<T: KernelArg>(a: T) -> (ArgKind, u64) {
    (T::KIND, a.slot())
}

/// One `extern "C" __global__` kernel's parameters as declared in kernels/*.cu. `name`
/// may end in `##X` (a kernel stamped out by a macro per head dim): it then stands for
/// the prefix followed by digits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSignature {
    pub file: &'static str,
    pub name: String,
    pub params: Vec<ArgKind>,
    /// `__launch_bounds__`' first value: a larger block fails to launch on a device.
    pub max_threads: Option<u32>,
}

impl KernelSignature {
    /// Whether this declaration declares `kernel`.
    pub fn names(&self, kernel: &str) -> bool {
        match self.name.split_once("##") {
            None => self.name == kernel,
            Some((prefix, _)) => kernel
                .strip_prefix(prefix)
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())),
        }
    }
}

/// The C kind of one parameter declaration (`const float* __restrict__ x`, `long long n`).
fn param_kind(decl: &str) -> std::result::Result<ArgKind, String> {
    if decl.contains('*') {
        return Ok(ArgKind::Ptr);
    }
    let words: Vec<&str> =
        decl.split_whitespace().filter(|w| !matches!(*w, "const" | "__restrict__" | "volatile")).collect();
    let ty = match words.split_last() {
        Some((_name, ty)) if !ty.is_empty() => ty.join(" "),
        _ => return Err(format!("cannot read the parameter `{decl}`")),
    };
    match ty.as_str() {
        "int" | "unsigned" | "unsigned int" => Ok(ArgKind::I32),
        "long long" | "unsigned long long" | "long" | "unsigned long" | "size_t" => Ok(ArgKind::I64),
        "float" => Ok(ArgKind::F32),
        "double" => Ok(ArgKind::F64),
        _ => Err(format!("parameter `{decl}`: type `{ty}` has no launcher argument kind")),
    }
}

/// Every `extern "C" __global__` kernel of one source file, in order. Lines continued
/// with `\` are joined and comments dropped first, as the preprocessor does.
pub fn parse_kernel_signatures(file: &'static str, src: &str) -> Result<Vec<KernelSignature>> {
    let bad = |what: String| Error::Cuda(format!("kernels/{file}: {what}"));
    let joined = src.replace("\\\n", " ");
    let mut text = String::with_capacity(joined.len());
    let mut rest = joined.as_str();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
            text.push(' ');
        } else {
            let c = rest.chars().next().expect("not empty");
            text.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = text[at..].find("extern \"C\"") {
        let decl = &text[at + i + "extern \"C\"".len()..];
        at += i + 1;
        let Some(decl) = decl.trim_start().strip_prefix("__global__") else { continue };
        let mut decl = decl.trim_start().strip_prefix("void").ok_or_else(|| bad("a kernel that is not void".into()))?;
        decl = decl.trim_start();
        let mut max_threads = None;
        if let Some(r) = decl.strip_prefix("__launch_bounds__") {
            let close = r.find(')').ok_or_else(|| bad("unclosed __launch_bounds__".into()))?;
            let first = r[..close].trim_start().trim_start_matches('(').split(',').next().unwrap_or("").trim();
            max_threads = Some(first.parse().map_err(|_| bad(format!("__launch_bounds__ `{first}` is not a number")))?);
            decl = r[close + 1..].trim_start();
        }
        let open = decl.find('(').ok_or_else(|| bad("a kernel without a parameter list".into()))?;
        let name = decl[..open].trim().to_string();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'#') {
            return Err(bad(format!("cannot read a kernel name from `{}`", &decl[..open])));
        }
        let close = decl[open..].find(')').ok_or_else(|| bad(format!("{name}: unclosed parameter list")))?;
        let list = decl[open + 1..open + close].trim();
        let params = if list.is_empty() || list == "void" {
            Vec::new()
        } else {
            list.split(',')
                .map(|p| param_kind(p.trim()).map_err(|e| bad(format!("{name}: {e}"))))
                .collect::<Result<_>>()?
        };
        out.push(KernelSignature { file, name, params, max_threads });
    }
    Ok(out)
}

/// The signatures of every kernel in kernels/*.cu (parsed once).
pub fn kernel_signatures() -> Result<&'static [KernelSignature]> {
    static SIGS: std::sync::OnceLock<std::result::Result<Vec<KernelSignature>, String>> = std::sync::OnceLock::new();
    let parsed = SIGS.get_or_init(|| {
        let mut all = Vec::new();
        for (file, src) in KERNEL_SOURCES {
            all.extend(parse_kernel_signatures(file, src).map_err(|e| e.to_string())?);
        }
        Ok(all)
    });
    parsed.as_deref().map_err(|e| Error::Cuda(e.clone()))
}

/// Refuses a launch that a device would refuse or run wrong, and the simulator would not
/// notice: arguments that differ from `kernel`'s declared parameters in count or kind, a
/// block larger than its `__launch_bounds__`, more dynamic shared memory than
/// `dynamic_smem_limit`. Checked on the simulator only (`KernelSim::launch_checked`): the
/// launchers build the same argument list and config for a device, and CI runs every
/// launcher on the simulator, so a device launch pays nothing for it.
pub fn check_launch(kernel: &str, cfg: &LaunchConfig, args: &[ArgKind]) -> Result<()> {
    let sig = kernel_signatures()?.iter().find(|s| s.names(kernel)).ok_or_else(|| {
        Error::Cuda(format!("kernel {kernel}: no `extern \"C\" __global__` declaration in kernels/*.cu"))
    })?;
    if sig.params != args {
        return Err(Error::Cuda(format!(
            "kernel {kernel}: the launcher passes {args:?}, kernels/{} declares {:?}",
            sig.file, sig.params
        )));
    }
    let (x, y, z) = cfg.block_dim;
    let threads = x * y * z;
    if let Some(max) = sig.max_threads.filter(|&m| threads > m) {
        return Err(Error::Cuda(format!(
            "kernel {kernel}: a block of {threads} threads, kernels/{} bounds it to {max}",
            sig.file
        )));
    }
    let limit = dynamic_smem_limit(kernel);
    if cfg.shared_mem_bytes > limit {
        return Err(Error::Cuda(format!(
            "kernel {kernel}: {} bytes of dynamic shared memory, more than the {limit} it may use",
            cfg.shared_mem_bytes
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ArgKind::{Ptr, F32, I32, I64};
    use super::*;
    use crate::engine::cuda::kernels::{attention_backward_smem, DEFAULT_DYNAMIC_SMEM, KERNEL_NAMES};

    /// One row of blocks of `block` threads with `smem` bytes of dynamic shared memory.
    fn cfg(block: u32, smem: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (4, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: smem }
    }

    #[test]
    fn parses_kernel_declarations_as_the_preprocessor_sees_them() {
        let src = "// extern \"C\" __global__ void commented_out(int a) {}\n\
            extern \"C\" __global__ void __launch_bounds__(256, 1) plain(\n\
                float* __restrict__ y, const __nv_bfloat16* __restrict__ x, /* rows */ int n,\n\
                unsigned int flags, long long count, float eps) {}\n\
            #define K(D) \\\n\
                extern \"C\" __global__ void __launch_bounds__(128) stamped_hd##D( \\\n\
                    const unsigned char* b, size_t n) {}\n\
            extern \"C\" int not_a_kernel(int);\n";
        let sigs = parse_kernel_signatures("t.cu", src).unwrap();
        assert_eq!(sigs.len(), 2, "{sigs:?}");
        assert_eq!((sigs[0].name.as_str(), sigs[0].params.clone()), ("plain", vec![Ptr, Ptr, I32, I32, I64, F32]));
        assert_eq!((sigs[1].name.as_str(), sigs[1].params.clone()), ("stamped_hd##D", vec![Ptr, I64]));
        assert_eq!((sigs[0].max_threads, sigs[1].max_threads), (Some(256), Some(128)));
        assert!(sigs[1].names("stamped_hd128") && !sigs[1].names("stamped_hd") && !sigs[1].names("stamped_hdx"));

        let err = parse_kernel_signatures("t.cu", "extern \"C\" __global__ void k(half h) {}").unwrap_err();
        assert!(err.to_string().contains("kernels/t.cu: k: parameter `half h`"), "{err}");
    }

    /// The declarations in kernels/*.cu, read by hand, for the kernels whose launchers mix
    /// 8- and 4-byte scalars: what the parser must find there.
    #[test]
    fn reads_the_real_kernel_files() {
        let sig = |name: &str| kernel_signatures().unwrap().iter().find(|s| s.names(name)).unwrap().params.clone();
        assert_eq!(sig("adamw_step"), [vec![Ptr; 5], vec![I64], vec![F32; 8]].concat());
        assert_eq!(sig("grad_norm"), vec![Ptr, Ptr, I64]);
        assert_eq!(sig("grad_norm_reduce"), vec![Ptr, Ptr, I32, I32]);
        assert_eq!(sig("attention_backward_hd128"), [vec![Ptr; 12], vec![I32; 8], vec![F32]].concat());
        assert_eq!(sig("swiglu_forward"), vec![Ptr, Ptr, I32, I32]);
        assert_eq!(sig("swiglu_backward"), [vec![Ptr; 4], vec![I32; 2]].concat());
        assert_eq!(sig("rmsnorm_backward_from_xhat"), [vec![Ptr; 7], vec![I32; 3]].concat());
        assert_eq!(sig("cast_f32_bf16"), vec![Ptr, Ptr, I64]);
        let bound = |name: &str| kernel_signatures().unwrap().iter().find(|s| s.names(name)).unwrap().max_threads;
        assert_eq!(
            [bound("logprobs_forward"), bound("attention_forward_hd16"), bound("rmsnorm_forward")],
            [Some(512), Some(128), Some(256)]
        );
        for (file, name) in KERNEL_NAMES {
            let found: Vec<_> = kernel_signatures().unwrap().iter().filter(|s| s.names(name)).collect();
            assert_eq!(found.len(), 1, "{name}: {found:?}");
            assert_eq!(found[0].file, *file, "{name}");
        }
    }

    #[test]
    fn refuses_arguments_of_the_wrong_kind_or_count() {
        let cfg = cfg(256, 0);
        assert!(check_launch("cast_f32_bf16", &cfg, &[Ptr, Ptr, I64]).is_ok());
        // An i32 count for `long long count`: correct on the simulator, garbage on a device.
        let err = check_launch("cast_f32_bf16", &cfg, &[Ptr, Ptr, I32]).unwrap_err();
        assert!(err.to_string().contains("kernels/elementwise.cu declares"), "{err}");
        assert!(check_launch("cast_f32_bf16", &cfg, &[Ptr, Ptr, I64, I32]).is_err());
        assert!(check_launch("swiglu_forward", &cfg, &[Ptr, Ptr, I32, I32]).is_ok());
        assert!(check_launch("swiglu_forward", &cfg, &[Ptr, Ptr, Ptr, I32, I32]).is_err());
        assert!(check_launch("attention_forward_hd48", &cfg, &[Ptr]).is_err());
        assert!(check_launch("no_such_kernel", &cfg, &[]).is_err());
    }

    #[test]
    fn refuses_blocks_past_the_launch_bounds_and_unopted_shared_memory() {
        let swiglu = [Ptr, Ptr, I32, I32];
        let err = check_launch("swiglu_forward", &cfg(512, 0), &swiglu).unwrap_err();
        assert!(err.to_string().contains("a block of 512 threads, kernels/elementwise.cu bounds it to 256"), "{err}");
        let err = check_launch("swiglu_forward", &cfg(256, 16), &swiglu).unwrap_err();
        assert!(err.to_string().contains("dynamic shared memory"), "{err}");

        // attention backward at head dim 128 needs more than 48 KB: opted in, up to its size.
        let bwd = [vec![Ptr; 12], vec![I32; 8], vec![F32]].concat();
        let need = attention_backward_smem(128);
        assert!(need > DEFAULT_DYNAMIC_SMEM, "{need}");
        assert!(check_launch("attention_backward_hd128", &cfg(128, need), &bwd).is_ok());
        assert!(check_launch("attention_backward_hd128", &cfg(128, need + 4), &bwd).is_err());
        assert!(check_launch("attention_backward_hd64", &cfg(128, need), &bwd).is_err());
    }
}
