//! End to end: `metaloop local` with real worker processes talking QUIC on loopback.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn metaloop() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_metaloop"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

fn run_local(dir: &Path, extra: &[&str]) -> Value {
    let out = metaloop()
        .args(["local", "--quiet", "--run-dir"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("start metaloop");
    assert!(
        out.status.success(),
        "metaloop local failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.join("worker-0.log")).unwrap_or_default()
    );
    let text = std::fs::read_to_string(dir.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary.json is JSON")
}

/// Runs `local` on a config that must fail; returns its stderr.
fn run_local_failing(cfg: &Path, run_dir: &Path) -> String {
    let out = metaloop()
        .args(["local", "--quiet", "--workers", "1", "--config"])
        .arg(cfg)
        .arg("--run-dir")
        .arg(run_dir)
        .output()
        .expect("run");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn local_sgd_trains_to_90_percent_with_two_worker_processes() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = run_local(dir.path(), &["--workers", "2", "--config", "configs/local-sgd.toml"]);
    let acc = s["test_accuracy"].as_f64().expect("test_accuracy");
    assert!((0.9..=1.0).contains(&acc), "test accuracy {acc} below 90%");
    assert_eq!(s["rounds"], 30);
    assert_eq!(s["workers"], 2);
    assert!(s["wall_seconds"].as_f64().expect("wall_seconds") > 0.0);
    assert!(
        s["bytes_in"].as_u64().expect("bytes_in") > 0,
        "deltas must have crossed the network"
    );
    let checksum = s["final_state_checksum"].as_str().expect("checksum");
    assert!(
        checksum.len() == 64 && checksum.chars().all(|c| c.is_ascii_hexdigit()),
        "{checksum}"
    );

    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("metrics.jsonl");
    let rounds: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(rounds.len(), 30);
    let first = rounds[0]["test_accuracy"].as_f64().expect("acc");
    assert!(first < acc, "accuracy should improve over the run: {first} → {acc}");
    for r in &rounds {
        assert_eq!(r["workers"], 2);
    }
}

#[test]
fn same_seed_gives_the_same_state_whatever_the_number_of_workers() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let c = tempfile::tempdir().expect("tmp");
    // The quickstart learns domain weights, so λ and its optimizer state are in the checksum too.
    let args = |workers: &'static str, seed: &'static str| {
        ["--workers", workers, "--rounds", "4", "--seed", seed, "--no-baseline"]
    };
    let one = run_local(a.path(), &args("1", "7"));
    let three = run_local(b.path(), &args("3", "7"));
    let other = run_local(c.path(), &args("2", "8"));
    assert_eq!(one["final_state_checksum"], three["final_state_checksum"]);
    assert_eq!(one["test_accuracy"], three["test_accuracy"]);
    assert_ne!(
        one["final_state_checksum"], other["final_state_checksum"],
        "the seed must matter"
    );
}

#[test]
fn two_cpu_replicas_in_a_worker_train_like_one() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let args = |devices: &'static str| ["--workers", "1", "--rounds", "4", "--no-baseline", "--devices", devices];
    let one = run_local(a.path(), &args("cpu"));
    let two = run_local(b.path(), &args("cpu,cpu"));
    let log = std::fs::read_to_string(b.path().join("worker-0.log")).expect("worker log");
    assert!(log.contains("one model replica per device"), "{log}");
    // The replicas split every batch and sum their gradients: only float rounding differs.
    let close = |x: &Value, y: &Value, what: &str| {
        let (x, y) = (x.as_f64().expect(what), y.as_f64().expect(what));
        assert!(
            (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
            "{what}: {x} with one replica, {y} with two"
        );
    };
    close(&one["test_loss"], &two["test_loss"], "test loss");
    let acc = |s: &Value| s["test_accuracy"].as_f64().expect("test accuracy");
    // A test sample within rounding of the decision boundary may flip: at most one.
    assert!((acc(&one) - acc(&two)).abs() <= 0.005, "{} vs {}", acc(&one), acc(&two));
    for name in ["clean", "noisy-50", "permuted", "feature-noise"] {
        close(&one["domain_weights"][name], &two["domain_weights"][name], name);
    }
    assert_eq!(one["samples"], two["samples"]);
}

#[test]
fn quickstart_learns_domain_weights_that_beat_uniform_weights() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = run_local(dir.path(), &["--workers", "2"]);
    let w = |name: &str| {
        s["domain_weights"][name]
            .as_f64()
            .unwrap_or_else(|| panic!("weight of {name}: {s}"))
    };
    let (clean, noisy, permuted, features) = (w("clean"), w("noisy-50"), w("permuted"), w("feature-noise"));
    assert!(permuted < 0.5 * clean, "permuted {permuted} vs clean {clean}");
    assert!(
        noisy < 0.5 * clean && features < clean,
        "noisy {noisy}, feature noise {features}, clean {clean}"
    );
    assert_eq!(s["strategy"], "hypergradient");
    let acc = s["test_accuracy"].as_f64().expect("acc");
    let baseline = s["baseline_test_accuracy"].as_f64().expect("the baseline ran");
    assert!(acc >= 0.9, "learned weights reach {acc}");
    assert!(acc > baseline + 0.05, "learned {acc} vs uniform {baseline}");
    let b: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("baseline-uniform/summary.json")).expect("baseline summary"),
    )
    .expect("JSON");
    assert_eq!(b["test_accuracy"].as_f64(), Some(baseline));
    assert_eq!(b["rounds"], s["rounds"], "same budget");
    assert_eq!(b["seed"], s["seed"], "same seed");

    let domains: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("domains.json")).expect("domains.json"))
            .expect("JSON");
    let noisy = &domains[1];
    assert_eq!(noisy["name"], "noisy-50");
    let flipped = noisy["flipped"].as_array().expect("flipped rows recorded").len();
    assert!(
        (120..=180).contains(&flipped),
        "{flipped} of 300 labels flipped at p = 0.5"
    );
    assert!(domains[2]["permutation"].as_array().is_some_and(|p| p.len() == 10));

    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("metrics");
    let last: Value = serde_json::from_str(metrics.lines().last().expect("a round")).expect("JSON");
    assert!(
        last["meta_loss"].as_f64().is_some() && last["hypergradient_norm"].as_f64().is_some(),
        "{last}"
    );
    let state = std::fs::read(dir.path().join("final.safetensors")).expect("final.safetensors");
    let header_len = u64::from_le_bytes(state[..8].try_into().expect("8 bytes")) as usize;
    let header: Value = serde_json::from_slice(&state[8..8 + header_len]).expect("safetensors header");
    for key in ["l0.weight", "l1.bias", "domain_weights.lambda", "domain_weights.adam_v"] {
        assert!(header.get(key).is_some(), "the final state lacks {key}: {header}");
    }
    assert_eq!(header["domain_weights.lambda"]["shape"], serde_json::json!([4]));
    let plot = std::fs::read_to_string(dir.path().join("plot.svg")).expect("plot.svg");
    assert!(
        plot.contains("permuted") && plot.matches("<polyline").count() >= 4 + 3,
        "weights and losses are plotted"
    );
}

