//! Test-only models: small double-precision MLPs, so numerical derivatives are precise enough
//! to judge the training primitives by.

use metaloop_common::model::{Inputs, Model};
use metaloop_proto::rng::SplitMix64;
use tch::Tensor;

/// A double-precision MLP with one tanh hidden layer.
pub struct Net {
    pub params: Vec<Tensor>,
    pub names: Vec<String>,
}

impl Model for Net {
    fn forward(&self, x: &Inputs) -> Tensor {
        let h = (x.dense().matmul(&self.params[0].tr()) + &self.params[1]).tanh();
        h.matmul(&self.params[2].tr()) + &self.params[3]
    }
    fn parameters(&self) -> &[Tensor] {
        &self.params
    }
    fn names(&self) -> &[String] {
        &self.names
    }
}

impl Net {
    /// θ − α·g as a new leaf network (one plain gradient step).
    pub fn stepped(&self, grads: &[Tensor], alpha: f64) -> Net {
        Net {
            params: self
                .params
                .iter()
                .zip(grads)
                .map(|(p, g)| (p.detach() - g * alpha).set_requires_grad(true))
                .collect(),
            names: self.names.clone(),
        }
    }
}

/// Values uniform in [-1, 1] (in steps of 1/1000), f64.
pub fn randn(rng: &mut SplitMix64, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| (rng.below(2001) as f64 - 1000.0) / 1000.0).collect();
    Tensor::from_slice(&v).reshape(shape)
}

/// An MLP `sizes[0] → sizes[1] → sizes[2]` with parameters drawn from `seed`.
pub fn net(seed: u64, sizes: [i64; 3]) -> Net {
    let mut rng = SplitMix64::new(seed);
    let shapes = [
        vec![sizes[1], sizes[0]],
        vec![sizes[1]],
        vec![sizes[2], sizes[1]],
        vec![sizes[2]],
    ];
    Net {
        params: shapes
            .iter()
            .map(|s| randn(&mut rng, s).set_requires_grad(true))
            .collect(),
        names: (0..4).map(|i| format!("p{i}")).collect(),
    }
}
