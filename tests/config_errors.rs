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

/// `n` rows of `features` features with labels cycling through 0..10, as safetensors.
fn rows(n: usize, features: usize) -> metaloop_proto::dataset::Dataset {
    metaloop_proto::dataset::Dataset {
        x: (0..n * features).map(|v| (v % 17) as f32 / 17.0).collect(),
        y: (0..n as i64).map(|i| i % 10).collect(),
        features,
    }
}

fn write_data(path: &Path, ds: &metaloop_proto::dataset::Dataset) {
    let bytes = metaloop_proto::dataset::to_safetensors(ds).expect("serialise");
    std::fs::write(path, bytes).expect("write data");
}

/// A safetensors file with the given `x` dtype and shape and `y` of `n` int64 zeros.
fn write_raw(path: &Path, dtype: safetensors::Dtype, x_shape: Vec<usize>, n: usize) {
    let x_len = x_shape.iter().product::<usize>() * dtype.bitsize() / 8;
    let (xb, yb) = (vec![0u8; x_len], vec![0u8; n * 8]);
    let x = safetensors::tensor::TensorView::new(dtype, x_shape, &xb).expect("x");
    let y = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![n], &yb).expect("y");
    std::fs::write(
        path,
        safetensors::serialize([("x", x), ("y", y)], None).expect("serialise"),
    )
    .expect("write");
}

/// A job whose every data file is wrong in a different way (and one right): not safetensors,
/// wrong dtype, wrong shape, labels outside the classes, too few features, and a meta set with
/// too many. Returns the config and, per problem, the parts its one line must hold.
fn bad_data_job(dir: &Path) -> (PathBuf, Vec<Vec<String>>) {
    let file = |name: &str| dir.join(name);
    write_data(&file("test.safetensors"), &rows(40, 8));
    write_data(&file("good.safetensors"), &rows(40, 8));
    std::fs::write(file("text.safetensors"), "x,y\n0.5,1\n").expect("write");
    write_raw(&file("f64.safetensors"), safetensors::Dtype::F64, vec![20, 8], 20);
    write_raw(&file("shape.safetensors"), safetensors::Dtype::F32, vec![20, 8, 1], 20);
    let mut labels = rows(30, 8);
    labels.y[4] = 10;
    labels.y[11] = 12;
    labels.y[20] = -3;
    write_data(&file("labels.safetensors"), &labels);
    write_data(&file("narrow.safetensors"), &rows(30, 6));
    write_data(&file("meta.safetensors"), &rows(20, 9));
    let mut text =
        "rounds = 3\n[data]\ntest = \"test.safetensors\"\nmeta = \"meta.safetensors\"\nclasses = 10\nshards = 1\n\
                    [strategy]\nmethod = \"hypergradient\"\n"
            .to_string();
    for name in ["good", "text", "f64", "shape", "labels", "narrow"] {
        text += &format!("[[data.domains]]\nname = \"{name}\"\nsource = \"{name}.safetensors\"\n");
    }
    let cfg = dir.join("job.toml");
    std::fs::write(&cfg, text).expect("write config");
    let shown = |name: &str| file(name).display().to_string();
    let lines = vec![
        vec![
            "data.domains[1].source: ".into(),
            shown("text.safetensors"),
            "is not a valid safetensors file".into(),
        ],
        vec![
            "data.domains[2].source: ".into(),
            shown("f64.safetensors"),
            "tensor `x`".into(),
            "dtype F64, expected F32".into(),
        ],
        vec![
            "data.domains[3].source: ".into(),
            shown("shape.safetensors"),
            "shape [20, 8, 1], expected [20, features]".into(),
        ],
        vec![
            "data.domains[4].source: ".into(),
            shown("labels.safetensors"),
            "label 10 at row 4 is outside 0..10 (3 labels in all)".into(),
        ],
        vec![
            "data.domains[5].source: domain `narrow`: ".into(),
            format!("{} has 6 features per row", shown("narrow.safetensors")),
            format!("data.test ({}) has 8", shown("test.safetensors")),
        ],
        vec![
            "data.meta: ".into(),
            format!("{} has 9 features per row", shown("meta.safetensors")),
            format!("data.test ({}) has 8", shown("test.safetensors")),
        ],
    ];
    (cfg, lines)
}

