//! `metaloop bench …`: the benchmarks of BENCHMARKS.md. Each measures metaloop against a
//! reference in the same run and prints a Markdown table with the ratio, since only ratios
//! mean anything on a shared machine. None of them is a test: they assert nothing about time.

mod coordinator;
mod overhead;
mod step;
mod transport;

use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// QUIC (the project's bundle path) against raw TCP on loopback.
    Transport {
        /// Payload sizes in MiB of f32.
        #[arg(long, value_delimiter = ',', default_value = "64,512")]
        sizes: Vec<usize>,
        /// Transfers per size and transport; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// Bi-level step throughput: the worker's inner loop against the same algorithm written as
    /// a plain PyTorch loop (scripts/bench_step.py) on the same torch, data and device.
    Step(step::StepArgs),
    /// Coordinator scaling and memory: real QUIC connections from simulated workers that
    /// compute nothing, in a child process.
    Coordinator(coordinator::CoordinatorArgs),
    /// The share of a `metaloop local` run's wall time not spent in worker compute.
    Overhead {
        /// The job config (default: the quickstart).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Runs, each in a fresh run directory; the median share is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// Internal: simulated workers for `bench coordinator` (a child process).
    #[command(hide = true)]
    SimWorkers(coordinator::SimArgs),
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Transport { sizes, repeats } => transport::run(sizes, repeats).await,
        BenchCommand::Step(args) => step::run(&args),
        BenchCommand::Coordinator(args) => coordinator::run(args).await,
        BenchCommand::Overhead { config, repeats } => overhead::run(config, repeats),
        BenchCommand::SimWorkers(args) => coordinator::sim_workers(args).await,
    }
}

/// A fresh scratch directory under the system's temp dir.
fn scratch_dir(what: &str) -> anyhow::Result<PathBuf> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("metaloop-bench-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The value at quantile `q` (0..=1) of `v` (sorted in place; nearest rank).
fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// This machine in a few words, for the tables' captions.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cpus} cores ({model})")
}
