//! State checksums: a SHA-256 over tensor names, shapes and raw little-endian bytes, so two runs
//! (or a worker and the coordinator) can compare model states bit for bit.

use crate::tensor::Bundle;
use sha2::{Digest, Sha256};

/// Incremental checksum over one or more bundles (model, optimizer state, outer state).
#[derive(Debug, Default)]
pub struct StateHasher {
    inner: Sha256,
}

impl StateHasher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a labelled bundle; the label keeps "model" and "momentum" from colliding.
    pub fn bundle(&mut self, label: &str, bundle: &Bundle) -> &mut Self {
        self.bytes(label.as_bytes());
        for t in &bundle.tensors {
            self.bytes(t.name.as_bytes());
            for d in &t.shape {
                self.inner.update((*d as u64).to_le_bytes());
            }
            for v in &t.data {
                self.inner.update(v.to_le_bytes());
            }
        }
        self
    }

    /// Adds a length-prefixed byte string.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.inner.update((b.len() as u64).to_le_bytes());
        self.inner.update(b);
        self
    }

    pub fn finish(&self) -> [u8; 32] {
        self.inner.clone().finalize().into()
    }
}

/// Checksum of one bundle alone (what a model version is identified by).
pub fn bundle_checksum(bundle: &Bundle) -> [u8; 32] {
    StateHasher::new().bundle("bundle", bundle).finish()
}

/// Lower-case hex, for summaries and logs.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
