//! Domain weights by hypergradient (docs/algorithms.md §3): the meta loss L_meta and, with
//! v = ∇θ L_meta, every domain's d_k = Σ_i ⟨∇θ ℓ_i, v⟩ over a probe of its shard, by the exact
//! or the finite-difference directional derivative.

use super::{meta_loss, need_meta, At, Producer};
use crate::data::TrainingData;
use crate::primitives;
use crate::train::TrainError;
use metaloop_common::model;
use metaloop_proto::proto::{DirectionalMethod, DomainStat, HypergradientSpec, Signal};

pub(super) struct Hypergradient(HypergradientSpec);

impl Hypergradient {
    /// # Errors
    /// `NoMeta` when the job has no meta set.
    pub(super) fn new(spec: HypergradientSpec, data: &TrainingData) -> Result<Self, TrainError> {
        need_meta(data)?;
        Ok(Self(spec))
    }
}

impl Producer for Hypergradient {
    fn answer(&self, at: &At<'_>) -> Result<(Option<f32>, Signal), TrainError> {
        let h = self.0;
        let Some((meta_loss, value)) = meta_loss(at)? else {
            return Ok((None, Signal::Hypergradient(Vec::new())));
        };
        let model = at.model;
        let v = primitives::gradient(model, &meta_loss);
        let mut stats = Vec::with_capacity(at.data.domains().len());
        for i in 0..at.data.domains().len() {
            let (rows, x, y) = at.data.probe(at.a, i, h.probe, at.device);
            let c = match h.directional {
                DirectionalMethod::Exact => primitives::directional_exact(model, &x, &y, &v),
                DirectionalMethod::FiniteDifference => {
                    primitives::directional_fd(model, &x, &y, &v, primitives::FD_RADIUS)
                }
            };
            let d_sum = c
                .to_kind(tch::Kind::Double)
                .sum(tch::Kind::Double)
                .f_double_value(&[])
                .map_err(model::ModelError::from)?;
            stats.push(DomainStat {
                d_sum,
                count: rows.len() as u64,
            });
        }
        Ok((Some(value), Signal::Hypergradient(stats)))
    }
}
