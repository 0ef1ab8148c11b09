//! The model zoo and the one trait every model is used through. The engine and every training
//! primitive are written against [`Model`] only, so other models (a transformer, a TorchScript
//! module) plug in without changing them.

use crate::classifier::{BertClassifier, Pooling};
use metaloop_proto::proto::ModelSpec;
use metaloop_proto::rng::SplitMix64;
use metaloop_proto::tensor::{Bundle, HostTensor};
use tch::{Device, Kind, Tensor};

/// A batch of model inputs: what a model kind takes, one row per sample.
#[derive(Debug)]
pub enum Inputs {
    /// Dense features `[n, inputs]` (f32).
    Dense(Tensor),
    /// Token ids `[n, len]` (i64) and the attention mask `[n, len]` (1 for a token, 0 for
    /// padding), padded to the longest row of the batch.
    Tokens { ids: Tensor, mask: Tensor },
}

impl Inputs {
    /// Rows (samples) in the batch.
    pub fn rows(&self) -> i64 {
        match self {
            Inputs::Dense(x) => x.size()[0],
            Inputs::Tokens { ids, .. } => ids.size()[0],
        }
    }

    /// Rows `start..start + len`, sharing storage.
    pub fn narrow(&self, start: i64, len: i64) -> Inputs {
        match self {
            Inputs::Dense(x) => Inputs::Dense(x.narrow(0, start, len)),
            Inputs::Tokens { ids, mask } => Inputs::Tokens {
                ids: ids.narrow(0, start, len),
                mask: mask.narrow(0, start, len),
            },
        }
    }

    /// The dense features; a model that takes them is only ever given them (the job's model
    /// and data kinds are checked together before anything runs).
    ///
    /// # Panics
    /// On token inputs: a model paired with data of another kind.
    pub fn dense(&self) -> &Tensor {
        match self {
            Inputs::Dense(x) => x,
            Inputs::Tokens { .. } => panic!("a dense-feature model was given token ids"),
        }
    }
}

/// A trainable classifier.
pub trait Model: Send {
    /// Per-sample logits `[n, classes]` for a batch of inputs.
    fn forward(&self, x: &Inputs) -> Tensor;
    /// Trainable parameters, in a fixed order that matches [`Model::names`].
    fn parameters(&self) -> &[Tensor];
    /// Parameter names, in the order of [`Model::parameters`].
    fn names(&self) -> &[String];
    /// Switches stochastic layers (dropout) on or off; models without any ignore it.
    fn set_train(&self, _train: bool) {}
}

/// Multi-layer perceptron with ReLU between layers; parameters `l{i}.weight` `[out, in]` and
/// `l{i}.bias` `[out]`.
#[derive(Debug)]
pub struct Mlp {
    params: Vec<Tensor>,
    names: Vec<String>,
    dropout: f64,
    /// Train mode (dropout active); off by default.
    train: std::sync::atomic::AtomicBool,
}

impl Mlp {
    /// Builds the MLP holding the parameters of `bundle` on `device`.
    ///
    /// # Errors
    /// When the bundle does not have an MLP's layout.
    pub fn from_bundle(bundle: &Bundle, device: Device) -> Result<Self, ModelError> {
        if bundle.tensors.is_empty() || bundle.tensors.len() % 2 != 0 {
            return Err(ModelError::Layout(format!(
                "an MLP needs weight/bias pairs, got {} tensors",
                bundle.tensors.len()
            )));
        }
        let mut params = Vec::with_capacity(bundle.tensors.len());
        let mut names = Vec::with_capacity(bundle.tensors.len());
        for t in &bundle.tensors {
            params.push(host_to_tensor(t, device).set_requires_grad(true));
            names.push(t.name.clone());
        }
        Ok(Mlp {
            params,
            names,
            dropout: 0.0,
            train: false.into(),
        })
    }

    /// The same MLP with dropout probability `p` after every hidden layer in train mode.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.dropout = p;
        self
    }
}

impl Mlp {
    /// Logits `[n, outputs]` for features `[n, inputs]`.
    pub fn forward_dense(&self, x: &Tensor) -> Tensor {
        let layers = self.params.len() / 2;
        let mut h = x.shallow_clone();
        for (i, pair) in self.params.chunks_exact(2).enumerate() {
            h = h.matmul(&pair[0].tr()) + &pair[1];
            if i + 1 < layers {
                h = h.relu();
                if self.dropout > 0.0 && self.train.load(std::sync::atomic::Ordering::Relaxed) {
                    h = h.dropout(self.dropout, true);
                }
            }
        }
        h
    }
}

impl Model for Mlp {
    fn forward(&self, x: &Inputs) -> Tensor {
        self.forward_dense(x.dense())
    }

    fn parameters(&self) -> &[Tensor] {
        &self.params
    }

    fn names(&self) -> &[String] {
        &self.names
    }

