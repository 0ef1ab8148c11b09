//! The coordinator's metrics: what a finished round, a refused connection, a lost worker or a
//! checkpoint means for the exported series (names in `metaloop_common::metrics`). Recording
//! through the `metrics` facade is a no-op when no recorder is installed (tests, library use).

use crate::rundir::RoundRecord;
use metaloop_common::metrics as m;
use std::time::{SystemTime, UNIX_EPOCH};

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The job starts (or resumes after `rounds_done` rounds): its strategy and length; the ages
/// of the last round and the last checkpoint count from now.
pub fn job_started(strategy: &str, rounds: u64, rounds_done: u64) {
    metrics::gauge!(m::JOB_INFO, "strategy" => strategy.to_string()).set(1.0);
    metrics::gauge!(m::ROUNDS_PLANNED).set(rounds as f64);
    metrics::counter!(m::ROUNDS_COMPLETED).absolute(rounds_done);
    metrics::gauge!(m::ROUND_LAST_TIMESTAMP).set(now());
    metrics::gauge!(m::CHECKPOINT_TIMESTAMP).set(now());
}

/// A round completed. `reassigned_before` is the cumulative count before it.
pub fn round(r: &RoundRecord, reassigned_before: u64) {
    metrics::counter!(m::ROUNDS_COMPLETED).increment(1);
    metrics::histogram!(m::ROUND_DURATION).record(r.seconds);
    metrics::gauge!(m::ROUND_LAST_TIMESTAMP).set(now());
    metrics::counter!(m::SAMPLES).increment(r.samples);
    metrics::gauge!(m::SAMPLES_PER_SECOND).set(r.samples_per_second);
    metrics::counter!(m::REASSIGNED).increment(r.reassigned.saturating_sub(reassigned_before));
    metrics::counter!(m::RECEIVE_BYTES).increment(r.bytes_in);
    metrics::counter!(m::TRANSMIT_BYTES).increment(r.bytes_out);
    metrics::gauge!(m::TRAIN_LOSS).set(r.train_loss);
    if let Some(v) = r.meta_loss {
        metrics::gauge!(m::META_LOSS).set(v);
    }
    if let (Some(loss), Some(accuracy)) = (r.test_loss, r.test_accuracy) {
        metrics::gauge!(m::TEST_LOSS).set(loss);
        metrics::gauge!(m::TEST_ACCURACY).set(accuracy);
    }
    for (name, w) in &r.domain_weights {
        metrics::gauge!(m::DOMAIN_WEIGHT, "domain" => name.clone()).set(*w);
    }
    if let Some(weights) = &r.source_weights {
        for (name, w) in weights {
            metrics::gauge!(m::SOURCE_WEIGHT, "source" => name.clone()).set(*w);
        }
    }
    for (name, reward) in r.rewards.iter().flatten() {
        metrics::gauge!(m::TASK_REWARD, "source" => name.clone()).set(*reward);
    }
    let weights: Vec<f64> = match &r.source_weights {
        Some(w) => w.values().copied().collect(),
        None => r.domain_weights.values().copied().collect(),
    };
    metrics::gauge!(m::WEIGHT_ENTROPY).set(m::entropy_ratio(&weights));
    for (name, v) in [
        (m::HYPERGRADIENT_NORM, r.hypergradient_norm),
        (m::RESCALER_GRADIENT_NORM, r.omega_grad_norm),
        (m::POLICY_GRADIENT_NORM, r.policy_grad_norm),
    ] {
        if let Some(v) = v {
            metrics::gauge!(name).set(v);
        }
    }
}

pub fn workers_connected(n: usize) {
    metrics::gauge!(m::WORKERS_CONNECTED).set(n as f64);
}

pub fn rejected(reason: &str) {
    metrics::counter!(m::REJECTED, "reason" => reason.to_string()).increment(1);
}

pub fn worker_lost(reason: &str) {
    metrics::counter!(m::WORKERS_LOST, "reason" => reason.to_string()).increment(1);
}

pub fn refused(reason: &str) {
    metrics::counter!(m::CONNECTIONS_REFUSED, "reason" => reason.to_string()).increment(1);
}

pub fn checkpoint_written() {
    metrics::gauge!(m::CHECKPOINT_TIMESTAMP).set(now());
}

pub fn checkpoint_failed() {
    metrics::counter!(m::CHECKPOINT_FAILURES).increment(1);
}

pub fn record_failed() {
    metrics::counter!(m::RECORD_FAILURES).increment(1);
}
