//! The fp32 CPU engine: the reference every CUDA kernel is checked against.
