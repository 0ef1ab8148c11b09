//! Source-task policy (docs/algorithms.md §6): the meta loss on the target rows the plan names
//! (the whole round shares them), after training on a source or on the target.

use super::{mean_loss, need_meta, At, Producer};
use crate::data::TrainingData;
use crate::train::TrainError;
use metaloop_proto::proto::Signal;

pub(super) struct TaskPolicy<'a> {
    /// Rows of the meta set.
    target_rows: &'a [u32],
}

impl<'a> TaskPolicy<'a> {
    /// # Errors
    /// `NoMeta` when the job has no meta set.
    pub(super) fn new(target_rows: &'a [u32], data: &TrainingData) -> Result<Self, TrainError> {
        need_meta(data)?;
        Ok(Self { target_rows })
    }
}

impl Producer for TaskPolicy<'_> {
    fn answer(&self, at: &At<'_>) -> Result<(Option<f32>, Signal), TrainError> {
        let Some(meta) = at.data.meta() else {
            return Ok((None, Signal::Nothing));
        };
        let rows: Vec<usize> = self.target_rows.iter().map(|&r| r as usize).collect();
        if let Some(bad) = rows.iter().find(|&&r| r >= meta.len()) {
            return Err(TrainError::Mismatch(format!(
                "target row {bad} is outside the meta set's {} rows",
                meta.len()
            )));
        }
        let (mx, my) = meta.batch(&rows, at.device);
        let (_, value) = mean_loss(at.model, &mx, &my)?;
        Ok((Some(value), Signal::Nothing))
    }
}
