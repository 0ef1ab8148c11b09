//! A user's TorchScript module as a [`Model`]: `[model] kind = "torchscript"`. The module's
//! `forward` takes the batch's inputs (dense features `[n, features]`; or token ids and the
//! attention mask, both `[n, len]`) and returns logits `[n, classes]`; its parameters are
//! trained in place, by the names `named_parameters` gives them, so deltas and checkpoints use
//! those names. The coordinator reads the file ([`spec`]) and ships its bytes to the workers
//! (checked against the spec's sha256); both sides load it from memory ([`TorchScriptModel::load`]).
//!
//! First-order only: the graph executor's optimisations are switched off on every thread that
//! runs a module (upstream reports second-order gradients through optimised TorchScript graphs
//! going wrong after warm-up), and the config refuses the exact meta-gradients; the strategies'
//! finite-difference forms need only first-order gradients.

use crate::model::{to_bundle, Inputs, Model, ModelError};
use metaloop_proto::checksum::hex;
use metaloop_proto::config::{JobConfig, ModelConfig};
use metaloop_proto::proto::{ModelSpec, ModuleBytes};
use metaloop_proto::tensor::Bundle;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tch::{CModule, Device, Kind, Tensor};

/// What is wrong with a TorchScript module; `module` names it (the file on the coordinator and
/// at `validate`, the module's sha256 on a worker).
#[derive(Debug, thiserror::Error)]
pub enum TorchScriptError {
    #[error("{module}: cannot read the module file: {error}")]
    Io { module: String, error: std::io::Error },
    #[error("{module} is not a TorchScript module libtorch can load (export it with torch.jit.script or torch.jit.trace and torch.jit.save): {reason}")]
    NotTorchScript { module: String, reason: String },
    #[error("{module}: the module has no parameters to train")]
    NoParameters { module: String },
    #[error(
        "{module}: parameter `{name}` is {kind:?}; only f32 parameters can be trained (call .float() before exporting)"
    )]
    Dtype { module: String, name: String, kind: Kind },
    #[error("{module}: forward({inputs}) failed: {reason}")]
    Forward {
        module: String,
        inputs: String,
        reason: String,
    },
    #[error("{module}: forward({inputs}) returned {got}; it must return the logits, f32 [{rows}, {classes}]")]
    Output {
        module: String,
        inputs: String,
        got: String,
        rows: i64,
        classes: i64,
    },
    #[error("{module}: its parameters are not those the job's spec lists: {reason}")]
    Layout { module: String, reason: String },
}

impl From<TorchScriptError> for ModelError {
    fn from(e: TorchScriptError) -> Self {
        ModelError::Layout(e.to_string())
    }
}

/// A loaded TorchScript module and its parameters (the module's own tensors, so an in-place
/// update of one is an update of the module).
pub struct TorchScriptModel {
    module: Mutex<CModule>,
    params: Vec<Tensor>,
    names: Vec<String>,
    /// What errors call the module.
    label: String,
}

impl std::fmt::Debug for TorchScriptModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchScriptModel")
            .field("label", &self.label)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

/// Switches the graph executor's optimisations off for this thread (they are per thread in
/// libtorch): the module then runs op by op, as eager code would, with plain autograd.
fn plain_executor() {
    tch::jit::set_graph_executor_optimize(false);
}

impl TorchScriptModel {
    /// Loads a module from the bytes of its file onto `device`, in eval mode.
    ///
    /// # Errors
    /// Bytes libtorch cannot load as TorchScript, a module without parameters, a parameter
    /// that is not f32.
    pub fn load(bytes: &[u8], device: Device, source: &str) -> Result<Self, TorchScriptError> {
        plain_executor();
        let not_ts = |e: tch::TchError| TorchScriptError::NotTorchScript {
            module: source.into(),
            reason: reason(&e.to_string()),
        };
        let mut module = CModule::load_data_on_device(&mut std::io::Cursor::new(bytes), device).map_err(not_ts)?;
        module.f_set_eval().map_err(not_ts)?;
        let named = module.named_parameters().map_err(not_ts)?;
        if named.is_empty() {
            return Err(TorchScriptError::NoParameters { module: source.into() });
        }
        let mut params = Vec::with_capacity(named.len());
        let mut names = Vec::with_capacity(named.len());
        for (name, p) in named {
            if p.kind() != Kind::Float {
                return Err(TorchScriptError::Dtype {
                    module: source.into(),
                    name,
                    kind: p.kind(),
                });
            }
            params.push(p.set_requires_grad(true));
            names.push(name);
        }
        Ok(TorchScriptModel {
            module: Mutex::new(module),
            params,
            names,
            label: source.into(),
        })
    }

    /// The module's parameters as (name, shape), in its order.
    pub fn layout(&self) -> Vec<(String, Vec<usize>)> {
        self.names
            .iter()
            .zip(&self.params)
            .map(|(n, p)| (n.clone(), p.size().iter().map(|&d| d as usize).collect()))
            .collect()
    }

    /// The logits for `x`, or what went wrong (a forward that does not take these inputs or
    /// does not return a tensor).
    ///
    /// # Errors
    /// `Forward` with libtorch's reason.
    pub fn try_forward(&self, x: &Inputs) -> Result<Tensor, TorchScriptError> {
        plain_executor();
        let module = self.module.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = match x {
            Inputs::Dense(f) => module.forward_ts(&[f]),
            Inputs::Tokens { ids, mask } => module.forward_ts(&[ids, mask]),
        };
        out.map_err(|e| TorchScriptError::Forward {
            module: self.label.clone(),
            inputs: describe(x),
            reason: reason(&e.to_string()),
        })
    }

