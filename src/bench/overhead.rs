//! `metaloop bench overhead`: how much of a `metaloop local` run is not worker compute.
//!
//! Runs `metaloop local --no-baseline` as a child process (so its start-up counts) and reads
//! the run directory: every round records its wall time and its critical path of worker compute
//! (the most seconds one worker spent on the round's assignments, as the workers timed them).
//! Whatever else a round takes — planning, sending the model, receiving and averaging deltas,
//! the outer step, evaluation, records, checkpoints — is overhead, and so is everything outside
//! the rounds (process start, data loading, workers joining, the final report).

use anyhow::{ensure, Context};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

#[derive(Debug, Default, Clone, Copy)]
struct Shares {
    /// Seconds of the whole `local` process.
    process: f64,
    /// Seconds of the coordinator's job (from binding to the summary).
    job: f64,
    /// Σ round seconds.
    rounds: f64,
    /// Σ critical-path worker compute seconds.
    compute: f64,
    n_rounds: usize,
}

pub fn run(config: Option<PathBuf>, repeats: usize) -> anyhow::Result<()> {
    let config = config.unwrap_or_else(|| PathBuf::from("configs/quickstart.toml"));
    ensure!(config.is_file(), "{} is not a file", config.display());
    let exe = std::env::current_exe()?;
    let mut runs = Vec::new();
    for _ in 0..repeats.max(1) {
        let dir = super::scratch_dir("overhead")?;
        let start = Instant::now();
        let out = Command::new(&exe)
            .args(["local", "--quiet", "--no-baseline", "--config"])
            .arg(&config)
            .arg("--run-dir")
            .arg(&dir)
            .output()
            .context("starting metaloop local")?;
        let process = start.elapsed().as_secs_f64();
        ensure!(
            out.status.success(),
            "metaloop local failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        runs.push(read(&dir, process)?);
        let _ = std::fs::remove_dir_all(&dir);
    }
    runs.sort_by(|a, b| overhead(a.compute, a.job).total_cmp(&overhead(b.compute, b.job)));
    let s = runs[runs.len() / 2];
    println!(
        "`metaloop local --no-baseline --config {}` ({} rounds), median of {} runs by job overhead; {}.",
        config.display(),
        s.n_rounds,
        runs.len(),
        super::machine()
    );
    println!();
    println!("| span | wall s | worker compute s (critical path) | not compute |");
    println!("|---|---|---|---|");
    for (span, wall) in [
        ("rounds only", s.rounds),
        ("coordinator job (incl. workers joining)", s.job),
        ("whole `local` process", s.process),
    ] {
        println!(
            "| {span} | {wall:.2} | {:.2} | {:.1}% |",
            s.compute,
            100.0 * overhead(s.compute, wall)
        );
    }
    Ok(())
}

fn overhead(compute: f64, wall: f64) -> f64 {
    1.0 - compute / wall.max(1e-9)
}

fn read(dir: &std::path::Path, process: f64) -> anyhow::Result<Shares> {
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("summary.json"))?)?;
    let job = summary["wall_seconds"]
        .as_f64()
        .context("summary.json has no wall_seconds")?;
    let mut s = Shares {
        process,
        job,
        ..Shares::default()
    };
    for line in std::fs::read_to_string(dir.join("metrics.jsonl"))?.lines() {
        let r: serde_json::Value = serde_json::from_str(line)?;
        s.rounds += r["seconds"].as_f64().context("a round without seconds")?;
        s.compute += r["compute_seconds"]
            .as_f64()
            .context("a round without compute_seconds")?;
        s.n_rounds += 1;
    }
    Ok(s)
}
