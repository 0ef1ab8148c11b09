//! A BERT encoder (Hugging Face `BertModel` layout: all-MiniLM-L6-v2 and the like) written with
//! plain eager tch ops, so that every operation has a double backward: the bi-level strategies
//! need exact second-order gradients through the whole encoder. Self-attention is spelled out
//! (matmul, additive mask, softmax, dropout) instead of libtorch's fused
//! `scaled_dot_product_attention`, which has no double backward on CPU; LayerNorm, the exact
//! (erf) GELU, softmax, embedding lookup and dropout are libtorch ops with double-backward
//! formulas. Checked against transformers in f64 (values, gradients) and against central
//! differences of the gradient (Hessian-vector products) in `common/tests/bert.rs`.
//!
//! [`Bert::load`] reads a model directory (`config.json`, `model.safetensors`); the parameters
//! are leaf tensors requiring grad, listed by name in [`Bert::named_parameters`] (sorted by name,
//! the order in which they are shipped), and [`Bert::from_tensors`] builds the same model from
//! such a list.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The architecture hyper-parameters read from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    pub type_vocab_size: i64,
    pub layer_norm_eps: f64,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
}

/// A problem with one tensor of a weights file, naming the tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorProblem {
    Missing {
        name: String,
        expected: Vec<i64>,
    },
    Unexpected {
        name: String,
        shape: Vec<i64>,
    },
    Shape {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    Dtype {
        name: String,
        dtype: String,
    },
    Duplicate {
        name: String,
    },
}

impl fmt::Display for TensorProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TensorProblem::Missing { name, expected } => {
                write!(f, "missing tensor `{name}` (expected shape {expected:?})")
            }
            TensorProblem::Unexpected { name, shape } => {
                write!(
                    f,
                    "unexpected tensor `{name}` (shape {shape:?}) is not a BERT parameter"
                )
            }
            TensorProblem::Shape { name, expected, found } => {
                write!(f, "tensor `{name}` has shape {found:?}, expected {expected:?}")
            }
            TensorProblem::Dtype { name, dtype } => {
                write!(f, "tensor `{name}` has dtype {dtype}, expected F32, F16, BF16 or F64")
            }
            TensorProblem::Duplicate { name } => {
                write!(f, "tensor `{name}` appears twice (with and without the `bert.` prefix)")
            }
        }
    }
}

