//! The fp32 CPU engine: the reference every CUDA kernel is checked against.
//! `ops` holds one function per op (forward and backward together); `model` strings them
//! into the Llama forward and hand-written backward and implements `Engine`.

pub mod model;
pub mod ops;

pub use model::{CpuEngine, KvCache};