#[test]
fn a_domain_that_does_not_fit_the_job_is_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let odd = metaloop_proto::dataset::Dataset {
        x: vec![0.5; 30],
        y: vec![1; 10],
        features: 3,
    };
    std::fs::write(
        dir.path().join("odd.safetensors"),
        metaloop_proto::dataset::to_safetensors(&odd).expect("ser"),
    )
    .expect("write");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits");
    let cfg = dir.path().join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            "rounds = 1\n[data]\ntest = {:?}\nclasses = 10\nshards = 1\n[[data.domains]]\nname = \"good\"\nsource = {:?}\n[[data.domains]]\nname = \"odd\"\nsource = \"odd.safetensors\"\n",
            root.join("test.safetensors"),
            root.join("train.safetensors")
        ),
    )
    .expect("write");
    let err = run_local_failing(&cfg, &dir.path().join("run"));
    assert!(err.contains("domain `odd`") && err.contains("3 features"), "{err}");
}

#[test]
fn validate_reports_every_problem_with_its_key() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "rounds = 0\n[data]\ntrain = \"nope.safetensors\"\ntest = \"nope.safetensors\"\nclasses = 10\n[inner]\nmomentum = 1.5\n")
        .expect("write");
    let out = metaloop().arg("validate").arg(&cfg).output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["rounds:", "data.train:", "data.test:", "inner.momentum:", "bad.toml"] {
        assert!(err.contains(key), "missing {key} in:\n{err}");
    }
    let ok = metaloop()
        .args(["validate", "configs/quickstart.toml"])
        .output()
        .expect("run");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

