//! Outer strategy `task-policy` (docs/algorithms.md §6, after Meta-RTL): an LSTM policy over N source
//! tasks. Each round its input is the previous round's weights and rewards and its softmax
//! output w_t; M sources are drawn from (1−ε)·w_t + ε·uniform, each one an assignment that
//! trains a copy of θ on that source and measures the target loss on a batch every assignment
//! of the round shares; one more assignment measures the target loss of θ itself. The reward of
//! a sampled source is r_i = L_T(θ) − L_T(θ_i). The policy takes one REINFORCE step with an
//! exponential-average baseline and an entropy bonus,
//!   ψ ← ψ + η ∇ψ [Σ_i (r_i − b) log w_t[s_i] + β H(w_t)],
//! and θ takes a Reptile step weighted by w_t over the sampled sources. The last rounds fine-tune
//! θ on the target's own examples. Pure: no I/O, no libtorch.
//!
//! [reconstruction] The gradient flows through the current LSTM step only (the previous hidden
//! state is a constant: truncated backpropagation of one step); the reward input of a source not
//! sampled last round is 0; the LSTM starts with uniform output (zero output layer).

use super::domain_weights::DomainWeights;
use super::{OuterStrategy, RoundDesign, StrategyReport};
use crate::checkpoint;
use crate::outer::Combine;
use metaloop_proto::config::{JobConfig, PolicyMethod};
use metaloop_proto::proto::{Ask, Assignment, AssignmentResult, Signal, TrainOn};
use metaloop_proto::rng::{derive_seed, SplitMix64};
use std::collections::BTreeMap;

/// The strategy: the policy, the round in progress, and the (uniform) mixture every plan
/// carries.
#[derive(Debug, Clone)]
pub struct TaskPolicy {
    policy: Policy,
    mixture: DomainWeights,
    /// Rows in the meta set (the target).
    meta_len: usize,
    round: Option<PolicyRound>,
}

impl TaskPolicy {
    pub fn new(config: &JobConfig, names: Vec<String>, meta_len: usize, mixture: DomainWeights) -> Self {
        Self {
            policy: Policy::new(config, names),
            mixture,
            meta_len,
            round: None,
        }
    }
}

impl OuterStrategy for TaskPolicy {
    fn name(&self) -> String {
        format!("task-policy/{}", self.policy.method.as_str())
    }

    fn plan(&mut self, round: u64) -> RoundDesign {
        let p = self.policy.plan(round, self.meta_len);
        let design = RoundDesign {
            assignments: p.assignments.clone(),
            domain_weights: self.mixture.training_weights(),
            ask: Ask::TaskPolicy {
                target_rows: p.target_rows.clone(),
            },
            combine: if p.finetune() {
                Combine::First
            } else {
                Combine::Weighted(reptile_weights(&p.weights, &p.sources))
            },
        };
        self.round = Some(p);
        design
    }

    fn check(&self, result: &AssignmentResult) -> Result<(), &'static str> {
        if !result.meta_loss.is_some_and(f32::is_finite) {
            return Err("bad_target_loss");
        }
        match result.signal {
            Signal::Nothing => Ok(()),
            _ => Err("unexpected_signal"),
        }
    }

    fn update(&mut self, results: &[&AssignmentResult]) -> StrategyReport {
        let meta: Vec<f64> = results.iter().filter_map(|r| r.meta_loss.map(f64::from)).collect();
        // The meta loss of a task-policy round is the target loss of θ before it (or after the
        // fine-tuning step): the last assignment's.
        let mut report = StrategyReport {
            meta_loss: meta.last().copied(),
            ..StrategyReport::default()
        };
        if let Some(plan) = self.round.as_ref().filter(|p| !p.finetune()) {
            let outcome = self.policy.update(plan, &meta);
            report.rewards = Some(
                self.policy
                    .names
                    .iter()
                    .zip(&outcome.rewards)
                    .filter_map(|(n, r)| r.map(|r| (n.clone(), r)))
                    .collect(),
            );
            report.policy_grad_norm = outcome.grad_norm;
        }
        report
    }

    fn domain_weights(&self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }

    fn source_weights(&self) -> Option<BTreeMap<String, f64>> {
        (self.policy.method != PolicyMethod::TargetOnly).then(|| {
            self.policy
                .names
                .iter()
                .cloned()
                .zip(self.policy.prev_weights.iter().copied())
                .collect()
        })
    }

    /// The mixture's state, then the policy's.
    fn state(&self) -> Vec<(String, Vec<f64>)> {
        let mut state = self.mixture.named_state();
        state.extend(self.policy.state());
        state
    }

    fn restore(&mut self, state: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
        self.mixture.restore_named(state)?;
        self.policy.restore(state)
    }
}

