//! The library's error type. Every error a user can cause names the file (and line,
//! tensor or field) it comes from, what was expected, and what to do.

use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // `err`, not `source`: the message already holds it, and a `source` would print it
    // twice in a context chain.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    /// A problem with a file as a whole, or with a named field or tensor inside it.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },

    /// A problem on one line (or record) of a data file; `line` counts from 1.
    #[error("{}:{line}: {msg}", path.display())]
    Line { path: PathBuf, line: usize, msg: String },

    /// Arguments or data that do not fit together (shapes, options, sizes).
    #[error("{0}")]
    Invalid(String),

    /// Training diverged (a non-finite or exploding loss or gradient norm); the message
    /// names where, and the run folder keeps the last state from before it.
    #[error("{0}")]
    Diverged(String),

    #[error("no CUDA GPU found: {0}")]
    NoGpu(String),

    #[error("CUDA error: {0}")]
    Cuda(String),
}

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), err: source }
    }
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::File { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn line(path: impl AsRef<Path>, line: usize, msg: impl Into<String>) -> Self {
        Error::Line { path: path.as_ref().to_path_buf(), line, msg: msg.into() }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
