//! `metaloop local`: a coordinator in this process and N worker processes on loopback, with a
//! throwaway CA, a progress bar and a line per round. When the job learns its domain weights,
//! the uniform-weights baseline runs next with the same seed and budget, for comparison; after
//! a learned task policy, the uniform-policy and target-only baselines.

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use metaloop_common::net::TlsFiles;
use metaloop_common::pki;
use metaloop_coordinator::{Coordinator, CoordinatorOptions, RoundRecord, RunDir, Summary};
use metaloop_proto::config::{JobConfig, PolicyMethod, StrategyKind, WeightMethod};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The quickstart, used when no config is given.
const QUICKSTART: &str = "configs/quickstart.toml";
/// At most this many per-round lines are printed (all rounds are in metrics.jsonl).
const MAX_LINES: u64 = 40;

#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    /// Job config (TOML) [default: configs/quickstart.toml]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of worker processes (at least 1).
    #[arg(long, default_value_t = 2, value_parser = at_least_one)]
    workers: usize,
    /// Run directory [default: runs/<config name>-<unix time>]
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// libtorch threads per model replica.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Each worker's devices, one model replica each (see `metaloop worker --help`).
    #[arg(long, default_value = "cpu")]
    devices: String,
    #[command(flatten)]
    overrides: crate::Overrides,
    /// Skip the uniform-weights baseline run.
    #[arg(long)]
    no_baseline: bool,
    /// No progress bar or per-round lines (for scripts and tests).
    #[arg(long)]
    quiet: bool,
    /// Serve the coordinator's /metrics, /healthz and /readyz over HTTP on this address.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
}

pub async fn run(args: LocalArgs, json_logs: bool) -> anyhow::Result<ExitCode> {
    let config_path = args.config.clone().unwrap_or_else(|| PathBuf::from(QUICKSTART));
    if args.config.is_none() && !config_path.is_file() {
        bail!("no --config given and {QUICKSTART} is not in the current directory; run from the repository root or pass --config");
    }
    let config = match crate::load_config(&config_path, &args.overrides) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    // Checked here too, so a bad value stops the run before any worker process starts.
    if let Err(e) = metaloop_worker::devices::resolve(&args.devices) {
        eprintln!("error: --devices: {e}");
        return Ok(ExitCode::from(crate::EXIT_USAGE));
    }
    let run_dir = match &args.run_dir {
        Some(d) => d.clone(),
        None => default_run_dir(&config_path)?,
    };
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let log = std::fs::File::create(run_dir.join("coordinator.log")).context("creating coordinator.log")?;
    let builder = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log));
    let _ = if json_logs {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    let ready = crate::serve_telemetry(args.metrics_listen).await?;
    // A throwaway CA per run: replace whatever an earlier run in this directory left.
    let certs = run_dir.join("certs");
    if certs.exists() {
        std::fs::remove_dir_all(&certs).with_context(|| format!("removing old {}", certs.display()))?;
    }
    // One identity per worker process, as on a cluster: the coordinator's logs name each.
    let tls = Tls {
        coordinator: pki::init(&certs)?,
        workers: (0..args.workers)
            .map(|i| pki::issue(&certs, &format!("worker-{i}")))
            .collect::<Result<_, _>>()?,
    };

    if !args.quiet {
        eprintln!(
            "metaloop local: {} on {} worker processes, run directory {}",
            config_path.display(),
            args.workers,
            run_dir.display()
        );
    }
    let mut summary = run_job(&args, config.clone(), &run_dir, &tls, "", ready.clone()).await?;
    if !args.no_baseline {
        for (name, baseline, what) in baselines(&config) {
            let dir = run_dir.join(format!("baseline-{name}"));
            if !args.quiet {
                eprintln!("baseline: the same job with {what}, run directory {}", dir.display());
            }
            let b = run_job(&args, baseline, &dir, &tls, &format!("baseline {name} "), ready.clone()).await?;
            match name {
                "target-only" => summary.target_only_test_accuracy = Some(b.test_accuracy),
                _ => summary.baseline_test_accuracy = Some(b.test_accuracy),
            }
            RunDir::open(&run_dir).write_summary(&summary)?;
        }
    }
    print_summary(&summary, &run_dir);
    Ok(ExitCode::SUCCESS)
}