/// Asserts that `text` has a line holding all of each entry's parts, and `count` problems.
fn assert_lines(text: &str, lines: &[Vec<String>]) {
    for parts in lines {
        assert!(
            text.lines().any(|l| parts.iter().all(|p| l.contains(p.as_str()))),
            "no line with {parts:?} in:\n{text}"
        );
    }
    assert!(text.contains(&format!("has {} problem(s)", lines.len())), "{text}");
}

#[test]
fn validate_opens_every_data_file_and_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let (cfg, lines) = bad_data_job(dir.path());
    let out = metaloop().arg("validate").arg(&cfg).output().expect("run metaloop");
    let (stderr, code) = stderr_and_code(&out);
    assert_eq!(code, Some(EXIT_USAGE), "{stderr}");
    assert_lines(&stderr, &lines);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn rows_the_settings_need_are_checked_against_the_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    write_data(&d.join("test.safetensors"), &rows(40, 8));
    write_data(&d.join("small.safetensors"), &rows(3, 8));
    write_data(&d.join("big.safetensors"), &rows(50, 8));
    let cfg = d.join("rows.toml");
    std::fs::write(
        &cfg,
        "rounds = 3\n[data]\ntest = \"test.safetensors\"\nclasses = 10\nshards = 4\n\
         meta = \"test.safetensors\"\nmeta_subset = { start = 30, count = 11 }\n\
         [[data.domains]]\nname = \"small\"\nsource = \"small.safetensors\"\n\
         [[data.domains]]\nname = \"cut\"\nsource = \"big.safetensors\"\nsubset = { start = 40, count = 20 }\n",
    )
    .expect("write");
    let out = metaloop().arg("validate").arg(&cfg).output().expect("run metaloop");
    let (stderr, code) = stderr_and_code(&out);
    assert_eq!(code, Some(EXIT_USAGE), "{stderr}");
    let shown = |name: &str| d.join(name).display().to_string();
    assert_lines(
        &stderr,
        &[
            vec![
                "data.shards: 4 shards, but domain `small`".into(),
                format!("({}) has only 3 rows", shown("small.safetensors")),
            ],
            vec![
                "data.domains[1].subset: rows 40..60 are past the end of".into(),
                format!("{}, which has 50 rows", shown("big.safetensors")),
            ],
            vec![
                "data.meta_subset: rows 30..41 are past the end of".into(),
                format!("{}, which has 40 rows", shown("test.safetensors")),
            ],
        ],
    );
}

#[test]
fn settings_larger_than_the_data_are_named_in_one_warning_line_each() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    write_data(&d.join("test.safetensors"), &rows(40, 8));
    write_data(&d.join("meta.safetensors"), &rows(15, 8));
    write_data(&d.join("train.safetensors"), &rows(144, 8));
    // Four domains of 36 rows against the default probe of 64; a task policy's default target
    // batch of 64 against a 15-row target.
    let mut text =
        "rounds = 10\n[data]\ntest = \"test.safetensors\"\nmeta = \"meta.safetensors\"\nclasses = 10\nshards = 1\n\
                    [strategy]\nmethod = \"hypergradient\"\nprobe = 64\n"
            .to_string();
    for i in 0..4 {
        text += &format!(
            "[[data.domains]]\nname = \"d{i}\"\nsource = \"train.safetensors\"\nsubset = {{ start = {}, count = 36 }}\n",
            i * 36
        );
    }
    let cfg = d.join("probe.toml");
    std::fs::write(&cfg, &text).expect("write");
    let out = metaloop().arg("validate").arg(&cfg).output().expect("run metaloop");
    let (stderr, code) = stderr_and_code(&out);
    assert_eq!(code, Some(0), "{stderr}");
    let train = d.join("train.safetensors").display().to_string();
    let probe: Vec<&str> = stderr.lines().filter(|l| l.contains("strategy.probe")).collect();
    assert_eq!(probe.len(), 1, "{stderr}");
    assert!(
        probe[0].starts_with("warning: ")
            && probe[0].contains(&format!(
                "strategy.probe: 64 is more than the 36 rows of domain `d0` ({train})"
            )),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok, with 1 warning(s)"));

    let policy = text.replace("method = \"hypergradient\"\nprobe = 64\n", "kind = \"task-policy\"\n");
    std::fs::write(&cfg, policy).expect("write");
    let out = metaloop().arg("validate").arg(&cfg).output().expect("run metaloop");
    let (stderr, code) = stderr_and_code(&out);
    assert_eq!(code, Some(0), "{stderr}");
    let meta = d.join("meta.safetensors").display().to_string();
    assert!(
        stderr.lines().any(|l| l.contains(&format!(
            "strategy.target_batch: 64 is more than the 15 rows of the target (data.meta, {meta})"
        ))),
        "{stderr}"
    );
}

