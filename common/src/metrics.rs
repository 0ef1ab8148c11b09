//! Every metric the coordinator and the workers export: names, labels and help texts, in one
//! place (docs/algorithms.md §7). Prometheus practice: one prefix, base units, `_total` on counters, and
//! only bounded labels (a reason from a fixed set, a domain or source named in the job config;
//! never a worker id).
//!
//! The values are recorded through the `metrics` facade; `crate::http` serves them as
//! Prometheus text on `/metrics`. The Grafana dashboard and alert rules under `k8s/` may name
//! only what [`ALL`] lists (a test checks it).

/// Kind of a metric, as Prometheus knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

macro_rules! metrics {
    ($($id:ident = $name:literal, $kind:ident, [$($label:literal),*], $help:literal;)*) => {
        $(pub const $id: &str = $name;)*
        /// Every metric, for `describe` and for the dashboard and rules tests.
        pub const ALL: &[Metric] = &[
            $(Metric { name: $name, kind: Kind::$kind, labels: &[$($label),*], help: $help },)*
        ];
    };
}

metrics! {
    // Coordinator: the job.
    JOB_INFO = "metaloop_job_info", Gauge, ["strategy"], "Always 1; the label names the outer strategy.";
    ROUNDS_PLANNED = "metaloop_rounds_planned", Gauge, [], "Rounds the job runs in all.";
    ROUNDS_COMPLETED = "metaloop_rounds_completed_total", Counter, [], "Rounds completed (all their results applied).";
    ROUND_DURATION = "metaloop_round_duration_seconds", Histogram, [], "Wall time of a round, from plan to evaluation.";
    ROUND_LAST_TIMESTAMP = "metaloop_round_last_completed_timestamp_seconds", Gauge, [], "Unix time at which the last round completed.";
    SAMPLES = "metaloop_samples_total", Counter, [], "Training samples processed by the workers' inner steps.";
    SAMPLES_PER_SECOND = "metaloop_samples_per_second", Gauge, [], "Training samples per second over the last round.";
    WORKERS_CONNECTED = "metaloop_workers_connected", Gauge, [], "Workers joined and connected now.";
    REASSIGNED = "metaloop_assignments_reassigned_total", Counter, [], "Assignments moved to another worker (lost, stuck or failed worker).";
    REJECTED = "metaloop_results_rejected_total", Counter, ["reason"], "Results not applied, by reason.";
    WORKERS_LOST = "metaloop_workers_lost_total", Counter, ["reason"], "Joined workers dropped or gone, by reason.";
    CONNECTIONS_REFUSED = "metaloop_connections_refused_total", Counter, ["reason"], "Connections refused before joining, by reason.";
    RECEIVE_BYTES = "metaloop_network_receive_bytes_total", Counter, [], "Tensor bytes received from workers.";
    TRANSMIT_BYTES = "metaloop_network_transmit_bytes_total", Counter, [], "Tensor bytes sent to workers.";
    TRAIN_LOSS = "metaloop_train_loss", Gauge, [], "Mean inner-loop training loss of the last round.";
    META_LOSS = "metaloop_meta_loss", Gauge, [], "Meta (or target) loss of the last round.";
    TEST_LOSS = "metaloop_test_loss", Gauge, [], "Test loss of the global model after the last round.";
    TEST_ACCURACY = "metaloop_test_accuracy_ratio", Gauge, [], "Test accuracy (0..1) of the global model after the last round.";
    DOMAIN_WEIGHT = "metaloop_domain_weight", Gauge, ["domain"], "Weight of each training domain (mean 1).";
    SOURCE_WEIGHT = "metaloop_source_weight", Gauge, ["source"], "Task policy: probability of each source task.";
    TASK_REWARD = "metaloop_task_reward", Gauge, ["source"], "Task policy: mean reward of each source sampled in the last round.";
    WEIGHT_ENTROPY = "metaloop_weight_entropy_ratio", Gauge, [], "Entropy of the normalised domain (or source) weights over its maximum, ln K: 1 is uniform, 0 is all on one.";
    HYPERGRADIENT_NORM = "metaloop_hypergradient_norm", Gauge, [], "Norm of the last domain-weight hypergradient.";
    RESCALER_GRADIENT_NORM = "metaloop_rescaler_gradient_norm", Gauge, [], "Norm of the last meta-gradient of the loss-rescaling network.";
    POLICY_GRADIENT_NORM = "metaloop_policy_gradient_norm", Gauge, [], "Norm of the last task-policy gradient.";
    CHECKPOINT_TIMESTAMP = "metaloop_checkpoint_last_success_timestamp_seconds", Gauge, [], "Unix time of the last checkpoint written (the start of the job before the first).";
    CHECKPOINT_FAILURES = "metaloop_checkpoint_failures_total", Counter, [], "Checkpoints that could not be written.";
    RECORD_FAILURES = "metaloop_record_failures_total", Counter, [], "Writes to the run's record (a metrics.jsonl line, a plot) that failed; training goes on.";
    // Worker.
    WORKER_CONNECTED = "metaloop_worker_connected", Gauge, [], "1 while this worker has joined a job.";
    WORKER_RECONNECTS = "metaloop_worker_reconnects_total", Counter, [], "Times this worker lost its coordinator and tried again.";
    WORKER_ASSIGNMENTS = "metaloop_worker_assignments_total", Counter, ["outcome"], "Assignments run by this worker, by outcome (ok, failed).";
    WORKER_ASSIGNMENT_DURATION = "metaloop_worker_assignment_duration_seconds", Histogram, [], "Compute time of one assignment.";
    WORKER_SAMPLES = "metaloop_worker_samples_total", Counter, [], "Training samples processed by this worker.";
    WORKER_INNER_LOSS = "metaloop_worker_inner_loss", Gauge, [], "Mean training loss of this worker's last assignment.";
    RESCALER_SAMPLE_WEIGHT = "metaloop_rescaler_sample_weight", Histogram, [], "Loss-rescaling network's weight (0..1) of each training sample.";
}

