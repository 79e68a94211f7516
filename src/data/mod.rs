//! Preference data: records in the formats people use, chat templates, tokenization,
//! and packing tokenized pairs into batches.

pub mod batch;
pub mod pretokenized;
pub mod batcher;

pub use batch::{Layout, LogpTarget, PairBatch, PairExample, CHOSEN, PROMPT, REJECTED};
