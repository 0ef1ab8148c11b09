//! The run directory: `summary.json` at the end, one JSON line per round in `metrics.jsonl`,
//! and `job.json`, the identity of the job the directory belongs to. These files are the run's
//! public record, read by people, scripts and tests.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One finished round, as written to `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRecord {
    pub round: u64,
    /// Mean inner-loop training loss over the round's assignments.
    pub train_loss: f64,
    /// Training samples the round's inner steps processed.
    pub samples: u64,
    /// Mean meta-set loss after the inner steps (when the job has a meta set).
    pub meta_loss: Option<f64>,
    /// Domain weights after this round's outer update.
    pub domain_weights: BTreeMap<String, f64>,
    /// ‖dL_meta/dλ‖ of this round's update (method `hypergradient`).
    pub hypergradient_norm: Option<f64>,
    /// DoReMi's clipped excess loss per domain in this round (proxy phase).
    pub excess_loss: Option<BTreeMap<String, f64>>,
    /// Every domain's mean d_k = ⟨∇ℓ_k, ∇L_meta⟩ per probed sample this round
    /// (`hypergradient`): the agreement of its gradient with the meta gradient that moves λ.
    pub domain_alignment: Option<BTreeMap<String, f64>>,
    /// ‖∇Ω‖ of this round's update (`loss-rescaling`).
    pub omega_grad_norm: Option<f64>,
    /// The task policy's probabilities over the sources used this round (`task-policy`).
    pub source_weights: Option<BTreeMap<String, f64>>,
    /// Mean reward L_T(θ) − L_T(θ_i) of each source sampled this round (`task-policy`).
    pub rewards: Option<BTreeMap<String, f64>>,
    /// ‖∇ψ J‖ of this round's policy update (`task-policy`, policy `learned`).
    pub policy_grad_norm: Option<f64>,
    /// The global model's accuracy on the meta set after this round.
    pub meta_accuracy: Option<f64>,
    /// The global model's test loss and accuracy after this round, when it was evaluated
    /// (every `eval_every` rounds and after the last).
    pub test_loss: Option<f64>,
    pub test_accuracy: Option<f64>,
    /// From the round's start to its last result folded and the outer step taken; the
    /// evaluation of its model runs during the next round and is not counted.
    pub seconds: f64,
    /// The round's critical path of worker compute: the most seconds any one worker spent
    /// running this round's assignments (what a round cannot be shorter than).
    pub compute_seconds: f64,
    pub samples_per_second: f64,
    pub workers: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Assignments reassigned so far (cumulative).
    pub reassigned: u64,
}

/// The end of a run, as written to `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Accuracy of the final model on the test set, in 0..1.
    pub test_accuracy: f64,
    pub test_loss: f64,
    pub rounds: u64,
    pub wall_seconds: f64,
    /// Distinct workers that joined during the run.
    pub workers: usize,
    pub seed: u64,
    pub samples: u64,
    pub reassigned: u64,
    /// Results not applied, by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Workers dropped during the run, by reason: disconnected (dead, or left), assignment
    /// timeout (stuck), malformed result.
    pub workers_lost: BTreeMap<String, u64>,
    /// Connections refused before they joined, by reason: TLS handshake failed (no or a
    /// foreign or expired certificate, wrong ALPN), no hello, version mismatch, a malformed
    /// hello frame, too many handshakes or workers at once.
    pub connections_refused: BTreeMap<String, u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// SHA-256 of the model parameters and all outer state: equal only for bit-identical runs.
    pub final_state_checksum: String,
    /// The domain-weights method: uniform, fixed or hypergradient.
    pub strategy: String,
    /// Final weight of every domain (mean 1); empty for `task-policy`.
    pub domain_weights: BTreeMap<String, f64>,
    /// The task policy's final probabilities over the sources (`task-policy`).
    pub source_weights: Option<BTreeMap<String, f64>>,
    pub meta_loss: Option<f64>,
    /// Test accuracy of the uniform-weights baseline run (same seed, same budget), when run.
    pub baseline_test_accuracy: Option<f64>,
    /// Test accuracy of the target-only baseline of a `task-policy` job, when run.
    pub target_only_test_accuracy: Option<f64>,
    /// False when the run was stopped before its last round (a checkpoint was written).
    pub completed: bool,
    /// Periodic checkpoints that could not be written (each reported on stderr; the previous
    /// checkpoint stays intact and training continues).
    pub checkpoint_failures: u64,
    /// Writes to the run's record that failed (a full disk, say): a `metrics.jsonl` line (kept
    /// and written with the next round's), `plot.svg` or `weights.svg`. Training continues.
    pub record_failures: u64,
    /// The round whose model did best on the meta set (accuracy, then loss), and its test
    /// accuracy: the fair number for plain training, which may overfit noisy labels late.
    pub best_meta_round: Option<u64>,
    pub test_accuracy_at_best_meta: Option<f64>,
    /// How Ω's final weights separate clean from corrupted training samples (`loss-rescaling`).
    pub rescaler: Option<crate::strategy::Separation>,
}