/// `--workers`: a job needs at least one worker process. Checked by clap, so a 0 is a usage
/// error (exit 64) before the config is read.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (the job needs a worker process)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// The baselines a job is compared with (same seed, same rounds): uniform domain weights after
/// learned ones; a uniform policy and the target alone after a learned task policy.
fn baselines(config: &JobConfig) -> Vec<(&'static str, JobConfig, &'static str)> {
    let with = |f: &dyn Fn(&mut JobConfig)| {
        let mut c = config.clone();
        f(&mut c);
        c
    };
    match config.strategy.kind {
        StrategyKind::TaskPolicy if config.strategy.policy == PolicyMethod::Learned => vec![
            (
                "uniform",
                with(&|c| c.strategy.policy = PolicyMethod::Uniform),
                "a uniform source policy",
            ),
            (
                "target-only",
                with(&|c| c.strategy.policy = PolicyMethod::TargetOnly),
                "the target's own examples only",
            ),
        ],
        StrategyKind::DomainWeights | StrategyKind::LossRescaling
            if config.strategy.method != WeightMethod::Uniform =>
        {
            vec![(
                "uniform",
                with(&|c| c.strategy.method = WeightMethod::Uniform),
                "uniform domain weights",
            )]
        }
        _ => Vec::new(),
    }
}

struct Tls {
    coordinator: TlsFiles,
    /// `worker-N`'s certificate for worker process N.
    workers: Vec<TlsFiles>,
}

/// One job: bind a coordinator, start the worker processes, run to the end, stop the workers.
async fn run_job(
    args: &LocalArgs,
    config: JobConfig,
    run_dir: &Path,
    tls: &Tls,
    label: &str,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let coordinator = Coordinator::bind(CoordinatorOptions {
        listen: "127.0.0.1:0".parse()?,
        tls: tls.coordinator.clone(),
        run_dir: run_dir.to_owned(),
        min_workers: args.workers,
        worker_wait: Duration::from_secs(60),
        resume: false,
        assignment_timeout: None,
        checkpoint_pause: Duration::ZERO,
        max_handshakes: 64,
        max_workers: 1024,
        ready,
        revocation: Default::default(),
    })?;
    let addr = coordinator.local_addr()?;
    let exe = std::env::current_exe().context("locating the metaloop binary")?;
    let mut children = Vec::new();
    for (i, worker_tls) in tls.workers.iter().enumerate() {
        let log_path = run_dir.join(format!("worker-{i}.log"));
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = tokio::process::Command::new(&exe)
            .arg("worker")
            .args([
                "--coordinator",
                &addr.to_string(),
                "--name",
                &format!("worker-{i}"),
                "--threads",
                &args.threads.to_string(),
                "--devices",
                &args.devices,
            ])
            .arg("--ca")
            .arg(&worker_tls.ca)
            .arg("--cert")
            .arg(&worker_tls.cert)
            .arg("--key")
            .arg(&worker_tls.key)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        children.push((i, log_path, child));
    }

    let job_over = CancellationToken::new();
    let workers_gone = CancellationToken::new();
    let pb = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(config.rounds)
    };
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{label}{{bar:30}} {{pos}}/{{len}} rounds  {{elapsed_precise}}  {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let monitor = {
        let (job_over, workers_gone, pb) = (job_over.clone(), workers_gone.clone(), pb.clone());
        tokio::spawn(async move {
            for (i, log_path, mut child) in children {
                tokio::select! {
                    status = child.wait() => match status {
                        Ok(s) if s.success() => {}
                        Ok(s) => say(&pb, format!("worker-{i} exited with {s}; its log: {}", log_path.display())),
                        Err(e) => say(&pb, format!("worker-{i}: {e}")),
                    },
                    () = job_over.cancelled() => {
                        // The job is over: give the worker a moment to leave, then stop it.
                        if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                            let _ = child.kill().await;
                        }
                    }
                }
            }
            workers_gone.cancel();
        })
    };
    let stop = CancellationToken::new();
    let interrupted = CancellationToken::new();
    {
        let (stop, workers_gone, interrupted) = (stop.clone(), workers_gone.clone(), interrupted.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => interrupted.cancel(),
                () = workers_gone.cancelled() => {}
            }
            stop.cancel();
        });
    }
    let every = config.rounds.div_ceil(MAX_LINES).max(1);
    let last = config.rounds.saturating_sub(1);
    let (pb2, quiet, label2) = (pb.clone(), args.quiet, label.to_string());
    let result = coordinator
        .run(
            config,
            move |r| {
                pb2.inc(1);
                if let Some(acc) = r.test_accuracy {
                    pb2.set_message(format!("test acc {:.1}%{}", acc * 100.0, weights_text(r)));
                }
                if !quiet && (r.round % every == 0 || r.round == last) {
                    say(&pb2, format!("{label2}{}", round_line(r)));
                }
            },
            stop.clone(),
        )
        .await;
    pb.finish_and_clear();
    job_over.cancel();
    let _ = monitor.await;
    let summary = result?;
    if !summary.completed {
        if workers_gone.is_cancelled() && !interrupted.is_cancelled() {
            bail!(
                "all worker processes exited after {} rounds; see the worker-*.log files in {}",
                summary.rounds,
                run_dir.display()
            );
        }
        bail!("interrupted after {} rounds", summary.rounds);
    }
    Ok(summary)
}

