//! `metaloop bench step`: the worker's bi-level step against the same algorithm written as a
//! plain PyTorch loop (`scripts/bench_step.py`), on the same torch build, data, initial
//! parameters, batch size and device, in the same run.
//!
//! The unit of work is one assignment, as a worker runs it: load the round's parameters, `steps`
//! weighted optimizer steps on the domain mixture, the delta back on the host, then the outer
//! signal the case asks for. The cases: `inner` (the weighted inner steps alone), `hyper-exact`
//! / `hyper-fd` (plus the domain-weight hypergradient signals: the meta loss, its gradient and
//! every domain's Σ⟨∇ℓ_i, ∇L_meta⟩ on a probe, by double backward or by finite difference),
//! `rescale` (Ω weighting every inner sample, plus Ω's meta-gradient through one virtual step,
//! self-taught).
//!
//! The models: `digits` and `large`, MLPs on Gaussian blobs trained with SGD and momentum; and,
//! opt-in, `minilm`: the pretrained all-MiniLM-L6-v2 (mean pooling, a seeded 2-class head)
//! fine-tuned as configs/text-*.toml do — AdamW at lr 5e-5 (constant: no warmup or decay),
//! weight decay 0.01, clipping at 1.0, batches of 16 reviews (4 from each of 4 domains cut from
//! reviews-train, 48 tokens at most), a meta batch of 32 reviews, probes of 16, a virtual step of
//! 0.02 — against transformers' `BertModel` (eager attention) in the reference. It needs the
//! text assets (`scripts/text-assets`) and, for the reference, transformers (`scripts/pydeps`).
//! Dropout (the config's 0.1) is on in the timed inner steps on both sides, as in a real job.
//!
//! Before timing, both sides run one assignment in a configuration whose batches are whole
//! domains (so sampling order cannot matter) and their results must agree: the comparison is
//! between two implementations of the same function. For `minilm` that assignment runs with the
//! config's dropout set to 0 on both sides (two random generators cannot draw the same masks).
//! Each side's timed runs are a process of their own, whose peak resident set size is reported
//! beside the rates: metaloop's one child of this one per case (`--child`, holding only the data
//! and the trainer, as a worker does; warmed up once, then one timed run per trial), the
//! reference a fresh process per trial (warmed up in each).

use anyhow::{bail, ensure, Context};
use metaloop_common::classifier::{self, Pooling};
use metaloop_common::data::{self, Data};
use metaloop_common::model;
use metaloop_common::text::TokenizedText;
use metaloop_proto::checksum::bundle_checksum;
use metaloop_proto::dataset::{self, Dataset};
use metaloop_proto::features::{default_features, Feature};
use metaloop_proto::proto::{
    Ask, Assignment, DirectionalMethod, HypergradientSpec, InnerOptimizer, InnerSpec, JobSpec, ModelSpec, RescaleMode,
    RescalerPlan, Signal, SmallTensor, TextSpec, TrainOn,
};
use metaloop_proto::rng::SplitMix64;
use metaloop_proto::tensor::Bundle;
use metaloop_worker::{RoundAsks, Trainer};
use serde_json::{json, Value};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Debug, clap::Args)]
pub struct StepArgs {
    /// Models: `digits` (64→256→10, batch 64), `large` (512→2048→2048→10, batch 256,
    /// kernel-bound) and `minilm` (the pretrained all-MiniLM-L6-v2 fine-tuned with AdamW on
    /// review text, batch 16; opt-in: it needs `scripts/text-assets` and, for the reference,
    /// transformers from `scripts/pydeps`).
    #[arg(long, value_delimiter = ',', default_value = "digits,large")]
    models: Vec<String>,
    /// Cases: inner, hyper-exact, hyper-fd, rescale.
    #[arg(long, value_delimiter = ',', default_value = "inner,hyper-exact,hyper-fd,rescale")]
    cases: Vec<String>,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Timed assignments per case and side (default: 40 for digits, 4 for large, 3 for minilm).
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
    /// Internal: run metaloop's timed assignments of the one model and case given, in this
    /// process, and print their seconds and this process's peak RSS as JSON.
    #[arg(long, hide = true)]
    child: bool,
}

