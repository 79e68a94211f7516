//! The kernel simulator: the kernels' own source (kernels/*.cu, unchanged) compiled for
//! the CPU with a C++ compiler against kernels/sim/cuda_sim.h, and launched through the
//! same launchers as on a GPU (`Gpu::sim`). Each CUDA thread runs as a fiber; barriers,
//! warp shuffles, mma.sync and ldmatrix are rendezvous of the block's or warp's fibers,
//! and cp.async copies land only when a wait_group retires them, so indexing, fragment
//! layouts, masking, tile skipping, shared-memory use, copy pipelines and reductions are
//! the kernels' real ones. Not simulated: timing, memory coalescing, bank conflicts, the
//! device's fast-math rounding, and concurrency between blocks (they run one at a time, so
//! atomics are exact and ordered). The GEMMs are computed on the host (`host.rs`):
//! they are cuBLASLt's, not ours.
//!
//! Used by tests/kernel_sim.rs on machines without a GPU. Needs `$CXX` or `c++` (g++ or
//! clang++ with C++17); the library is built once per source hash into the
//! directory the caller gives. `declarations` reads the kernels' declarations, against
//! which every launcher's launch is checked before it runs here.

pub mod declarations;

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use cudarc::driver::LaunchConfig;

use self::declarations::{check_launch, ArgKind};
use super::kernels::KERNEL_NAMES;
use super::{fnv1a, KERNEL_HEADERS, KERNEL_SOURCES};
use crate::error::{Error, Result};

const SIM_HEADER: &str = include_str!("../../../kernels/sim/cuda_sim.h");
const SIM_RUNTIME: &str = include_str!("../../../kernels/sim/cuda_sim.cpp");
/// Kernels that pin the simulator's ldmatrix and cp.async (tests/kernel_sim.rs); built
/// into the simulator only, never for a device.
const SIM_SELFTEST: &str = include_str!("../../../kernels/sim/selftest.cu");
/// The entry points of `SIM_SELFTEST`, launched by name like the real kernels.
pub const SELFTEST_KERNELS: &[&str] = &["sim_selftest_ldmatrix", "sim_selftest_cp_async"];

/// `sdpo_sim::Launch` in cuda_sim.h.
#[repr(C)]
struct Launch {
    grid: [u32; 3],
    block: [u32; 3],
    smem_bytes: u32,
    reverse: i32,
    error: [u8; 512],
}

type EntryPoint = unsafe extern "C" fn(*mut Launch, *mut *mut c_void) -> i32;

/// The compiled kernels, and the order blocks, warps and lanes run in (cuda_sim.h).
#[derive(Clone)]
pub struct KernelSim {
    lib: Arc<libloading::Library>,
    reverse: bool,
}

impl KernelSim {
    /// Compiles (or reuses from `dir`) the simulator library and loads it.
    pub fn build(dir: &Path) -> Result<Self> {
        let mut parts: Vec<&[u8]> = vec![SIM_HEADER.as_bytes(), SIM_RUNTIME.as_bytes(), SIM_SELFTEST.as_bytes()];
        KERNEL_SOURCES.iter().chain(KERNEL_HEADERS).for_each(|(n, s)| parts.extend([n.as_bytes(), s.as_bytes()]));
        let lib_path = dir.join(format!("libsdpo_kernel_sim-{:016x}.so", fnv1a(&parts)));
        if !lib_path.exists() {
            compile(dir, &lib_path)?;
        }
        // SAFETY: the library is ours (built above from the embedded sources); loading it
        // runs no initialisers beyond C++ globals of plain data.
        let lib = unsafe { libloading::Library::new(&lib_path) }
            .map_err(|e| Error::Cuda(format!("loading the kernel simulator {}: {e}", lib_path.display())))?;
        Ok(KernelSim { lib: Arc::new(lib), reverse: false })
    }

    /// The same library, running blocks, warps and lanes in reverse order.
    pub fn reversed(&self) -> Self {
        KernelSim { lib: self.lib.clone(), reverse: true }
    }

    /// Runs one of kernels/*.cu as its launcher passes it: refuses arguments, a block or
    /// shared memory that its declaration does not allow (`check_launch`), then `launch`es.
    ///
    /// # Safety
    /// Every pointer argument must address host memory of the extent the kernel uses.
    pub unsafe fn launch_checked(&self, name: &str, cfg: &LaunchConfig, args: &[(ArgKind, u64)]) -> Result<()> {
        check_launch(name, cfg, &args.iter().map(|a| a.0).collect::<Vec<_>>())?;
        self.launch(name, cfg, &args.iter().map(|a| a.1).collect::<Vec<_>>())
    }

