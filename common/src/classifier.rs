//! A sequence classifier on a BERT-family encoder, as a [`Model`]: the encoder's last hidden
//! state pooled (the `[CLS]` token's state, or the mask-weighted mean that sentence-transformers
//! checkpoints were trained with) and a linear head to the task's classes. The head is made in
//! pure Rust from a seed, like the MLP's parameters, so every machine starts from the same bits;
//! the encoder's parameters keep their Hugging Face names, the head's are `head.weight` and
//! `head.bias`. A job's model of `[model] kind = "bert"`: the coordinator starts it from the
//! pretrained files ([`pretrained`]); a worker builds it from the parameters it is sent and the
//! architecture in the spec ([`BertClassifier::from_bundle`]), so it needs no weights file.

use crate::bert::{mean_pool, Bert, BertConfig, BertError};
use crate::model::{host_to_tensor, linear_init, to_bundle, Inputs, Model, ModelError};
use metaloop_proto::proto::ModelSpec;
use metaloop_proto::rng::SplitMix64;
use metaloop_proto::tensor::Bundle;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

/// The names of the head's parameters, after the encoder's.
const HEAD: [&str; 2] = ["head.weight", "head.bias"];

/// The job's model spec and initial parameters for the pretrained encoder in `dir` (its
/// `config.json` and `model.safetensors`) with a head to `classes` classes seeded by `seed`.
///
/// # Errors
/// The encoder's load errors (a bad config, a missing, extra or misshapen tensor, each named).
pub fn pretrained(dir: &Path, pooling: Pooling, classes: u32, seed: u64) -> Result<(ModelSpec, Bundle), ModelError> {
    let config_path = dir.join("config.json");
    let config = std::fs::read_to_string(&config_path).map_err(|e| {
        bert_error(BertError::Io {
            path: config_path,
            source: e,
        })
    })?;
    let bert = Bert::load(dir, Device::Cpu, Kind::Float).map_err(bert_error)?;
    let pooler = pooling == Pooling::Cls && bert.has_pooler();
    let model = BertClassifier::new(bert, pooling, classes as usize, seed);
    let spec = ModelSpec::Bert {
        config,
        cls: pooling == Pooling::Cls,
        pooler,
        classes,
    };
    Ok((spec, to_bundle(&model)?))
}

/// Every parameter's name and shape, in the classifier's order, for a [`ModelSpec::Bert`].
///
/// # Errors
/// A config the encoder does not support.
pub fn layout(config: &str, pooler: bool, classes: u32) -> Result<Vec<(String, Vec<usize>)>, ModelError> {
    let c = BertConfig::parse(config, Path::new("config.json")).map_err(bert_error)?;
    let hidden = c.hidden_size as usize;
    let mut out: Vec<(String, Vec<usize>)> = c
        .parameter_shapes(pooler)
        .into_iter()
        .map(|(n, s)| (n, s.into_iter().map(|d| d as usize).collect()))
        .collect();
    out.push((HEAD[0].into(), vec![classes as usize, hidden]));
    out.push((HEAD[1].into(), vec![classes as usize]));
    Ok(out)
}

fn bert_error(e: BertError) -> ModelError {
    ModelError::Layout(e.to_string())
}

/// How a sequence's hidden states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The first (`[CLS]`) token's last hidden state, through the encoder's pooler (tanh of a
    /// dense layer) when it has one, as `BertForSequenceClassification`.
    Cls,
    /// The mean of the last hidden states over the attended tokens; the pooler, if any, is
    /// unused and is not among the classifier's parameters.
    Mean,
}

/// The encoder, its pooling and a linear head; see the module documentation.
#[derive(Debug)]
pub struct BertClassifier {
    bert: Bert,
    pooling: Pooling,
    head_weight: Tensor,
    head_bias: Tensor,
    /// The encoder's parameters then the head's, in the order of `names`.
    params: Vec<Tensor>,
    names: Vec<String>,
    train: AtomicBool,
}

