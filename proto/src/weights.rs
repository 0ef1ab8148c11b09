//! Domain-weight math shared by both sides (docs/algorithms.md §3): softplus normalisation of raw λ to
//! weights with mean 1, the closed-form hypergradient, and AdamW on λ. Pure functions.

/// softplus(x) = ln(1 + eˣ), computed stably.
pub fn softplus(x: f64) -> f64 {
    if x > 30.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// The logistic function, softplus's derivative.
pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// w_k = softplus(λ_k) / mean_j softplus(λ_j): positive, mean 1.
pub fn normalized(lambda: &[f64]) -> Vec<f64> {
    let s: Vec<f64> = lambda.iter().map(|&l| softplus(l)).collect();
    let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
    s.iter().map(|v| v / mean).collect()
}

/// dL_meta/dλ_j = −(σ(λ_j)/s̄) · (d_j − (1/K) Σ_k w_k d_k), where d_k = ⟨∇θ ℓ_k, ∇θ L_meta⟩
/// (inverse Hessian taken as identity). This is the gradient per unit of inner step size; the
/// positive factor (inner lr / K) is absorbed into the outer learning rate.
pub fn hypergradient(lambda: &[f64], d: &[f64]) -> Vec<f64> {
    let k = lambda.len() as f64;
    let w = normalized(lambda);
    let s_bar = lambda.iter().map(|&l| softplus(l)).sum::<f64>() / k;
    let avg = w.iter().zip(d).map(|(w, d)| w * d).sum::<f64>() / k;
    lambda
        .iter()
        .zip(d)
        .map(|(&l, &dj)| -(sigmoid(l) / s_bar) * (dj - avg))
        .collect()
}

/// AdamW (Loshchilov & Hutter) as PyTorch implements it: decoupled weight decay, bias-corrected
/// moments. Defaults for λ from DreamPRM's code: lr 0.01, weight decay 1e-3.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub m: Vec<f64>,
    pub v: Vec<f64>,
    pub t: u64,
}

impl AdamW {
    pub fn new(n: usize, lr: f64, weight_decay: f64) -> Self {
        Self {
            lr,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// One step: x ← x·(1 − lr·wd) − lr · m̂ / (√v̂ + ε).
    pub fn step(&mut self, x: &mut [f64], grad: &[f64]) {
        self.t += 1;
        let t = self.t as i32;
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for i in 0..x.len() {
            x[i] *= 1.0 - self.lr * self.weight_decay;
            self.m[i] = self.beta1 * self.m[i] + (1.0 - self.beta1) * grad[i];
            self.v[i] = self.beta2 * self.v[i] + (1.0 - self.beta2) * grad[i] * grad[i];
            let m_hat = self.m[i] / bc1;
            let v_hat = self.v[i] / bc2;
            x[i] -= self.lr * m_hat / (v_hat.sqrt() + self.eps);
        }
    }
}

/// One DoReMi update (Xie et al. 2023): exponentiated gradient on the per-domain excess loss λ,
/// α' = softmax(log α + η λ), then smoothing toward uniform, α = (1 − c) α' + c/K.
pub fn doremi_step(alpha: &[f64], lambda: &[f64], eta: f64, c: f64) -> Vec<f64> {
    let k = alpha.len() as f64;
    let logits: Vec<f64> = alpha
        .iter()
        .zip(lambda)
        .map(|(a, l)| a.max(1e-300).ln() + eta * l)
        .collect();
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logits.iter().map(|v| (v - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| (1.0 - c) * e / sum + c / k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_have_mean_one_and_start_uniform() {
        assert_eq!(normalized(&[0.0; 4]), vec![1.0; 4]);
        let w = normalized(&[1.0, -2.0, 0.5]);
        assert!((w.iter().sum::<f64>() / 3.0 - 1.0).abs() < 1e-12);
        assert!(w[0] > w[2] && w[2] > w[1]);
    }

    #[test]
    fn hypergradient_matches_numerical_derivative_of_the_linearised_loss() {
        // L(λ) = −Σ_k w_k(λ) d_k / K is the first-order meta loss change; its gradient must
        // equal the closed form up to the absorbed 1/K factor.
        let lambda = [0.3, -0.7, 1.1, 0.0];
        let d = [2.0, -1.0, 0.5, 0.25];
        let k = lambda.len() as f64;
        let l = |lam: &[f64]| -normalized(lam).iter().zip(&d).map(|(w, d)| w * d).sum::<f64>() / k;
        let g = hypergradient(&lambda, &d);
        for j in 0..4 {
            let h = 1e-6;
            let (mut p, mut m) = (lambda, lambda);
            p[j] += h;
            m[j] -= h;
            let numeric = (l(&p) - l(&m)) / (2.0 * h) * k;
            assert!((numeric - g[j]).abs() < 1e-7, "λ_{j}: {numeric} vs {}", g[j]);
        }
        assert!(
            g[0] < 0.0,
            "the domain most aligned with the meta gradient gains weight"
        );
    }

    #[test]
    fn adamw_first_step_matches_hand_computation() {
        let mut opt = AdamW::new(2, 0.01, 1e-3);
        let mut x = [1.0, -2.0];
        opt.step(&mut x, &[0.5, -4.0]);
        // First step: m̂ = g, v̂ = g², so the Adam part is lr·sign(g) (up to ε).
        assert!((x[0] - (1.0 * (1.0 - 1e-5) - 0.01)).abs() < 1e-9);
        assert!((x[1] - (-2.0 * (1.0 - 1e-5) + 0.01)).abs() < 1e-9);
    }

    #[test]
    fn doremi_step_matches_hand_computation() {
        // α = (0.5, 0.5), λ = (ln 3, 0), η = 1: softmax(ln 0.5 + ln 3, ln 0.5) = (0.75, 0.25);
        // smoothing c = 0.1: (0.9·0.75 + 0.05, 0.9·0.25 + 0.05) = (0.725, 0.275).
        let a = doremi_step(&[0.5, 0.5], &[3f64.ln(), 0.0], 1.0, 0.1);
        assert!((a[0] - 0.725).abs() < 1e-12 && (a[1] - 0.275).abs() < 1e-12, "{a:?}");
        // Zero excess loss everywhere leaves α unchanged up to the smoothing.
        let b = doremi_step(&[0.7, 0.2, 0.1], &[0.0; 3], 1.0, 0.0);
        assert!(
            b.iter().zip([0.7, 0.2, 0.1]).all(|(x, y)| (x - y).abs() < 1e-12),
            "{b:?}"
        );
    }
}