    fn set_train(&self, train: bool) {
        self.train.store(train, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model layout: {0}")]
    Layout(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// `n` values drawn from `rng` uniformly in ±1/√fan_in: PyTorch's `nn.Linear` initialisation,
/// in pure Rust so every machine starts from the same bits.
pub fn linear_init(rng: &mut SplitMix64, n: usize, fan_in: usize) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    (0..n)
        .map(|_| ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * bound)
        .map(|v| v as f32)
        .collect()
}

/// Every parameter's name and shape, in the model's order: what a bundle of `spec` holds.
///
/// # Errors
/// A BERT config the encoder does not support.
pub fn layout(spec: &ModelSpec) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    match spec {
        ModelSpec::Mlp { .. } => Ok(shapes(&init_params(spec, 0))),
        ModelSpec::Bert {
            config,
            pooler,
            classes,
            ..
        } => crate::classifier::layout(config, *pooler, *classes),
        ModelSpec::TorchScript { layout, .. } => Ok(layout
            .iter()
            .map(|(n, s)| (n.clone(), s.iter().map(|&d| d as usize).collect()))
            .collect()),
    }
}

/// Initial parameters for an MLP `spec`, made in pure Rust from `seed` so every machine and
/// every libtorch build starts from the same bits. Uniform(±1/√fan_in), as PyTorch's
/// `nn.Linear`.
///
/// # Panics
/// For a BERT or TorchScript spec: its encoder starts from pretrained weights (`classifier::pretrained`).
pub fn init_params(spec: &ModelSpec, seed: u64) -> Bundle {
    let ModelSpec::Mlp {
        inputs,
        hidden,
        classes,
        ..
    } = spec
    else {
        panic!("a BERT classifier or TorchScript module starts from its file's weights, not from a seed");
    };
    let mut rng = SplitMix64::new(seed);
    let mut sizes = vec![*inputs as usize];
    sizes.extend(hidden.iter().map(|&h| h as usize));
    sizes.push(*classes as usize);
    let mut tensors = Vec::new();
    for (i, w) in sizes.windows(2).enumerate() {
        let (fan_in, fan_out) = (w[0], w[1]);
        let mut uniform = |n: usize| linear_init(&mut rng, n, fan_in);
        tensors.push(HostTensor {
            name: format!("l{i}.weight"),
            shape: vec![fan_out, fan_in],
            data: uniform(fan_out * fan_in),
        });
        tensors.push(HostTensor {
            name: format!("l{i}.bias"),
            shape: vec![fan_out],
            data: uniform(fan_out),
        });
    }
    Bundle { tensors }
}

/// Builds a model of `spec` from parameters.
///
/// # Errors
/// When the parameters do not fit the spec.
pub fn build(spec: &ModelSpec, params: &Bundle, device: Device) -> Result<Box<dyn Model>, ModelError> {
    let expected = layout(spec)?;
    if expected != shapes(params) {
        return Err(ModelError::Layout(format!(
            "parameters do not match the model spec: {}",
            first_difference(&expected, &shapes(params))
        )));
    }
    match spec {
        ModelSpec::Mlp { dropout, .. } => Ok(Box::new(
            Mlp::from_bundle(params, device)?.with_dropout(f64::from(*dropout)),
        )),
        ModelSpec::Bert { config, cls, .. } => {
            let pooling = if *cls { Pooling::Cls } else { Pooling::Mean };
            Ok(Box::new(BertClassifier::from_bundle(config, pooling, params, device)?))
        }
        ModelSpec::TorchScript { .. } => Ok(Box::new(crate::torchscript::from_spec(spec, params, device)?)),
    }
}

/// Whether a model of `spec` draws dropout masks in train mode.
pub fn has_dropout(spec: &ModelSpec) -> bool {
    match spec {
        ModelSpec::Mlp { dropout, .. } => *dropout > 0.0,
        // A config that does not parse cannot be built either; say yes, the safe answer.
        ModelSpec::Bert { config, .. } => crate::bert::BertConfig::parse(config, std::path::Path::new("config.json"))
            .map_or(true, |c| {
                c.hidden_dropout_prob > 0.0 || c.attention_probs_dropout_prob > 0.0
            }),
        // What a user's module does in train mode is its own: assume it may draw masks.
        ModelSpec::TorchScript { .. } => true,
    }
}

fn shapes(b: &Bundle) -> Vec<(String, Vec<usize>)> {
    b.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect()
}

/// The first tensor where two layouts differ, or their lengths.
fn first_difference(want: &[(String, Vec<usize>)], got: &[(String, Vec<usize>)]) -> String {
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        if w != g {
            return format!("tensor {i} should be {} {:?}, got {} {:?}", w.0, w.1, g.0, g.1);
        }
    }
    format!("{} tensors expected, got {}", want.len(), got.len())
}

/// A host tensor as a libtorch tensor on `device`.
pub fn host_to_tensor(t: &HostTensor, device: Device) -> Tensor {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    Tensor::from_slice(&t.data).reshape(&shape).to_device(device)
}

/// Copies a model's parameters out to host memory.
///
/// # Errors
/// When libtorch cannot read a tensor back.
pub fn to_bundle(model: &dyn Model) -> Result<Bundle, ModelError> {
    let mut tensors = Vec::new();
    for (p, name) in model.parameters().iter().zip(model.names()) {
        let flat = p
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous()
            .view(-1);
        let data = Vec::<f32>::try_from(&flat)?;
        let shape = p.size().iter().map(|&d| d as usize).collect();
        tensors.push(HostTensor {
            name: name.clone(),
            shape,
            data,
        });
    }
    Ok(Bundle { tensors })
}

/// Overwrites a model's parameters with `bundle` (same layout).
///
/// # Errors
/// `Layout` when names or shapes differ.
pub fn load_bundle(model: &dyn Model, bundle: &Bundle) -> Result<(), ModelError> {
    let names = model.names();
    if names.len() != bundle.tensors.len() {
        return Err(ModelError::Layout(format!(
            "model has {} tensors, bundle {}",
            names.len(),
            bundle.tensors.len()
        )));
    }
    tch::no_grad(|| {
        for ((p, name), t) in model.parameters().iter().zip(names).zip(&bundle.tensors) {
            let shape: Vec<usize> = p.size().iter().map(|&d| d as usize).collect();
            if *name != t.name || shape != t.shape {
                return Err(ModelError::Layout(format!(
                    "tensor {name} {shape:?} vs {} {:?}",
                    t.name, t.shape
                )));
            }
            let mut p = p.shallow_clone();
            p.f_copy_(&host_to_tensor(t, p.device()))?;
        }
        Ok(())
    })
}

/// Features and labels as libtorch tensors, for training or evaluation.
pub fn batch_tensors(x: &[f32], y: &[i64], features: usize, device: Device) -> (Inputs, Tensor) {
    let n = y.len() as i64;
    (
        Inputs::Dense(Tensor::from_slice(x).reshape([n, features as i64]).to_device(device)),
        Tensor::from_slice(y).to_device(device),
    )
}

/// Mean cross-entropy and accuracy of a model on a whole dataset.
///
/// # Errors
/// When libtorch fails.
pub fn evaluate(
    model: &dyn Model,
    ds: &metaloop_proto::dataset::Dataset,
    device: Device,
) -> Result<(f64, f64), ModelError> {
    tch::no_grad(|| {
        let (x, y) = batch_tensors(&ds.x, &ds.y, ds.features, device);
        let logits = model.forward(&x);
        let loss = logits.cross_entropy_for_logits(&y).f_double_value(&[])?;
        let correct = logits
            .f_argmax(-1, false)?
            .f_eq_tensor(&y)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])?;
        Ok((loss, correct as f64 / ds.len() as f64))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        ModelSpec::Mlp {
            inputs: 3,
            hidden: vec![4],
            classes: 2,
            dropout: 0.0,
        }
    }

