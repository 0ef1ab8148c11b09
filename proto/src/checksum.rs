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
            self.floats(&t.data);
        }
        self
    }

    /// Adds the floats' little-endian bytes, converted a block at a time: the hasher sees
    /// the same bytes as one `update` per float, without the cost of a call per float.
    fn floats(&mut self, data: &[f32]) {
        const BLOCK: usize = 4096;
        let mut buf = [0u8; BLOCK * 4];
        for chunk in data.chunks(BLOCK) {
            for (out, v) in buf.chunks_exact_mut(4).zip(chunk) {
                out.copy_from_slice(&v.to_le_bytes());
            }
            self.inner.update(&buf[..chunk.len() * 4]);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::HostTensor;

    /// The checksum as it was first defined: one hasher update per float.
    fn per_float(bundle: &Bundle) -> [u8; 32] {
        fn bytes(h: &mut Sha256, b: &[u8]) {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        }
        let mut h = Sha256::new();
        bytes(&mut h, b"bundle");
        for t in &bundle.tensors {
            bytes(&mut h, t.name.as_bytes());
            for d in &t.shape {
                h.update((*d as u64).to_le_bytes());
            }
            for v in &t.data {
                h.update(v.to_le_bytes());
            }
        }
        h.finalize().into()
    }

    #[test]
    fn block_hashing_matches_one_update_per_float() {
        // Lengths around the block size, so a short last block and an exact fit are covered.
        for n in [0usize, 1, 3, 4095, 4096, 4097, 8192, 10_001] {
            let data: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 1e3 - 0.5).collect();
            let bundle = Bundle {
                tensors: vec![
                    HostTensor {
                        name: "w".into(),
                        shape: vec![n],
                        data,
                    },
                    HostTensor {
                        name: "b".into(),
                        shape: vec![2],
                        data: vec![f32::MIN_POSITIVE, -0.0],
                    },
                ],
            };
            assert_eq!(bundle_checksum(&bundle), per_float(&bundle), "{n} floats");
        }
    }
}