/// Inner steps per assignment (the quickstart's).
const STEPS: u32 = 5;
const DOMAINS: usize = 4;
/// The text assets `minilm` needs (`scripts/text-assets` installs them; a link into the cache).
const TEXT_DIR: &str = "data/text";
const MINILM: &str = "all-MiniLM-L6-v2";

struct Shape {
    name: &'static str,
    spec: ModelSpec,
    /// The round's parameters: seeded for an MLP, pretrained (with a seeded head) for MiniLM.
    params: Bundle,
    inner: InnerSpec,
    /// Rows per domain and in the meta set.
    rows: usize,
    meta_rows: usize,
    /// Meta rows per assignment (0: all).
    meta_batch: u32,
    /// Rows of every domain a hypergradient probes.
    probe: u32,
    assignments: usize,
    /// Untimed assignments before the timed ones, on each side.
    warmup: usize,
    /// The largest relative difference the check accepts.
    tolerance: f64,
    source: Source,
}

/// Where a shape's rows come from.
enum Source {
    /// Gaussian blobs around seeded class centres.
    Blobs,
    /// Reviews: the training file's first rows cut into the domains, and the meta file; the
    /// model spec with dropout 0 for the check.
    Text {
        train: Box<TokenizedText>,
        meta: Box<TokenizedText>,
        check_spec: ModelSpec,
    },
}

fn shape(name: &str) -> anyhow::Result<Shape> {
    let mlp = |inputs, hidden: Vec<u32>| ModelSpec::Mlp {
        inputs,
        hidden,
        classes: 10,
        dropout: 0.0,
    };
    let sgd = |batch_size| InnerSpec {
        batch_size,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        ..InnerSpec::default()
    };
    let blobs = |name, spec: ModelSpec, batch, rows, meta_rows, assignments| Shape {
        name,
        params: model::init_params(&spec, 1),
        spec,
        inner: sgd(batch),
        rows,
        meta_rows,
        meta_batch: 0,
        probe: 64,
        assignments,
        warmup: 3,
        tolerance: 1e-2,
        source: Source::Blobs,
    };
    Ok(match name {
        "digits" => blobs("digits", mlp(64, vec![256]), 64, 300, 100, 40),
        "large" => blobs("large", mlp(512, vec![2048, 2048]), 256, 1024, 256, 4),
        "minilm" => minilm()?,
        other => bail!("unknown model `{other}` (digits, large, minilm)"),
    })
}

