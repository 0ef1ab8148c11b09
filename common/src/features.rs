//! Per-sample signals from the model itself (DESIGN.md §6.3), the input of the loss-rescaling
//! network Ω: loss, probability of the given label, entropy, margin, and training progress.
//! Each is scaled to a fixed range (loss and entropy divided by ln C) so Ω sees comparable
//! values in every round, whatever the model's state.

use serde::Deserialize;
use tch::{Kind, Tensor};

/// One feature Ω can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Feature {
    /// Cross-entropy of the given label / ln C.
    Loss,
    /// Softmax probability of the given label, in [0, 1].
    LabelProb,
    /// Entropy of the softmax / ln C, in [0, 1].
    Entropy,
    /// Probability of the given label minus the largest other probability, in [-1, 1].
    Margin,
    /// Fraction of the run done, in [0, 1] (the same for every sample of a round).
    Progress,
}

impl Feature {
    pub fn code(self) -> u8 {
        match self {
            Feature::Loss => 0,
            Feature::LabelProb => 1,
            Feature::Entropy => 2,
            Feature::Margin => 3,
            Feature::Progress => 4,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        [
            Feature::Loss,
            Feature::LabelProb,
            Feature::Entropy,
            Feature::Margin,
            Feature::Progress,
        ]
        .into_iter()
        .find(|f| f.code() == c)
    }
}

/// The default inputs: loss alone was found fragile (at 60% noise Ω learned to favour noisy
/// samples); loss + label probability + entropy was robust (DESIGN.md §6.3).
pub fn default_features() -> Vec<Feature> {
    vec![Feature::Loss, Feature::LabelProb, Feature::Entropy]
}

/// Features `[n, features.len()]` of samples `(x, y)` under `logits = model(x)`; no gradient
/// flows through them.
pub fn compute(logits: &Tensor, y: &Tensor, features: &[Feature], progress: f64) -> Tensor {
    tch::no_grad(|| {
        let logits = logits.to_kind(Kind::Float);
        let classes = logits.size()[1];
        let ln_c = (classes.max(2) as f64).ln();
        let logp = logits.log_softmax(-1, Kind::Float);
        let p = logp.exp();
        let label_logp = logp.gather(1, &y.unsqueeze(1), false).squeeze_dim(1);
        let columns: Vec<Tensor> = features
            .iter()
            .map(|f| match f {
                Feature::Loss => -&label_logp / ln_c,
                Feature::LabelProb => label_logp.exp(),
                Feature::Entropy => -(&p * &logp).sum_dim_intlist(-1, false, Kind::Float) / ln_c,
                Feature::Margin => {
                    let label_p = label_logp.exp();
                    let others = p.scatter_value(1, &y.unsqueeze(1), -1.0);
                    label_p - others.amax(-1, false)
                }
                Feature::Progress => Tensor::full([y.size()[0]], progress, (Kind::Float, y.device())),
            })
            .collect();
        Tensor::stack(&columns, 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_match_hand_computation() {
        // Two classes: logits (ln 3, 0) → p = (0.75, 0.25).
        let logits = Tensor::from_slice(&[3f32.ln(), 0.0, 3f32.ln(), 0.0]).reshape([2, 2]);
        let y = Tensor::from_slice(&[0i64, 1]);
        let all = [
            Feature::Loss,
            Feature::LabelProb,
            Feature::Entropy,
            Feature::Margin,
            Feature::Progress,
        ];
        let f = compute(&logits, &y, &all, 0.5);
        let v = Vec::<f32>::try_from(f.view(-1)).expect("read");
        let ln2 = 2f32.ln();
        let h = -(0.75f32 * 0.75f32.ln() + 0.25 * 0.25f32.ln()) / ln2;
        let expect = [
            -(0.75f32.ln()) / ln2,
            0.75,
            h,
            0.5,
            0.5, // sample 0, label 0
            -(0.25f32.ln()) / ln2,
            0.25,
            h,
            -0.5,
            0.5, // sample 1, label 1
        ];
        for (g, e) in v.iter().zip(expect) {
            assert!((g - e).abs() < 1e-5, "{v:?} vs {expect:?}");
        }
        assert_eq!(
            all.iter().map(|f| Feature::from_code(f.code())).collect::<Vec<_>>(),
            all.map(Some)
        );
    }
}
