//! Matrix multiplies through cuBLASLt: bf16 × bf16 with fp32 compute, output fp32 or bf16,
//! through the raw `result` API (cudarc's safe `Matmul` wants A, B and C of one dtype).
//!
//! Row-major everywhere, as the rest of the engine: `C[m, n] = α·op(A)·op(B) + β·C` with
//! A stored `[m, k]` (`[k, m]` when `trans_a`) and B stored `[k, n]` (`[n, k]` when
//! `trans_b`), each with a row stride (`lda`, `ldb`, `ldc`, in elements). cuBLAS is
//! column-major, so the call computes Cᵀ = op(B)ᵀ·op(A)ᵀ: a row-major matrix is its
//! column-major transpose, and nothing is copied. The three uses in a linear layer:
//!   forward  y = x·Wᵀ        gemm(y, x, W, m = n_tok, n = out, k = in, trans_b)
//!   backward dx = dy·W       gemm(dx, dy, W, m = n_tok, n = in, k = out)
//!   backward dW += dyᵀ·x     gemm(dW, dy, x, m = out, n = in, k = n_tok, trans_a, β = 1)
//! Algorithms come from cuBLASLt's heuristic once per shape and operand alignment (told to
//! the heuristic: it assumes 256-byte aligned pointers otherwise) and are cached; the workspace
//! (32 MiB on Hopper, 4 MiB before, as NVIDIA recommends) is allocated once.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::kernels::{Bf16, DPtr};
use super::profile::Prof;
use crate::engine::profile::Category;
use crate::error::{Error, Result};

/// The output type of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OutType {
    F32,
    Bf16,
}

/// One GEMM's shape (row-major view; see the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl GemmShape {
    /// Contiguous operands: the row strides are the stored widths.
    pub fn new(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Self {
        let lda = if trans_a { m } else { k };
        let ldb = if trans_b { k } else { n };
        GemmShape { m, n, k, trans_a, trans_b, lda, ldb, ldc: n }
    }

    /// The cuBLAS (column-major) view of the call: operand 1 is op(B)ᵀ, operand 2 is
    /// op(A)ᵀ, the output is Cᵀ `[n, m]` — a row-major matrix read column-major is its
    /// transpose, so Cᵀ = op(B)ᵀ·op(A)ᵀ needs no copies.
    pub fn column_major(&self) -> [ColMajor; 3] {
        // Stored B is [k, n] row-major = [n, k] column-major = Bᵀ: already op(B)ᵀ, no op;
        // stored [n, k] (trans_b) reads as [k, n] and needs a transpose. Same for A.
        let op1 = if self.trans_b {
            ColMajor { rows: self.k, cols: self.n, ld: self.ldb, trans: true }
        } else {
            ColMajor { rows: self.n, cols: self.k, ld: self.ldb, trans: false }
        };
        let op2 = if self.trans_a {
            ColMajor { rows: self.m, cols: self.k, ld: self.lda, trans: true }
        } else {
            ColMajor { rows: self.k, cols: self.m, ld: self.lda, trans: false }
        };
        [op1, op2, ColMajor { rows: self.n, cols: self.m, ld: self.ldc, trans: false }]
    }

    /// Elements A, B and C must span.
    fn spans(&self) -> (usize, usize, usize) {
        let (ar, ac) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let (br, bc) = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        ((ar - 1) * self.lda + ac, (br - 1) * self.ldb + bc, (self.m - 1) * self.ldc + self.n)
    }
}

/// One cuBLAS operand: its stored column-major shape and leading dimension, and whether
/// the call applies a transpose (CUBLAS_OP_T).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColMajor {
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub trans: bool,
}

fn lt_err(what: &str) -> impl Fn(lt::CublasError) -> Error + '_ {
    move |e| Error::Cuda(format!("cuBLASLt {what}: {e:?}"))
}

/// Owns a cuBLASLt handle, the workspace and the algorithm cache.
pub struct Gemm {
    handle: sys::cublasLtHandle_t,
    /// `None` (with no workspace): on the host, `host::gemm` (the kernel simulator).
    stream: Option<Arc<CudaStream>>,
    workspace: Option<CudaSlice<u8>>,
    /// Keyed by shape, output type and the operands' alignments (`AlignKey`).
    algos: HashMap<(GemmShape, OutType, AlignKey), sys::cublasLtMatmulAlgo_t>,
    /// Charged with every GEMM, as `Category::Gemm`.
    pub prof: Prof,
}

/// The alignments (bytes) of cuBLAS's A and B pointers (our b and a) and of C, which is
/// also D (every call writes its output in place).
type AlignKey = [u32; 3];

/// The alignment cuBLASLt may rely on for `addr`: its largest power-of-two divisor, up to
/// 256 bytes. The heuristic assumes 256 unless told, and an algorithm chosen that way can
/// fail on (or fault at) a less aligned view — a weight slice of the flat buffers is only
/// 16-byte aligned when a small tensor (a norm of a narrow model) sits before it.
pub fn alignment(addr: u64) -> u32 {
    1 << addr.trailing_zeros().min(8)
}

