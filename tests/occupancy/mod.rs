//! Theoretical occupancy: how many blocks of a kernel fit on one SM, and which resource
//! stops the next one, from ptxas's report (registers, static shared memory, barriers),
//! the block size and the dynamic shared memory of a launch. No GPU needed.
//!
//! The arithmetic follows `cudaOccMaxActiveBlocksPerMultiprocessor` in `cuda_occupancy.h`
//! (CUDA 12.9, `.nvrtc/nvidia/cuda_runtime/include/` once INSTALL_HINT's wheels are in):
//! registers are allocated per warp in units of 256 and per SM sub-partition (4 per SM:
//! `cudaOccMaxBlocksPerSMRegsLimit`); shared memory per block is static + dynamic + the
//! driver's 1 KB reservation, rounded up to 128 bytes (`cudaOccMaxBlocksPerSMSmemLimit`);
//! from compute capability 9 on, named barriers cap blocks too
//! (`cudaOccMaxBlocksPerSMBlockBarrierLimit`: 2 per block slot). It assumes the default
//! carveout (the whole shared-memory capacity of the SM, as `cudaOccSMemPreferenceVoltaPlus`
//! takes it) and that a kernel needing more than 48 KB is opted in to the per-block
//! maximum, as `Kernels::load` does. Achieved occupancy on a device can be lower (tail
//! effects, a smaller carveout the driver picks); this is the ceiling.

use std::fmt;

/// One SM's limits. Per-device numbers (register file, warps, shared memory) are from the
/// CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" and the
/// shared-memory sections for compute capability 8.x and 9.x ("the shared memory capacity
/// can be set to 0, 8, 16, 32, 64, 100, 132 or 164 KB" on 8.0, "… 196 or 228 KB" on 9.0;
/// "the maximum shared memory per thread block is 163 KB" / "227 KB"; "the 1 KB of shared
/// memory not made available to a thread block is reserved for system use"), and agree
/// with the carveout tables in `cuda_occupancy.h`; allocation units, sub-partitions, block
/// and barrier limits are from `cuda_occupancy.h` (CUDA 12.9) for majors 8 and 9.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmLimits {
    pub name: &'static str,
    pub registers_per_sm: u32,
    pub registers_per_block: u32,
    /// Registers are handed to a warp in multiples of this.
    pub register_unit: u32,
    /// ptxas never assigns more than 255 (`cuda_occupancy.h` checks against 256).
    pub max_registers_per_thread: u32,
    /// The register file is split between this many schedulers; a warp's registers come
    /// from one of them.
    pub sub_partitions: u32,
    pub max_threads_per_block: u32,
    pub max_warps_per_sm: u32,
    pub max_blocks_per_sm: u32,
    pub smem_per_sm: u32,
    /// The most one block may use after opting in (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES).
    pub max_smem_per_block: u32,
    /// Taken from the SM for every resident block, besides what the kernel asks for.
    pub smem_reserved_per_block: u32,
    pub smem_unit: u32,
    /// Named barriers available per block slot, where barriers limit occupancy (sm_90+).
    pub barriers_per_block_slot: Option<u32>,
}

/// H100 / H200 (compute capability 9.0).
pub const SM_90: SmLimits = SmLimits {
    name: "sm_90",
    registers_per_sm: 65536,
    registers_per_block: 65536,
    register_unit: 256,
    max_registers_per_thread: 255,
    sub_partitions: 4,
    max_threads_per_block: 1024,
    max_warps_per_sm: 64,
    max_blocks_per_sm: 32,
    smem_per_sm: 228 << 10,
    max_smem_per_block: 227 << 10,
    smem_reserved_per_block: 1 << 10,
    smem_unit: 128,
    barriers_per_block_slot: Some(2),
};

/// A100 (compute capability 8.0).
pub const SM_80: SmLimits = SmLimits {
    name: "sm_80",
    smem_per_sm: 164 << 10,
    max_smem_per_block: 163 << 10,
    barriers_per_block_slot: None,
    ..SM_90
};

impl SmLimits {
    /// The limits for an NVRTC arch flag ("sm_90a", "sm_90", "sm_80"), if known.
    pub fn for_arch(arch: &str) -> Option<&'static SmLimits> {
        match arch.trim_end_matches('a') {
            "sm_90" => Some(&SM_90),
            "sm_80" => Some(&SM_80),
            _ => None,
        }
    }
}

/// What one launch of a kernel holds while resident.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelUse {
    pub registers: u32,
    pub threads_per_block: u32,
    pub static_smem: u32,
    pub dynamic_smem: u32,
    pub barriers: u32,
}

