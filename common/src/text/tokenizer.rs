//! A Hugging Face `tokenizer.json` (the `tokenizers` crate, pure Rust: `fancy-regex`, no onig)
//! set up for classification: truncation to `max_len` tokens with the post-processor's special
//! tokens ([CLS] … [SEP]) counted in, and no padding (batches are padded later, each to its own
//! longest row). Whatever truncation or padding the file itself configures is replaced.

use super::TextError;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// The BERT family's special tokens, excluded from token noise wherever the vocabulary has them
/// (besides the tokenizer's own added special tokens, the post-processor's and padding's).
const BERT_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// One row's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Whether tokens were cut off at `max_len`.
    pub truncated: bool,
}

/// A loaded `tokenizer.json` with its truncation set.
#[derive(Debug)]
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    fingerprint: [u8; 32],
    max_len: usize,
    pad_id: u32,
    special_ids: Vec<u32>,
    vocab_size: usize,
}

impl TextTokenizer {
    /// Loads `path`: a `tokenizer.json`, or a model directory holding one.
    ///
    /// # Errors
    /// An unreadable or invalid file, no pad token, or a `max_len` that leaves no room for text
    /// beside the special tokens.
    pub fn load(path: &Path, max_len: usize) -> Result<Self, TextError> {
        let path = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let bytes = std::fs::read(&path).map_err(|error| TextError::Read {
            path: path.clone(),
            error,
        })?;
        Self::from_bytes(&bytes, &path, max_len)
    }