impl Drop for Gemm {
    fn drop(&mut self) {
        if self.stream.is_some() {
            // SAFETY: the handle was created in `new` and is destroyed once.
            unsafe {
                let _ = lt::destroy_handle(self.handle);
            }
        }
    }
}

/// Layouts and descriptor of one call, destroyed on drop.
struct Descs {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: created by `Gemm::descs`, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

impl Gemm {
    /// Needs libcublasLt; `major` is the device's compute capability major (workspace size).
    pub fn new(stream: Arc<CudaStream>, major: i32) -> Result<Self> {
        // SAFETY: only probes whether the library loads.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoGpu(
                "libcublasLt (CUDA 13 or 12) was not found on the library path; install the CUDA toolkit or add \
                 its lib64 folder to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let handle = lt::create_handle().map_err(lt_err("create handle"))?;
        let size = if major >= 9 { 32 << 20 } else { 4 << 20 };
        // SAFETY: the workspace is scratch memory; its contents are never read by us.
        let workspace = unsafe { stream.alloc::<u8>(size) }.map_err(|e| Error::Cuda(format!("workspace: {e}")))?;
        Ok(Gemm {
            handle,
            stream: Some(stream),
            workspace: Some(workspace),
            algos: HashMap::new(),
            prof: Prof::default(),
        })
    }

    /// On the host (the kernel simulator): the same checks, then `host::gemm`.
    pub fn host() -> Self {
        Gemm {
            handle: std::ptr::null_mut(),
            stream: None,
            workspace: None,
            algos: HashMap::new(),
            prof: Prof::default(),
        }
    }