/// A resource that caps blocks per SM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limiter {
    Warps,
    Registers,
    SharedMemory,
    Blocks,
    Barriers,
}

impl fmt::Display for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limiter::Warps => "warps",
            Limiter::Registers => "regs",
            Limiter::SharedMemory => "smem",
            Limiter::Blocks => "blocks",
            Limiter::Barriers => "barriers",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub blocks_per_sm: u32,
    pub active_warps: u32,
    pub max_warps: u32,
    /// Every resource whose own limit equals `blocks_per_sm` (ties are common: a 256-thread
    /// block at 32 registers hits the warp and register limits at once).
    pub limiters: Vec<Limiter>,
    /// Shared memory one block takes from the SM, reservation and rounding included.
    pub smem_per_block: u32,
}

impl Occupancy {
    /// Active warps over the SM's maximum, in percent.
    pub fn percent(&self) -> f64 {
        100.0 * self.active_warps as f64 / self.max_warps as f64
    }

    /// The limiters joined by "+", e.g. "warps+regs".
    pub fn limiter_text(&self) -> String {
        self.limiters.iter().map(Limiter::to_string).collect::<Vec<_>>().join("+")
    }
}

fn round_up(x: u64, unit: u64) -> u64 {
    x.div_ceil(unit) * unit
}

