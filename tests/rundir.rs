//! The run directory's durability with real processes: a resume over unusable checkpoints keeps
//! its own, records every round once and carries the run's counts; a finished job is not run
//! again; another job's directory is refused; a disk too full for the record does not stop
//! training and leaves nothing half-written.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits (bounded) until `file` contains `text`.
fn wait_for_text(file: &Path, text: &str) {
    let start = Instant::now();
    while !std::fs::read_to_string(file).unwrap_or_default().contains(text) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never said {text:?}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The rounds `metrics.jsonl` records, in file order; every line must be a whole JSON object.
fn recorded_rounds(run: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics.jsonl");
    assert!(text.is_empty() || text.ends_with('\n'), "a half-written last line");
    text.lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"))["round"]
                .as_u64()
                .expect("round")
        })
        .collect()
}

/// A coordinator run to its end (or its refusal) with no worker: its output.
fn coordinator_alone(dir: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(ROOT)
        .args([
            "coordinator",
            "--config",
            "configs/quickstart.toml",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--run-dir")
        .arg(dir.join("run"))
        .args(tls_args(&dir.join("certs"), "coordinator"))
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run coordinator")
}

/// Every file under `dir`, with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).expect("read")));
            }
        }
    }
    out.sort();
    out
}

/// The case: a finished run directory loses its summary and final state, and every
/// checkpoint is torn. A resume starts from round 0, must keep the checkpoints it writes
/// (torn files numbered higher used to win "keep the newest K" and the stop message named a
/// deleted file), and a later resume continues from its stop: one record line per round,
/// the undisturbed result, and the counts of every process of the run in the summary.
#[test]
fn a_resume_over_torn_newer_checkpoints_keeps_its_own_and_records_each_round_once() {
    let job = ["--rounds", "60", "--seed", "31"];
    let dir = tempfile::tempdir().expect("tmp");
    metaloop_common::net::write_pki(&dir.path().join("certs")).expect("pki");
    let run = dir.path().join("run");

    // A finished run: checkpoints 30, 40, 50 remain (keep = 3).
    let (mut first, addr) = coordinator(dir.path(), &job);
    let mut w = worker(dir.path(), &addr, "first");
    assert!(wait_for(&mut first, Duration::from_secs(120)).success());
    wait_for(&mut w, Duration::from_secs(30));
    let reference = summary(&run)["final_state_checksum"].clone();
    std::fs::remove_file(run.join("summary.json")).expect("rm summary");
    std::fs::remove_file(run.join("final.safetensors")).expect("rm final");
    let ckpt = run.join("checkpoints");
    let mut torn = Vec::new();
    for e in std::fs::read_dir(&ckpt).expect("checkpoints").flatten() {
        let bytes = std::fs::read(e.path()).expect("read");
        std::fs::write(e.path(), &bytes[..bytes.len() / 2]).expect("tear");
        torn.push(e.file_name());
    }
    assert_eq!(torn.len(), 3, "{torn:?}");

    // Resumed with two workers: one leaves (a lost worker to count), then a SIGTERM.
    let args = [&job[..], &["--resume", "--min-workers", "2"]].concat();
    let (mut second, _) = coordinator_on(dir.path(), &addr, "second.stderr", &args);
    let mut ws = [worker(dir.path(), &addr, "w0"), worker(dir.path(), &addr, "w1")];
    wait_for_text(&dir.path().join("w0.log"), "joined the job");
    wait_for_rounds(&run, 12);
    sigterm(&ws[1]);
    wait_for(&mut ws[1], Duration::from_secs(10));
    wait_for_text(&dir.path().join("second.stderr"), "worker lost");
    let at = rounds_done(&run);
    wait_for_rounds(&run, at + 2);
    sigterm(&second);
    assert!(wait_for(&mut second, Duration::from_secs(30)).success());
    let log = std::fs::read_to_string(dir.path().join("second.stderr")).expect("log");
    assert!(log.contains("no valid checkpoint"), "{log}");
    let named = log
        .lines()
        .find_map(|l| {
            l.split("; checkpoint ")
                .nth(1)?
                .strip_suffix(" (continue with --resume)")
        })
        .unwrap_or_else(|| panic!("no stop message: {log}"));
    assert!(
        Path::new(named).exists(),
        "the stop message names {named}, which is gone"
    );
    assert!(
        ckpt.join("round-00000010.safetensors").exists(),
        "the resumed run's own checkpoint was pruned"
    );
    let stopped_at = recorded_rounds(&run);
    assert_eq!(stopped_at, (0..stopped_at.len() as u64).collect::<Vec<_>>());
    for t in &torn {
        assert!(ckpt.join("unusable").join(t).exists(), "{t:?} was not moved aside");
    }

    // Resumed again to the end, by one worker that leaves no one behind.
    let (mut third, _) = coordinator_on(dir.path(), &addr, "third.stderr", &[&job[..], &["--resume"]].concat());
    let mut last = worker(dir.path(), &addr, "last");
    assert!(wait_for(&mut third, Duration::from_secs(120)).success());
    wait_for(&mut ws[0], Duration::from_secs(30));
    wait_for(&mut last, Duration::from_secs(30));
    let log = std::fs::read_to_string(dir.path().join("third.stderr")).expect("log");
    assert!(log.contains(&format!("resuming from {named}")), "{log}");
    assert!(!log.contains("worker lost"), "the third process lost no worker: {log}");
    let got = summary(&run);
    assert_eq!(got["completed"], true);
    assert_eq!(got["final_state_checksum"], reference, "the undisturbed result");
    assert_eq!(
        recorded_rounds(&run),
        (0..60).collect::<Vec<u64>>(),
        "one line per round after a stop and a resume"
    );
    let lost: u64 = got["workers_lost"]
        .as_object()
        .expect("workers_lost")
        .values()
        .map(|v| v.as_u64().expect("count"))
        .sum();
    assert!(lost >= 1, "the worker lost before the restart is still counted: {got}");
}