/// One LSTM cell followed by a linear layer to N logits. Parameters live flat in one vector:
/// W [4H×D], U [4H×H], b [4H], V [N×H], c [N]; gate order input, forget, cell, output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lstm {
    pub inputs: usize,
    pub hidden: usize,
    pub outputs: usize,
}

/// One forward step, kept for its backward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    x: Vec<f64>,
    h_prev: Vec<f64>,
    c_prev: Vec<f64>,
    /// Gate activations i, f, g, o (each H).
    gates: [Vec<f64>; 4],
    pub c: Vec<f64>,
    pub h: Vec<f64>,
    /// softmax of the logits.
    pub w: Vec<f64>,
}

impl Lstm {
    /// Number of parameters.
    pub fn size(&self) -> usize {
        let (d, h, n) = (self.inputs, self.hidden, self.outputs);
        4 * h * d + 4 * h * h + 4 * h + n * h + n
    }

    /// Offsets of W, U, b, V, c in the flat parameters.
    fn offsets(&self) -> [usize; 5] {
        let (d, h, n) = (self.inputs, self.hidden, self.outputs);
        let u = 4 * h * d;
        let b = u + 4 * h * h;
        let v = b + 4 * h;
        [0, u, b, v, v + n * h]
    }

    /// Initial parameters: the LSTM uniform in ±1/√H (PyTorch's default), the output layer
    /// zero so the first policy is uniform.
    pub fn init(&self, seed: u64) -> Vec<f64> {
        let mut rng = SplitMix64::new(seed);
        let bound = 1.0 / (self.hidden as f64).sqrt();
        let [_, _, _, v, _] = self.offsets();
        (0..self.size())
            .map(|i| if i < v { (2.0 * rng.unit() - 1.0) * bound } else { 0.0 })
            .collect()
    }

    pub fn forward(&self, psi: &[f64], x: &[f64], h_prev: &[f64], c_prev: &[f64]) -> Step {
        let (d, hn, n) = (self.inputs, self.hidden, self.outputs);
        let [ow, ou, ob, ov, oc] = self.offsets();
        let z: Vec<f64> = (0..4 * hn)
            .map(|r| {
                let wx: f64 = (0..d).map(|j| psi[ow + r * d + j] * x[j]).sum();
                let uh: f64 = (0..hn).map(|j| psi[ou + r * hn + j] * h_prev[j]).sum();
                wx + uh + psi[ob + r]
            })
            .collect();
        let act = |k: usize, f: fn(f64) -> f64| z[k * hn..(k + 1) * hn].iter().map(|&v| f(v)).collect::<Vec<_>>();
        let gates = [act(0, sigmoid), act(1, sigmoid), act(2, f64::tanh), act(3, sigmoid)];
        let c: Vec<f64> = (0..hn)
            .map(|j| gates[1][j] * c_prev[j] + gates[0][j] * gates[2][j])
            .collect();
        let h: Vec<f64> = (0..hn).map(|j| gates[3][j] * c[j].tanh()).collect();
        let logits: Vec<f64> = (0..n)
            .map(|i| (0..hn).map(|j| psi[ov + i * hn + j] * h[j]).sum::<f64>() + psi[oc + i])
            .collect();
        Step {
            x: x.to_vec(),
            h_prev: h_prev.to_vec(),
            c_prev: c_prev.to_vec(),
            gates,
            c,
            h,
            w: softmax(&logits),
        }
    }