/// Theoretical blocks per SM of `k` on `sm`; 0 when one block does not fit at all.
pub fn occupancy(sm: &SmLimits, k: &KernelUse) -> Occupancy {
    let warps_per_block = k.threads_per_block.div_ceil(32);
    let warps = if k.threads_per_block == 0 || k.threads_per_block > sm.max_threads_per_block {
        0
    } else {
        sm.max_warps_per_sm / warps_per_block
    };

    let regs = if k.registers > sm.max_registers_per_thread {
        0
    } else if k.registers == 0 {
        u32::MAX
    } else {
        let per_warp = round_up(k.registers as u64 * 32, sm.register_unit as u64);
        // The hardware checks a block as if its warps were spread over every sub-partition.
        let assumed = per_warp * round_up(warps_per_block as u64, sm.sub_partitions as u64);
        if assumed > sm.registers_per_block as u64 || per_warp * warps_per_block as u64 > sm.registers_per_block as u64
        {
            0
        } else {
            let warps_per_partition = (sm.registers_per_sm / sm.sub_partitions) as u64 / per_warp;
            (warps_per_partition * sm.sub_partitions as u64 / warps_per_block.max(1) as u64) as u32
        }
    };

    let smem_per_block =
        round_up(k.static_smem as u64 + k.dynamic_smem as u64 + sm.smem_reserved_per_block as u64, sm.smem_unit as u64);
    let smem = if smem_per_block > (sm.max_smem_per_block + sm.smem_reserved_per_block) as u64 {
        0
    } else {
        (sm.smem_per_sm as u64 / smem_per_block) as u32
    };

    let barriers = match sm.barriers_per_block_slot {
        Some(per_slot) if k.barriers > 0 => per_slot * sm.max_blocks_per_sm / k.barriers,
        _ => u32::MAX,
    };

    let limits = [
        (Limiter::Warps, warps),
        (Limiter::Registers, regs),
        (Limiter::SharedMemory, smem),
        (Limiter::Blocks, sm.max_blocks_per_sm),
        (Limiter::Barriers, barriers),
    ];
    let blocks = limits.iter().map(|l| l.1).min().expect("five limits");
    Occupancy {
        blocks_per_sm: blocks,
        active_warps: blocks * warps_per_block,
        max_warps: sm.max_warps_per_sm,
        limiters: limits.iter().filter(|l| l.1 == blocks).map(|l| l.0).collect(),
        smem_per_block: smem_per_block as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn use_of(registers: u32, threads: u32, dynamic_smem: u32) -> KernelUse {
        KernelUse { registers, threads_per_block: threads, dynamic_smem, ..Default::default() }
    }

    fn summary(o: &Occupancy) -> (u32, u32, String) {
        (o.blocks_per_sm, o.active_warps, o.limiter_text())
    }

    #[test]
    fn registers_limit_a_255_register_block() {
        // 255 × 32 = 8160 registers per warp, rounded up to 256s: 8192. A sub-partition has
        // 65536 / 4 = 16384, so 2 warps each, 8 per SM: two 4-warp blocks, 8 / 64 = 12.5%.
        let o = occupancy(&SM_90, &use_of(255, 128, 0));
        assert_eq!(summary(&o), (2, 8, "regs".into()));
        assert_eq!(o.percent(), 12.5);
    }

    #[test]
    fn shared_memory_limits_a_64k_block() {
        // 65536 + 1024 reserved = 66560 bytes (a multiple of 128). sm_90: 233472 / 66560 =
        // 3.5 → 3 blocks of 4 warps = 12 / 64 = 18.75%; sm_80: 167936 / 66560 = 2.5 → 2.
        // Registers alone would allow 16 blocks (32 × 32 = 1024 per warp, 16 warps per
        // sub-partition), warps 16.
        let k = use_of(32, 128, 64 << 10);
        let o = occupancy(&SM_90, &k);
        assert_eq!(summary(&o), (3, 12, "smem".into()));
        assert_eq!((o.smem_per_block, o.percent()), (66560, 18.75));
        assert_eq!(summary(&occupancy(&SM_80, &k)), (2, 8, "smem".into()));
    }

    #[test]
    fn a_256_thread_32_register_block_fills_the_sm() {
        // 8 warps per block; registers: 1024 per warp, 16 warps per sub-partition, 64 per SM
        // → 8 blocks; warps: 64 / 8 = 8 blocks. Both limits meet at 100%.
        let o = occupancy(&SM_90, &use_of(32, 256, 0));
        assert_eq!(summary(&o), (8, 64, "warps+regs".into()));
        assert_eq!(o.percent(), 100.0);
    }

    #[test]
    fn registers_are_counted_per_sub_partition() {
        // 40 × 32 = 1280 per warp. 16384 / 1280 = 12.8 → 12 warps per sub-partition, 48 per
        // SM → 24 two-warp blocks (75%). Dividing the whole file (65536 / 1280 = 51 warps)
        // would claim 25.
        let o = occupancy(&SM_90, &use_of(40, 64, 0));
        assert_eq!(summary(&o), (24, 48, "regs".into()));
    }

    #[test]
    fn tiny_blocks_hit_the_block_limit() {
        // One warp of 16 registers: warps would allow 64 blocks, registers 128, shared
        // memory (1 KB reserved each) 228; the SM holds 32 blocks, 32 warps = 50%.
        let o = occupancy(&SM_90, &use_of(16, 32, 0));
        assert_eq!(summary(&o), (32, 32, "blocks".into()));
        assert_eq!(o.percent(), 50.0);
    }

    #[test]
    fn barriers_limit_on_sm90_only() {
        // 64 barrier slots (2 × 32 blocks) / 3 barriers per block = 21 blocks on sm_90;
        // cuda_occupancy.h applies no barrier limit to sm_80, where the 32-block cap holds.
        let k = KernelUse { barriers: 3, ..use_of(16, 32, 0) };
        assert_eq!(summary(&occupancy(&SM_90, &k)), (21, 21, "barriers".into()));
        assert_eq!(summary(&occupancy(&SM_80, &k)), (32, 32, "blocks".into()));
    }

    #[test]
    fn a_block_that_cannot_launch_has_zero_blocks() {
        // 1024 threads × 128 registers = 131072 > 65536 registers per block.
        assert_eq!(summary(&occupancy(&SM_90, &use_of(128, 1024, 0))), (0, 0, "regs".into()));
        // 227 KB + 1 KB reserved = 233472 fits exactly once; one byte more rounds to 233600.
        let fits = KernelUse { static_smem: 1024, ..use_of(32, 128, (227 << 10) - 1024) };
        assert_eq!(summary(&occupancy(&SM_90, &fits)), (1, 4, "smem".into()));
        let over = KernelUse { dynamic_smem: fits.dynamic_smem + 1, ..fits };
        assert_eq!(summary(&occupancy(&SM_90, &over)), (0, 0, "smem".into()));
        // The same block is over A100's 163 KB.
        assert_eq!(occupancy(&SM_80, &fits).blocks_per_sm, 0);
        // More threads than a block may have.
        assert_eq!(summary(&occupancy(&SM_90, &use_of(16, 2048, 0))), (0, 0, "warps".into()));
    }

    #[test]
    fn arch_flags_map_to_limits() {
        assert_eq!(SmLimits::for_arch("sm_90a"), Some(&SM_90));
        assert_eq!(SmLimits::for_arch("sm_90"), Some(&SM_90));
        assert_eq!(SmLimits::for_arch("sm_80"), Some(&SM_80));
        assert_eq!(SmLimits::for_arch("sm_86"), None);
    }
}