/// A coordinator SIGKILLed after its round-10 checkpoint and resumed records every round once
/// (the rounds after the checkpoint used to be appended twice). Then `--resume` on the job,
/// now complete, says so and exits 0 without waiting for workers; another job (here another
/// seed) in the same directory is refused with what differs, with or without `--resume`, and
/// the directory is left exactly as it was.
#[test]
fn a_killed_job_records_each_round_once_then_is_not_run_again_and_another_job_is_refused() {
    let job = ["--rounds", "30", "--seed", "7"];
    let dir = tempfile::tempdir().expect("tmp");
    metaloop_common::net::write_pki(&dir.path().join("certs")).expect("pki");
    let run = dir.path().join("run");
    let (mut first, addr) = coordinator(dir.path(), &job);
    let mut w = worker(dir.path(), &addr, "w");
    wait_for_rounds(&run, 15);
    first.kill().expect("SIGKILL the coordinator");
    first.wait().expect("reap");
    assert!(rounds_done(&run) < 30, "killed mid-run");
    let (mut second, _) = coordinator_on(dir.path(), &addr, "second.stderr", &[&job[..], &["--resume"]].concat());
    assert!(wait_for(&mut second, Duration::from_secs(120)).success());
    wait_for(&mut w, Duration::from_secs(30));
    assert_eq!(recorded_rounds(&run), (0..30).collect::<Vec<u64>>());
    let before = snapshot(&run);

    let started = Instant::now();
    let out = coordinator_alone(dir.path(), &[&job[..], &["--resume", "--worker-wait", "20"]].concat());
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("is complete") && stdout.contains("nothing to resume"),
        "{stdout}"
    );
    assert!(started.elapsed() < Duration::from_secs(15), "it waited for workers");

    for extra in [&["--resume", "--worker-wait", "2"][..], &["--worker-wait", "2"][..]] {
        let out = coordinator_alone(dir.path(), &[&["--rounds", "30", "--seed", "8"][..], extra].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "a usage error: {stderr}");
        assert!(stderr.contains("belongs to another job"), "{stderr}");
        assert!(stderr.contains("seed: 7 in the run directory, 8 now"), "{stderr}");
    }
    assert!(
        snapshot(&run) == before,
        "a refused or complete job changed the run directory"
    );

    // Killed after saving the final state but before writing the summary (the workers were
    // already told the job is finished, and have left): `--resume` finishes the record from
    // the final state, without workers, to the same result.
    let want = summary(&run);
    std::fs::remove_file(run.join("summary.json")).expect("remove summary.json");
    let out = coordinator_alone(dir.path(), &[&job[..], &["--resume", "--worker-wait", "20"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("finishing the run's record"), "{stderr}");
    let got = summary(&run);
    assert_eq!(got["completed"], true, "{got}");
    assert_eq!(got["final_state_checksum"], want["final_state_checksum"]);
    assert_eq!(got["test_accuracy"], want["test_accuracy"]);
    assert_eq!(recorded_rounds(&run), (0..30).collect::<Vec<u64>>());
}

/// A disk too full for the record (here a file-size limit that `metrics.jsonl` reaches
/// mid-run, and that no checkpoint fits under): training goes on to the last round, the
/// rounds that could not be recorded are counted, `metrics.jsonl` ends with a whole line, no
/// temporary file stays behind, and the messages name the real cause.
#[test]
fn a_disk_too_full_for_the_record_does_not_stop_training() {
    let job = ["--rounds", "60", "--seed", "19"];
    let dir = tempfile::tempdir().expect("tmp");
    metaloop_common::net::write_pki(&dir.path().join("certs")).expect("pki");
    let run = dir.path().join("run");
    let log = std::fs::File::create(dir.path().join("full.stderr")).expect("log");
    // A quickstart line is ~800 bytes: the limit comes after 20-odd rounds.
    let mut coord = Command::new("prlimit")
        .current_dir(ROOT)
        .args([
            "--fsize=20000",
            "--",
            BIN,
            "coordinator",
            "--config",
            "configs/quickstart.toml",
        ])
        .args(["--listen", "127.0.0.1:0", "--run-dir"])
        .arg(&run)
        .args(tls_args(&dir.path().join("certs"), "coordinator"))
        .args(job)
        // The log file is under the limit too: errors only.
        .env("METALOOP_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start coordinator under prlimit");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(coord.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("read");
    let addr = line.trim().strip_prefix("listening on ").expect("address").to_string();
    let mut w = worker(dir.path(), &addr, "w");
    let status = wait_for(&mut coord, Duration::from_secs(120));
    wait_for(&mut w, Duration::from_secs(30));
    let stderr = std::fs::read_to_string(dir.path().join("full.stderr")).expect("log");
    // No checkpoint fits, so the final state cannot be saved either: that is still an error.
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("the final state could not be saved"), "{stderr}");

    let got = summary(&run);
    assert_eq!(got["rounds"], 60, "training went on to the end: {got}");
    let rounds = recorded_rounds(&run);
    assert!(rounds.len() < 60, "the limit was reached: {} lines", rounds.len());
    assert_eq!(rounds, (0..rounds.len() as u64).collect::<Vec<_>>(), "a clean prefix");
    assert!(got["record_failures"].as_u64().expect("record_failures") >= 1, "{got}");
    assert_eq!(got["checkpoint_failures"], 5, "{got}");
    assert!(
        stderr.contains("could not be recorded") && stderr.contains("metrics.jsonl"),
        "{stderr}"
    );
    let messages = stderr.replace(&dir.path().display().to_string(), "DIR");
    assert!(
        !messages.contains(".tmp"),
        "a message names a temporary file: {messages}"
    );
    let leftovers: Vec<_> = snapshot(&run)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}
