//! What an assignment answers besides its delta: one producer per outer strategy, chosen by
//! the round's [`Ask`] (docs/algorithms.md §1). A producer is made before the inner steps (it
//! may weigh their samples: [`Producer::sample_weights`]) and answers after them, at the
//! trained θ, with the meta loss and the strategy's [`Signal`].
//!
//! Adding a strategy: a module here with its producer, and its arm in [`producer`].

mod doremi;
mod hypergradient;
mod loss_rescaling;
mod task_policy;

use crate::data::TrainingData;
use crate::inner::zero_grads;
use crate::primitives;
use crate::train::TrainError;
use metaloop_common::model::{self, Inputs, Model};
use metaloop_proto::proto::{Ask, Assignment, Signal};
use tch::{Device, Tensor};

/// One outer strategy's side of an assignment.
pub(crate) trait Producer {
    /// Each row's loss weight in an inner batch `(x, y)` at the current θ, multiplying the
    /// batch's own weights; `None` (the default) leaves them as they are.
    fn sample_weights(&self, _model: &dyn Model, _x: &Inputs, _y: &Tensor) -> Option<Tensor> {
        None
    }

    /// The meta loss (when the job has a meta set) and the signal, at the trained θ.
    ///
    /// # Errors
    /// What the strategy's measurement can fail with (a bad row, a libtorch failure).
    fn answer(&self, at: &At<'_>) -> Result<(Option<f32>, Signal), TrainError>;
}

/// Where a producer answers: the trained model (in eval mode), the job's data, the assignment.
pub(crate) struct At<'a> {
    pub(crate) model: &'a dyn Model,
    pub(crate) data: &'a TrainingData,
    pub(crate) a: &'a Assignment,
    pub(crate) device: Device,
}

/// The producer for `ask`.
///
/// # Errors
/// `NoMeta` when the ask needs a meta set the job lacks; what building the strategy's state
/// from the plan can fail with.
pub(crate) fn producer<'a>(
    ask: &'a Ask,
    data: &TrainingData,
    device: Device,
) -> Result<Box<dyn Producer + 'a>, TrainError> {
    Ok(match ask {
        Ask::Nothing => Box::new(Nothing),
        Ask::Hypergradient(h) => Box::new(hypergradient::Hypergradient::new(*h, data)?),
        Ask::Doremi { probe } => Box::new(doremi::Doremi { probe: *probe }),
        Ask::LossRescaling(plan) => Box::new(loss_rescaling::Omega::from_plan(plan, data, device)?),
        Ask::TaskPolicy { target_rows } => Box::new(task_policy::TaskPolicy::new(target_rows, data)?),
    })
}

/// No strategy: the meta loss alone.
struct Nothing;

impl Producer for Nothing {
    fn answer(&self, at: &At<'_>) -> Result<(Option<f32>, Signal), TrainError> {
        Ok((meta_loss(at)?.map(|(_, value)| value), Signal::Nothing))
    }
}

/// `NoMeta` unless the job has a meta set.
fn need_meta(data: &TrainingData) -> Result<(), TrainError> {
    match data.meta() {
        Some(_) => Ok(()),
        None => Err(TrainError::NoMeta),
    }
}

/// The meta loss on the assignment's meta batch, when the job has a meta set: the loss (for
/// its gradient) and its value.
fn meta_loss(at: &At<'_>) -> Result<Option<(Tensor, f32)>, TrainError> {
    let Some((mx, my)) = at.data.meta_batch(at.a, at.device) else {
        return Ok(None);
    };
    mean_loss(at.model, &mx, &my).map(Some)
}

/// The mean loss on `(x, y)` at θ, the parameters' gradients zeroed first: the loss and its value.
fn mean_loss(model: &dyn Model, x: &Inputs, y: &Tensor) -> Result<(Tensor, f32), TrainError> {
    zero_grads(model.parameters());
    let loss = primitives::per_sample_loss(model, x, y).mean(tch::Kind::Float);
    let value = loss.f_double_value(&[]).map_err(model::ModelError::from)? as f32;
    Ok((loss, value))
}