/// Bucket bounds (seconds or ratios) for the histograms.
pub fn buckets(name: &str) -> &'static [f64] {
    match name {
        RESCALER_SAMPLE_WEIGHT => &[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0],
        _ => &[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ],
    }
}

/// Registers every help text with the installed recorder.
pub fn describe() {
    for m in ALL {
        match m.kind {
            Kind::Counter => metrics::describe_counter!(m.name, m.help),
            Kind::Gauge => metrics::describe_gauge!(m.name, m.help),
            Kind::Histogram => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// Normalised entropy H(p)/ln K of non-negative weights (1 when K < 2 or all are zero).
pub fn entropy_ratio(weights: &[f64]) -> f64 {
    let total: f64 = weights.iter().filter(|w| **w > 0.0).sum();
    if weights.len() < 2 || total <= 0.0 {
        return 1.0;
    }
    let h: f64 = weights
        .iter()
        .filter(|w| **w > 0.0)
        .map(|w| {
            let p = w / total;
            -p * p.ln()
        })
        .sum();
    h / (weights.len() as f64).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_practice() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("metaloop_"), "{}", m.name);
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                m.name
            );
            assert_eq!(m.kind == Kind::Counter, m.name.ends_with("_total"), "{}", m.name);
            assert!(!m.help.is_empty());
            for l in m.labels {
                assert!(
                    ["reason", "domain", "source", "strategy", "outcome"].contains(l),
                    "unbounded label {l}"
                );
            }
        }
    }

    #[test]
    fn entropy_ratio_is_one_for_uniform_and_zero_for_one_hot() {
        assert!((entropy_ratio(&[1.0, 1.0, 1.0, 1.0]) - 1.0).abs() < 1e-12);
        assert!(entropy_ratio(&[1.0, 0.0, 0.0]).abs() < 1e-12);
        let mid = entropy_ratio(&[3.0, 1.0]);
        assert!(mid > 0.5 && mid < 1.0, "{mid}");
    }
}
