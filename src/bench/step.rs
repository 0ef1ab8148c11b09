//! `metaloop bench step`: the worker's bi-level step against the same algorithm written as a
//! plain PyTorch loop (`scripts/bench_step.py`), on the same torch build, data, initial
//! parameters, batch size and device, in the same run.
//!
//! The unit of work is one assignment, as a worker runs it: load the round's parameters, `steps`
//! weighted SGD-with-momentum steps on the domain mixture, the delta back on the host, then the
//! outer signal the case asks for. The cases: `inner` (the weighted inner steps alone),
//! `hyper-exact` / `hyper-fd` (plus the domain-weight hypergradient signals: the meta loss, its
//! gradient and every domain's Σ⟨∇ℓ_i, ∇L_meta⟩ on a probe, by double backward or by finite
//! difference), `rescale` (Ω weighting every inner sample, plus Ω's meta-gradient through one
//! virtual step, self-taught). Before timing, both sides run one assignment in a configuration
//! whose batches are whole domains (so sampling order cannot matter) and their results must
//! agree: the comparison is between two implementations of the same function.

use anyhow::{bail, ensure, Context};
use metaloop_common::data::Data;
use metaloop_common::model;
use metaloop_proto::checksum::bundle_checksum;
use metaloop_proto::dataset::{self, Dataset};
use metaloop_proto::features::{default_features, Feature};
use metaloop_proto::proto::{
    Ask, Assignment, DirectionalMethod, HypergradientSpec, InnerSpec, JobSpec, ModelSpec, RescaleMode, RescalerPlan,
    Signal, SmallTensor, TrainOn,
};
use metaloop_proto::rng::SplitMix64;
use metaloop_proto::tensor::Bundle;
use metaloop_worker::{RoundAsks, Trainer};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct StepArgs {
    /// Models: `digits` (64→256→10, batch 64) and `large` (512→2048→2048→10, batch 256,
    /// kernel-bound).
    #[arg(long, value_delimiter = ',', default_value = "digits,large")]
    models: Vec<String>,
    /// Cases: inner, hyper-exact, hyper-fd, rescale.
    #[arg(long, value_delimiter = ',', default_value = "inner,hyper-exact,hyper-fd,rescale")]
    cases: Vec<String>,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Timed assignments per case and side (default: 40 for digits, 4 for large).
    #[arg(long)]
    assignments: Option<usize>,
    /// Timed runs per case and side, alternating between the sides; the best of each is
    /// reported (the least disturbed by whatever else the machine is doing).
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// libtorch intra-op threads on both sides (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// The Python that runs the reference; it must import torch 2.11.0. When LIBTORCH names the
    /// torch package `./dev` installed, its directory is put on PYTHONPATH.
    #[arg(long, default_value = "python3")]
    python: String,
    /// The reference script.
    #[arg(long, default_value = "scripts/bench_step.py")]
    script: PathBuf,
}

/// Inner steps per assignment (the quickstart's).
const STEPS: u32 = 5;
const DOMAINS: usize = 4;

struct Shape {
    name: &'static str,
    spec: ModelSpec,
    batch: u32,
    /// Rows per domain and in the meta set.
    rows: usize,
    meta_rows: usize,
    assignments: usize,
}

fn shape(name: &str) -> anyhow::Result<Shape> {
    let mlp = |inputs, hidden: Vec<u32>| ModelSpec::Mlp {
        inputs,
        hidden,
        classes: 10,
        dropout: 0.0,
    };
    Ok(match name {
        "digits" => Shape {
            name: "digits",
            spec: mlp(64, vec![256]),
            batch: 64,
            rows: 300,
            meta_rows: 100,
            assignments: 40,
        },
        "large" => Shape {
            name: "large",
            spec: mlp(512, vec![2048, 2048]),
            batch: 256,
            rows: 1024,
            meta_rows: 256,
            assignments: 4,
        },
        other => bail!("unknown model `{other}` (digits, large)"),
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Case {
    Inner,
    Hyper(DirectionalMethod),
    Rescale,
}

impl Case {
    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "inner" => Case::Inner,
            "hyper-exact" => Case::Hyper(DirectionalMethod::Exact),
            "hyper-fd" => Case::Hyper(DirectionalMethod::FiniteDifference),
            "rescale" => Case::Rescale,
            other => bail!("unknown case `{other}` (inner, hyper-exact, hyper-fd, rescale)"),
        })
    }

    fn label(self) -> &'static str {
        match self {
            Case::Inner => "(a) weighted inner step",
            Case::Hyper(DirectionalMethod::Exact) => "(b) hypergradient, exact",
            Case::Hyper(DirectionalMethod::FiniteDifference) => "(b) hypergradient, finite difference",
            Case::Rescale => "(c) loss-rescaling meta step",
        }
    }
}

