//! Per-sample signals from the model itself (docs/algorithms.md §5), the input of the loss-rescaling
//! network Ω: loss, probability of the given label, entropy, margin, and training progress.
//! Each is scaled to a fixed range (loss and entropy divided by ln C) so Ω sees comparable
//! values in every round, whatever the model's state. Which features there are (`Feature`, its
//! wire codes, the default set) is `metaloop_proto::features`; this module computes them.

use crate::model::{Inputs, Model};
use metaloop_proto::features::Feature;
use tch::{Kind, Tensor};

/// Features of `(x, y)` under `model`: one deterministic (eval-mode) forward pass, plus
/// `passes` stochastic (train-mode, dropout) ones when a feature needs them. Leaves the model
/// in eval mode. Randomness comes from libtorch's generator, which callers seed.
pub fn of_model(model: &dyn Model, x: &Inputs, y: &Tensor, features: &[Feature], progress: f64, passes: u32) -> Tensor {
    tch::no_grad(|| {
        model.set_train(false);
        let logits = model.forward(x);
        let stochastic = features.iter().any(|f| f.stochastic()).then(|| {
            model.set_train(true);
            let probs: Vec<Tensor> = (0..passes.max(1))
                .map(|_| {
                    let logp = model.forward(x).to_kind(Kind::Float).log_softmax(-1, Kind::Float);
                    logp.gather(1, &y.unsqueeze(1), false).squeeze_dim(1).exp()
                })
                .collect();
            model.set_train(false);
            Tensor::stack(&probs, 0)
        });
        compute(&logits, y, features, progress, stochastic.as_ref())
    })
}

/// Features `[n, features.len()]` of samples `(x, y)` under `logits = model(x)`; `stochastic`
/// holds the given label's probability over G stochastic passes `[G, n]` (needed only by the
/// stochastic features; without it they fall back to the single pass). No gradient flows.
pub fn compute(
    logits: &Tensor,
    y: &Tensor,
    features: &[Feature],
    progress: f64,
    stochastic: Option<&Tensor>,
) -> Tensor {
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
                Feature::LabelProbMean => match stochastic {
                    Some(s) => s.mean_dim(0, false, Kind::Float),
                    None => label_logp.exp(),
                },
                Feature::LabelProbSpread => match stochastic {
                    Some(s) if s.size()[0] > 1 => s.std_dim(0, false, false),
                    _ => label_logp.zeros_like(),
                },
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
        let f = compute(&logits, &y, &all, 0.5, None);
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

    #[test]
    fn stochastic_features_sample_dropout() {
        use crate::model::{build, init_params};
        use metaloop_proto::proto::ModelSpec;
        let spec = |dropout| ModelSpec::Mlp {
            inputs: 4,
            hidden: vec![32],
            classes: 3,
            dropout,
        };
        let params = init_params(&spec(0.0), 1);
        let x = Inputs::Dense(Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.1, 1.0, 1.0, -0.5, 0.3]).reshape([2, 4]));
        let y = Tensor::from_slice(&[0i64, 2]);
        let feats = [Feature::LabelProb, Feature::LabelProbMean, Feature::LabelProbSpread];
        let column = |f: &Tensor, i: i64| Vec::<f32>::try_from(f.select(1, i)).expect("read");
        // Without dropout every pass is the same: mean = label probability, spread = 0.
        let plain = build(&spec(0.0), &params, tch::Device::Cpu).expect("build");
        let f = of_model(plain.as_ref(), &x, &y, &feats, 0.0, 8);
        for (a, b) in column(&f, 0).iter().zip(column(&f, 1)) {
            assert!((a - b).abs() < 1e-6);
        }
        assert!(column(&f, 2).iter().all(|s| *s == 0.0));
        // With dropout the passes differ, and the same seed gives the same features.
        let noisy = build(&spec(0.5), &params, tch::Device::Cpu).expect("build");
        tch::manual_seed(7);
        let a = of_model(noisy.as_ref(), &x, &y, &feats, 0.0, 8);
        tch::manual_seed(7);
        let b = of_model(noisy.as_ref(), &x, &y, &feats, 0.0, 8);
        assert!(column(&a, 2).iter().all(|s| *s > 0.0), "{:?}", column(&a, 2));
        assert_eq!(column(&a, 2), column(&b, 2));
        assert_eq!(column(&a, 0), column(&f, 0), "the deterministic pass runs in eval mode");
    }
}
