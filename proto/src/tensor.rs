//! Host-side tensors: named float32 arrays that cross the wire and are averaged by the
//! coordinator without libtorch. Conversion to and from `tch::Tensor` lives in `metaloop_common::model`.

/// A dense float32 array in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Number of elements the shape describes.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when every element is finite (no NaN, no infinity).
    pub fn is_finite(&self) -> bool {
        // A branch-free test per block vectorises; `all` alone stops at every value.
        self.data
            .chunks(4096)
            .all(|block| block.iter().fold(true, |ok, v| ok & v.is_finite()))
    }
}

/// An ordered list of named tensors: a model's parameters, a delta or an update.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Bundle {
    pub tensors: Vec<HostTensor>,
}

impl Bundle {
    /// A bundle of the same names and shapes, filled with zeros.
    pub fn zeros_like(&self) -> Bundle {
        Bundle {
            tensors: self
                .tensors
                .iter()
                .map(|t| HostTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    data: vec![0.0; t.data.len()],
                })
                .collect(),
        }
    }

    /// True when `other` has the same tensor names and shapes in the same order.
    pub fn same_layout(&self, other: &Bundle) -> bool {
        self.tensors.len() == other.tensors.len()
            && self
                .tensors
                .iter()
                .zip(&other.tensors)
                .all(|(a, b)| a.name == b.name && a.shape == b.shape)
    }

    /// Total number of float elements.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    /// Size of the raw payload in bytes.
    pub fn byte_len(&self) -> usize {
        self.numel() * std::mem::size_of::<f32>()
    }

    /// Elementwise `self += other`; callers check `same_layout` first.
    pub fn add_assign(&mut self, other: &Bundle) {
        for (a, b) in self.tensors.iter_mut().zip(&other.tensors) {
            for (x, y) in a.data.iter_mut().zip(&b.data) {
                *x += *y;
            }
        }
    }

    /// True when every tensor is finite.
    pub fn is_finite(&self) -> bool {
        self.tensors.iter().all(HostTensor::is_finite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_non_finite_value_anywhere_is_found() {
        for len in [1usize, 7, 4095, 4096, 4097, 10_000] {
            let t = |data: Vec<f32>| HostTensor {
                name: "t".into(),
                shape: vec![data.len()],
                data,
            };
            assert!(t(vec![1.5; len]).is_finite());
            for at in [0, len / 2, len - 1] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut data = vec![-2.0; len];
                    data[at] = bad;
                    assert!(!t(data).is_finite(), "{bad} at {at} of {len}");
                }
            }
            let mut edge = vec![f32::MAX; len];
            edge[0] = f32::MIN_POSITIVE / 2.0;
            assert!(t(edge).is_finite(), "subnormals and the largest values are finite");
        }
    }
}