/// What makes a job's results what they are, recorded in `job.json` when a run directory is
/// first used: a run directory holds one job, and `--resume` with another (seed, rounds, data,
/// model or settings) is refused instead of mixing two jobs' checkpoints and records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobIdentity {
    pub seed: u64,
    pub rounds: u64,
    /// The model's architecture as workers build it.
    pub model: String,
    /// SHA-256 over every domain's name and built-data checksum, the meta and test sets'
    /// checksums, the classes and the shards (not the paths: moving the data changes nothing).
    pub data: String,
    /// SHA-256 of each config section that decides the results, by section name.
    pub settings: BTreeMap<String, String>,
}

impl JobIdentity {
    /// How `other` (the job asking for this directory) differs from `self` (the recorded job),
    /// one line per difference; empty when they are the same job.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let mut out = Vec::new();
        if self.seed != other.seed {
            out.push(format!("seed: {} in the run directory, {} now", self.seed, other.seed));
        }
        if self.rounds != other.rounds {
            out.push(format!(
                "rounds: {} in the run directory, {} now",
                self.rounds, other.rounds
            ));
        }
        if self.model != other.model {
            out.push(format!(
                "model: {} in the run directory, {} now",
                self.model, other.model
            ));
        }
        if self.data != other.data {
            out.push("data: the training, meta or test data (or classes, shards) differ".to_string());
        }
        let sections: std::collections::BTreeSet<&String> = self.settings.keys().chain(other.settings.keys()).collect();
        for section in sections {
            if self.settings.get(section) != other.settings.get(section) {
                out.push(format!("[{section}]: the settings differ"));
            }
        }
        out
    }
}

/// The name of the file that holds the run directory's [`JobIdentity`].
pub const JOB_FILE: &str = "job.json";

/// Most `metrics.jsonl` bytes kept in memory while the file cannot be written; beyond that a
/// round's line is dropped (and counted), so a disk that stays full cannot exhaust memory.
const PENDING_LIMIT: usize = 4 << 20;

#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    /// Whole `metrics.jsonl` lines not written yet (the disk was full): written before the next.
    pending: Vec<u8>,
}

