//! The run directory: `summary.json` at the end, one JSON line per round in `metrics.jsonl`.
//! These files are the run's public record, read by people, scripts and tests.

use anyhow::Context;
use serde::Serialize;
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
    pub test_loss: f64,
    pub test_accuracy: f64,
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
    /// The round whose model did best on the meta set (accuracy, then loss), and its test
    /// accuracy: the fair number for plain training, which may overfit noisy labels late.
    pub best_meta_round: Option<u64>,
    pub test_accuracy_at_best_meta: Option<f64>,
    /// How Ω's final weights separate clean from corrupted training samples (`loss-rescaling`).
    pub rescaler: Option<crate::rescaler::Separation>,
}

#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// A run directory that already exists (to amend its summary).
    pub fn open(path: &Path) -> Self {
        Self { path: path.to_owned() }
    }

    /// Creates the directory (and parents); `metrics.jsonl` is started afresh unless `resume`.
    ///
    /// # Errors
    /// When the directory cannot be created or written.
    pub fn create(path: &Path, resume: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path).with_context(|| format!("creating run directory {}", path.display()))?;
        let metrics = path.join("metrics.jsonl");
        if !resume || !metrics.exists() {
            std::fs::write(&metrics, b"").with_context(|| format!("writing {}", metrics.display()))?;
        }
        Ok(Self { path: path.to_owned() })
    }

    /// Appends one round to `metrics.jsonl`.
    ///
    /// # Errors
    /// On a write failure (a full disk, say), naming the file.
    pub fn append_metrics(&self, record: &RoundRecord) -> anyhow::Result<()> {
        let p = self.path.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .with_context(|| format!("opening {}", p.display()))?;
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        f.write_all(&line).with_context(|| format!("writing {}", p.display()))
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
        let p = self.path.join(name);
        let tmp = self.path.join(format!("{name}.tmp"));
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(body)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("renaming {} to {}", tmp.display(), p.display()))
    }
}