impl BertClassifier {
    /// `bert` with a head to `classes` classes, initialised from `seed` as PyTorch's
    /// `nn.Linear` (uniform in ±1/√hidden), in the encoder's kind and on its device.
    pub fn new(bert: Bert, pooling: Pooling, classes: usize, seed: u64) -> Self {
        let hidden = bert.config().hidden_size as usize;
        let mut rng = SplitMix64::new(seed);
        let mut uniform = |n: usize| linear_init(&mut rng, n, hidden);
        let (kind, device) = (bert.kind(), bert.named_parameters()[0].1.device());
        let leaf = |data: Vec<f32>, shape: &[i64]| {
            Tensor::from_slice(&data)
                .reshape(shape)
                .to_kind(kind)
                .to_device(device)
                .set_requires_grad(true)
        };
        let head_weight = leaf(uniform(classes * hidden), &[classes as i64, hidden as i64]);
        let head_bias = leaf(uniform(classes), &[classes as i64]);
        Self::with_head(bert, pooling, head_weight, head_bias)
    }

    /// The classifier holding `bundle`'s parameters (encoder by name, then the head) for the
    /// architecture in `config` (`config.json`'s text), on `device` in f32.
    ///
    /// # Errors
    /// A bad config, or parameters that do not fit it (each tensor named).
    pub fn from_bundle(config: &str, pooling: Pooling, bundle: &Bundle, device: Device) -> Result<Self, ModelError> {
        let c = BertConfig::parse(config, Path::new("config.json")).map_err(bert_error)?;
        let mut encoder = Vec::with_capacity(bundle.tensors.len());
        let mut head = Vec::new();
        for t in &bundle.tensors {
            if HEAD.contains(&t.name.as_str()) {
                head.push(host_to_tensor(t, device).set_requires_grad(true));
            } else {
                encoder.push((t.name.clone(), host_to_tensor(t, device)));
            }
        }
        let [head_weight, head_bias]: [Tensor; 2] = head
            .try_into()
            .map_err(|_| ModelError::Layout("a BERT classifier's bundle needs head.weight and head.bias".into()))?;
        let bert = Bert::from_own_tensors(c, encoder, device, Kind::Float).map_err(bert_error)?;
        Ok(Self::with_head(bert, pooling, head_weight, head_bias))
    }

    fn with_head(bert: Bert, pooling: Pooling, head_weight: Tensor, head_bias: Tensor) -> Self {
        // Every parameter takes part in the forward pass, so every one has a gradient.
        let used = |name: &str| pooling == Pooling::Cls || !name.starts_with("pooler.");
        let (mut names, mut params): (Vec<String>, Vec<Tensor>) = bert
            .named_parameters()
            .iter()
            .filter(|(n, _)| used(n))
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .unzip();
        params.push(head_weight.shallow_clone());
        params.push(head_bias.shallow_clone());
        names.extend(HEAD.map(String::from));
        Self {
            bert,
            pooling,
            head_weight,
            head_bias,
            params,
            names,
            train: AtomicBool::new(false),
        }
    }

    /// The pooled sequence vectors `[n, hidden]` for token ids and their attention mask.
    pub fn pooled(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let train = self.train.load(Ordering::Relaxed);
        let hidden = self.bert.forward(ids, mask, &ids.zeros_like(), train);
        match self.pooling {
            Pooling::Cls => self.bert.pool(&hidden).unwrap_or_else(|| hidden.select(1, 0)),
            Pooling::Mean => mean_pool(&hidden, mask),
        }
    }
}

impl Model for BertClassifier {
    /// # Panics
    /// On dense features: an encoder takes token ids (the job's model and data kinds are
    /// checked together before anything runs).
    fn forward(&self, x: &Inputs) -> Tensor {
        match x {
            Inputs::Tokens { ids, mask } => self.pooled(ids, mask).matmul(&self.head_weight.tr()) + &self.head_bias,
            Inputs::Dense(_) => panic!("a BERT classifier was given dense features"),
        }
    }

