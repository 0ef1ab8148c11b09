//! The per-sample features Ω can see (docs/algorithms.md §5): which ones there are, their wire
//! codes and the default set. Computing them from a model needs libtorch and lives in
//! `metaloop_common::features`.

use serde::Deserialize;

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
    /// Mean of the given label's probability over G stochastic (dropout) forward passes.
    LabelProbMean,
    /// Standard deviation of the given label's probability over G stochastic forward passes.
    LabelProbSpread,
}

impl Feature {
    pub fn code(self) -> u8 {
        match self {
            Feature::Loss => 0,
            Feature::LabelProb => 1,
            Feature::Entropy => 2,
            Feature::Margin => 3,
            Feature::Progress => 4,
            Feature::LabelProbMean => 5,
            Feature::LabelProbSpread => 6,
        }
    }

    /// True for the features that need stochastic forward passes.
    pub fn stochastic(self) -> bool {
        matches!(self, Feature::LabelProbMean | Feature::LabelProbSpread)
    }

    pub fn from_code(c: u8) -> Option<Self> {
        [
            Feature::Loss,
            Feature::LabelProb,
            Feature::Entropy,
            Feature::Margin,
            Feature::Progress,
            Feature::LabelProbMean,
            Feature::LabelProbSpread,
        ]
        .into_iter()
        .find(|f| f.code() == c)
    }
}

/// The default inputs: loss alone was found fragile (at 60% noise Ω learned to favour noisy
/// samples); loss + label probability + entropy was robust (docs/algorithms.md §5).
pub fn default_features() -> Vec<Feature> {
    vec![Feature::Loss, Feature::LabelProb, Feature::Entropy]
}
