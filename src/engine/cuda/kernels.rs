//! One launcher per kernel, in the order of the kernels/*.cu files.

/// Every kernel a launcher uses: (file, `extern "C"` name). The `cuda_compile` test
/// checks that each one exists in the compiled file.
pub const KERNEL_NAMES: &[(&str, &str)] = &[
    ("attention.cu", "attention_forward_hd32"),
    ("attention.cu", "attention_forward_hd64"),
    ("attention.cu", "attention_forward_hd128"),
    ("attention.cu", "attention_backward_hd32"),
    ("attention.cu", "attention_backward_hd64"),
    ("attention.cu", "attention_backward_hd128"),
    ("attention.cu", "attention_backward_delta"),
    ("rmsnorm.cu", "rmsnorm_forward"),
    ("rmsnorm.cu", "rmsnorm_backward"),
    ("rope.cu", "rope_forward"),
    ("rope.cu", "rope_backward"),
    ("logprobs.cu", "logprobs_forward"),
    ("logprobs.cu", "logprobs_backward"),
    ("adamw.cu", "adamw_update"),
    ("adamw.cu", "grad_norm_forward"),
    ("adamw.cu", "grad_norm_forward_reduce"),
    ("elementwise.cu", "swiglu_forward"),
    ("elementwise.cu", "swiglu_backward"),
    ("elementwise.cu", "embedding_forward"),
    ("elementwise.cu", "embedding_backward"),
    ("elementwise.cu", "residual_forward"),
    ("elementwise.cu", "cast_forward_f32_bf16"),
    ("elementwise.cu", "cast_forward_bf16_f32"),
];