    fn parameters(&self) -> &[Tensor] {
        &self.params
    }

    fn names(&self) -> &[String] {
        &self.names
    }

    fn set_train(&self, train: bool) {
        self.train.store(train, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn tiny(kind: Kind) -> Bert {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/tiny-bert");
        match Bert::load(&dir, Device::Cpu, kind) {
            Ok(b) => b,
            Err(e) => panic!("tiny BERT: {e}"),
        }
    }

    fn batch() -> Inputs {
        // Two sequences, the second padded after 3 tokens.
        let ids = Tensor::from_slice(&[2i64, 10, 11, 12, 3, 2, 20, 3, 0, 0]).reshape([2, 5]);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0]).reshape([2, 5]);
        Inputs::Tokens { ids, mask }
    }

    #[test]
    fn logits_are_the_head_on_the_pooled_state_and_padding_is_ignored() {
        for pooling in [Pooling::Cls, Pooling::Mean] {
            let c = BertClassifier::new(tiny(Kind::Double), pooling, 3, 7);
            let logits = c.forward(&batch());
            assert_eq!(logits.size(), vec![2, 3]);
            // The padded row gives the same logits as the same tokens alone.
            let alone = Inputs::Tokens {
                ids: Tensor::from_slice(&[2i64, 20, 3]).reshape([1, 3]),
                mask: Tensor::from_slice(&[1i64, 1, 1]).reshape([1, 3]),
            };
            let gap = (logits.select(0, 1) - c.forward(&alone).select(0, 0))
                .abs()
                .max()
                .double_value(&[]);
            assert!(gap < 1e-12, "{pooling:?}: padding changed the logits by {gap}");
        }
    }

    #[test]
    fn the_head_is_seeded_and_named_after_the_encoder() {
        let a = BertClassifier::new(tiny(Kind::Float), Pooling::Mean, 2, 1);
        let b = BertClassifier::new(tiny(Kind::Float), Pooling::Mean, 2, 1);
        let c = BertClassifier::new(tiny(Kind::Float), Pooling::Mean, 2, 2);
        let head = |m: &BertClassifier| Vec::<f32>::try_from(m.head_weight.view(-1)).expect("read");
        assert_eq!(head(&a), head(&b));
        assert_ne!(head(&a), head(&c));
        assert_eq!(a.names().len(), a.parameters().len());
        assert_eq!(&a.names()[a.names().len() - 2..], ["head.weight", "head.bias"]);
        assert!(a.names().iter().any(|n| n == "embeddings.word_embeddings.weight"));
    }

    #[test]
    fn second_order_gradients_flow_through_the_encoder() {
        // ⟨∇θ L, v⟩ differentiated again (a Hessian-vector product) is defined and non-zero for
        // the encoder's parameters: what exact hypergradients need.
        for pooling in [Pooling::Cls, Pooling::Mean] {
            second_order(pooling);
        }
    }

    fn second_order(pooling: Pooling) {
        let c = BertClassifier::new(tiny(Kind::Double), pooling, 2, 3);
        let y = Tensor::from_slice(&[0i64, 1]);
        let loss = c.forward(&batch()).cross_entropy_for_logits(&y);
        let g = Tensor::run_backward(&[&loss], c.parameters(), true, true);
        assert!(
            g.iter().all(Tensor::defined),
            "{pooling:?}: every parameter has a gradient"
        );
        let dot = g
            .iter()
            .map(|g| g.square().sum(Kind::Double))
            .fold(Tensor::zeros([], (Kind::Double, Device::Cpu)), |a, b| a + b);
        let h = Tensor::run_backward(&[&dot], c.parameters(), false, false);
        let i = c
            .names()
            .iter()
            .position(|n| n == "encoder.layer.0.attention.self.query.weight")
            .expect("query weight");
        assert!(h[i].abs().sum(Kind::Double).double_value(&[]) > 0.0, "{pooling:?}");
    }
}
