//! Tokenized rows held flat (every row's ids concatenated, with row offsets), and batches padded
//! to their own longest row.

use super::source::Categorical;
use super::tokenizer::TextTokenizer;
use super::{TextError, TextRows};
use sha2::{Digest, Sha256};

/// A tokenized data set. Row `i` is `ids[offsets[i]..offsets[i + 1]]`, special tokens included,
/// at most `max_len` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedText {
    pub ids: Vec<u32>,
    /// Row starts into `ids`; `len() + 1` entries, the last `ids.len()`.
    pub offsets: Vec<u32>,
    /// Class ids, `0..label_names.len()`.
    pub labels: Vec<i64>,
    /// The label map the labels went through: `label_names[k]` is class k's label.
    pub label_names: Vec<String>,
    pub domains: Option<Categorical>,
    pub tasks: Option<Categorical>,
    /// Rows cut off at `max_len` (sorted).
    pub truncated: Vec<u32>,
    pub max_len: u32,
    pub pad_id: u32,
    /// The tokenizer's special ids (sorted), which token noise leaves alone.
    pub special_ids: Vec<u32>,
    /// Every id is below this.
    pub vocab_size: u32,
}

/// A padded batch, row-major `[rows × len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub input_ids: Vec<i64>,
    /// 1 for a token, 0 for padding.
    pub attention_mask: Vec<i64>,
    pub labels: Vec<i64>,
    pub rows: usize,
    /// The longest row's length, which every row is padded to.
    pub len: usize,
}

