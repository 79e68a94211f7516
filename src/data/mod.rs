//! Preference data: records in the formats people use, chat templates, tokenization,
//! and packing tokenized pairs into batches.

pub mod batch;
pub mod batcher;
pub mod prepare;
pub mod pretokenized;
pub mod progress;
pub mod records;
pub mod template;
pub mod tokenize;

pub use batch::{Layout, LogpPlan, LogpTarget, PairBatch, PairExample, CHOSEN, PROMPT, REJECTED};
pub use prepare::{load_pairs, DataOptions, Summary};
