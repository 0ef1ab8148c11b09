//! The coordinator's evaluation: test and meta-set loss and accuracy of the global model, the
//! per-sample losses DoReMi keeps as its reference, and Ω's weight of every training sample.

use metaloop_common::data::{self, Data};
use metaloop_common::features;
use metaloop_common::model;
use metaloop_proto::features::Feature;
use metaloop_proto::proto::ModelSpec;
use metaloop_proto::tensor::Bundle;

/// The coordinator's own libtorch work, on its compute thread: the global model's quality after
/// a round, DoReMi's reference losses, and Ω's weights for the final separation report.
pub(crate) struct Evaluator {
    pub(crate) spec: ModelSpec,
    pub(crate) test: Data,
    pub(crate) meta: Option<Data>,
    pub(crate) train: Vec<(Data, Vec<usize>)>,
}

/// The global model's quality after a round.
pub(crate) struct Evaluation {
    pub(crate) test: (f64, f64),
    /// Loss and accuracy on the meta set, when the job has one.
    pub(crate) meta: Option<(f64, f64)>,
}

impl Evaluator {
    pub(crate) fn evaluate(&self, params: &Bundle) -> Result<Evaluation, model::ModelError> {
        let m = model::build(&self.spec, params, tch::Device::Cpu)?;
        let test = data::evaluate(m.as_ref(), &self.test, tch::Device::Cpu)?;
        let meta = self
            .meta
            .as_ref()
            .map(|d| data::evaluate(m.as_ref(), d, tch::Device::Cpu))
            .transpose()?;
        Ok(Evaluation { test, meta })
    }

    /// The model's loss on every sample of every training domain (DoReMi's reference losses).
    pub(crate) fn per_sample_losses(&self, params: &Bundle) -> Result<Vec<Vec<f64>>, model::ModelError> {
        let m = model::build(&self.spec, params, tch::Device::Cpu)?;
        self.train
            .iter()
            .map(|(d, _)| data::per_sample_losses(m.as_ref(), d, tch::Device::Cpu))
            .collect()
    }

    /// Ω's raw weight for every training sample, split into (clean, corrupted).
    pub(crate) fn omega_weights(
        &self,
        params: &Bundle,
        omega: &Bundle,
        features: &[Feature],
        passes: u32,
    ) -> Result<(Vec<f64>, Vec<f64>), model::ModelError> {
        tch::manual_seed(0);
        let m = model::build(&self.spec, params, tch::Device::Cpu)?;
        let o = model::Mlp::from_bundle(omega, tch::Device::Cpu)?;
        let (mut clean, mut corrupted) = (Vec::new(), Vec::new());
        for (d, flipped) in &self.train {
            let mut w = Vec::with_capacity(d.len());
            for rows in data::eval_chunks(d) {
                let (x, y) = d.batch(&rows, tch::Device::Cpu);
                let chunk = tch::no_grad(|| {
                    let f = features::of_model(m.as_ref(), &x, &y, features, 1.0, passes);
                    o.forward_dense(&f).sigmoid().squeeze_dim(1).to_kind(tch::Kind::Double)
                });
                w.extend(Vec::<f64>::try_from(&chunk)?);
            }
            let bad: std::collections::HashSet<usize> = flipped.iter().copied().collect();
            for (i, v) in w.into_iter().enumerate() {
                if bad.contains(&i) {
                    corrupted.push(v)
                } else {
                    clean.push(v)
                }
            }
        }
        Ok((clean, corrupted))
    }
}