    /// Runs kernel `name` over the grid of `cfg`; `args` in the kernel's parameter order,
    /// one 8-byte slot each (`KernelArg::slot`).
    ///
    /// # Safety
    /// Every pointer argument must address host memory of the extent the kernel uses, and
    /// there must be one argument of the right kind per kernel parameter (`launch_checked`
    /// checks the kinds).
    pub unsafe fn launch(&self, name: &str, cfg: &LaunchConfig, args: &[u64]) -> Result<()> {
        let symbol = format!("sdpo_sim_{name}\0");
        let entry: libloading::Symbol<EntryPoint> = self
            .lib
            .get(symbol.as_bytes())
            .map_err(|e| Error::Cuda(format!("kernel {name} is not in the simulator: {e}")))?;
        let mut slots = args.to_vec();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        let mut launch = Launch {
            grid: [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2],
            block: [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2],
            smem_bytes: cfg.shared_mem_bytes,
            reverse: self.reverse as i32,
            error: [0; 512],
        };
        if entry(&mut launch, params.as_mut_ptr()) != 0 {
            let end = launch.error.iter().position(|&b| b == 0).unwrap_or(launch.error.len());
            return Err(Error::Cuda(format!("{name} (simulated): {}", String::from_utf8_lossy(&launch.error[..end]))));
        }
        Ok(())
    }
}

/// Writes the sources and one wrapper per kernel file into `dir`, compiles them in
/// parallel and links `lib_path`.
fn compile(dir: &Path, lib_path: &Path) -> Result<()> {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("sim")).map_err(|e| Error::Cuda(format!("creating {}: {e}", src.display())))?;
    let write = |p: PathBuf, text: &str| {
        std::fs::write(&p, text).map_err(|e| Error::Cuda(format!("writing {}: {e}", p.display())))
    };
    write(src.join("sim/cuda_sim.h"), SIM_HEADER)?;
    write(src.join("sim/cuda_sim.cpp"), SIM_RUNTIME)?;
    write(src.join("sim/selftest.cu"), SIM_SELFTEST)?;
    let mut selftest = "#include \"selftest.cu\"\n".to_string();
    SELFTEST_KERNELS.iter().for_each(|k| selftest += &format!("SDPO_SIM_EXPORT({k})\n"));
    write(src.join("sim/selftest.sim.cpp"), &selftest)?;
    let mut units = vec![src.join("sim/cuda_sim.cpp"), src.join("sim/selftest.sim.cpp")];
    for (file, text) in KERNEL_SOURCES.iter().chain(KERNEL_HEADERS) {
        write(src.join(file), text)?;
    }
    for (file, _) in KERNEL_SOURCES {
        let mut wrapper = format!("#include \"{file}\"\n");
        KERNEL_NAMES.iter().filter(|(f, _)| f == file).for_each(|(_, k)| wrapper += &format!("SDPO_SIM_EXPORT({k})\n"));
        let p = src.join(format!("{}.sim.cpp", file.trim_end_matches(".cu")));
        write(p.clone(), &wrapper)?;
        units.push(p);
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let flags = ["-std=c++17", "-O2", "-fPIC", "-fno-strict-aliasing", "-w", "-DSDPO_SIM"];
    let run = |cmd: &mut Command, what: &str| -> Result<std::process::Child> {
        cmd.spawn().map_err(|e| {
            Error::Cuda(format!("running the C++ compiler `{cxx}` for {what}: {e} (set CXX to a C++17 compiler)"))
        })
    };
    let mut jobs = Vec::new();
    for u in &units {
        let obj = u.with_extension("o");
        let child = run(
            Command::new(&cxx).args(flags).arg("-I").arg(&src).arg("-c").arg(u).arg("-o").arg(&obj),
            &u.display().to_string(),
        )?;
        jobs.push((u.clone(), obj, child));
    }
    let mut objs = Vec::new();
    for (u, obj, child) in jobs {
        let out = child.wait_with_output().map_err(|e| Error::Cuda(format!("{cxx} on {}: {e}", u.display())))?;
        if !out.status.success() {
            return Err(Error::Cuda(format!("{cxx} failed on {}", u.display())));
        }
        objs.push(obj);
    }
    let tmp = lib_path.with_extension(format!("tmp{}", std::process::id()));
    let out = run(Command::new(&cxx).arg("-shared").arg("-o").arg(&tmp).args(&objs), "linking")?
        .wait_with_output()
        .map_err(|e| Error::Cuda(format!("{cxx} linking: {e}")))?;
    if !out.status.success() {
        return Err(Error::Cuda(format!("{cxx} failed linking {}", tmp.display())));
    }
    std::fs::rename(&tmp, lib_path).map_err(|e| Error::Cuda(format!("renaming {}: {e}", tmp.display())))
}
