//! Host memory for the kernel simulator (`Gpu::sim`): buffers addressed like device
//! memory, with red zones that catch kernels reading or writing past an end; and the
//! GEMM, which on a device is cuBLASLt's (not ours to simulate), computed here with the
//! device's contract — bf16 inputs, f32 accumulation, output f32 or rounded to bf16,
//! `C = α·op(A)·op(B) + β·C`.
//!
//! Safety: a `DPtr` in host mode holds a host address from `HostMem`; launchers have
//! checked every length before calling here.

use half::bf16;

use super::kernels::{Bf16, DPtr};

/// Host memory addressed like device memory (a raw pointer and a length), for plain
/// numbers only, followed by a red zone of `RED_ZONE` bytes holding a signalling NaN of the
/// element's size (a huge value as an index): a kernel that reads
/// past the end of a buffer reads NaN, which no check lets pass, and one that writes past
/// it is reported when the buffer is dropped. (Arithmetic on the NaN quiets it, so even a
/// NaN written back past the end differs from the pattern.)
pub struct HostMem<T> {
    ptr: *mut T,
    len: usize,
}

const RED_ZONE: usize = 256;

/// One element of the red zone, little-endian: signalling NaNs (bf16 0x7fa5, f32
/// 0x7fa5a5a5, f64 0x7ff5a5a5a5a5a5a5) and 0xa5 for bytes.
fn red_pattern(size: usize) -> &'static [u8] {
    match size {
        2 => &[0xa5, 0x7f],
        4 => &[0xa5, 0xa5, 0xa5, 0x7f],
        8 => &[0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xa5, 0xf5, 0x7f],
        _ => &[0xa5],
    }
}

fn red_zone<T>() -> impl Iterator<Item = u8> {
    red_pattern(std::mem::size_of::<T>()).iter().copied().cycle().take(RED_ZONE)
}

impl<T> HostMem<T> {
    fn layout(len: usize) -> (usize, std::alloc::Layout) {
        let bytes = len * std::mem::size_of::<T>();
        let align = std::mem::align_of::<T>().max(64);
        (bytes, std::alloc::Layout::from_size_align(bytes + RED_ZONE, align).expect("host buffer size overflows"))
    }

    /// `len` (at least 1) elements, each `init(i)`.
    fn new_with(len: usize, init: impl Fn(usize) -> T) -> Self {
        let len = len.max(1);
        let (bytes, layout) = Self::layout(len);
        // SAFETY: `layout` has a non-zero size; every element is written before use and
        // the red zone lies inside the allocation.
        unsafe {
            let p = std::alloc::alloc(layout);
            if p.is_null() {
                std::alloc::handle_alloc_error(layout);
            }
            red_zone::<T>().enumerate().for_each(|(i, b)| p.add(bytes + i).write(b));
            let ptr = p as *mut T;
            (0..len).for_each(|i| ptr.add(i).write(init(i)));
            HostMem { ptr, len }
        }
    }
}

impl<T: Clone + Default> HostMem<T> {
    pub fn zeroed(len: usize) -> Self {
        Self::new_with(len, |_| T::default())
    }
    pub fn from_slice(s: &[T]) -> Self {
        Self::new_with(s.len(), |i| s.get(i).cloned().unwrap_or_default())
    }
}

impl<T> HostMem<T> {
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> Drop for HostMem<T> {
    fn drop(&mut self) {
        let (bytes, layout) = Self::layout(self.len);
        // SAFETY: `ptr` came from `alloc(layout)` in `new_with`; the elements are plain
        // numbers (no drop glue).
        let intact = unsafe {
            let p = self.ptr as *mut u8;
            let intact = std::slice::from_raw_parts(p.add(bytes), RED_ZONE).iter().copied().eq(red_zone::<T>());
            std::alloc::dealloc(p, layout);
            intact
        };
        if !intact && !std::thread::panicking() {
            panic!("a kernel wrote past the end of a host buffer of {} × {} bytes", self.len, std::mem::size_of::<T>());
        }
    }
}

fn b2f(x: Bf16) -> f32 {
    bf16::from_bits(x).to_f32()
}
fn f2b(x: f32) -> Bf16 {
    bf16::from_f32(x).to_bits()
}

unsafe fn at<T: Copy>(p: DPtr<T>, i: usize) -> T {
    *(p.ptr as *const T).add(i)
}
unsafe fn put<T>(p: DPtr<T>, i: usize, v: T) {
    *(p.ptr as *mut T).add(i) = v;
}

pub(crate) unsafe fn zero<T>(p: DPtr<T>) {
    std::ptr::write_bytes(p.ptr as *mut T, 0, p.len);
}

/// `c = alpha·op(a)·op(b) + beta·c` with bf16 inputs, f32 accumulation, f32 or bf16 `c`.
pub(crate) unsafe fn gemm(
    c: u64,
    c_bf16: bool,
    a: DPtr<Bf16>,
    b: DPtr<Bf16>,
    s: &super::gemm::GemmShape,
    alpha: f32,
    beta: f32,
) {
    let ea = |i: usize, l: usize| b2f(if s.trans_a { at(a, l * s.lda + i) } else { at(a, i * s.lda + l) });
    let eb = |l: usize, j: usize| b2f(if s.trans_b { at(b, j * s.ldb + l) } else { at(b, l * s.ldb + j) });
    let a_rows: Vec<Vec<f32>> = (0..s.m).map(|i| (0..s.k).map(|l| ea(i, l)).collect()).collect();
    let b_cols: Vec<Vec<f32>> = (0..s.n).map(|j| (0..s.k).map(|l| eb(l, j)).collect()).collect();
    for (i, ar) in a_rows.iter().enumerate() {
        for (j, bc) in b_cols.iter().enumerate() {
            let acc = alpha * ar.iter().zip(bc).map(|(x, y)| x * y).sum::<f32>();
            let idx = i * s.ldc + j;
            if c_bf16 {
                let p: DPtr<Bf16> = DPtr::from_raw(c, idx + 1);
                let old = if beta != 0.0 { beta * b2f(at(p, idx)) } else { 0.0 };
                put(p, idx, f2b(acc + old));
            } else {
                let p: DPtr<f32> = DPtr::from_raw(c, idx + 1);
                let old = if beta != 0.0 { beta * at(p, idx) } else { 0.0 };
                put(p, idx, acc + old);
            }
        }
    }
}