impl RunDir {
    /// A run directory that already exists (to amend its summary).
    pub fn open(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            pending: Vec::new(),
        }
    }

    /// Creates the directory (and parents). Its record is left as it is: [`RunDir::claim`]
    /// decides whose it is, then [`RunDir::start_metrics`] cuts `metrics.jsonl` to where the job
    /// starts.
    ///
    /// # Errors
    /// When the directory cannot be created.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path).with_context(|| format!("creating run directory {}", path.display()))?;
        Ok(Self::open(path))
    }

    /// Takes the directory for the job `identity`: records it in `job.json` when the directory
    /// has none yet.
    ///
    /// # Errors
    /// When the directory belongs to another job (the error lists every difference), when
    /// `job.json` cannot be read as one, or cannot be written.
    pub fn claim(&self, identity: &JobIdentity) -> anyhow::Result<()> {
        let p = self.path.join(JOB_FILE);
        match std::fs::read(&p) {
            Ok(bytes) => {
                let recorded: JobIdentity = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not a job identity this version can read", p.display()))?;
                let diffs = recorded.differences(identity);
                if !diffs.is_empty() {
                    return Err(AnotherJob(format!(
                        "run directory {} belongs to another job ({}):\n  - {}\nuse another --run-dir for this job",
                        self.path.display(),
                        p.display(),
                        diffs.join("\n  - ")
                    ))
                    .into());
                }
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.write_json(JOB_FILE, identity),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Cuts `metrics.jsonl` to the rounds before `rounds_done` (where the job continues; 0 for
    /// a fresh start): one line per round however often the coordinator was restarted, and no
    /// half-written line.
    ///
    /// # Errors
    /// When the file cannot be read or cut.
    pub fn start_metrics(&mut self, rounds_done: u64) -> anyhow::Result<()> {
        let p = self.path.join("metrics.jsonl");
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        let keep = metrics_prefix(&bytes, rounds_done);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        if keep < bytes.len() {
            let dropped = bytes[keep..].iter().filter(|&&b| b == b'\n').count();
            eprintln!(
                "{}: keeping the {} rounds before round {rounds_done}, dropping {dropped} later or broken line(s)",
                p.display(),
                bytes[..keep].iter().filter(|&&b| b == b'\n').count(),
            );
            f.set_len(keep as u64)
                .and_then(|()| f.sync_all())
                .with_context(|| format!("cutting {}", p.display()))?;
        }
        self.pending.clear();
        Ok(())
    }

    /// Appends one round to `metrics.jsonl`, after any lines that could not be written before.
    /// A failed write is cut back to the last whole line, and its lines are kept for the next
    /// call (up to a limit; beyond it this round's line is dropped).
    ///
    /// # Errors
    /// On a write failure (a full disk, say), naming the file and the cause; the file still
    /// ends with a whole line.
    pub fn append_metrics(&mut self, record: &RoundRecord) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        if self.pending.len() + line.len() <= PENDING_LIMIT {
            self.pending.extend_from_slice(&line);
        } else {
            tracing::warn!(
                round = record.round,
                "metrics.jsonl: too many unwritten lines; dropping this round's"
            );
        }
        self.flush_metrics()
    }

    /// Writes the `metrics.jsonl` lines still pending, if any.
    ///
    /// # Errors
    /// As [`RunDir::append_metrics`]; the lines stay pending.
    pub fn flush_metrics(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let p = self.path.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        let len = f.metadata().with_context(|| format!("reading {}", p.display()))?.len();
        if let Err(e) = f.write_all(&self.pending).and_then(|()| f.flush()) {
            // Never leave half a line: cut the file back to where this write began.
            let cut = f
                .set_len(len)
                .err()
                .map(|c| format!(" (and cutting it back failed: {c})"))
                .unwrap_or_default();
            return Err(e).with_context(|| format!("writing {}{cut}", p.display()));
        }
        self.pending.clear();
        Ok(())
    }

    /// Bytes of `metrics.jsonl` lines still waiting to be written.
    pub fn metrics_pending(&self) -> usize {
        self.pending.len()
    }

    /// `summary.json`'s `rounds` and `final_state_checksum` when it says the job completed.
    pub fn completed(&self) -> Option<(u64, String)> {
        let bytes = std::fs::read(self.path.join("summary.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        if !v.get("completed")?.as_bool()? {
            return None;
        }
        let checksum = v.get("final_state_checksum")?.as_str()?.to_string();
        Some((v.get("rounds")?.as_u64()?, checksum))
    }

    /// Writes `summary.json` atomically.
    ///
    /// # Errors
    /// On a write failure, naming the file.
    pub fn write_summary(&self, summary: &Summary) -> anyhow::Result<()> {
        self.write_json("summary.json", summary)
    }

    /// Writes `name` in the run directory as pretty JSON, atomically.
    ///
    /// # Errors
    /// On a write failure, naming the file.
    pub fn write_json(&self, name: &str, value: &impl Serialize) -> anyhow::Result<()> {
        self.write_text(name, &String::from_utf8(serde_json::to_vec_pretty(value)?)?)
    }

    /// Writes `name` in the run directory atomically (temporary file, fsync, rename), so a
    /// crash never leaves a half-written file.
    ///
    /// # Errors
    /// On a write failure, naming the file.
    pub fn write_text(&self, name: &str, body: &str) -> anyhow::Result<()> {
        self.write_bytes(name, body.as_bytes())
    }

    fn write_bytes(&self, name: &str, body: &[u8]) -> anyhow::Result<()> {
        // The checkpoints' atomic write: a failure names the file and removes the temporary one.
        crate::checkpoint::write_atomic(&self.path, name, body).map(|_| ())
    }
}

/// How many leading bytes of `metrics.jsonl` to keep when the job continues at `rounds_done`:
/// whole lines, each a JSON object for the next round in order, all before `rounds_done`. It
/// stops at the first line that is not (a torn last line, a round recorded twice or one the
/// checkpoint does not cover).
fn metrics_prefix(bytes: &[u8], rounds_done: u64) -> usize {
    let mut keep = 0;
    let mut last: Option<u64> = None;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        let round = line
            .strip_suffix(b"\n")
            .and_then(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
            .and_then(|v| v.get("round")?.as_u64());
        match round {
            Some(r) if r < rounds_done && last.is_none_or(|l| r > l) => {
                last = Some(r);
                keep += line.len();
            }
            _ => break,
        }
    }
    keep
}

/// A run directory that holds another job: a usage error (the caller named the wrong
/// directory or changed the job), which the CLI reports with exit code 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AnotherJob(String);

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(rounds: &[u64]) -> String {
        rounds
            .iter()
            .map(|r| format!("{{\"round\":{r},\"test_loss\":0.5}}\n"))
            .collect()
    }

    /// The defect this guards against: a resume after a crash appended the rounds since the
    /// checkpoint again (407 lines for 400 rounds).
    #[test]
    fn a_resume_cuts_the_record_to_the_checkpoint_round() {
        let text = lines(&[0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(metrics_prefix(text.as_bytes(), 4), lines(&[0, 1, 2, 3]).len());
        assert_eq!(metrics_prefix(text.as_bytes(), 0), 0, "a fresh start keeps nothing");
        assert_eq!(metrics_prefix(text.as_bytes(), 100), text.len());
        // A torn last line (a crash or a full disk mid-write) is dropped.
        let torn = format!("{}{{\"round\":3,\"te", lines(&[0, 1, 2]));
        assert_eq!(metrics_prefix(torn.as_bytes(), 10), lines(&[0, 1, 2]).len());
        // A record that repeats rounds (what an old resume left) is cut at the repeat.
        let repeated = lines(&[0, 1, 2, 3, 2, 3, 4]);
        assert_eq!(metrics_prefix(repeated.as_bytes(), 10), lines(&[0, 1, 2, 3]).len());
    }

    #[test]
    fn start_metrics_cuts_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(&p, lines(&[0, 1, 2, 3, 4])).expect("write");
        let mut run = RunDir::create(dir.path()).expect("create");
        run.start_metrics(2).expect("cut");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), lines(&[0, 1]));
    }

    fn identity() -> JobIdentity {
        JobIdentity {
            seed: 1,
            rounds: 40,
            model: "mlp 64-128-10".into(),
            data: "d".into(),
            settings: BTreeMap::from([("inner".into(), "a".into()), ("strategy".into(), "b".into())]),
        }
    }

    #[test]
    fn another_job_is_refused_with_every_difference() {
        let dir = tempfile::tempdir().expect("tmp");
        let run = RunDir::create(dir.path()).expect("create");
        run.claim(&identity()).expect("an empty directory is taken");
        run.claim(&identity()).expect("the same job again");
        let other = JobIdentity {
            seed: 2,
            settings: BTreeMap::from([("inner".into(), "a".into()), ("strategy".into(), "c".into())]),
            ..identity()
        };
        let e = format!("{:#}", run.claim(&other).expect_err("another job"));
        assert!(e.contains("belongs to another job") && e.contains("job.json"), "{e}");
        assert!(e.contains("seed: 1 in the run directory, 2 now"), "{e}");
        assert!(
            e.contains("[strategy]: the settings differ") && !e.contains("[inner]"),
            "{e}"
        );
    }
}