impl TokenizedText {
    /// Tokenizes `rows`.
    ///
    /// # Errors
    /// What the tokenizer reports, or more tokens than a u32 offset holds.
    pub fn build(rows: &TextRows, labels: &[String], tokenizer: &TextTokenizer) -> Result<Self, TextError> {
        let encoded = tokenizer.encode_all(&rows.texts)?;
        let total: usize = encoded.iter().map(|e| e.ids.len()).sum();
        if u32::try_from(total).is_err() {
            return Err(TextError::Tokenizer {
                path: tokenizer.path().into(),
                reason: format!("{total} tokens in all, more than 2^32"),
            });
        }
        let mut ids = Vec::with_capacity(total);
        let mut offsets = Vec::with_capacity(encoded.len() + 1);
        offsets.push(0);
        let mut truncated = Vec::new();
        for (i, e) in encoded.iter().enumerate() {
            ids.extend_from_slice(&e.ids);
            offsets.push(ids.len() as u32);
            if e.truncated {
                truncated.push(i as u32);
            }
        }
        Ok(Self {
            ids,
            offsets,
            labels: rows.labels.clone(),
            label_names: labels.to_vec(),
            domains: rows.domains.clone(),
            tasks: rows.tasks.clone(),
            truncated,
            max_len: tokenizer.max_len() as u32,
            pad_id: tokenizer.pad_id(),
            special_ids: tokenizer.special_ids().to_vec(),
            vocab_size: tokenizer.vocab_size() as u32,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn classes(&self) -> usize {
        self.label_names.len()
    }

    /// Row `i`'s ids.
    pub fn row(&self, i: usize) -> &[u32] {
        &self.ids[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    /// The rows `rows`, in that order (a subset, a shard, a shuffle).
    ///
    /// # Panics
    /// A row out of range.
    pub fn select(&self, rows: &[usize]) -> Self {
        let mut ids = Vec::new();
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        offsets.push(0);
        for &r in rows {
            ids.extend_from_slice(self.row(r));
            offsets.push(ids.len() as u32);
        }
        let truncated = (0..rows.len() as u32)
            .filter(|&i| self.truncated.binary_search(&(rows[i as usize] as u32)).is_ok())
            .collect();
        Self {
            ids,
            truncated,
            offsets,
            labels: rows.iter().map(|&r| self.labels[r]).collect(),
            label_names: self.label_names.clone(),
            domains: self.domains.as_ref().map(|d| d.select(rows)),
            tasks: self.tasks.as_ref().map(|t| t.select(rows)),
            max_len: self.max_len,
            pad_id: self.pad_id,
            special_ids: self.special_ids.clone(),
            vocab_size: self.vocab_size,
        }
    }

    /// `rows` padded with `pad_id` to the longest of them, with the attention mask and labels.
    ///
    /// # Panics
    /// A row out of range.
    pub fn batch(&self, rows: &[usize], pad_id: u32) -> Batch {
        let len = rows.iter().map(|&r| self.row(r).len()).max().unwrap_or(0);
        let mut input_ids = vec![i64::from(pad_id); rows.len() * len];
        let mut attention_mask = vec![0i64; rows.len() * len];
        for (b, &r) in rows.iter().enumerate() {
            let row = self.row(r);
            for (j, &id) in row.iter().enumerate() {
                input_ids[b * len + j] = i64::from(id);
                attention_mask[b * len + j] = 1;
            }
        }
        Batch {
            input_ids,
            attention_mask,
            labels: rows.iter().map(|&r| self.labels[r]).collect(),
            rows: rows.len(),
            len,
        }
    }

    /// SHA-256 of everything the rows are (ids, offsets, labels and their names, domains, tasks,
    /// and the tokenizer facts kept here): equal on two machines exactly when the data is.
    pub fn checksum(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut bytes = |b: &[u8]| {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        };
        bytes(b"metaloop tokenized text v1");
        bytes(&words(&self.ids));
        bytes(&words(&self.offsets));
        bytes(&self.labels.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
        for name in &self.label_names {
            bytes(name.as_bytes());
        }
        for c in [&self.domains, &self.tasks] {
            match c {
                Some(c) => {
                    bytes(b"some");
                    for name in &c.names {
                        bytes(name.as_bytes());
                    }
                    bytes(&words(&c.ids));
                }
                None => bytes(b"none"),
            }
        }
        bytes(&words(&self.truncated));
        bytes(&words(&[self.max_len, self.pad_id, self.vocab_size]));
        bytes(&words(&self.special_ids));
        h.finalize().into()
    }

    /// Whether the parts agree (offsets rise from 0 to `ids.len()`, one label, domain and task
    /// per row, labels within the map, ids within the vocabulary); what a cache file must pass.
    pub(super) fn consistent(&self) -> Result<(), String> {
        let n = self.labels.len();
        if self.offsets.len() != n + 1 || self.offsets.first() != Some(&0) {
            return Err(format!("{} offsets for {n} rows", self.offsets.len()));
        }
        if self.offsets.windows(2).any(|w| w[0] > w[1]) || self.offsets[n] as usize != self.ids.len() {
            return Err("offsets do not rise to the number of ids".into());
        }
        if let Some(l) = self
            .labels
            .iter()
            .find(|&&l| l < 0 || l as usize >= self.label_names.len())
        {
            return Err(format!("label {l} outside 0..{}", self.label_names.len()));
        }
        if self.truncated.windows(2).any(|w| w[0] >= w[1]) || self.truncated.last().is_some_and(|&r| r as usize >= n) {
            return Err("truncated rows are not sorted row numbers".into());
        }
        if let Some(id) = self.ids.iter().find(|&&id| id >= self.vocab_size) {
            return Err(format!("id {id} outside the vocabulary of {}", self.vocab_size));
        }
        for c in [&self.domains, &self.tasks].into_iter().flatten() {
            if c.ids.len() != n || c.ids.iter().any(|&i| i as usize >= c.names.len()) {
                return Err("domain or task ids do not match the rows".into());
            }
        }
        Ok(())
    }
}

fn words(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Rows of lengths 3, 5 and 1 over a vocabulary of 50 (0 pad, 1/2 the CLS/SEP).
    pub(crate) fn sample() -> TokenizedText {
        TokenizedText {
            ids: vec![1, 10, 2, 1, 11, 12, 13, 2, 1],
            offsets: vec![0, 3, 8, 9],
            labels: vec![0, 1, 1],
            label_names: vec!["neg".into(), "pos".into()],
            domains: Some(Categorical {
                names: vec!["a".into(), "b".into()],
                ids: vec![0, 1, 0],
            }),
            tasks: None,
            truncated: vec![1],
            max_len: 5,
            pad_id: 0,
            special_ids: vec![0, 1, 2],
            vocab_size: 50,
        }
    }

    #[test]
    fn batches_pad_to_their_longest_row_with_masks() {
        let t = sample();
        assert_eq!(t.len(), 3);
        let b = t.batch(&[0, 2], 0);
        assert_eq!((b.rows, b.len), (2, 3));
        assert_eq!(b.input_ids, [1, 10, 2, 1, 0, 0]);
        assert_eq!(b.attention_mask, [1, 1, 1, 1, 0, 0]);
        assert_eq!(b.labels, [0, 1]);
        let b = t.batch(&[1, 0], 7);
        assert_eq!(b.len, 5);
        assert_eq!(b.input_ids, [1, 11, 12, 13, 2, 1, 10, 2, 7, 7]);
        assert_eq!(b.attention_mask, [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]);
        let empty = t.batch(&[], 0);
        assert_eq!((empty.rows, empty.len, empty.input_ids.len()), (0, 0, 0));
        let s = t.select(&[2, 0]);
        assert_eq!(
            (s.row(0), s.row(1), &s.labels[..]),
            (&[1][..], &[1, 10, 2][..], &[1, 0][..])
        );
        assert_eq!(s.domains.as_ref().map(|d| d.value(0)), Some("a"));
        assert_eq!(t.select(&[2, 1, 1]).truncated, [1, 2]);
        assert!(s.consistent().is_ok());
        assert_ne!(s.checksum(), t.checksum());
        assert_eq!(t.select(&[0, 1, 2]).checksum(), t.checksum());
    }
}