    fn descs(&self, s: &GemmShape, out: OutType) -> Result<Descs> {
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        let c_type = match out {
            OutType::F32 => sys::cudaDataType_t::CUDA_R_32F,
            OutType::Bf16 => bf16,
        };
        let [o1, o2, oc] = s.column_major();
        let layout = |t, o: ColMajor| lt::create_matrix_layout(t, o.rows as u64, o.cols as u64, o.ld as i64);
        let l1 = layout(bf16, o1).map_err(lt_err("layout"))?;
        let l2 = layout(bf16, o2).map_err(lt_err("layout"))?;
        let l3 = layout(c_type, oc).map_err(lt_err("layout"))?;
        let desc =
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(lt_err("matmul desc"))?;
        let d = Descs { desc, layouts: [l1, l2, l3] };
        for (attr, t) in [
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, o1.trans),
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, o2.trans),
        ] {
            let op: i32 = t as i32; // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
                                    // SAFETY: the descriptor is live; the attribute is a 4-byte enum.
            unsafe { lt::set_matmul_desc_attribute(d.desc, attr, &op as *const i32 as *const c_void, 4) }
                .map_err(lt_err("transpose"))?;
        }
        Ok(d)
    }

    /// `c = alpha·op(a)·op(b) + beta·c`; `c` is f32 or bf16 per `out` (its raw address).
    /// With beta 1 this is also the residual add, in place.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &mut self,
        c: u64,
        c_len: usize,
        out: OutType,
        a: DPtr<Bf16>,
        b: DPtr<Bf16>,
        s: &GemmShape,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if s.m == 0 || s.n == 0 || s.k == 0 {
            return Err(Error::invalid(format!("gemm: empty shape {s:?}")));
        }
        let (sa, sb, sc) = s.spans();
        if a.len < sa || b.len < sb || c_len < sc {
            return Err(Error::invalid(format!(
                "gemm {s:?}: operands hold {} / {} / {c_len} elements, the shape needs {sa} / {sb} / {sc}",
                a.len, b.len
            )));
        }
        self.prof.launch(Category::Gemm)?;
        let (Some(stream), Some(workspace)) = (self.stream.clone(), self.workspace.as_ref()) else {
            // SAFETY: host-mode pointers spanning the shape (checked above).
            unsafe { super::host::gemm(c, out == OutType::Bf16, a, b, s, alpha, beta) };
            return Ok(());
        };
        let ws_len = workspace.len();
        let d = self.descs(s, out)?;
        let align = [alignment(b.ptr), alignment(a.ptr), alignment(c)];
        let key = (*s, out, align);
        let algo = match self.algos.get(&key) {
            Some(a) => *a,
            None => {
                let algo = self.heuristic(&d, align, ws_len).map_err(|e| {
                    Error::Cuda(format!("cuBLASLt has no algorithm for {s:?} → {out:?} (alignments {align:?}): {e:?}"))
                })?;
                self.algos.insert(key, algo);
                algo
            }
        };
        let (ws, _sync) = workspace.device_ptr(&stream);
        // SAFETY: every operand spans its layout (checked above); descriptors are live.
        unsafe {
            lt::matmul(
                self.handle,
                d.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b.ptr as *const c_void,
                d.layouts[0],
                a.ptr as *const c_void,
                d.layouts[1],
                c as *const c_void,
                d.layouts[2],
                c as *mut c_void,
                d.layouts[2],
                &algo,
                ws as *mut c_void,
                ws_len,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| Error::Cuda(format!("cuBLASLt matmul {s:?}: {e:?}")))
    }

    /// cuBLASLt's first choice for the call described by `d`, with operands aligned as
    /// `align` says and at most `ws_len` bytes of workspace.
    fn heuristic(
        &self,
        d: &Descs,
        align: AlignKey,
        ws_len: usize,
    ) -> std::result::Result<sys::cublasLtMatmulAlgo_t, lt::CublasError> {
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let pref = lt::create_matmul_pref()?;
        let ws = ws_len as u64;
        let r = (|| {
            // SAFETY: a live preference; each attribute gets a value of its documented
            // type (u64 byte count, u32 alignments).
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as _,
                    8,
                )?;
                for (attr, bytes) in [
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align[0]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align[1]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align[2]),
                    (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align[2]),
                ] {
                    lt::set_matmul_pref_attribute(pref, attr, bytes as *const u32 as _, 4)?;
                }
                lt::get_matmul_algo_heuristic(
                    self.handle,
                    d.desc,
                    d.layouts[0],
                    d.layouts[1],
                    d.layouts[2],
                    d.layouts[2],
                    pref,
                )
            }
        })();
        // SAFETY: created above, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        Ok(r?.algo)
    }

    /// `c (f32) = alpha·op(a)·op(b) + beta·c`.
    pub fn gemm_f32(
        &mut self,
        c: DPtr<f32>,
        a: DPtr<Bf16>,
        b: DPtr<Bf16>,
        s: &GemmShape,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.gemm(c.ptr, c.len, OutType::F32, a, b, s, alpha, beta)
    }

    /// `c (bf16) = alpha·op(a)·op(b) + beta·c`.
    pub fn gemm_bf16(
        &mut self,
        c: DPtr<Bf16>,
        a: DPtr<Bf16>,
        b: DPtr<Bf16>,
        s: &GemmShape,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.gemm(c.ptr, c.len, OutType::Bf16, a, b, s, alpha, beta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS semantics on the host: D = op(A1)·op(A2) + β·C, all column-major.
    fn cublas_reference(ops: [ColMajor; 3], a1: &[f32], a2: &[f32], c: &mut [f32], beta: f32) {
        let at = |o: ColMajor, x: &[f32], r: usize, col: usize| {
            // element (r, col) of op(X)
            if o.trans {
                x[r * o.ld + col]
            } else {
                x[col * o.ld + r]
            }
        };
        let (m1, k1) = if ops[0].trans { (ops[0].cols, ops[0].rows) } else { (ops[0].rows, ops[0].cols) };
        let (k2, n2) = if ops[1].trans { (ops[1].cols, ops[1].rows) } else { (ops[1].rows, ops[1].cols) };
        assert_eq!(k1, k2, "inner dimensions");
        assert_eq!((ops[2].rows, ops[2].cols), (m1, n2), "output shape");
        for col in 0..n2 {
            for r in 0..m1 {
                let s: f32 = (0..k1).map(|k| at(ops[0], a1, r, k) * at(ops[1], a2, k, col)).sum();
                let d = &mut c[col * ops[2].ld + r];
                *d = s + beta * *d;
            }
        }
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_divisor_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0180), 128);
        assert_eq!(alignment(0x7f00_0000_0010), 16);
        assert_eq!(alignment(0x7f00_0000_0002), 2);
        assert_eq!(alignment(0), 256);
    }

    /// The row-major contract of `GemmShape` against the column-major call it becomes, for
    /// every transpose combination, with padded strides.
    #[test]
    fn column_major_mapping_computes_the_row_major_product() {
        let (m, n, k) = (3, 5, 4);
        let val = |i: usize| ((i * 37 + 11) % 17) as f32 - 8.0;
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                let mut s = GemmShape::new(m, n, k, trans_a, trans_b);
                s.lda += 2;
                s.ldb += 1;
                s.ldc += 3;
                let (ar, br) = (if trans_a { k } else { m }, if trans_b { n } else { k });
                let a: Vec<f32> = (0..ar * s.lda).map(val).collect();
                let b: Vec<f32> = (0..br * s.ldb).map(|i| val(i + 5)).collect();
                let op_a = |i: usize, j: usize| if trans_a { a[j * s.lda + i] } else { a[i * s.lda + j] };
                let op_b = |i: usize, j: usize| if trans_b { b[j * s.ldb + i] } else { b[i * s.ldb + j] };
                let mut c = vec![1f32; m * s.ldc];
                cublas_reference(s.column_major(), &b, &a, &mut c, 0.5);
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = 0.5 + (0..k).map(|l| op_a(i, l) * op_b(l, j)).sum::<f32>();
                        assert_eq!(c[i * s.ldc + j], want, "trans_a {trans_a} trans_b {trans_b} at ({i}, {j})");
                    }
                }
            }
        }
    }
}