    /// ∂J/∂ψ given ∂J/∂logits of one step (the previous state held constant).
    pub fn backward(&self, psi: &[f64], s: &Step, d_logits: &[f64]) -> Vec<f64> {
        let (d, hn, n) = (self.inputs, self.hidden, self.outputs);
        let [ow, ou, ob, ov, oc] = self.offsets();
        let mut g = vec![0.0; self.size()];
        let mut dh = vec![0.0; hn];
        for i in 0..n {
            g[oc + i] = d_logits[i];
            for j in 0..hn {
                g[ov + i * hn + j] = d_logits[i] * s.h[j];
                dh[j] += psi[ov + i * hn + j] * d_logits[i];
            }
        }
        let [gi, gf, gg, go] = &s.gates;
        let mut dz = vec![0.0; 4 * hn];
        for j in 0..hn {
            let tc = s.c[j].tanh();
            let dc = dh[j] * go[j] * (1.0 - tc * tc);
            dz[j] = dc * gg[j] * gi[j] * (1.0 - gi[j]);
            dz[hn + j] = dc * s.c_prev[j] * gf[j] * (1.0 - gf[j]);
            dz[2 * hn + j] = dc * gi[j] * (1.0 - gg[j] * gg[j]);
            dz[3 * hn + j] = dh[j] * tc * go[j] * (1.0 - go[j]);
        }
        for (r, &dzr) in dz.iter().enumerate() {
            g[ob + r] = dzr;
            for j in 0..d {
                g[ow + r * d + j] = dzr * s.x[j];
            }
            for j in 0..hn {
                g[ou + r * hn + j] = dzr * s.h_prev[j];
            }
        }
        g
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

/// ∂/∂logits of Σ_i A_i log w[s_i] + β H(w), with w = softmax(logits):
/// Σ_i A_i (e_{s_i} − w) − β w ⊙ (log w + H).
pub fn reinforce_logit_gradient(w: &[f64], sources: &[u32], advantages: &[f64], beta: f64) -> Vec<f64> {
    let entropy: f64 = -w.iter().filter(|&&p| p > 0.0).map(|p| p * p.ln()).sum::<f64>();
    let total: f64 = advantages.iter().sum();
    let mut g: Vec<f64> = w
        .iter()
        .map(|&p| -total * p - beta * p * (p.max(f64::MIN_POSITIVE).ln() + entropy))
        .collect();
    for (&s, a) in sources.iter().zip(advantages) {
        g[s as usize] += a;
    }
    g
}

/// Reptile weights over the sampled sources: w̃_j = w[s_j] / Σ_k w[s_k].
pub fn reptile_weights(w: &[f64], sources: &[u32]) -> Vec<f64> {
    let total: f64 = sources.iter().map(|&s| w[s as usize]).sum();
    sources.iter().map(|&s| w[s as usize] / total).collect()
}

/// What one round of the policy asks for, and what its update needs.
#[derive(Debug, Clone)]
pub struct PolicyRound {
    /// w_t, the policy's probabilities over the sources.
    pub weights: Vec<f64>,
    /// Sampled sources, one per training assignment (assignment j trains on `sources[j]`);
    /// empty in a fine-tuning round.
    pub sources: Vec<u32>,
    /// Rows of the meta set (the target) every assignment measures its target loss on.
    pub target_rows: Vec<u32>,
    pub assignments: Vec<Assignment>,
    step: Option<Step>,
}

impl PolicyRound {
    pub fn finetune(&self) -> bool {
        self.sources.is_empty()
    }
}

/// How the round's update went, for the record.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Mean reward of each sampled source (in source order; `None` when not sampled).
    pub rewards: Vec<Option<f64>>,
    /// ‖∇ψ J‖ (method `learned`).
    pub grad_norm: Option<f64>,
}

/// The policy over the sources (Meta-RTL).
#[derive(Debug, Clone)]
struct Policy {
    names: Vec<String>,
    method: PolicyMethod,
    net: Lstm,
    psi: Vec<f64>,
    h: Vec<f64>,
    c: Vec<f64>,
    /// The last round's w and per-source mean rewards: the policy's next input.
    prev_weights: Vec<f64>,
    prev_rewards: Vec<f64>,
    baseline: f64,
    epsilon: f64,
    lr: f64,
    beta: f64,
    decay: f64,
    sources_per_round: u32,
    target_batch: u32,
    steps: u32,
    /// Rounds from this one on fine-tune on the target.
    finetune_from: u64,
    seed: u64,
}

impl Policy {
    /// The policy of a `task-policy` job over its domains (the sources).
    pub fn new(config: &JobConfig, names: Vec<String>) -> Self {
        let n = names.len();
        let s = &config.strategy;
        let net = Lstm {
            inputs: 2 * n,
            hidden: s.policy_hidden as usize,
            outputs: n,
        };
        Self {
            psi: net.init(derive_seed(config.seed, &[0x901C])),
            h: vec![0.0; net.hidden],
            c: vec![0.0; net.hidden],
            prev_weights: vec![1.0 / n as f64; n],
            prev_rewards: vec![0.0; n],
            baseline: 0.0,
            names,
            method: s.policy,
            net,
            epsilon: s.epsilon,
            lr: s.policy_lr,
            beta: s.entropy_bonus,
            decay: s.baseline_decay,
            sources_per_round: config.sources_per_round(),
            target_batch: s.target_batch,
            steps: config.inner.steps,
            finetune_from: config.rounds - config.finetune_rounds(),
            seed: config.seed,
        }
    }