fn list(problems: &[TensorProblem]) -> String {
    problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

#[derive(Debug, thiserror::Error)]
pub enum BertError {
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {msg}", .path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{}: not a safetensors file: {msg}", .path.display())]
    Format { path: PathBuf, msg: String },
    #[error("{}: {}", .path.display(), list(.problems))]
    Tensors {
        path: PathBuf,
        problems: Vec<TensorProblem>,
    },
    #[error("unsupported parameter kind {0:?}: a BERT is held in Float, Double, Half or BFloat16")]
    Kind(Kind),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl BertConfig {
    /// Parses a Hugging Face `config.json`; `path` only names the file in errors.
    ///
    /// # Errors
    /// Invalid JSON, a `model_type` other than `bert` (or, without one, no `Bert*` architecture),
    /// a missing or mistyped size, `hidden_act` other than `gelu`, a `position_embedding_type`
    /// other than `absolute`, a decoder or cross-attention configuration, sizes that do not fit.
    pub fn parse(text: &str, path: &Path) -> Result<Self, BertError> {
        let err = |msg: String| BertError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let v: Value = serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| err("config.json is not a JSON object".into()))?;
        match obj.get("model_type") {
            Some(Value::String(t)) if t == "bert" => {}
            Some(other) => {
                return Err(err(format!(
                    "model_type {other} is not supported: only \"bert\" (BertModel) is implemented"
                )))
            }
            None => {
                let archs = obj.get("architectures").and_then(Value::as_array);
                let bert = archs.is_some_and(|a| a.iter().any(|x| x.as_str().is_some_and(|s| s.starts_with("Bert"))));
                if !bert {
                    return Err(err(format!(
                        "no model_type and no Bert* architecture ({}): not a BERT config",
                        obj.get("architectures").map_or("none".to_string(), Value::to_string)
                    )));
                }
            }
        }
        let int = |key: &str| -> Result<i64, BertError> {
            match obj.get(key) {
                None => Err(err(format!("missing key `{key}`"))),
                Some(x) => match x.as_i64() {
                    Some(n) if n > 0 => Ok(n),
                    _ => Err(err(format!("`{key}` must be a positive integer, got {x}"))),
                },
            }
        };
        let int_or = |key: &str, default: i64| if obj.contains_key(key) { int(key) } else { Ok(default) };
        let float_or = |key: &str, default: f64| -> Result<f64, BertError> {
            match obj.get(key) {
                None => Ok(default),
                Some(x) => x
                    .as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .ok_or_else(|| err(format!("`{key}` must be a non-negative number, got {x}"))),
            }
        };
        let string_or = |key: &str, default: &str| -> Result<String, BertError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(x) => Err(err(format!("`{key}` must be a string, got {x}"))),
            }
        };
        let act = string_or("hidden_act", "gelu")?;
        if act != "gelu" {
            return Err(err(format!(
                "hidden_act \"{act}\" is not supported: only \"gelu\" (the exact erf form) is implemented"
            )));
        }
        let pos = string_or("position_embedding_type", "absolute")?;
        if pos != "absolute" {
            return Err(err(format!(
                "position_embedding_type \"{pos}\" is not supported: only \"absolute\" is implemented"
            )));
        }
        for key in ["is_decoder", "add_cross_attention"] {
            if obj.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(err(format!("`{key}: true` is not supported: this is an encoder only")));
            }
        }
        let config = BertConfig {
            vocab_size: int("vocab_size")?,
            hidden_size: int("hidden_size")?,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads: int("num_attention_heads")?,
            intermediate_size: int("intermediate_size")?,
            max_position_embeddings: int("max_position_embeddings")?,
            type_vocab_size: int_or("type_vocab_size", 2)?,
            layer_norm_eps: float_or("layer_norm_eps", 1e-12)?,
            hidden_dropout_prob: float_or("hidden_dropout_prob", 0.1)?,
            attention_probs_dropout_prob: float_or("attention_probs_dropout_prob", 0.1)?,
        };
        if config.hidden_size % config.num_attention_heads != 0 {
            return Err(err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        for (key, p) in [
            ("hidden_dropout_prob", config.hidden_dropout_prob),
            ("attention_probs_dropout_prob", config.attention_probs_dropout_prob),
        ] {
            if p >= 1.0 {
                return Err(err(format!("`{key}` must be below 1, got {p}")));
            }
        }
        Ok(config)
    }

    /// Reads and parses `path`.
    ///
    /// # Errors
    /// As [`BertConfig::parse`], or when the file cannot be read.
    pub fn load(path: &Path) -> Result<Self, BertError> {
        let text = std::fs::read_to_string(path).map_err(|source| BertError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Every parameter's name and shape, sorted by name; the pooler's two only with `pooler`.
    pub fn parameter_shapes(&self, pooler: bool) -> Vec<(String, Vec<i64>)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let mut out = vec![
            (
                "embeddings.word_embeddings.weight".to_string(),
                vec![self.vocab_size, h],
            ),
            (
                "embeddings.position_embeddings.weight".to_string(),
                vec![self.max_position_embeddings, h],
            ),
            (
                "embeddings.token_type_embeddings.weight".to_string(),
                vec![self.type_vocab_size, h],
            ),
            ("embeddings.LayerNorm.weight".to_string(), vec![h]),
            ("embeddings.LayerNorm.bias".to_string(), vec![h]),
        ];
        for l in 0..self.num_hidden_layers {
            let p = format!("encoder.layer.{l}.");
            for (suffix, shape) in [
                ("attention.self.query.weight", vec![h, h]),
                ("attention.self.query.bias", vec![h]),
                ("attention.self.key.weight", vec![h, h]),
                ("attention.self.key.bias", vec![h]),
                ("attention.self.value.weight", vec![h, h]),
                ("attention.self.value.bias", vec![h]),
                ("attention.output.dense.weight", vec![h, h]),
                ("attention.output.dense.bias", vec![h]),
                ("attention.output.LayerNorm.weight", vec![h]),
                ("attention.output.LayerNorm.bias", vec![h]),
                ("intermediate.dense.weight", vec![i, h]),
                ("intermediate.dense.bias", vec![i]),
                ("output.dense.weight", vec![h, i]),
                ("output.dense.bias", vec![h]),
                ("output.LayerNorm.weight", vec![h]),
                ("output.LayerNorm.bias", vec![h]),
            ] {
                out.push((format!("{p}{suffix}"), shape));
            }
        }
        if pooler {
            out.push(("pooler.dense.weight".to_string(), vec![h, h]));
            out.push(("pooler.dense.bias".to_string(), vec![h]));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Buffers `BertModel` may save next to its parameters (older transformers did); not
/// parameters, so they are accepted and ignored.
const BUFFERS: [&str; 2] = ["embeddings.position_ids", "embeddings.token_type_ids"];
const POOLER: [&str; 2] = ["pooler.dense.weight", "pooler.dense.bias"];

#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.matmul(&self.weight.tr()) + &self.bias
    }
}

#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

#[derive(Debug)]
struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// The BERT encoder; see the module documentation.
#[derive(Debug)]
pub struct Bert {
    config: BertConfig,
    kind: Kind,
    params: Vec<(String, Tensor)>,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
}

fn float_kind(kind: Kind) -> Result<Kind, BertError> {
    match kind {
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16 => Ok(kind),
        other => Err(BertError::Kind(other)),
    }
}

fn tch_kind(dtype: safetensors::Dtype) -> Option<Kind> {
    match dtype {
        safetensors::Dtype::F32 => Some(Kind::Float),
        safetensors::Dtype::F64 => Some(Kind::Double),
        safetensors::Dtype::F16 => Some(Kind::Half),
        safetensors::Dtype::BF16 => Some(Kind::BFloat16),
        _ => None,
    }
}

impl Bert {
    /// Loads `dir/config.json` and `dir/model.safetensors` onto `device` as `kind` (F32, F16,
    /// BF16 and F64 tensors are converted). Names may carry a `bert.` prefix (as in
    /// `BertFor*` checkpoints); the buffers `embeddings.position_ids` and
    /// `embeddings.token_type_ids` are ignored; the pooler is optional (both of its tensors, or
    /// neither).
    ///
    /// # Errors
    /// A bad config (see [`BertConfig::parse`]), an unreadable or malformed file, and, all in one
    /// error, every missing, unexpected, duplicated, misshapen or non-float tensor, each named.
    pub fn load(dir: impl AsRef<Path>, device: Device, kind: Kind) -> Result<Self, BertError> {
        let dir = dir.as_ref();
        let kind = float_kind(kind)?;
        let config = BertConfig::load(&dir.join("config.json"))?;
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).map_err(|source| BertError::Io {
            path: path.clone(),
            source,
        })?;
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| BertError::Format {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let mut problems = Vec::new();
        let mut tensors = Vec::new();
        let mut names = file.names();
        names.sort();
        for name in names {
            let view = file.tensor(name).map_err(|e| BertError::Format {
                path: path.clone(),
                msg: e.to_string(),
            })?;
            let bare = name.strip_prefix("bert.").unwrap_or(name);
            if BUFFERS.contains(&bare) {
                continue;
            }
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let Some(stored) = tch_kind(view.dtype()) else {
                problems.push(TensorProblem::Dtype {
                    name: name.to_string(),
                    dtype: format!("{:?}", view.dtype()),
                });
                continue;
            };
            let t = Tensor::f_from_data_size(view.data(), &shape, stored)?;
            tensors.push((name.to_string(), t));
        }
        Self::build(config, tensors, device, kind, problems, Leaves::Copy).map_err(|e| match e {
            BuildError::Tensors(problems) => BertError::Tensors { path, problems },
            BuildError::Other(e) => e,
        })
    }

    /// Builds the model from named tensors (any float kind, any device; copied to `device` as
    /// `kind`), for parameters received by name. The same name rules as [`Bert::load`].
    ///
    /// # Errors
    /// Every missing, unexpected, duplicated or misshapen tensor, each named, in one error whose
    /// path is empty; an unsupported `kind`.
    pub fn from_tensors(
        config: BertConfig,
        tensors: Vec<(String, Tensor)>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, BertError> {
        Self::from_named(config, tensors, device, kind, Leaves::Copy)
    }

    /// [`Bert::from_tensors`] for tensors the caller made for this model alone (fresh leaves of
    /// `kind` on `device`, used nowhere else): taken as they are, not copied.
    pub(crate) fn from_own_tensors(
        config: BertConfig,
        tensors: Vec<(String, Tensor)>,
        device: Device,
        kind: Kind,
    ) -> Result<Self, BertError> {
        Self::from_named(config, tensors, device, kind, Leaves::Take)
    }

    fn from_named(
        config: BertConfig,
        tensors: Vec<(String, Tensor)>,
        device: Device,
        kind: Kind,
        leaves: Leaves,
    ) -> Result<Self, BertError> {
        let kind = float_kind(kind)?;
        let tensors = tensors
            .into_iter()
            .filter(|(n, _)| !BUFFERS.contains(&n.strip_prefix("bert.").unwrap_or(n)))
            .collect();
        Self::build(config, tensors, device, kind, Vec::new(), leaves).map_err(|e| match e {
            BuildError::Tensors(problems) => BertError::Tensors {
                path: PathBuf::new(),
                problems,
            },
            BuildError::Other(e) => e,
        })
    }

    fn build(
        config: BertConfig,
        tensors: Vec<(String, Tensor)>,
        device: Device,
        kind: Kind,
        mut problems: Vec<TensorProblem>,
        leaves: Leaves,
    ) -> Result<Self, BuildError> {
        let mut by_name: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for (name, t) in tensors {
            let bare = name.strip_prefix("bert.").unwrap_or(&name).to_string();
            if !seen.insert(bare.clone()) {
                problems.push(TensorProblem::Duplicate { name: bare });
                continue;
            }
            by_name.insert(bare, t);
        }
        let pooler = POOLER.iter().any(|n| by_name.contains_key(*n));
        let expected = config.parameter_shapes(pooler);
        let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        for (name, t) in &by_name {
            if !expected_names.contains(name.as_str()) {
                problems.push(TensorProblem::Unexpected {
                    name: name.clone(),
                    shape: t.size(),
                });
            }
        }
        let mut params = Vec::with_capacity(expected.len());
        for (name, shape) in &expected {
            match by_name.remove(name) {
                None => problems.push(TensorProblem::Missing {
                    name: name.clone(),
                    expected: shape.clone(),
                }),
                Some(t) if t.size() != *shape => problems.push(TensorProblem::Shape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: t.size(),
                }),
                Some(t) if !t.is_floating_point() => problems.push(TensorProblem::Dtype {
                    name: name.clone(),
                    dtype: format!("{:?}", t.kind()),
                }),
                Some(t) => {
                    let t = t
                        .f_to_device(device)
                        .and_then(|t| t.f_to_kind(kind))
                        .and_then(|t| t.f_detach())
                        .and_then(|t| t.f_contiguous())
                        .map_err(|e| BuildError::Other(e.into()))?;
                    // A fresh leaf, whatever the caller's tensor was (a view, or part of a graph),
                    // unless the caller made it for this model.
                    let t = match leaves {
                        Leaves::Copy => t.copy(),
                        Leaves::Take => t,
                    }
                    .set_requires_grad(true);
                    params.push((name.clone(), t));
                }
            }
        }
        if !problems.is_empty() {
            return Err(BuildError::Tensors(problems));
        }
        let get = |name: &str| -> Tensor {
            // Present: every expected name was checked above.
            let i = params
                .binary_search_by(|(n, _)| n.as_str().cmp(name))
                .unwrap_or_else(|_| unreachable!("parameter {name} was checked to be present"));
            params[i].1.shallow_clone()
        };
        let linear = |prefix: &str| Linear {
            weight: get(&format!("{prefix}.weight")),
            bias: get(&format!("{prefix}.bias")),
        };
        let norm = |prefix: &str| LayerNorm {
            weight: get(&format!("{prefix}.weight")),
            bias: get(&format!("{prefix}.bias")),
        };
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                Layer {
                    query: linear(&format!("{p}.attention.self.query")),
                    key: linear(&format!("{p}.attention.self.key")),
                    value: linear(&format!("{p}.attention.self.value")),
                    attention_output: linear(&format!("{p}.attention.output.dense")),
                    attention_norm: norm(&format!("{p}.attention.output.LayerNorm")),
                    intermediate: linear(&format!("{p}.intermediate.dense")),
                    output: linear(&format!("{p}.output.dense")),
                    output_norm: norm(&format!("{p}.output.LayerNorm")),
                }
            })
            .collect();
        let word = get("embeddings.word_embeddings.weight");
        let position = get("embeddings.position_embeddings.weight");
        let token_type = get("embeddings.token_type_embeddings.weight");
        let embedding_norm = norm("embeddings.LayerNorm");
        let pooler = pooler.then(|| linear("pooler.dense"));
        Ok(Bert {
            config,
            kind,
            params,
            word,
            position,
            token_type,
            embedding_norm,
            layers,
            pooler,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The kind the parameters are held in.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Whether the model has a pooler (`pooler.dense.*`).
    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    /// Every parameter (a leaf requiring grad) with its Hugging Face name, sorted by name.
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The parameters alone, in the order of [`Bert::named_parameters`] (shallow clones: the
    /// same tensors).
    pub fn parameters(&self) -> Vec<Tensor> {
        self.params.iter().map(|(_, t)| t.shallow_clone()).collect()
    }

    fn layer_norm(&self, x: &Tensor, norm: &LayerNorm) -> Tensor {
        x.layer_norm(
            [self.config.hidden_size],
            Some(&norm.weight),
            Some(&norm.bias),
            self.config.layer_norm_eps,
            false,
        )
    }

    /// The last hidden state `[batch, seq, hidden]` for token ids `[batch, seq]` (i64), an
    /// attention mask `[batch, seq]` (1 = token, 0 = padding; any numeric kind) and token type
    /// ids `[batch, seq]` (i64). Dropout (hidden and attention probabilities, at the config's
    /// rates) only when `train`.
    ///
    /// # Panics
    /// When `seq` exceeds `max_position_embeddings`, an id is out of range, or the shapes
    /// disagree (libtorch's errors).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor, token_type_ids: &Tensor, train: bool) -> Tensor {
        let (batch, seq) = input_ids
            .size2()
            .unwrap_or_else(|e| panic!("input_ids must be [batch, seq]: {e}"));
        assert!(
            seq <= self.config.max_position_embeddings,
            "sequence length {seq} exceeds max_position_embeddings {}",
            self.config.max_position_embeddings
        );
        let c = &self.config;
        let device = self.word.device();
        let positions = Tensor::arange(seq, (Kind::Int64, device));
        let embedded = Tensor::embedding(&self.word, input_ids, -1, false, false)
            + Tensor::embedding(&self.position, &positions, -1, false, false).unsqueeze(0)
            + Tensor::embedding(&self.token_type, token_type_ids, -1, false, false);
        let mut h = self
            .layer_norm(&embedded, &self.embedding_norm)
            .dropout(c.hidden_dropout_prob, train);

        // Additive mask [batch, 1, 1, seq]: 0 where attended, the kind's lowest value where not,
        // as transformers' eager attention; the softmax gives padding exactly zero weight.
        let lowest = match self.kind {
            Kind::Double => f64::MIN,
            Kind::Half => -65504.0,
            Kind::BFloat16 => -3.3895313892515355e38,
            _ => f64::from(f32::MIN),
        };
        let keep = attention_mask
            .to_device(device)
            .to_kind(self.kind)
            .view([batch, 1, 1, seq]);
        let additive = (keep.ones_like() - keep) * lowest;

        let heads = c.num_attention_heads;
        let head = c.hidden_size / heads;
        let scale = 1.0 / (head as f64).sqrt();
        let split = |x: Tensor| x.view([batch, seq, heads, head]).transpose(1, 2);
        for layer in &self.layers {
            let q = split(layer.query.forward(&h));
            let k = split(layer.key.forward(&h));
            let v = split(layer.value.forward(&h));
            let scores = q.matmul(&k.transpose(-1, -2)) * scale + &additive;
            let probs = scores
                .softmax(-1, None::<Kind>)
                .dropout(c.attention_probs_dropout_prob, train);
            let context = probs
                .matmul(&v)
                .transpose(1, 2)
                .contiguous()
                .view([batch, seq, c.hidden_size]);
            let attended = layer
                .attention_output
                .forward(&context)
                .dropout(c.hidden_dropout_prob, train)
                + &h;
            let attended = self.layer_norm(&attended, &layer.attention_norm);
            let inner = layer.intermediate.forward(&attended).gelu("none");
            let out = layer.output.forward(&inner).dropout(c.hidden_dropout_prob, train) + &attended;
            h = self.layer_norm(&out, &layer.output_norm);
        }
        h
    }

    /// The pooler output `[batch, hidden]`: tanh of a dense layer on each sequence's first
    /// (`[CLS]`) hidden state; `None` without a pooler.
    pub fn pool(&self, hidden: &Tensor) -> Option<Tensor> {
        self.pooler.as_ref().map(|p| p.forward(&hidden.select(1, 0)).tanh())
    }
}

/// Whether the encoder copies the tensors it is given or takes them as its parameters.
#[derive(Debug, Clone, Copy)]
enum Leaves {
    Copy,
    Take,
}

#[derive(Debug)]
enum BuildError {
    Tensors(Vec<TensorProblem>),
    Other(BertError),
}

/// The mask-weighted mean over the sequence `[batch, hidden]` of `hidden` `[batch, seq, hidden]`
/// (sentence-transformers' mean pooling; a sequence without tokens gives zeros).
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Tensor {
    let m = attention_mask
        .to_device(hidden.device())
        .to_kind(hidden.kind())
        .unsqueeze(-1);
    (hidden * &m).sum_dim_intlist(1, false, None::<Kind>) / m.sum_dim_intlist(1, false, None::<Kind>).clamp_min(1e-9)
}
