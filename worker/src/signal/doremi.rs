//! Domain weights by excess loss (docs/algorithms.md §4): the meta loss, then every domain's
//! per-sample losses on a probe of its shard (the coordinator holds the reference's).

use super::{meta_loss, At, Producer};
use crate::primitives;
use crate::train::TrainError;
use metaloop_common::model;
use metaloop_proto::proto::{DomainProbe, Signal};

pub(super) struct Doremi {
    /// Rows per domain's probe.
    pub(super) probe: u32,
}

impl Producer for Doremi {
    fn answer(&self, at: &At<'_>) -> Result<(Option<f32>, Signal), TrainError> {
        let meta_loss = meta_loss(at)?.map(|(_, value)| value);
        let mut out = Vec::with_capacity(at.data.domains().len());
        for i in 0..at.data.domains().len() {
            let (rows, x, y) = at.data.probe(at.a, i, self.probe, at.device);
            let l = tch::no_grad(|| primitives::per_sample_loss(at.model, &x, &y)).to_kind(tch::Kind::Float);
            let losses = Vec::<f32>::try_from(&l).map_err(model::ModelError::from)?;
            out.push(DomainProbe {
                rows: rows.iter().map(|&r| r as u32).collect(),
                losses,
            });
        }
        Ok((meta_loss, Signal::Doremi(out)))
    }
}