    /// As [`Self::load`], from the file's bytes; `path` names it in errors.
    ///
    /// # Errors
    /// As [`Self::load`].
    pub fn from_bytes(bytes: &[u8], path: &Path, max_len: usize) -> Result<Self, TextError> {
        let fail = |reason: String| TextError::Tokenizer {
            path: path.into(),
            reason,
        };
        let mut inner = Tokenizer::from_bytes(bytes).map_err(|e| fail(format!("not a valid tokenizer.json: {e}")))?;
        let specials = inner
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        if max_len <= specials {
            return Err(fail(format!(
                "max_len {max_len} leaves no room for text beside the {specials} special tokens the post-processor adds"
            )));
        }
        // The file's padding is a fixed length for serving; this crate pads per batch.
        let file_pad = inner.get_padding().map(|p| (p.pad_id, p.pad_token.clone()));
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: max_len,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| fail(format!("cannot truncate to {max_len}: {e}")))?;
        let pad_id = match file_pad {
            Some((id, _)) => id,
            None => inner
                .token_to_id("[PAD]")
                .ok_or_else(|| fail("no padding configured and no `[PAD]` token in the vocabulary".into()))?,
        };
        let mut special: BTreeSet<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        special.insert(pad_id);
        special.extend(BERT_SPECIALS.iter().filter_map(|t| inner.token_to_id(t)));
        // The post-processor's, whatever they are called: those of an empty text.
        let empty = inner
            .encode("", true)
            .map_err(|e| fail(format!("cannot encode an empty text: {e}")))?;
        special.extend(
            empty
                .get_ids()
                .iter()
                .zip(empty.get_special_tokens_mask())
                .filter(|(_, &m)| m == 1)
                .map(|(&id, _)| id),
        );
        let vocab_size = inner.get_vocab_size(true);
        Ok(Self {
            inner,
            path: path.into(),
            fingerprint: Sha256::digest(bytes).into(),
            max_len,
            pad_id,
            special_ids: special.into_iter().collect(),
            vocab_size,
        })
    }

    /// Tokenizes one text.
    ///
    /// # Errors
    /// What the tokenizer reports (not expected for valid UTF-8 text).
    pub fn encode(&self, text: &str) -> Result<Encoded, TextError> {
        let e = self.inner.encode(text, true).map_err(|e| self.fail(e))?;
        Ok(Self::encoded(&e))
    }

    /// Tokenizes many texts (in parallel on rayon's pool; `TOKENIZERS_PARALLELISM=false` turns
    /// that off). The same ids as [`Self::encode`] one by one.
    ///
    /// # Errors
    /// As [`Self::encode`].
    pub fn encode_all(&self, texts: &[String]) -> Result<Vec<Encoded>, TextError> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let out = self.inner.encode_batch_fast(inputs, true).map_err(|e| self.fail(e))?;
        Ok(out.iter().map(Self::encoded).collect())
    }

    fn encoded(e: &tokenizers::Encoding) -> Encoded {
        Encoded {
            ids: e.get_ids().to_vec(),
            truncated: !e.get_overflowing().is_empty(),
        }
    }

    fn fail(&self, e: impl std::fmt::Display) -> TextError {
        TextError::Tokenizer {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// The padding token's id: the file's padding config, else `[PAD]`.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Ids never produced nor replaced by token noise (sorted): added special tokens, the
    /// post-processor's, the pad token and the BERT family's `[UNK]`/`[MASK]`/….
    pub fn special_ids(&self) -> &[u32] {
        &self.special_ids
    }

    /// Vocabulary size, added tokens included: every id is below it.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// SHA-256 of the `tokenizer.json` bytes.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
    }

    #[test]
    fn tiny_bert_gives_cls_text_sep_and_truncates_at_max_len() {
        let t = TextTokenizer::load(&repo("tests/data/tiny-bert"), 16).expect("tiny-bert tokenizer");
        // transformers 5.20.2 (tokenizers 0.23.3) on the same file.
        let e = t.encode("Hello, world! This is fine.").expect("encode");
        assert_eq!(e.ids, [2, 131, 62, 62, 65, 6, 151, 7, 99, 97, 30, 59, 64, 55, 5, 3]);
        assert!(!e.truncated);
        let t6 = TextTokenizer::load(&repo("tests/data/tiny-bert/tokenizer.json"), 6).expect("load");
        let e = t6.encode("abc def ghi jkl mno pqr").expect("encode");
        assert_eq!(e.ids, [2, 25, 52, 53, 28, 3]);
        assert!(e.truncated);
        assert_eq!(
            (t.pad_id(), t.special_ids(), t.vocab_size()),
            (0, &[0, 1, 2, 3, 4][..], 189)
        );
        let all = t6
            .encode_all(&["abc def ghi jkl mno pqr".into(), "Hello".into()])
            .expect("batch");
        assert_eq!(all[0], e);
        assert_eq!(all[1], t6.encode("Hello").expect("one"));
        let m = TextTokenizer::load(&repo("tests/data/tiny-bert"), 2)
            .expect_err("too short")
            .to_string();
        assert!(
            m.contains("max_len 2 leaves no room") && m.contains("tokenizer.json"),
            "{m}"
        );
        let m = TextTokenizer::load(&repo("tests/data/nope"), 8)
            .expect_err("missing")
            .to_string();
        assert!(m.contains("nope"), "{m}");
    }

    /// all-MiniLM-L6-v2's tokenizer (`scripts/text-assets`), when installed: the ids
    /// transformers 5.20.2 gives, its fixed padding to 128 turned off.
    #[test]
    fn minilm_matches_transformers_when_installed() {
        let path = repo("data/text/all-MiniLM-L6-v2/tokenizer.json");
        if !path.exists() {
            eprintln!("skipped: {} is not installed (scripts/text-assets)", path.display());
            return;
        }
        let t = TextTokenizer::load(&path, 128).expect("MiniLM");
        let cases: [(&str, &[u32]); 2] = [
            (
                "The film's ending is a masterpiece — unforgettable!",
                &[
                    101, 1996, 2143, 1005, 1055, 4566, 2003, 1037, 17743, 1517, 4895, 29278, 18150, 10880, 999, 102,
                ],
            ),
            (
                "Naïve café déjà vu, 東京 2024.",
                &[
                    101, 15743, 7668, 2139, 3900, 24728, 1010, 1879, 1755, 16798, 2549, 1012, 102,
                ],
            ),
        ];
        for (text, ids) in cases {
            assert_eq!(t.encode(text).expect("encode").ids, ids, "{text}");
        }
        let t12 = TextTokenizer::load(&path, 12).expect("MiniLM");
        let e = t12
            .encode(&"A three-hour cinema master class. ".repeat(10))
            .expect("encode");
        assert_eq!(
            e.ids,
            [101, 1037, 2093, 1011, 3178, 5988, 3040, 2465, 1012, 1037, 2093, 102]
        );
        assert!(e.truncated);
        assert_eq!(
            (t.pad_id(), t.special_ids(), t.vocab_size()),
            (0, &[0, 100, 101, 102, 103][..], 30522)
        );
    }
}