#[test]
fn a_corrupt_data_file_is_named_before_training() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("train.safetensors"), b"not a safetensors file").expect("write");
    let test = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits/test.safetensors");
    let cfg = dir.path().join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            "rounds = 1\n[data]\ntrain = \"train.safetensors\"\ntest = {:?}\nclasses = 10\n",
            test
        ),
    )
    .expect("write");
    let err = run_local_failing(&cfg, &dir.path().join("run"));
    assert!(
        err.contains("train.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );
}

/// Meta loss rescaling end to end with 2 worker processes, in both modes: Ω must give the
/// corrupted samples (recorded in domains.json) a lower weight than the clean ones.
#[test]
fn loss_rescaling_weights_corrupted_samples_down_in_both_modes() {
    for mode in ["clean-meta", "self-taught"] {
        let dir = tempfile::tempdir().expect("tmp");
        let config = format!("configs/noise40-{mode}.toml");
        let s = run_local(dir.path(), &["--workers", "2", "--config", &config, "--rounds", "150"]);
        assert_eq!(s["strategy"], format!("loss-rescaling/{mode}"));
        let r = &s["rescaler"];
        let (clean, corrupted) = (
            r["mean_weight_clean"].as_f64().expect("clean"),
            r["mean_weight_corrupted"].as_f64().expect("corrupted"),
        );
        assert!(corrupted < clean, "{mode}: corrupted {corrupted} vs clean {clean}");
        assert!(r["auc"].as_f64().expect("auc") > 0.9, "{mode}: {r}");
        let flipped: usize =
            serde_json::from_str::<Value>(&std::fs::read_to_string(dir.path().join("domains.json")).expect("domains"))
                .expect("JSON")[0]["flipped"]
                .as_array()
                .expect("flipped")
                .len();
        assert_eq!(
            r["corrupted"].as_u64(),
            Some(flipped as u64),
            "the corrupted group is exactly the recorded rows"
        );
        assert!(s["best_meta_round"].as_u64().is_some() && s["test_accuracy_at_best_meta"].as_f64().is_some());
        let svg = std::fs::read_to_string(dir.path().join("weights.svg")).expect("weights.svg");
        assert!(svg.contains("corrupted"), "histogram written");
        let last: Value = serde_json::from_str(
            std::fs::read_to_string(dir.path().join("metrics.jsonl"))
                .expect("metrics")
                .lines()
                .last()
                .expect("a round"),
        )
        .expect("JSON");
        assert!(last["omega_grad_norm"].as_f64().is_some(), "{last}");
    }
}

/// DoReMi end to end with 2 worker processes: a reference phase on uniform weights, then a
/// proxy phase whose per-round excess losses move the weights; the summary reports them.
#[test]
fn doremi_runs_both_phases_and_reports_its_weights() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = run_local(
        dir.path(),
        &[
            "--workers",
            "2",
            "--config",
            "configs/domain-weights-doremi.toml",
            "--rounds",
            "60",
            "--no-baseline",
        ],
    );
    assert_eq!(s["strategy"], "doremi");
    let weights: Vec<f64> = s["domain_weights"]
        .as_object()
        .expect("weights")
        .values()
        .map(|w| w.as_f64().expect("f64"))
        .collect();
    assert_eq!(weights.len(), 4);
    assert!(
        (weights.iter().sum::<f64>() / 4.0 - 1.0).abs() < 1e-9,
        "mean 1: {weights:?}"
    );
    assert!(
        weights.iter().any(|w| (w - 1.0).abs() > 1e-6),
        "the proxy phase moved them: {weights:?}"
    );
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("metrics");
    let rounds: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    // rounds = 60 → the reference phase is rounds 0..30 (half), the proxy phase 30..60.
    assert!(
        rounds[..30].iter().all(|r| r["excess_loss"].is_null()),
        "no excess loss in the reference phase"
    );
    assert!(
        rounds[30..].iter().all(|r| r["excess_loss"].is_object()),
        "excess loss every proxy round"
    );
    assert!(
        rounds[29]["domain_weights"]["clean"] == 1.0,
        "uniform until the proxy phase"
    );
}

