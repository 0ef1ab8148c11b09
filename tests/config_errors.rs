//! End to end: a bad config is refused with every problem, each with its key path, and the usage
//! exit code (64), by `validate` and by the commands that run a job, before anything starts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// sysexits' EX_USAGE.
const EXIT_USAGE: i32 = 64;

fn metaloop() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_metaloop"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

/// A config with two unknown keys in different sections, a wrong type, a missing required key,
/// an out-of-range value and a missing file; returns its path and the key paths to be named.
fn bad_config(dir: &Path) -> (PathBuf, [&'static str; 6]) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/digits");
    let text = format!(
        "rounds = 3\n\
         [data]\n\
         test = {test:?}\n\
         shards = 1\n\
         [[data.domains]]\n\
         name = \"clean\"\n\
         source = {train:?}\n\
         [[data.domains]]\n\
         name = \"noisy\"\n\
         source = {train:?}\n\
         label_noise = \"high\"\n\
         [[data.domains]]\n\
         name = \"gone\"\n\
         source = \"missing.safetensors\"\n\
         [inner]\n\
         step = 5\n\
         lr = -1.0\n\
         [outer]\n\
         methd = \"average\"\n",
        test = data.join("test.safetensors"),
        train = data.join("train.safetensors"),
    );
    let path = dir.join("bad.toml");
    std::fs::write(&path, text).expect("write config");
    let keys = [
        "inner.step: unknown key",
        "outer.methd: unknown key",
        "data.domains[1].label_noise: wrong type",
        "data.classes: missing (required)",
        "inner.lr: must be positive",
        "data.domains[2].source: file",
    ];
    (path, keys)
}

fn stderr_and_code(out: &Output) -> (String, Option<i32>) {
    (String::from_utf8_lossy(&out.stderr).into_owned(), out.status.code())
}

#[test]
fn validate_reports_every_problem_at_once_with_the_usage_exit_code() {
    let dir = tempfile::tempdir().expect("tmp");
    let (cfg, keys) = bad_config(dir.path());
    let out = metaloop().arg("validate").arg(&cfg).output().expect("run metaloop");
    let (stderr, code) = stderr_and_code(&out);
    let all = format!("{stderr}{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(code, Some(EXIT_USAGE), "{all}");
    assert!(all.contains(&format!("has {} problem(s)", keys.len())), "{all}");
    for key in keys {
        assert!(all.contains(key), "`{key}` not named in:\n{all}");
    }
}

#[test]
fn validate_refuses_text_that_is_not_toml_or_a_file_that_is_not_there() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("broken.toml");
    std::fs::write(&cfg, "rounds = 3\n[data\nclasses = 10\n").expect("write");
    let out = metaloop().arg("validate").arg(&cfg).output().expect("run metaloop");
    let (stderr, code) = stderr_and_code(&out);
    assert_eq!(code, Some(EXIT_USAGE), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");

    let out = metaloop()
        .arg("validate")
        .arg(dir.path().join("absent.toml"))
        .output()
        .expect("run metaloop");
    let (stderr, code) = stderr_and_code(&out);
    assert_eq!(code, Some(EXIT_USAGE), "{stderr}");
    assert!(stderr.contains("absent.toml"), "{stderr}");
}

#[test]
fn validate_accepts_a_shipped_config() {
    let out = metaloop()
        .args(["validate", "configs/quickstart.toml"])
        .output()
        .expect("run metaloop");
    let (stderr, code) = stderr_and_code(&out);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn local_refuses_a_bad_config_before_starting_anything() {
    let dir = tempfile::tempdir().expect("tmp");
    let (cfg, keys) = bad_config(dir.path());
    let run_dir = dir.path().join("run");
    let out = metaloop()
        .args(["local", "--quiet", "--workers", "1", "--config"])
        .arg(&cfg)
        .arg("--run-dir")
        .arg(&run_dir)
        .output()
        .expect("run metaloop");
    let (stderr, code) = stderr_and_code(&out);
    assert_eq!(code, Some(EXIT_USAGE), "{stderr}");
    for key in keys {
        assert!(stderr.contains(key), "`{key}` not named in:\n{stderr}");
    }
    assert!(
        !run_dir.exists(),
        "nothing may start on a bad config, but the run directory was made"
    );
}

#[test]
fn bad_devices_are_refused_naming_the_value_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tmp");
    let run_dir = dir.path().join("run");
    // No GPU in CI (and the default build does not link libtorch's CUDA library).
    for (devices, named) in [
        ("gpu", "`gpu` is not a device list"),
        ("cuda:3", "cuda:3 is not available"),
        ("cpu,", "`cpu,` is not a device list"),
    ] {
        let out = metaloop()
            .args(["local", "--quiet", "--workers", "1", "--devices", devices, "--run-dir"])
            .arg(&run_dir)
            .output()
            .expect("run metaloop");
        let (stderr, code) = stderr_and_code(&out);
        assert_eq!(code, Some(EXIT_USAGE), "{devices}: {stderr}");
        assert!(stderr.contains(named), "{devices}: {stderr}");
        assert!(!run_dir.exists(), "nothing may start with bad devices");
    }
    // A worker reads METALOOP_DEVICES when --devices is not given, and checks it before it
    // reads its certificates or dials the coordinator.
    let out = metaloop()
        .args([
            "worker",
            "--coordinator",
            "127.0.0.1:9",
            "--ca",
            "x",
            "--cert",
            "x",
            "--key",
            "x",
        ])
        .env("METALOOP_DEVICES", "tpu:0")
        .output()
        .expect("run metaloop");
    let (stderr, code) = stderr_and_code(&out);
    assert_eq!(code, Some(EXIT_USAGE), "{stderr}");
    assert!(stderr.contains("--devices: `tpu:0` is not a device list"), "{stderr}");
}
