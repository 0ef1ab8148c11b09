//! `metaloop local`: a coordinator in this process and N worker processes on loopback, with a
//! throwaway CA, a progress bar and one line per round.

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use metaloop_common::config::JobConfig;
use metaloop_common::net;
use metaloop_coordinator::{Coordinator, CoordinatorOptions};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The quickstart, used when no config is given.
const QUICKSTART: &str = "configs/quickstart.toml";

#[derive(Debug, clap::Args)]
pub struct LocalArgs {
    /// Job config (TOML) [default: configs/quickstart.toml]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Run directory [default: runs/<config name>-<unix time>]
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// libtorch threads per worker.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Override the config's number of rounds.
    #[arg(long)]
    rounds: Option<u64>,
    /// Override the config's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// No progress bar or per-round lines (for scripts and tests).
    #[arg(long)]
    quiet: bool,
}

pub async fn run(args: LocalArgs) -> anyhow::Result<ExitCode> {
    let config_path = args.config.clone().unwrap_or_else(|| PathBuf::from(QUICKSTART));
    if args.config.is_none() && !config_path.is_file() {
        bail!("no --config given and {QUICKSTART} is not in the current directory; run from the repository root or pass --config");
    }
    let mut config = match JobConfig::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(crate::EXIT_USAGE));
        }
    };
    if let Some(r) = args.rounds {
        config.rounds = r;
    }
    if let Some(s) = args.seed {
        config.seed = s;
    }
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let run_dir = match &args.run_dir {
        Some(d) => d.clone(),
        None => default_run_dir(&config_path)?,
    };
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let log = std::fs::File::create(run_dir.join("coordinator.log")).context("creating coordinator.log")?;
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(log))
        .try_init();

    let (coord_tls, worker_tls) = net::write_pki(&run_dir.join("certs"))?;
    let coordinator = Coordinator::bind(CoordinatorOptions {
        listen: "127.0.0.1:0".parse()?,
        tls: coord_tls,
        run_dir: run_dir.clone(),
        min_workers: args.workers,
        worker_wait: Duration::from_secs(60),
    })?;
    let addr = coordinator.local_addr()?;

    let exe = std::env::current_exe().context("locating the metaloop binary")?;
    let mut children = Vec::new();
    for i in 0..args.workers {
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

    let shutdown = CancellationToken::new();
    let workers_gone = CancellationToken::new();
    let pb = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(config.rounds)
    };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} rounds  {elapsed_precise}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !args.quiet {
        eprintln!(
            "metaloop local: {} on {} worker processes, run directory {}",
            config_path.display(),
            args.workers,
            run_dir.display()
        );
    }
    let monitor = {
        let (shutdown, workers_gone, pb) = (shutdown.clone(), workers_gone.clone(), pb.clone());
        tokio::spawn(async move {
            for (i, log_path, mut child) in children {
                tokio::select! {
                    status = child.wait() => {
                        match status {
                            Ok(s) if s.success() => {}
                            Ok(s) => say(&pb, format!("worker-{i} exited with {s}; its log: {}", log_path.display())),
                            Err(e) => say(&pb, format!("worker-{i}: {e}")),
                        }
                    }
                    () = shutdown.cancelled() => {
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
    {
        let (stop, workers_gone) = (stop.clone(), workers_gone.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = workers_gone.cancelled() => {}
            }
            stop.cancel();
        });
    }
    let pb2 = pb.clone();
    let quiet = args.quiet;
    let result = coordinator
        .run(
            config,
            move |r| {
                pb2.inc(1);
                pb2.set_message(format!("test acc {:.1}%", r.test_accuracy * 100.0));
                if !quiet {
                    say(&pb2, format!(
                        "round {:>3}  train loss {:.4}  test loss {:.4}  test acc {:>5.1}%  {:>6.2}s  {:>7.0} samples/s  {} workers  {:.1} KiB out",
                        r.round, r.train_loss, r.test_loss, r.test_accuracy * 100.0, r.seconds, r.samples_per_second, r.workers, r.bytes_out as f64 / 1024.0
                    ));
                }
            },
            stop.clone(),
        )
        .await;
    pb.finish_and_clear();
    shutdown.cancel();
    let _ = monitor.await;
    let summary = match result {
        Ok(s) => s,
        Err(e) if workers_gone.is_cancelled() && !stop_by_signal(&stop, &workers_gone) => {
            return Err(e.context(format!(
                "all worker processes exited; see the worker-*.log files in {}",
                run_dir.display()
            )));
        }
        Err(e) => return Err(e),
    };
    println!(
        "done: test accuracy {:.2}% after {} rounds on {} workers in {:.1}s\nsummary: {}\nstate checksum: {}",
        summary.test_accuracy * 100.0,
        summary.rounds,
        summary.workers,
        summary.wall_seconds,
        run_dir.join("summary.json").display(),
        summary.final_state_checksum
    );
    Ok(ExitCode::SUCCESS)
}

/// A line above the progress bar, or on stderr when there is no bar (not a terminal).
fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

fn stop_by_signal(stop: &CancellationToken, workers_gone: &CancellationToken) -> bool {
    stop.is_cancelled() && !workers_gone.is_cancelled()
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