    /// The policy's weights of the last round it sampled in (uniform before the first).
    #[cfg(test)]
    pub fn weights(&self) -> &[f64] {
        &self.prev_weights
    }

    /// Plans round `round` on a target of `target_len` examples. Deterministic in the state,
    /// the job seed and the round.
    pub fn plan(&self, round: u64, target_len: usize) -> PolicyRound {
        let mut rows: Vec<u32> = (0..target_len as u32).collect();
        if (self.target_batch as usize) < rows.len() {
            SplitMix64::new(derive_seed(self.seed, &[round, 0x7A6E7])).shuffle(&mut rows);
            rows.truncate(self.target_batch as usize);
        }
        let assignment = |index: u32, data: TrainOn, steps: u32| Assignment {
            index,
            shard: 0,
            steps,
            seed: derive_seed(self.seed, &[round, u64::from(index)]),
            data,
        };
        if round >= self.finetune_from {
            return PolicyRound {
                weights: self.prev_weights.clone(),
                sources: Vec::new(),
                target_rows: rows,
                assignments: vec![assignment(0, TrainOn::Meta, self.steps)],
                step: None,
            };
        }
        let n = self.names.len();
        let (weights, step) = match self.method {
            PolicyMethod::Learned => {
                let x: Vec<f64> = self.prev_weights.iter().chain(&self.prev_rewards).copied().collect();
                let step = self.net.forward(&self.psi, &x, &self.h, &self.c);
                (step.w.clone(), Some(step))
            }
            _ => (vec![1.0 / n as f64; n], None),
        };
        let mut rng = SplitMix64::new(derive_seed(self.seed, &[round, 0x5A3B1E]));
        let sources: Vec<u32> = (0..self.sources_per_round)
            .map(|_| sample(&weights, self.epsilon, rng.unit()))
            .collect();
        let mut assignments: Vec<Assignment> = sources
            .iter()
            .enumerate()
            .map(|(j, &s)| assignment(j as u32, TrainOn::Domain(s), self.steps))
            .collect();
        assignments.push(assignment(sources.len() as u32, TrainOn::Meta, 0));
        PolicyRound {
            weights,
            sources,
            target_rows: rows,
            assignments,
            step,
        }
    }

    /// Learns from a source round: `target_losses[j]` is L_T after assignment j, the last one
    /// L_T(θ). Returns the rewards and the gradient norm; the model update's weights are
    /// [`reptile_weights`].
    pub fn update(&mut self, round: &PolicyRound, target_losses: &[f64]) -> Outcome {
        let n = self.names.len();
        let Some((&before, after)) = target_losses.split_last() else {
            return Outcome {
                rewards: vec![None; n],
                grad_norm: None,
            };
        };
        let rewards: Vec<f64> = after.iter().map(|l| before - l).collect();
        let advantages: Vec<f64> = rewards.iter().map(|r| r - self.baseline).collect();
        let mut grad_norm = None;
        if let Some(step) = &round.step {
            let d_logits = reinforce_logit_gradient(&step.w, &round.sources, &advantages, self.beta);
            let g = self.net.backward(&self.psi, step, &d_logits);
            grad_norm = Some(g.iter().map(|v| v * v).sum::<f64>().sqrt());
            for (p, gv) in self.psi.iter_mut().zip(&g) {
                *p += self.lr * gv;
            }
            self.h.clone_from(&step.h);
            self.c.clone_from(&step.c);
        }
        if !rewards.is_empty() {
            let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
            self.baseline = self.decay * self.baseline + (1.0 - self.decay) * mean;
        }
        let mut per_source = vec![(0.0, 0u32); n];
        for (&s, r) in round.sources.iter().zip(&rewards) {
            per_source[s as usize].0 += r;
            per_source[s as usize].1 += 1;
        }
        let means: Vec<Option<f64>> = per_source
            .iter()
            .map(|&(sum, k)| (k > 0).then(|| sum / f64::from(k)))
            .collect();
        self.prev_rewards = means.iter().map(|m| m.unwrap_or(0.0)).collect();
        self.prev_weights.clone_from(&round.weights);
        Outcome {
            rewards: means,
            grad_norm,
        }
    }