    /// Runs `forward` on `x` without gradients and checks that it returns f32 logits
    /// `[rows, classes]`: what `validate` asks of a user's module.
    ///
    /// # Errors
    /// `Forward` or `Output`, naming the module and the inputs it was given.
    pub fn check_forward(&self, x: &Inputs, classes: u32) -> Result<(), TorchScriptError> {
        let out = tch::no_grad(|| self.try_forward(x))?;
        let (rows, classes) = (x.rows(), i64::from(classes));
        if out.size() != [rows, classes] || out.kind() != Kind::Float {
            return Err(TorchScriptError::Output {
                module: self.label.clone(),
                inputs: describe(x),
                got: format!("{:?} {:?}", out.kind(), out.size()),
                rows,
                classes,
            });
        }
        Ok(())
    }
}

impl Model for TorchScriptModel {
    /// # Panics
    /// When the module's forward fails: `validate` and the coordinator's start ran it on the
    /// job's inputs, so this is a module that fails on some inputs only.
    fn forward(&self, x: &Inputs) -> Tensor {
        match self.try_forward(x) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn parameters(&self) -> &[Tensor] {
        &self.params
    }

    fn names(&self) -> &[String] {
        &self.names
    }

    fn set_train(&self, train: bool) {
        let mut module = self.module.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if train {
            module.set_train();
        } else {
            module.set_eval();
        }
    }
}

/// The module file at `path`: its bytes, the job's model spec and its initial parameters (the
/// module's own values).
///
/// # Errors
/// The file cannot be read or loaded, or has no trainable f32 parameters.
pub fn spec(path: &Path, classes: u32) -> Result<(ModelSpec, Bundle, TorchScriptModel), TorchScriptError> {
    let source = path.display().to_string();
    let bytes: Arc<[u8]> = std::fs::read(path)
        .map_err(|error| TorchScriptError::Io {
            module: source.clone(),
            error,
        })?
        .into();
    let model = TorchScriptModel::load(&bytes, Device::Cpu, &source)?;
    let initial = to_bundle(&model).map_err(|e| TorchScriptError::NotTorchScript {
        module: source.clone(),
        reason: e.to_string(),
    })?;
    let spec = ModelSpec::TorchScript {
        sha256: Sha256::digest(&bytes).into(),
        size: bytes.len() as u64,
        layout: model
            .layout()
            .into_iter()
            .map(|(n, s)| (n, s.into_iter().map(|d| d as u32).collect()))
            .collect(),
        classes,
        module: ModuleBytes(Some(bytes)),
    };
    Ok((spec, initial, model))
}

/// The model of a [`ModelSpec::TorchScript`] holding `params`, on `device`.
///
/// # Errors
/// The module's bytes have not been received, or its parameters are not the spec's.
pub fn from_spec(spec: &ModelSpec, params: &Bundle, device: Device) -> Result<TorchScriptModel, ModelError> {
    let ModelSpec::TorchScript { sha256, module, .. } = spec else {
        return Err(ModelError::Layout("not a TorchScript spec".into()));
    };
    let source = format!("TorchScript module {}", &hex(sha256)[..12]);
    let Some(bytes) = &module.0 else {
        return Err(ModelError::Layout(format!("{source} has not been received")));
    };
    let model = TorchScriptModel::load(bytes, device, &source)?;
    let want = crate::model::layout(spec)?;
    if model.layout() != want {
        return Err(TorchScriptError::Layout {
            module: source,
            reason: format!("the module has {:?}, the spec {want:?}", model.layout()),
        }
        .into());
    }
    crate::model::load_bundle(&model, params)?;
    Ok(model)
}

/// Every problem of a TorchScript job's module, for `validate` and before any job starts: the
/// file loads as TorchScript, has f32 parameters, and its `forward` takes a few rows of the
/// job's test set (features, or token ids and mask) and returns their logits; empty for another
/// model kind.
pub fn check_job(cfg: &JobConfig) -> Vec<String> {
    let ModelConfig::TorchScript { path, .. } = &cfg.model else {
        return Vec::new();
    };
    if !path.is_file() {
        // The config's own checks report a missing file.
        return Vec::new();
    }
    let (_, _, model) = match spec(path, cfg.data.classes) {
        Ok(s) => s,
        Err(e) => return vec![format!("model.path: {e}")],
    };
    let d = &cfg.data;
    // A test set that does not load is the config's data checks' to report.
    let text = crate::data::text_spec(cfg);
    let Ok(test) = crate::data::load_set(&d.test, None, d.classes, text.as_ref(), "the test set") else {
        return Vec::new();
    };
    let rows: Vec<usize> = (0..test.len().min(4)).collect();
    match model.check_forward(&test.batch(&rows, Device::Cpu).0, d.classes) {
        Ok(()) => Vec::new(),
        Err(e) => vec![format!("model.path: {e}")],
    }
}

/// A short description of a batch's inputs, for errors.
fn describe(x: &Inputs) -> String {
    match x {
        Inputs::Dense(f) => format!("features {:?} {:?}", f.kind(), f.size()),
        Inputs::Tokens { ids, mask } => format!("ids {:?} {:?}, mask {:?}", ids.kind(), ids.size(), mask.size()),
    }
}

/// libtorch's errors carry a C++ backtrace after the message, and the TorchScript interpreter's
/// a traceback of the module's code before its last line (`RuntimeError: …`): the first line
/// and that one say what happened.
fn reason(s: &str) -> String {
    let lines: Vec<&str> = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take_while(|l| !l.starts_with("Exception raised from") && !l.starts_with("frame #"))
        .collect();
    let first = lines.first().copied().unwrap_or_default();
    match lines.iter().rev().find(|l| l.contains("Error: ")) {
        Some(err) if *err != first => format!("{first} … {err}"),
        _ => lines.iter().take(3).copied().collect::<Vec<_>>().join(" "),
    }
}