    #[test]
    fn init_is_deterministic_and_bounded() {
        let a = init_params(&spec(), 1);
        assert_eq!(a, init_params(&spec(), 1));
        assert_ne!(a, init_params(&spec(), 2));
        let shapes: Vec<_> = a.tensors.iter().map(|t| t.shape.clone()).collect();
        assert_eq!(shapes, vec![vec![4, 3], vec![4], vec![2, 4], vec![2]]);
        let bound = 1.0 / 3f32.sqrt();
        assert!(a.tensors[0].data.iter().all(|v| v.abs() <= bound));
    }

    #[test]
    fn forward_matches_a_hand_computed_mlp() {
        let params = init_params(&spec(), 5);
        let model = build(&spec(), &params, Device::Cpu).expect("build");
        let x = [0.5f32, -1.0, 2.0];
        let t = &params.tensors;
        let hidden: Vec<f32> = (0..4)
            .map(|o| (t[1].data[o] + (0..3).map(|i| t[0].data[o * 3 + i] * x[i]).sum::<f32>()).max(0.0))
            .collect();
        let expect: Vec<f32> = (0..2)
            .map(|o| t[3].data[o] + (0..4).map(|i| t[2].data[o * 4 + i] * hidden[i]).sum::<f32>())
            .collect();
        let out = model.forward(&Inputs::Dense(Tensor::from_slice(&x).reshape([1, 3])));
        let got = Vec::<f32>::try_from(out.view(-1)).expect("read");
        for (g, e) in got.iter().zip(&expect) {
            assert!((g - e).abs() < 1e-5, "{got:?} vs {expect:?}");
        }
        assert_eq!(to_bundle(model.as_ref()).expect("bundle"), params);
    }

    #[test]
    fn load_bundle_replaces_parameters_and_checks_layout() {
        let model = build(&spec(), &init_params(&spec(), 1), Device::Cpu).expect("build");
        let other = init_params(&spec(), 2);
        load_bundle(model.as_ref(), &other).expect("load");
        assert_eq!(to_bundle(model.as_ref()).expect("bundle"), other);
        let wrong = init_params(
            &ModelSpec::Mlp {
                inputs: 3,
                hidden: vec![5],
                classes: 2,
                dropout: 0.0,
            },
            1,
        );
        assert!(load_bundle(model.as_ref(), &wrong).is_err());
        assert!(build(&spec(), &wrong, Device::Cpu).is_err());
    }
}