#[test]
fn local_and_coordinator_refuse_bad_data_before_anything_starts() {
    let dir = tempfile::tempdir().expect("tmp");
    let (cfg, lines) = bad_data_job(dir.path());
    let run_dir = dir.path().join("run");
    let start = std::time::Instant::now();
    let out = metaloop()
        .args(["local", "--quiet", "--workers", "2", "--config"])
        .arg(&cfg)
        .arg("--run-dir")
        .arg(&run_dir)
        .output()
        .expect("run metaloop");
    let took = start.elapsed();
    let (stderr, code) = stderr_and_code(&out);
    eprintln!("local refused bad data in {took:?}");
    assert_eq!(code, Some(EXIT_USAGE), "{stderr}");
    assert_lines(&stderr, &lines);
    // Before this check, the coordinator only found the bad file after the run directory, the
    // certificates and the worker processes (with their logs) were made.
    assert!(!run_dir.exists(), "no run directory, no worker log, no worker process");

    let out = metaloop()
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--ca",
            "ca",
            "--cert",
            "c",
            "--key",
            "k",
        ])
        .arg("--config")
        .arg(&cfg)
        .arg("--run-dir")
        .arg(&run_dir)
        .output()
        .expect("run metaloop");
    let (stderr, code) = stderr_and_code(&out);
    assert_eq!(code, Some(EXIT_USAGE), "{stderr}");
    assert_lines(&stderr, &lines);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "the coordinator must check its data before it binds"
    );
    assert!(!run_dir.exists());
}

#[test]
fn usage_errors_exit_64_and_help_and_version_exit_0() {
    let dir = tempfile::tempdir().expect("tmp");
    let run_dir = dir.path().join("run");
    let out = metaloop()
        .args(["local", "--quiet", "--workers", "0", "--run-dir"])
        .arg(&run_dir)
        .output()
        .expect("run metaloop");
    let (stderr, code) = stderr_and_code(&out);
    assert_eq!(code, Some(EXIT_USAGE), "{stderr}");
    assert!(
        stderr.contains("--workers") && stderr.contains("at least 1"),
        "{stderr}"
    );
    assert!(!run_dir.exists());
    for args in [
        &[][..],
        &["frobnicate"],
        &["local", "--wrokers", "2"],
        &["local", "--workers", "two"],
        &["validate"],
        &["coordinator", "--config", "x.toml"],
        &["worker", "--threads", "1"],
        &["certs"],
        &["bench", "step", "--no-such-flag"],
    ] {
        let out = metaloop().args(args).output().expect("run metaloop");
        let (stderr, code) = stderr_and_code(&out);
        assert_eq!(code, Some(EXIT_USAGE), "{args:?}: {stderr}");
        assert!(!stderr.is_empty(), "{args:?}: clap says what was wrong");
    }
    for args in [
        &["--help"][..],
        &["--version"],
        &["local", "--help"],
        &["validate", "--help"],
    ] {
        let out = metaloop().args(args).output().expect("run metaloop");
        let (stderr, code) = stderr_and_code(&out);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!out.stdout.is_empty(), "{args:?}");
    }
}
