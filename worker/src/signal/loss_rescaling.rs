//! Meta loss rescaling (docs/algorithms.md §5): the round's Ω, built from its plan, weighs
//! every inner-batch sample; after the inner steps, the meta loss and Ω's meta-gradient through
//! one virtual step (`crate::rescaler` has the math).

use super::{meta_loss, need_meta, At, Producer};
use crate::data::TrainingData;
use crate::rescaler::{self, Batch, Validation, VirtualStep};
use crate::train::TrainError;
use metaloop_common::features;
use metaloop_common::model::{self, Inputs, Mlp, Model};
use metaloop_proto::features::Feature;
use metaloop_proto::proto::{DirectionalMethod, RescaleMode, RescalerPlan, Signal, SmallTensor};
use tch::{Device, Tensor};

/// The rescaler network of a round, built from its plan.
pub(super) struct Omega {
    model: Box<dyn Model>,
    mode: RescaleMode,
    features: Vec<Feature>,
    normalize: bool,
    directional: DirectionalMethod,
    progress: f64,
    /// Stochastic forward passes for the spread features.
    passes: u32,
}

impl Omega {
    /// # Errors
    /// `NoMeta` for `clean-meta` validation without a meta set; `Mismatch` for an unknown
    /// feature; `Model` for a malformed Ω.
    pub(super) fn from_plan(plan: &RescalerPlan, data: &TrainingData, device: Device) -> Result<Self, TrainError> {
        if plan.mode == RescaleMode::CleanMeta {
            need_meta(data)?;
        }
        let features = plan
            .features
            .iter()
            .map(|&c| Feature::from_code(c).ok_or_else(|| TrainError::Mismatch(format!("unknown feature code {c}"))))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            model: Box::new(Mlp::from_bundle(&SmallTensor::to_bundle(&plan.omega), device)?),
            mode: plan.mode,
            features,
            normalize: plan.normalize,
            directional: plan.directional,
            progress: f64::from(plan.progress),
            passes: plan.passes,
        })
    }

    /// Features of `(x, y)` under the model as it is now (leaves it in eval mode).
    fn features(&self, model: &dyn Model, x: &Inputs, y: &Tensor) -> Tensor {
        features::of_model(model, x, y, &self.features, self.progress, self.passes)
    }

    /// Inner-loop weights for a batch: Ω's output on the batch's features, normalised if
    /// asked; constants for the model's gradient. Leaves the model in train mode.
    fn weights(&self, model: &dyn Model, x: &Inputs, y: &Tensor) -> Tensor {
        let f = self.features(model, x, y);
        model.set_train(true);
        tch::no_grad(|| {
            let raw = rescaler::omega_weights(self.model.as_ref(), &f);
            if let Ok(values) = Vec::<f64>::try_from(raw.to_kind(tch::Kind::Double)) {
                let h = metrics::histogram!(metaloop_common::metrics::RESCALER_SAMPLE_WEIGHT);
                for v in values {
                    h.record(v);
                }
            }
            rescaler::batch_weights(&raw, self.normalize)
        })
        .detach()
    }

    /// Ω's meta-gradient through one virtual step at the current θ, on a fresh training batch.
    fn gradient(&self, at: &At<'_>) -> Result<Vec<SmallTensor>, TrainError> {
        let (model, data, a) = (at.model, at.data, at.a);
        let (x, y) = data.draw(a, 3 << 32, at.device);
        let f = self.features(model, &x, &y);
        let meta;
        let (vx, vy, vf);
        let val = match self.mode {
            RescaleMode::CleanMeta => {
                meta = data.meta_batch(a, at.device).ok_or(TrainError::NoMeta)?;
                Validation::Clean { x: &meta.0, y: &meta.1 }
            }
            RescaleMode::SelfTaught => {
                (vx, vy) = data.draw(a, 4 << 32, at.device);
                vf = self.features(model, &vx, &vy);
                Validation::SelfTaught {
                    x: &vx,
                    y: &vy,
                    features: &vf,
                }
            }
        };
        let batch = Batch {
            x: &x,
            y: &y,
            features: &f,
        };
        let step = VirtualStep {
            // One plain SGD step whatever the inner optimizer (docs/algorithms.md §5).
            alpha: data.job().inner.virtual_lr(),
            normalize: self.normalize,
            directional: self.directional,
        };
        let (grads, _) = rescaler::meta_gradient(model, self.model.as_ref(), &batch, &val, step);
        grads
            .iter()
            .zip(self.model.names())
            .map(|(g, name)| {
                let data = Vec::<f32>::try_from(g.to_kind(tch::Kind::Float).contiguous().view(-1))
                    .map_err(model::ModelError::from)?;
                Ok(SmallTensor {
                    name: name.clone(),
                    shape: g.size().iter().map(|&d| d as u32).collect(),
                    data,
                })
            })
            .collect()
    }
}

impl Producer for Omega {
    fn sample_weights(&self, model: &dyn Model, x: &Inputs, y: &Tensor) -> Option<Tensor> {
        Some(self.weights(model, x, y))
    }

    fn answer(&self, at: &At<'_>) -> Result<(Option<f32>, Signal), TrainError> {
        let meta_loss = meta_loss(at)?.map(|(_, value)| value);
        Ok((meta_loss, Signal::LossRescaling(self.gradient(at)?)))
    }
}