pub fn run(args: &StepArgs) -> anyhow::Result<()> {
    // OpenMP threads that spin-wait between parallel regions turn any other load on the machine
    // into stalls of tens of milliseconds, on both sides alike. Both sides wait passively
    // instead; it must be set before libtorch starts, so this process runs again with it.
    if std::env::var_os("OMP_WAIT_POLICY").is_none() {
        let status = std::process::Command::new(std::env::current_exe()?)
            .args(std::env::args_os().skip(1))
            .env("OMP_WAIT_POLICY", "PASSIVE")
            .status()?;
        ensure!(status.success(), "the benchmark failed ({status})");
        return Ok(());
    }
    let device = parse_device(&args.device)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get));
    tch::set_num_threads(threads as i32);
    ensure!(
        args.script.is_file(),
        "the reference script {} is missing (run from the repository root, or pass --script)",
        args.script.display()
    );
    let cases = args
        .cases
        .iter()
        .map(|c| Case::parse(c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut torch_version = String::from("?");
    println!(
        "Device {}, {threads} threads on both sides (OMP_WAIT_POLICY={}), {}; an assignment = {STEPS} inner steps + its outer signal; best of {} alternating trials.",
        args.device,
        std::env::var("OMP_WAIT_POLICY").unwrap_or_default(),
        super::machine(),
        args.trials.max(1)
    );
    println!();
    println!("| model | case | metaloop steps/s | PyTorch steps/s | metaloop / PyTorch | check (max rel. diff) |");
    println!("|---|---|---|---|---|---|");
    for name in &args.models {
        let shape = shape(name)?;
        for &case in &cases {
            let dir = super::scratch_dir("step")?;
            // The check: whole-domain batches, so both sides compute the same numbers.
            let check = Setup::new(&shape, case, true);
            let ours = check.rust_check(device)?;
            let theirs = check.python(&dir.join("check"), args, device, threads, 0)?;
            torch_version = theirs["torch"].as_str().unwrap_or("?").to_string();
            let diff = compare(&ours, &theirs["check"])?;
            // The timed runs.
            let timed = Setup::new(&shape, case, false);
            let n = args.assignments.unwrap_or(shape.assignments).max(1);
            let (mut rust_seconds, mut py_seconds) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..args.trials.max(1) {
                rust_seconds = rust_seconds.min(timed.rust_timed(device, n)?);
                let py = timed.python(&dir.join("timed"), args, device, threads, n)?;
                py_seconds = py_seconds.min(py["seconds"].as_f64().context("the reference printed no seconds")?);
            }
            // Steps per second: inner steps for (a), whole bi-level steps (one assignment) for
            // the others.
            let per = if case == Case::Inner { f64::from(STEPS) } else { 1.0 };
            let (ours_rate, theirs_rate) = (per * n as f64 / rust_seconds, per * n as f64 / py_seconds);
            println!(
                "| {} | {} | {} | {} | {:.2} | {:.1e} |",
                shape.name,
                case.label(),
                rate(ours_rate),
                rate(theirs_rate),
                ours_rate / theirs_rate,
                diff
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    println!();
    println!("PyTorch side: torch {torch_version} in {}.", args.python);
    Ok(())
}

/// Three significant digits.
fn rate(r: f64) -> String {
    let decimals = (2 - r.abs().max(1e-9).log10().floor() as i64).clamp(0, 6) as usize;
    format!("{r:.decimals$}")
}

fn parse_device(s: &str) -> anyhow::Result<tch::Device> {
    if s == "cpu" {
        return Ok(tch::Device::Cpu);
    }
    let index = s
        .strip_prefix("cuda:")
        .and_then(|i| i.parse::<usize>().ok())
        .with_context(|| format!("--device {s}: expected cpu or cuda:N"))?;
    ensure!(
        tch::Cuda::is_available() && index < tch::Cuda::device_count() as usize,
        "--device {s}: libtorch sees {} CUDA devices",
        tch::Cuda::device_count()
    );
    Ok(tch::Device::Cuda(index))
}

/// Everything both sides are given: data, parameters, what to compute.
struct Setup {
    job: JobSpec,
    domains: Vec<Dataset>,
    meta: Dataset,
    params: Bundle,
    asks: RoundAsks,
    check: bool,
}

impl Setup {
    fn new(shape: &Shape, case: Case, check: bool) -> Self {
        let ModelSpec::Mlp { inputs, classes, .. } = shape.spec else {
            unreachable!("the step benchmark's shapes are MLPs")
        };
        let per_domain = shape.batch as usize / DOMAINS;
        // In the check every batch is a whole domain and every probe all of it.
        let rows = if check { per_domain } else { shape.rows };
        let meta_rows = if check { per_domain } else { shape.meta_rows };
        let mut rng = SplitMix64::new(0xBE7C);
        let centres = synthetic(&mut rng, classes as usize, inputs as usize, 0, 1.0).x;
        let domains = (0..DOMAINS)
            .map(|_| blobs(&mut rng, &centres, rows, inputs as usize, classes as usize))
            .collect();
        let meta = blobs(&mut rng, &centres, meta_rows, inputs as usize, classes as usize);
        let probe = if check { rows as u32 } else { 64 };
        let mut asks = RoundAsks::weights(&[1.4, 1.0, 0.8, 0.8]);
        match case {
            Case::Inner => {}
            Case::Hyper(directional) => asks.ask = Ask::Hypergradient(HypergradientSpec { directional, probe }),
            Case::Rescale => asks.ask = Ask::LossRescaling(rescaler_plan()),
        }
        Self {
            job: JobSpec {
                seed: 0,
                model: shape.spec.clone(),
                domains: Vec::new(),
                meta: None,
                shards: 1,
                inner: InnerSpec {
                    batch_size: shape.batch,
                    lr: 0.05,
                    momentum: 0.9,
                    weight_decay: 5e-4,
                    ..InnerSpec::default()
                },
                delta_dtype: metaloop_proto::proto::DType::F32,
                text: None,
                meta_batch: 0,
            },
            domains,
            meta,
            params: model::init_params(&shape.spec, 1),
            asks,
            check,
        }
    }

    fn trainer(&self, device: tch::Device) -> anyhow::Result<Trainer> {
        let domains = self.domains.iter().cloned().map(Data::Dense).collect();
        let meta = Some(Data::Dense(self.meta.clone()));
        let mut t = Trainer::with_data(self.job.clone(), domains, meta, device);
        t.set_model(0, bundle_checksum(&self.params), self.params.clone())?;
        Ok(t)
    }

    fn assignment(seed: u64) -> Assignment {
        Assignment {
            index: 0,
            shard: 0,
            steps: STEPS,
            seed,
            data: TrainOn::Mixture,
        }
    }

    /// One assignment's results, in the reference's `check` terms.
    fn rust_check(&self, device: tch::Device) -> anyhow::Result<Value> {
        let out = self.trainer(device)?.run(&Self::assignment(0), &self.asks)?;
        let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        Ok(json!({
            "mean_loss": out.mean_loss,
            "delta_norm": norm(&mut out.delta.tensors.iter().flat_map(|t| t.data.iter().copied())),
            "meta_loss": out.meta_loss,
            "d_sum": match &out.signal {
                Signal::Hypergradient(domains) => Some(domains.iter().map(|d| d.d_sum).collect::<Vec<_>>()),
                _ => None,
            },
            "omega_grad_norm": match &out.signal {
                Signal::LossRescaling(grad) => Some(norm(&mut grad.iter().flat_map(|t| t.data.iter().copied()))),
                _ => None,
            },
        }))
    }

    /// Seconds for `n` assignments after a warm-up of 3.
    fn rust_timed(&self, device: tch::Device, n: usize) -> anyhow::Result<f64> {
        let mut t = self.trainer(device)?;
        for seed in 0..WARMUP {
            t.run(&Self::assignment(seed as u64), &self.asks)?;
        }
        let start = Instant::now();
        for seed in 0..n {
            t.run(&Self::assignment((WARMUP + seed) as u64), &self.asks)?;
        }
        Ok(start.elapsed().as_secs_f64())
    }

    /// Writes the spec and data into `dir`, runs the reference and returns its JSON line.
    fn python(
        &self,
        dir: &Path,
        args: &StepArgs,
        device: tch::Device,
        threads: usize,
        n: usize,
    ) -> anyhow::Result<Value> {
        std::fs::create_dir_all(dir)?;
        let write_data = |name: &str, ds: &Dataset| -> anyhow::Result<String> {
            let path = dir.join(name);
            std::fs::write(&path, dataset::to_safetensors(ds)?)?;
            Ok(path.to_string_lossy().into_owned())
        };
        let write_params = |name: &str, b: &Bundle| -> anyhow::Result<String> {
            let path = dir.join(name);
            std::fs::write(&path, bundle_safetensors(b)?)?;
            Ok(path.to_string_lossy().into_owned())
        };
        let domains = self
            .domains
            .iter()
            .enumerate()
            .map(|(i, d)| write_data(&format!("domain-{i}.safetensors"), d))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let ModelSpec::Mlp {
            inputs,
            hidden,
            classes,
            ..
        } = &self.job.model
        else {
            unreachable!("the step benchmark's shapes are MLPs")
        };
        let hyper = match &self.asks.ask {
            Ask::Hypergradient(h) => Some(json!({"directional": directional_name(h.directional), "probe": h.probe})),
            _ => None,
        };
        let rescaler = match &self.asks.ask {
            Ask::LossRescaling(r) => {
                let omega = SmallTensor::to_bundle(&r.omega);
                let features: Vec<&str> = r
                    .features
                    .iter()
                    .filter_map(|&c| Feature::from_code(c).map(feature_name))
                    .collect();
                json!({
                    "params": write_params("omega.safetensors", &omega)?,
                    "features": features,
                    "mode": match r.mode { RescaleMode::SelfTaught => "self-taught", RescaleMode::CleanMeta => "clean-meta" },
                    "normalize": r.normalize,
                    "passes": r.passes,
                    "directional": directional_name(r.directional),
                    "progress": r.progress,
                })
            }
            _ => Value::Null,
        };
        let spec = json!({
            "device": match device { tch::Device::Cuda(i) => format!("cuda:{i}"), _ => "cpu".into() },
            "threads": threads,
            "model": {"inputs": inputs, "hidden": hidden, "classes": classes},
            "params": write_params("params.safetensors", &self.params)?,
            "domains": domains,
            "meta": write_data("meta.safetensors", &self.meta)?,
            "weights": self.asks.weights,
            "inner": {
                "steps": STEPS,
                "batch_size": self.job.inner.batch_size,
                "lr": self.job.inner.lr,
                "momentum": self.job.inner.momentum,
                "weight_decay": self.job.inner.weight_decay,
            },
            "hypergradient": hyper,
            "rescaler": rescaler,
            "assignments": n,
            "warmup": WARMUP,
            "check": self.check,
        });
        let spec_path = dir.join("spec.json");
        std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;
        let mut cmd = Command::new(&args.python);
        cmd.arg(&args.script).arg(&spec_path);
        if let Some(site) = std::env::var_os("LIBTORCH")
            .map(PathBuf::from)
            .and_then(|t| t.parent().map(Path::to_path_buf))
        {
            let mut paths = vec![site];
            if let Some(old) = std::env::var_os("PYTHONPATH") {
                paths.extend(std::env::split_paths(&old));
            }
            cmd.env("PYTHONPATH", std::env::join_paths(paths)?);
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {} {}", args.python, args.script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "the PyTorch reference failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let last = stdout.lines().last().context("the PyTorch reference printed nothing")?;
        serde_json::from_str(last).with_context(|| format!("the PyTorch reference's last line is not JSON: {last}"))
    }
}

const WARMUP: usize = 3;

fn directional_name(d: DirectionalMethod) -> &'static str {
    match d {
        DirectionalMethod::Exact => "exact",
        DirectionalMethod::FiniteDifference => "fd",
    }
}

/// The config spelling of a feature.
fn feature_name(f: Feature) -> &'static str {
    match f {
        Feature::Loss => "loss",
        Feature::LabelProb => "label-prob",
        Feature::Entropy => "entropy",
        Feature::Margin => "margin",
        Feature::Progress => "progress",
        Feature::LabelProbMean => "label-prob-mean",
        Feature::LabelProbSpread => "label-prob-spread",
    }
}

/// Ω as a `loss-rescaling` job starts it (default features and width), self-taught.
fn rescaler_plan() -> RescalerPlan {
    let features = default_features();
    let spec = ModelSpec::Mlp {
        inputs: features.len() as u32,
        hidden: vec![100],
        classes: 1,
        dropout: 0.0,
    };
    RescalerPlan {
        mode: RescaleMode::SelfTaught,
        omega: SmallTensor::from_bundle(model::init_params(&spec, 2)),
        features: features.iter().map(|f| f.code()).collect(),
        normalize: true,
        directional: DirectionalMethod::Exact,
        progress: 0.5,
        passes: 4,
    }
}

/// `n` rows of unit Gaussian features around the class centres, labels uniform.
fn blobs(rng: &mut SplitMix64, centres: &[f32], n: usize, features: usize, classes: usize) -> Dataset {
    let mut ds = synthetic(rng, n, features, classes, 1.0);
    for (row, &y) in ds.x.chunks_exact_mut(features).zip(&ds.y) {
        let c = &centres[y as usize * features..(y as usize + 1) * features];
        for (v, m) in row.iter_mut().zip(c) {
            *v += m;
        }
    }
    ds
}

/// `n` rows of standard normal features times `scale`, labels uniform in `0..classes`.
fn synthetic(rng: &mut SplitMix64, n: usize, features: usize, classes: usize, scale: f64) -> Dataset {
    let x = (0..n * features)
        .map(|_| {
            let (u1, u2) = (rng.unit().max(1e-12), rng.unit());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * scale) as f32
        })
        .collect();
    let y = (0..n).map(|_| rng.below(classes.max(1)) as i64).collect();
    Dataset { x, y, features }
}

/// A bundle as safetensors (f32 tensors by name).
fn bundle_safetensors(b: &Bundle) -> anyhow::Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = b
        .tensors
        .iter()
        .map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = b
        .tensors
        .iter()
        .zip(&bytes)
        .map(|(t, data)| {
            Ok((
                t.name.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), data)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// The largest relative difference between the two sides' check results (each number against
/// max(|ours|, 1e-3)); an error when a field is missing on one side or the difference exceeds
/// 1e-2 — the two sides would not be computing the same function.
fn compare(ours: &Value, theirs: &Value) -> anyhow::Result<f64> {
    let mut worst = 0.0f64;
    for key in ["mean_loss", "delta_norm", "meta_loss", "d_sum", "omega_grad_norm"] {
        let (a, b) = (flatten(&ours[key]), flatten(&theirs[key]));
        ensure!(
            a.len() == b.len(),
            "check `{key}`: metaloop has {} values, the reference {} ({} vs {})",
            a.len(),
            b.len(),
            ours[key],
            theirs[key]
        );
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs() / x.abs().max(1e-3));
        }
    }
    ensure!(
        worst <= 1e-2,
        "the reference computes something else: relative difference {worst:.2e} (metaloop {ours}, PyTorch {theirs})"
    );
    Ok(worst)
}

fn flatten(v: &Value) -> Vec<f64> {
    match v {
        Value::Number(n) => n.as_f64().into_iter().collect(),
        Value::Array(a) => a.iter().flat_map(flatten).collect(),
        _ => Vec::new(),
    }
}
