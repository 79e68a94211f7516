//! Preference data: records in the formats people use, chat templates, tokenization,
//! and packing tokenized pairs into batches.

pub mod batch;

pub use batch::{Layout, LogpTarget, PairBatch, PairExample, CHOSEN, PROMPT, REJECTED};