/// MiniLM fine-tuned on reviews as configs/text-*.toml do (without their learning-rate schedule:
/// a constant 5e-5).
fn minilm() -> anyhow::Result<Shape> {
    let dir = Path::new(TEXT_DIR);
    let model_dir = dir.join(MINILM);
    let (train_path, meta_path) = (
        dir.join("corpus/reviews-train.jsonl"),
        dir.join("corpus/reviews-meta.jsonl"),
    );
    for need in [
        model_dir.join("model.safetensors"),
        model_dir.join("tokenizer.json"),
        train_path.clone(),
        meta_path.clone(),
    ] {
        ensure!(
            need.is_file(),
            "`--models minilm` needs the text assets: {} is missing (run scripts/text-assets from the repository root)",
            need.display()
        );
    }
    let (spec, params) = classifier::pretrained(&model_dir, Pooling::Mean, 2, 0)
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let text = TextSpec {
        tokenizer: model_dir.join("tokenizer.json").to_string_lossy().into_owned(),
        max_len: 48,
        labels: vec!["rotten".into(), "fresh".into()],
        text_column: "text".into(),
        label_column: "label".into(),
    };
    let load = |path: &Path, what: &str| -> anyhow::Result<TokenizedText> {
        match data::load_set(path, None, 2, Some(&text), what)? {
            Data::Text(t) => Ok(t),
            Data::Dense(_) => bail!("{what}: expected text"),
        }
    };
    let train = load(&train_path, "reviews-train")?;
    let meta = load(&meta_path, "reviews-meta")?;
    let ModelSpec::Bert {
        config,
        cls,
        pooler,
        classes,
    } = &spec
    else {
        unreachable!("a pretrained classifier is a BERT")
    };
    let mut no_dropout: Value = serde_json::from_str(config).context("config.json")?;
    for key in ["hidden_dropout_prob", "attention_probs_dropout_prob"] {
        no_dropout[key] = json!(0.0);
    }
    let check_spec = ModelSpec::Bert {
        config: serde_json::to_string_pretty(&no_dropout)?,
        cls: *cls,
        pooler: *pooler,
        classes: *classes,
    };
    Ok(Shape {
        name: "minilm",
        spec,
        params,
        inner: InnerSpec {
            batch_size: 16,
            lr: 5e-5,
            weight_decay: 0.01,
            optimizer: InnerOptimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            clip_norm: Some(1.0),
            virtual_lr: Some(0.02),
            ..InnerSpec::default()
        },
        rows: 256,
        meta_rows: 256,
        meta_batch: 32,
        probe: 16,
        assignments: 3,
        warmup: 1,
        tolerance: 1e-2,
        source: Source::Text {
            train: Box::new(train),
            meta: Box::new(meta),
            check_spec,
        },
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

    fn name(self) -> &'static str {
        match self {
            Case::Inner => "inner",
            Case::Hyper(DirectionalMethod::Exact) => "hyper-exact",
            Case::Hyper(DirectionalMethod::FiniteDifference) => "hyper-fd",
            Case::Rescale => "rescale",
        }
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
    if args.child {
        return child(args, device, &cases);
    }
    let mut torch_version = String::from("?");
    println!(
        "Device {}, {threads} threads on both sides (OMP_WAIT_POLICY={}), {}; an assignment = {STEPS} inner steps + its outer signal; best of {} alternating trials; peak RSS of each side's timed process.",
        args.device,
        std::env::var("OMP_WAIT_POLICY").unwrap_or_default(),
        super::machine(),
        args.trials.max(1)
    );
    println!();
    println!("| model | case | metaloop steps/s | PyTorch steps/s | metaloop / PyTorch | check (max rel. diff) | metaloop peak RSS | PyTorch peak RSS | RSS metaloop / PyTorch |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut details = Vec::new();
    for name in &args.models {
        let shape = shape(name)?;
        for &case in &cases {
            let dir = super::scratch_dir("step")?;
            // The check: whole-domain batches, so both sides compute the same numbers.
            let check = Setup::new(&shape, case, true);
            let ours = check.rust_check(device)?;
            let theirs = check.python(&dir.join("check"), args, device, threads, 0)?;
            drop(check);
            torch_version = theirs["torch"].as_str().unwrap_or("?").to_string();
            let (diff, each) = compare(&ours, &theirs["check"], shape.tolerance)?;
            details.push(format!("- {} {}: {each}", shape.name, case.name()));
            // The timed runs, each side in a process of its own: metaloop's one child for all
            // the trials, the reference a fresh process per trial.
            let timed = Setup::new(&shape, case, false);
            let n = args.assignments.unwrap_or(shape.assignments).max(1);
            let (mut rust_seconds, mut py_seconds) = (f64::INFINITY, f64::INFINITY);
            let mut py_rss = 0u64;
            let mut metaloop = RustChild::start(args, shape.name, case, threads, n)?;
            for _ in 0..args.trials.max(1) {
                rust_seconds = rust_seconds.min(metaloop.run()?);
                let py = timed.python(&dir.join("timed"), args, device, threads, n)?;
                py_seconds = py_seconds.min(py["seconds"].as_f64().context("the reference printed no seconds")?);
                py_rss = py_rss.max(py["peak_rss"].as_u64().context("the reference printed no peak_rss")?);
            }
            let rust_rss = metaloop.finish()?;
            // Steps per second: inner steps for (a), whole bi-level steps (one assignment) for
            // the others.
            let per = if case == Case::Inner { f64::from(STEPS) } else { 1.0 };
            let (ours_rate, theirs_rate) = (per * n as f64 / rust_seconds, per * n as f64 / py_seconds);
            println!(
                "| {} | {} | {} | {} | {:.2} | {:.1e} | {} MiB | {} MiB | {:.2} |",
                shape.name,
                case.label(),
                rate(ours_rate),
                rate(theirs_rate),
                ours_rate / theirs_rate,
                diff,
                rust_rss >> 20,
                py_rss >> 20,
                rust_rss as f64 / py_rss.max(1) as f64
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    println!();
    println!("The check, the largest relative difference of each quantity:");
    for d in &details {
        println!("{d}");
    }
    println!();
    println!("PyTorch side: torch {torch_version} in {}.", args.python);
    Ok(())
}

/// `--child`: metaloop's timed side of one model and case, in a process of its own that holds
/// only the data and the trainer, as a worker does. For every line on stdin, `n` timed
/// assignments (after the warm-up, the first time), answered with `{"seconds"}`; at the end of
/// stdin, `{"peak_rss"}` (bytes).
fn child(args: &StepArgs, device: tch::Device, cases: &[Case]) -> anyhow::Result<()> {
    let ([name], [case]) = (args.models.as_slice(), cases) else {
        bail!("--child runs one model and one case")
    };
    let shape = shape(name)?;
    let setup = Setup::new(&shape, *case, false);
    drop(shape);
    let n = args.assignments.context("--child needs --assignments")?;
    let mut warmup = setup.warmup;
    let (mut trainer, asks) = setup.into_trainer(device)?;
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lines() {
        line?;
        let seconds = Setup::timed(&mut trainer, &asks, warmup, n)?;
        warmup = 0;
        writeln!(out, "{}", json!({ "seconds": seconds }))?;
        out.flush()?;
    }
    writeln!(out, "{}", json!({ "peak_rss": peak_rss()? }))?;
    Ok(())
}

/// metaloop's timed side of one case: a `--child` process, started once (one start per case,
/// as the trainer used to be built once), asked for one timed run per trial.
struct RustChild {
    process: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl RustChild {
    fn start(args: &StepArgs, model: &str, case: Case, threads: usize, n: usize) -> anyhow::Result<Self> {
        let mut process = Command::new(std::env::current_exe()?)
            .args(["bench", "step", "--child", "--models", model, "--cases", case.name()])
            .args(["--device", &args.device, "--threads", &threads.to_string()])
            .args(["--assignments", &n.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting metaloop's timed side")?;
        let stdin = process.stdin.take();
        let stdout = std::io::BufReader::new(process.stdout.take().context("no stdout")?).lines();
        Ok(Self { process, stdin, stdout })
    }

    /// The child's next JSON line.
    fn answer(&mut self) -> anyhow::Result<Value> {
        match self.stdout.next() {
            Some(line) => Ok(serde_json::from_str(&line?)?),
            None => {
                let status = self.process.wait()?;
                bail!("metaloop's timed side ended ({status}) without answering")
            }
        }
    }

    /// Seconds for one timed run.
    fn run(&mut self) -> anyhow::Result<f64> {
        let stdin = self.stdin.as_mut().context("the timed side was finished")?;
        writeln!(stdin, "run")?;
        stdin.flush()?;
        self.answer()?["seconds"].as_f64().context("no seconds")
    }

    /// Ends the child: its peak RSS.
    fn finish(mut self) -> anyhow::Result<u64> {
        drop(self.stdin.take());
        let rss = self.answer()?["peak_rss"].as_u64().context("no peak_rss")?;
        let status = self.process.wait()?;
        ensure!(status.success(), "metaloop's timed side failed ({status})");
        Ok(rss)
    }
}

/// This process's peak resident set size (VmHWM), in bytes.
fn peak_rss() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(kib << 10)
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
    domains: Vec<Data>,
    meta: Data,
    params: Bundle,
    asks: RoundAsks,
    warmup: usize,
    check: bool,
}

impl Setup {
    fn new(shape: &Shape, case: Case, check: bool) -> Self {
        let per_domain = shape.inner.batch_size as usize / DOMAINS;
        // In the check every batch is a whole domain and every probe all of it.
        let rows = if check { per_domain } else { shape.rows };
        let meta_rows = if check { per_domain } else { shape.meta_rows };
        let (spec, domains, meta) = match &shape.source {
            Source::Blobs => {
                let ModelSpec::Mlp { inputs, classes, .. } = shape.spec else {
                    unreachable!("blobs are for MLPs")
                };
                let (inputs, classes) = (inputs as usize, classes as usize);
                let mut rng = SplitMix64::new(0xBE7C);
                let centres = synthetic(&mut rng, classes, inputs, 0, 1.0).x;
                let domains = (0..DOMAINS)
                    .map(|_| Data::Dense(blobs(&mut rng, &centres, rows, inputs, classes)))
                    .collect();
                let meta = Data::Dense(blobs(&mut rng, &centres, meta_rows, inputs, classes));
                (shape.spec.clone(), domains, meta)
            }
            Source::Text {
                train,
                meta,
                check_spec,
            } => {
                // Domain k: rows k·shape.rows.. of the training file (its first `rows` of them).
                let domains = (0..DOMAINS)
                    .map(|k| Data::Text(train.select(&(k * shape.rows..k * shape.rows + rows).collect::<Vec<_>>())))
                    .collect();
                let meta = Data::Text(meta.select(&(0..meta_rows.min(meta.len())).collect::<Vec<_>>()));
                let spec = if check { check_spec } else { &shape.spec };
                (spec.clone(), domains, meta)
            }
        };
        let probe = if check { rows as u32 } else { shape.probe };
        let mut asks = RoundAsks::weights(&[1.4, 1.0, 0.8, 0.8]);
        match case {
            Case::Inner => {}
            Case::Hyper(directional) => asks.ask = Ask::Hypergradient(HypergradientSpec { directional, probe }),
            Case::Rescale => asks.ask = Ask::LossRescaling(rescaler_plan()),
        }
        Self {
            job: JobSpec {
                seed: 0,
                model: spec,
                domains: Vec::new(),
                meta: None,
                shards: 1,
                inner: shape.inner.clone(),
                delta_dtype: metaloop_proto::proto::DType::F32,
                text: None,
                meta_batch: shape.meta_batch,
            },
            domains,
            meta,
            params: shape.params.clone(),
            asks,
            warmup: shape.warmup,
            check,
        }
    }

    /// A trainer holding this setup's data and parameters (moved, not copied: what a worker
    /// holds), and the round's asks.
    fn into_trainer(self, device: tch::Device) -> anyhow::Result<(Trainer, RoundAsks)> {
        let mut t = Trainer::with_data(self.job, self.domains, Some(self.meta), device);
        t.set_model(0, bundle_checksum(&self.params), self.params)?;
        Ok((t, self.asks))
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
        let mut t = Trainer::with_data(self.job.clone(), self.domains.clone(), Some(self.meta.clone()), device);
        t.set_model(0, bundle_checksum(&self.params), self.params.clone())?;
        let out = t.run(&Self::assignment(0), &self.asks)?;
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

    /// Seconds for `n` assignments of `t` after a warm-up of `warmup`.
    fn timed(t: &mut Trainer, asks: &RoundAsks, warmup: usize, n: usize) -> anyhow::Result<f64> {
        for seed in 0..warmup {
            t.run(&Self::assignment(seed as u64), asks)?;
        }
        let start = Instant::now();
        for seed in 0..n {
            t.run(&Self::assignment((warmup + seed) as u64), asks)?;
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
        let write_data = |name: &str, d: &Data| -> anyhow::Result<String> {
            let path = dir.join(name);
            let bytes = match d {
                Data::Dense(ds) => dataset::to_safetensors(ds)?,
                Data::Text(t) => text_safetensors(t)?,
            };
            std::fs::write(&path, bytes)?;
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
        let (model, text) = match &self.job.model {
            ModelSpec::Mlp {
                inputs,
                hidden,
                classes,
                ..
            } => (
                json!({"kind": "mlp", "inputs": inputs, "hidden": hidden, "classes": classes}),
                false,
            ),
            ModelSpec::Bert { config, classes, .. } => {
                let path = dir.join("config.json");
                std::fs::write(&path, config)?;
                (json!({"kind": "bert", "config": path, "classes": classes}), true)
            }
            ModelSpec::TorchScript { .. } => {
                anyhow::bail!("the step benchmark has no PyTorch reference for TorchScript modules")
            }
        };
        let inner = &self.job.inner;
        let (optimizer, betas, eps) = match inner.optimizer {
            InnerOptimizer::Sgd => ("sgd", Value::Null, Value::Null),
            InnerOptimizer::AdamW { beta1, beta2, eps } => ("adamw", json!([beta1, beta2]), json!(eps)),
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
            "model": model,
            "params": write_params("params.safetensors", &self.params)?,
            "domains": domains,
            "meta": write_data("meta.safetensors", &self.meta)?,
            "meta_batch": self.job.meta_batch,
            "weights": self.asks.weights,
            "inner": {
                "steps": STEPS,
                "batch_size": inner.batch_size,
                "lr": inner.lr,
                "momentum": inner.momentum,
                "weight_decay": inner.weight_decay,
                "optimizer": optimizer,
                "betas": betas,
                "eps": eps,
                "clip_norm": inner.clip_norm,
                "virtual_lr": inner.virtual_lr(),
            },
            "hypergradient": hyper,
            "rescaler": rescaler,
            "assignments": n,
            "warmup": self.warmup,
            "check": self.check,
        });
        let spec_path = dir.join("spec.json");
        std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;
        let mut cmd = Command::new(&args.python);
        cmd.arg(&args.script).arg(&spec_path);
        let mut paths = Vec::new();
        if text {
            // transformers and its dependencies (then torch), as scripts/pydeps installs them.
            paths.extend(std::env::split_paths(&pydeps(&args.script)?));
        }
        if let Some(site) = std::env::var_os("LIBTORCH")
            .map(PathBuf::from)
            .and_then(|t| t.parent().map(Path::to_path_buf))
        {
            paths.push(site);
        }
        if !paths.is_empty() {
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

/// The PYTHONPATH `scripts/pydeps` (beside the reference script) prints: transformers for the
/// BERT reference.
fn pydeps(script: &Path) -> anyhow::Result<std::ffi::OsString> {
    let tool = script.with_file_name("pydeps");
    let out = Command::new(&tool)
        .output()
        .with_context(|| format!("running {} (the reference's transformers)", tool.display()))?;
    ensure!(
        out.status.success(),
        "{} failed ({}): {}",
        tool.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().into())
}

/// Tokenized text as safetensors for the reference: `ids` and `mask` i64 `[rows, max_len]`
/// (padded with the tokenizer's pad id; the reference cuts every batch to its longest row, as
/// the worker pads it) and `y` i64 `[rows]`.
fn text_safetensors(t: &TokenizedText) -> anyhow::Result<Vec<u8>> {
    let (n, width) = (t.len(), t.max_len as usize);
    let mut ids = vec![i64::from(t.pad_id); n * width];
    let mut mask = vec![0i64; n * width];
    for i in 0..n {
        let row = t.row(i);
        ensure!(
            row.len() <= width,
            "row {i} has {} tokens, more than max_len {width}",
            row.len()
        );
        for (j, &id) in row.iter().enumerate() {
            ids[i * width + j] = i64::from(id);
            mask[i * width + j] = 1;
        }
    }
    let bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (ids, mask, y) = (bytes(&ids), bytes(&mask), bytes(&t.labels));
    let view = |data, shape| safetensors::tensor::TensorView::new(safetensors::Dtype::I64, shape, data);
    Ok(safetensors::serialize(
        [
            ("ids", view(&ids, vec![n, width])?),
            ("mask", view(&mask, vec![n, width])?),
            ("y", view(&y, vec![n])?),
        ],
        None,
    )?)
}

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
/// `tolerance` — the two sides would not be computing the same function.
/// Also says the largest difference of each quantity the case has.
fn compare(ours: &Value, theirs: &Value, tolerance: f64) -> anyhow::Result<(f64, String)> {
    let mut worst = 0.0f64;
    let mut each = Vec::new();
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
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs() / x.abs().max(1e-3))
            .fold(0.0f64, f64::max);
        if !a.is_empty() {
            each.push(format!("{key} {diff:.1e}"));
        }
        worst = worst.max(diff);
    }
    ensure!(
        worst <= tolerance,
        "the reference computes something else: relative difference {worst:.2e} (metaloop {ours}, PyTorch {theirs})"
    );
    Ok((worst, each.join(", ")))
}

fn flatten(v: &Value) -> Vec<f64> {
    match v {
        Value::Number(n) => n.as_f64().into_iter().collect(),
        Value::Array(a) => a.iter().flat_map(flatten).collect(),
        _ => Vec::new(),
    }
}
