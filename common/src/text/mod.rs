//! Text classification data: labelled text read from JSONL, CSV or Parquet (what Hugging Face
//! `datasets` exports), tokenized with a Hugging Face `tokenizer.json`, cached as safetensors,
//! and corrupted by seeded transforms. Nothing here needs libtorch: coordinator, workers and tests
//! use it alike, and a batch becomes tensors only where a model takes it.
//!
//! - `source` — [`read_source`]: the rows of a file (text, label through the caller's label map,
//!   optional domain and task columns), with every problem named by file, row and column.
//! - `tokenizer` — [`TextTokenizer`]: `tokenizer.json` with truncation to `max_len` tokens (the
//!   post-processor's [CLS]/[SEP] included) and no padding.
//! - `tokenized` — [`TokenizedText`]: every row's ids concatenated, with per-batch padding.
//! - `cache` — [`load_tokenized`]: tokenized results keyed by a hash of everything they depend
//!   on, written atomically, checked on load and rebuilt when damaged.
//! - `corrupt` — label noise, label permutation and token noise, pure functions of a seed.
//! - `check` — [`check_job`]: a text job's model directory and data files, for `validate`.

mod cache;
mod check;
mod corrupt;
mod source;
mod tokenized;
mod tokenizer;

pub use cache::{cache_key, cache_path, load_tokenized, load_tokenized_status, CacheStatus, TextOptions};
pub use check::check_job;
pub use corrupt::{label_noise, permute_labels, token_noise, TokenNoise};
pub use source::{parse_source, read_source, Categorical, Columns, Format, Problem, RowRef, SourceOptions, TextRows};
pub use tokenized::{Batch, TokenizedText};
pub use tokenizer::{Encoded, TextTokenizer};

use std::path::PathBuf;

/// At most this many problems of one file are kept; the rest are counted.
pub const MAX_PROBLEMS: usize = 20;

/// Why text data could not be read, tokenized or cached. Every variant names the file; the
/// message is whole in `Display` (no `source` for a chain printer to repeat).
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    /// Not a file of a known format, or not readable as its format at all.
    #[error("{path}: {reason}")]
    Format { path: PathBuf, reason: String },
    /// Problems with the rows or columns of a data file: all of them up to [`MAX_PROBLEMS`],
    /// then a count of the rest.
    #[error("data file {path} has {}:{}{}", count(problems.len() + more), list(problems), also(*more))]
    Data {
        path: PathBuf,
        problems: Vec<Problem>,
        /// Problems found beyond those listed.
        more: usize,
    },
    #[error("data file {path} holds no rows")]
    Empty { path: PathBuf },
    #[error("label map: {reason}")]
    LabelMap { reason: String },
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("text cache {path}: {reason}")]
    Cache { path: PathBuf, reason: String },
}

fn count(n: usize) -> String {
    if n == 1 {
        "1 problem".into()
    } else {
        format!("{n} problems")
    }
}

fn list(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("\n  - {p}")).collect()
}

fn also(more: usize) -> String {
    if more > 0 {
        format!("\n  ... and {more} more")
    } else {
        String::new()
    }
}
