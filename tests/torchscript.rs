//! End to end: a TorchScript module (`[model] kind = "torchscript"`) shipped by the coordinator
//! to worker processes and trained there. The MLP exported by `scripts/export_torchscript.py`
//! (tests/data/torchscript/mlp.pt: the native MLP's initial values for seed 0) must end in the
//! native MLP's state bit for bit; modules metaloop cannot train, and exact meta-gradients, are
//! refused by `validate` before anything starts, naming the file and the reason.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn metaloop(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_metaloop"))
        .current_dir(ROOT)
        .args(args)
        .output()
        .expect("start metaloop")
}

/// A job on two digits domains (one with half its labels flipped) that learns domain weights
/// by the finite-difference hypergradient, with `model` as its `[model]` section.
fn job(dir: &Path, name: &str, model: &str) -> PathBuf {
    let data = Path::new(ROOT).join("data/digits");
    let text = format!(
        "seed = 0\nrounds = 12\neval_every = 4\n\
         [data]\ntest = \"{d}/test.safetensors\"\nmeta = \"{d}/meta.safetensors\"\nclasses = 10\nshards = 2\n\
         [[data.domains]]\nname = \"clean\"\nsource = \"{d}/train.safetensors\"\nsubset = {{ start = 0, count = 200 }}\n\
         [[data.domains]]\nname = \"noisy\"\nsource = \"{d}/train.safetensors\"\nsubset = {{ start = 200, count = 200 }}\nlabel_noise = 0.5\n\
         [model]\n{model}\n\
         [inner]\nsteps = 3\nbatch_size = 32\nlr = 0.05\nmomentum = 0.9\n\
         [strategy]\nkind = \"domain-weights\"\nmethod = \"hypergradient\"\ndirectional = \"finite-difference\"\nprobe = 16\n",
        d = data.display()
    );
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

fn fixture(name: &str) -> String {
    Path::new(ROOT)
        .join("tests/data/torchscript")
        .join(name)
        .display()
        .to_string()
}

fn run(config: &Path, workers: &str) -> Value {
    let dir = tempfile::tempdir().expect("tmp");
    let run_dir = dir.path().join("run");
    let out = metaloop(&[
        "local",
        "--quiet",
        "--no-baseline",
        "--workers",
        workers,
        "--config",
        &config.display().to_string(),
        "--run-dir",
        &run_dir.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "metaloop local failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(run_dir.join("worker-0.log")).unwrap_or_default()
    );
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).expect("summary")).expect("JSON")
}

#[test]
fn the_exported_mlp_trains_to_the_native_mlps_state_on_worker_processes() {
    let dir = tempfile::tempdir().expect("tmp");
    let native = job(dir.path(), "native.toml", "kind = \"mlp\"\nhidden = [32]");
    let module = job(
        dir.path(),
        "torchscript.toml",
        &format!("kind = \"torchscript\"\npath = \"{}\"", fixture("mlp.pt")),
    );
    let a = run(&native, "2");
    let b = run(&module, "2");
    assert_eq!(b["rounds"], 12);
    assert!(
        b["bytes_in"].as_u64().expect("bytes_in") > 0,
        "deltas crossed the network"
    );
    for key in ["final_state_checksum", "test_accuracy", "domain_weights"] {
        assert_eq!(a[key], b[key], "{key}: native {} vs TorchScript {}", a[key], b[key]);
    }
    // One worker ends where two do: assignments, not workers, decide the result.
    assert_eq!(run(&module, "1")["final_state_checksum"], b["final_state_checksum"]);
}

#[test]
fn validate_refuses_what_cannot_be_trained_naming_the_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let garbage = dir.path().join("garbage.pt");
    std::fs::write(&garbage, "not a module").expect("write");
    let cases = [
        (
            garbage.display().to_string(),
            "is not a TorchScript module libtorch can load",
        ),
        (fixture("no-params.pt"), "the module has no parameters to train"),
        (fixture("f64.pt"), "only f32 parameters can be trained"),
        (fixture("two-inputs.pt"), "forward(features Float [4, 64]) failed"),
        (fixture("tuple.pt"), "forward(features Float [4, 64]) failed"),
        (
            fixture("three-classes.pt"),
            "returned Float [4, 3]; it must return the logits, f32 [4, 10]",
        ),
    ];
    for (i, (module, reason)) in cases.iter().enumerate() {
        let config = job(
            dir.path(),
            &format!("case-{i}.toml"),
            &format!("kind = \"torchscript\"\npath = \"{module}\""),
        );
        for command in ["validate", "local"] {
            let mut args = vec![command];
            let config = config.display().to_string();
            let run_dir = dir.path().join(format!("run-{i}")).display().to_string();
            if command == "validate" {
                args.push(&config);
            } else {
                args.extend(["--quiet", "--config", &config, "--run-dir", &run_dir]);
            }
            let out = metaloop(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{command} {module}: {err}");
            assert!(
                err.contains(&format!("model.path: {module}")) && err.contains(reason),
                "{command} {module}: expected `{reason}` in:\n{err}"
            );
            assert!(!Path::new(&run_dir).exists(), "nothing starts: {run_dir}");
        }
    }
    // The exact hypergradient is refused for a module that would load.
    let exact = job(
        dir.path(),
        "exact.toml",
        &format!("kind = \"torchscript\"\npath = \"{}\"", fixture("mlp.pt")),
    );
    let text = std::fs::read_to_string(&exact)
        .expect("read")
        .replace("finite-difference", "exact");
    std::fs::write(&exact, text).expect("write");
    let out = metaloop(&["validate", &exact.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("strategy.directional: a TorchScript model trains first-order only"),
        "{err}"
    );
}