    /// The policy's state as named vectors, for checkpoints.
    pub fn state(&self) -> Vec<(String, Vec<f64>)> {
        vec![
            ("policy.psi".into(), self.psi.clone()),
            ("policy.h".into(), self.h.clone()),
            ("policy.c".into(), self.c.clone()),
            ("policy.prev_weights".into(), self.prev_weights.clone()),
            ("policy.prev_rewards".into(), self.prev_rewards.clone()),
            ("policy.baseline".into(), vec![self.baseline]),
        ]
    }

    /// Takes over a state written by [`Policy::state`].
    ///
    /// # Errors
    /// When an entry is missing or has the wrong length.
    pub fn restore(&mut self, state: &[(String, Vec<f64>)]) -> anyhow::Result<()> {
        let (n, h) = (self.names.len(), self.net.hidden);
        let psi = checkpoint::named(state, "policy.psi", self.net.size())?;
        let hs = checkpoint::named(state, "policy.h", h)?;
        let cs = checkpoint::named(state, "policy.c", h)?;
        let w = checkpoint::named(state, "policy.prev_weights", n)?;
        let r = checkpoint::named(state, "policy.prev_rewards", n)?;
        let b = checkpoint::named(state, "policy.baseline", 1)?;
        (self.psi, self.h, self.c, self.prev_weights, self.prev_rewards) = (psi, hs, cs, w, r);
        self.baseline = b[0];
        Ok(())
    }
}

/// The source that `u` ∈ [0, 1) picks from (1−ε)·w + ε·uniform.
fn sample(w: &[f64], epsilon: f64, u: f64) -> u32 {
    let n = w.len() as f64;
    let mut acc = 0.0;
    for (i, p) in w.iter().enumerate() {
        acc += (1.0 - epsilon) * p + epsilon / n;
        if u < acc {
            return i as u32;
        }
    }
    (w.len() - 1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (Lstm, Vec<f64>) {
        let net = Lstm {
            inputs: 4,
            hidden: 3,
            outputs: 2,
        };
        let mut psi = net.init(7);
        // A non-zero output layer, so every parameter gets a gradient.
        let [_, _, _, v, _] = net.offsets();
        for (i, p) in psi[v..].iter_mut().enumerate() {
            *p = 0.3 * ((i as f64) - 3.0) / 4.0;
        }
        (net, psi)
    }

    fn objective(net: &Lstm, psi: &[f64], sources: &[u32], adv: &[f64], beta: f64) -> f64 {
        let s = net.forward(psi, &[0.5, 0.5, 0.2, -0.1], &[0.1, -0.2, 0.3], &[0.4, 0.0, -0.3]);
        let entropy: f64 = -s.w.iter().map(|p| p * p.ln()).sum::<f64>();
        sources
            .iter()
            .zip(adv)
            .map(|(&i, a)| a * s.w[i as usize].ln())
            .sum::<f64>()
            + beta * entropy
    }

    #[test]
    fn the_logit_gradient_matches_hand_values() {
        // w = (0.5, 0.3, 0.2), sources 0 and 2 with advantages 1 and −0.5, β = 0.1.
        let w = [0.5, 0.3, 0.2];
        let g = reinforce_logit_gradient(&w, &[0, 2], &[1.0, -0.5], 0.1);
        let h = -(0.5f64 * 0.5f64.ln() + 0.3 * 0.3f64.ln() + 0.2 * 0.2f64.ln());
        let expect = [
            1.0 - 0.5 * 0.5 - 0.1 * 0.5 * (0.5f64.ln() + h),
            -0.5 * 0.3 - 0.1 * 0.3 * (0.3f64.ln() + h),
            -0.5 - 0.5 * 0.2 - 0.1 * 0.2 * (0.2f64.ln() + h),
        ];
        for (a, b) in g.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        // Gradients of the log-probabilities and of the entropy through softmax sum to zero.
        assert!(g.iter().sum::<f64>().abs() < 1e-12);
    }

    #[test]
    fn the_policy_gradient_matches_central_differences() {
        let (net, psi) = tiny();
        let (sources, adv, beta) = ([1u32, 0, 1], [0.7, -0.2, 0.4], 0.05);
        let s = net.forward(&psi, &[0.5, 0.5, 0.2, -0.1], &[0.1, -0.2, 0.3], &[0.4, 0.0, -0.3]);
        let d_logits = reinforce_logit_gradient(&s.w, &sources, &adv, beta);
        let g = net.backward(&psi, &s, &d_logits);
        let h = 1e-6;
        for i in 0..psi.len() {
            let (mut up, mut down) = (psi.clone(), psi.clone());
            up[i] += h;
            down[i] -= h;
            let numeric =
                (objective(&net, &up, &sources, &adv, beta) - objective(&net, &down, &sources, &adv, beta)) / (2.0 * h);
            assert!(
                (g[i] - numeric).abs() <= 1e-8 + 1e-6 * numeric.abs(),
                "parameter {i}: analytic {} vs numeric {numeric}",
                g[i]
            );
        }
    }

    #[test]
    fn reptile_weights_renormalise_over_the_sampled_sources() {
        let w = reptile_weights(&[0.5, 0.3, 0.2], &[0, 2, 0]);
        let expect = [0.5 / 1.2, 0.2 / 1.2, 0.5 / 1.2];
        for (a, b) in w.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn sampling_follows_the_mixture() {
        // (1−ε)w + ε/N with ε = 0.2, w = (1, 0): (0.9, 0.1).
        let w = [1.0, 0.0];
        assert_eq!(sample(&w, 0.2, 0.89), 0);
        assert_eq!(sample(&w, 0.2, 0.91), 1);
        let mut rng = SplitMix64::new(3);
        let ones = (0..10_000).filter(|_| sample(&w, 0.2, rng.unit()) == 1).count();
        assert!((900..1100).contains(&ones), "{ones}");
    }

    fn config(method: &str) -> JobConfig {
        let dir = tempfile::tempdir().expect("tmp");
        for f in ["p-train.st", "p-test.st", "p-meta.st"] {
            std::fs::write(dir.path().join(f), b"x").expect("write");
        }
        let text = format!(
            "rounds = 10\n[data]\ntest = \"p-test.st\"\nmeta = \"p-meta.st\"\nclasses = 10\nshards = 1\n\
             [[data.domains]]\nname = \"a\"\nsource = \"p-train.st\"\n\
             [[data.domains]]\nname = \"b\"\nsource = \"p-train.st\"\n\
             [[data.domains]]\nname = \"c\"\nsource = \"p-train.st\"\n\
             [inner]\nsteps = 3\n\
             [strategy]\nkind = \"task-policy\"\npolicy = \"{method}\"\nsources_per_round = 4\n\
             target_batch = 5\nfinetune_rounds = 2\npolicy_lr = 0.5\nentropy_bonus = 0.0\nbaseline_decay = 0.5\n"
        );
        JobConfig::parse(&text, dir.path()).expect("valid")
    }

    fn names() -> Vec<String> {
        ["a", "b", "c"].map(String::from).to_vec()
    }

    #[test]
    fn a_round_is_sources_then_the_evaluation_and_ends_with_fine_tuning() {
        let p = Policy::new(&config("learned"), names());
        let r = p.plan(0, 20);
        assert_eq!(r.sources.len(), 4);
        assert_eq!(r.assignments.len(), 5);
        for (a, &s) in r.assignments.iter().zip(&r.sources) {
            assert_eq!((a.data, a.steps), (TrainOn::Domain(s), 3));
        }
        assert_eq!((r.assignments[4].data, r.assignments[4].steps), (TrainOn::Meta, 0));
        assert_eq!(r.target_rows.len(), 5);
        assert!(r.target_rows.iter().all(|&t| t < 20));
        for (a, b) in r.weights.iter().zip([1.0 / 3.0; 3]) {
            assert!((a - b).abs() < 1e-12, "the zero output layer starts uniform");
        }
        let again = p.plan(0, 20);
        assert_eq!(
            (again.sources, again.target_rows),
            (r.sources.clone(), r.target_rows.clone())
        );
        assert_ne!(
            p.plan(1, 20).target_rows,
            r.target_rows,
            "a new target batch each round"
        );
        let last = p.plan(8, 20);
        assert!(last.finetune());
        assert_eq!(last.assignments.len(), 1);
        assert_eq!(
            (last.assignments[0].data, last.assignments[0].steps),
            (TrainOn::Meta, 3)
        );
    }

    #[test]
    fn one_update_by_hand() {
        let mut p = Policy::new(&config("learned"), names());
        let r = p.plan(0, 20);
        // L_T after each source and L_T(θ) last: rewards 1 − l.
        let losses = [0.5, 0.9, 1.2, 0.7, 1.0];
        let before = p.psi.clone();
        let out = p.update(&r, &losses);
        let rewards: Vec<f64> = losses[..4].iter().map(|l| 1.0 - l).collect();
        // Baseline 0 before the first update: advantages are the rewards.
        let step = r.step.as_ref().expect("learned");
        let d_logits = reinforce_logit_gradient(&step.w, &r.sources, &rewards, 0.0);
        let g = p.net.backward(&before, step, &d_logits);
        for ((after, b), gv) in p.psi.iter().zip(&before).zip(&g) {
            assert!((after - (b + 0.5 * gv)).abs() < 1e-15);
        }
        let mean = rewards.iter().sum::<f64>() / 4.0;
        assert!((p.baseline - 0.5 * mean).abs() < 1e-15, "b = 0.5·0 + 0.5·mean r");
        for (i, m) in out.rewards.iter().enumerate() {
            let own: Vec<f64> = r
                .sources
                .iter()
                .zip(&rewards)
                .filter(|(s, _)| **s as usize == i)
                .map(|(_, v)| *v)
                .collect();
            match m {
                Some(v) => assert!((v - own.iter().sum::<f64>() / own.len() as f64).abs() < 1e-15),
                None => assert!(own.is_empty()),
            }
        }
        assert_eq!(p.prev_weights, r.weights);
        assert_eq!(p.h, step.h);
        // The policy moved toward the sources with positive advantage.
        let next = p.plan(1, 20);
        assert_ne!(next.weights, r.weights);
    }

    #[test]
    fn repeated_rewards_teach_the_policy_the_best_source() {
        let mut p = Policy::new(&config("learned"), names());
        for round in 0..8 {
            let r = p.plan(round, 20);
            // Source b helps (reward 0.5), a is neutral, c hurts (−0.5).
            let mut losses: Vec<f64> = r.sources.iter().map(|&s| [1.0, 0.5, 1.5][s as usize]).collect();
            losses.push(1.0);
            p.update(&r, &losses);
        }
        let w = p.weights();
        assert!(w[1] > w[0] && w[0] > w[2], "{w:?}");
    }

    #[test]
    fn the_uniform_policy_never_learns() {
        let mut p = Policy::new(&config("uniform"), names());
        let r = p.plan(0, 20);
        p.update(&r, &[0.5, 0.9, 1.2, 0.7, 1.0]);
        assert_eq!(p.plan(1, 20).weights, vec![1.0 / 3.0; 3]);
        let t = Policy::new(&config("target-only"), names());
        assert!(t.plan(0, 20).finetune(), "target-only fine-tunes from the start");
    }

    #[test]
    fn state_roundtrips() {
        let mut p = Policy::new(&config("learned"), names());
        let r = p.plan(0, 20);
        p.update(&r, &[0.5, 0.9, 1.2, 0.7, 1.0]);
        let mut q = Policy::new(&config("learned"), names());
        q.restore(&p.state()).expect("restore");
        assert_eq!(q.state(), p.state());
        assert_eq!(q.plan(1, 20).sources, p.plan(1, 20).sources);
        assert!(q.restore(&[]).is_err());
    }
}