fn round_line(r: &RoundRecord) -> String {
    let meta = r.meta_loss.map_or(String::new(), |m| format!("  meta {m:.4}"));
    let test = match (r.test_loss, r.test_accuracy) {
        (Some(loss), Some(acc)) => format!("  test {loss:.4}  acc {:>5.1}%", acc * 100.0),
        _ => String::new(),
    };
    format!(
        "round {:>4}  train {:.4}{meta}{test}  {:>5.2}s  {:>6.0} samples/s  {} workers{}",
        r.round,
        r.train_loss,
        r.seconds,
        r.samples_per_second,
        r.workers,
        weights_text(r)
    )
}

fn weights_text(r: &RoundRecord) -> String {
    if let Some(w) = &r.source_weights {
        let parts: Vec<String> = w.iter().map(|(n, w)| format!("{n} {w:.2}")).collect();
        return format!("  policy: {}", parts.join(", "));
    }
    if r.domain_weights.len() < 2 || r.domain_weights.values().all(|&w| w == 1.0) {
        return String::new();
    }
    let parts: Vec<String> = r.domain_weights.iter().map(|(n, w)| format!("{n} {w:.2}")).collect();
    format!("  weights: {}", parts.join(", "))
}

fn print_summary(s: &Summary, run_dir: &Path) {
    println!(
        "done: test accuracy {:.2}% after {} rounds on {} workers in {:.1}s",
        s.test_accuracy * 100.0,
        s.rounds,
        s.workers,
        s.wall_seconds
    );
    if s.domain_weights.len() > 1 {
        let parts: Vec<String> = s.domain_weights.iter().map(|(n, w)| format!("{n} {w:.3}")).collect();
        println!("domain weights ({}): {}", s.strategy, parts.join(", "));
    }
    if let Some(w) = &s.source_weights {
        let parts: Vec<String> = w.iter().map(|(n, w)| format!("{n} {w:.3}")).collect();
        println!("source-task policy ({}): {}", s.strategy, parts.join(", "));
    }
    let policy = s.source_weights.is_some();
    let compare = [
        (
            s.baseline_test_accuracy,
            if policy {
                "uniform source policy"
            } else {
                "uniform weights"
            },
        ),
        (s.target_only_test_accuracy, "target data only"),
    ];
    for (b, what) in compare {
        let Some(b) = b else { continue };
        println!(
            "baseline ({what}, same seed and budget): test accuracy {:.2}%  →  {} by {:+.2} points",
            b * 100.0,
            if s.test_accuracy >= b {
                "learned wins"
            } else {
                "learned loses"
            },
            (s.test_accuracy - b) * 100.0
        );
    }
    println!("summary: {}", run_dir.join("summary.json").display());
    println!("plot: {}", run_dir.join("plot.svg").display());
    println!("state checksum: {}", s.final_state_checksum);
}

/// A line above the progress bar, or on stderr when there is no bar (not a terminal).
fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

fn default_run_dir(config: &Path) -> anyhow::Result<PathBuf> {
    let stem = config.file_stem().and_then(|s| s.to_str()).unwrap_or("job");
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut dir = PathBuf::from("runs").join(format!("{stem}-{secs}"));
    let mut n = 1;
    while dir.exists() {
        n += 1;
        dir = PathBuf::from("runs").join(format!("{stem}-{secs}-{n}"));
    }
    Ok(dir)
}