/// The task policy end to end with 2 worker processes: every round samples sources, a copy of
/// the model trains on each, the rewards teach the LSTM policy; the clean related source ends
/// with the highest weight, and the run reports the policy per round and in the summary.
#[test]
fn the_task_policy_learns_to_prefer_the_clean_related_source() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = run_local(
        dir.path(),
        &[
            "--workers",
            "2",
            "--config",
            "configs/task-policy.toml",
            "--rounds",
            "80",
            "--no-baseline",
        ],
    );
    assert_eq!(s["strategy"], "task-policy/learned");
    let w = s["source_weights"].as_object().expect("source_weights");
    let weight = |n: &str| w[n].as_f64().expect("f64");
    assert!((w.values().map(|v| v.as_f64().expect("f64")).sum::<f64>() - 1.0).abs() < 1e-9);
    for other in ["noisy-60", "label-permuted", "pixel-permuted"] {
        assert!(weight("clean") > weight(other), "clean must lead: {w:?}");
    }
    assert!(weight("clean") > 0.3, "and have moved from 0.25: {w:?}");
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).expect("metrics");
    let rounds: Vec<Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    // 80 rounds, of which the last 20 fine-tune on the target.
    assert!(rounds[..60]
        .iter()
        .all(|r| r["rewards"].is_object() && r["source_weights"].is_object()));
    assert!(rounds[60..].iter().all(|r| r["rewards"].is_null()));
    let permuted: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r["rewards"]["label-permuted"].as_f64())
        .collect();
    assert!(
        permuted.iter().sum::<f64>() < 0.0,
        "training on permuted labels raises the target loss: {permuted:?}"
    );
    let plot = std::fs::read_to_string(dir.path().join("plot.svg")).expect("plot");
    assert!(plot.contains("source-task policy"));
}

/// `[outer] delta_dtype = "bf16"` / `"int8"`: workers send their deltas as bfloat16 or blockwise
/// int8. The job still trains, half / about a quarter of the bytes cross the network to the
/// coordinator, and the result differs from the exact run (the rounding is real); the int8 run is
/// the same with one worker process as with two.
#[test]
fn compressed_deltas_cut_the_bytes_in_and_still_train() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg_dir = tempfile::tempdir().expect("tmp");
    let exact = std::fs::read_to_string(root.join("configs/local-sgd.toml"))
        .expect("config")
        .replace("\"../data/", &format!("\"{}/data/", root.display()));
    let bf16 = exact.replace("[outer]\n", "[outer]\ndelta_dtype = \"bf16\"\n");
    let int8 = exact.replace("[outer]\n", "[outer]\ndelta_dtype = \"int8\"\n");
    assert!(exact != bf16 && exact != int8);
    let run = |name: &str, text: &str, workers: &str| {
        let cfg = cfg_dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, text).expect("write");
        let dir = cfg_dir.path().join(name);
        run_local(
            &dir,
            &[
                "--workers",
                workers,
                "--rounds",
                "10",
                "--config",
                cfg.to_str().expect("path"),
            ],
        )
    };
    let f32_run = run("f32", &exact, "2");
    let bytes = |s: &Value| s["bytes_in"].as_f64().expect("bytes_in");
    let exact_acc = f32_run["test_accuracy"].as_f64().expect("accuracy");
    for (name, text, range) in [("bf16", &bf16, 0.45..0.6), ("int8", &int8, 0.2..0.32)] {
        let compressed = run(name, text, "2");
        let ratio = bytes(&compressed) / bytes(&f32_run);
        assert!(range.contains(&ratio), "{name} bytes in / f32 bytes in = {ratio}");
        let acc = compressed["test_accuracy"].as_f64().expect("accuracy");
        assert!(
            acc > 0.8 && (acc - exact_acc).abs() < 0.05,
            "{name} {acc} vs f32 {exact_acc}"
        );
        assert_ne!(
            compressed["final_state_checksum"], f32_run["final_state_checksum"],
            "{name} deltas must actually be rounded"
        );
        if name == "int8" {
            let one = run("int8-one", text, "1");
            assert_eq!(one["final_state_checksum"], compressed["final_state_checksum"]);
        }
    }
}
