//! sdpo: stepwise Direct Preference Optimization (arXiv 2403.19270) for Llama models.
//!
//! The preference data is split into T chunks and DPO runs T times, step t using the
//! model aligned at step t−1 both as its frozen reference and as its starting point.
//! Two engines compute the same thing: `engine::cpu` (plain fp32, the reference) and
//! `engine::cuda` (hand-written bf16 kernels). See DESIGN.md for the whole picture.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod demo;
pub mod dpo;
pub mod engine;
pub mod error;
pub mod generate;
pub mod lora;
pub mod outputs;
pub mod partition;
pub mod report;
pub mod sdpo;
pub mod tensorboard;
pub mod train;
pub mod weights;

pub use config::LlamaConfig;
pub use data::{Layout, PairBatch, PairExample};
pub use dpo::{LossConfig, LossKind, PairLogps};
pub use engine::{AdamWConfig, Engine};
pub use error::{Error, Result};
pub use weights::LlamaWeights;
