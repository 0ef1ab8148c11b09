//! Fault tolerance with real processes and real signals: a worker SIGKILLed in the middle of a
//! run costs time, never correctness.

mod common;

use common::*;
use serde_json::Value;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[test]
fn a_worker_killed_mid_run_changes_time_not_the_result() {
    let job = ["--rounds", "120", "--seed", "5"];
    let reference = reference_run(&job, "2");

    let dir = tempfile::tempdir().expect("tmp");
    metaloop_common::net::write_pki(&dir.path().join("certs")).expect("pki");
    let (mut coord, addr) = coordinator(dir.path(), &[&job[..], &["--min-workers", "2"]].concat());
    let mut survivor = worker(dir.path(), &addr, "survivor");
    let mut victim = worker(dir.path(), &addr, "victim");
    let run = dir.path().join("run");
    wait_for_rounds(&run, 10);
    victim.kill().expect("SIGKILL the victim"); // Child::kill sends SIGKILL on Unix
    victim.wait().expect("reap");
    let killed_at = rounds_done(&run);
    let status = wait_for(&mut coord, Duration::from_secs(120));
    assert!(
        status.success(),
        "coordinator failed: {}",
        std::fs::read_to_string(dir.path().join("coordinator.stderr")).unwrap_or_default()
    );
    wait_for(&mut survivor, Duration::from_secs(30));

    let (got, want) = (summary(&run), reference);
    assert!(
        killed_at < 120,
        "the victim must die mid-run (killed after {killed_at} rounds)"
    );
    assert_eq!(
        got["final_state_checksum"], want["final_state_checksum"],
        "a lost worker must not change the result"
    );
    assert!(got["reassigned"].as_u64().expect("reassigned") >= 1, "{got}");
    assert_eq!(got["workers_lost"]["disconnected"], 1, "{got}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let slowest = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("JSON")["seconds"]
                .as_f64()
                .expect("seconds")
        })
        .fold(0.0, f64::max);
    eprintln!("dead worker detected and its work redone within {slowest:.1}s (the slowest round)");
}

#[test]
fn a_worker_joining_mid_run_is_admitted_and_changes_nothing() {
    let job = ["--rounds", "150", "--seed", "9"];
    let reference = reference_run(&job, "1");

    let dir = tempfile::tempdir().expect("tmp");
    metaloop_common::net::write_pki(&dir.path().join("certs")).expect("pki");
    let (mut coord, addr) = coordinator(dir.path(), &[&job[..], &["--min-workers", "1"]].concat());
    let mut first = worker(dir.path(), &addr, "first");
    let run = dir.path().join("run");
    wait_for_rounds(&run, 3);
    let mut late = worker(dir.path(), &addr, "late");
    assert!(wait_for(&mut coord, Duration::from_secs(120)).success());
    wait_for(&mut first, Duration::from_secs(30));
    wait_for(&mut late, Duration::from_secs(30));

    let got = summary(&run);
    assert_eq!(got["workers"], 2, "the late worker joined: {got}");
    assert_eq!(got["final_state_checksum"], reference["final_state_checksum"]);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let workers: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("JSON")["workers"]
                .as_u64()
                .expect("n")
        })
        .collect();
    assert_eq!(workers[0], 1);
    assert_eq!(
        *workers.last().expect("rounds"),
        2,
        "the late worker serves the last rounds"
    );
    let late_log = std::fs::read_to_string(dir.path().join("late.log")).expect("late log");
    assert!(late_log.contains("joined the job"), "{late_log}");
}

/// A worker that lies: it answers its first assignment with a result for a round that does not
/// exist, then with a NaN delta. Both are rejected and counted, the liar is dropped, an honest
/// worker redoes its work, and the result is the undisturbed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_and_nan_results_are_rejected_and_the_round_completes() {
    use metaloop_common::net;
    use metaloop_proto::proto::{AssignmentResult, CoordinatorMsg, ModelSource, WorkerMsg};

    let job = ["--rounds", "20", "--seed", "3"];
    let reference = reference_run(&job, "1");

    let dir = tempfile::tempdir().expect("tmp");
    let (_, worker_tls) = net::write_pki(&dir.path().join("certs")).expect("pki");
    let (mut coord, addr) = coordinator(dir.path(), &[&job[..], &["--min-workers", "2"]].concat());

    let mut fake = FakeWorker::join(&worker_tls, &addr, "liar").await;
    let (conn, welcome) = (&fake.conn, fake.welcome.clone());
    let (send, recv) = (&mut fake.send, &mut fake.recv);
    let mut honest = worker(dir.path(), &addr, "honest");
    let Some(CoordinatorMsg::Round(plan)) = net::read_frame(recv, "plan").await.expect("read") else {
        panic!("expected a round plan")
    };
    assert!(
        matches!(plan.model, ModelSource::Full { .. }),
        "a new worker gets the full model"
    );
    let a = plan.assignments[0].index;
    let mut nan = metaloop_common::model::init_params(&welcome.job.model, 0);
    nan.tensors[0].data[0] = f32::NAN;
    let result = |round: u64, transfer: u64| {
        WorkerMsg::Result(AssignmentResult {
            train_loss: 0.1,
            samples: 1,
            ..AssignmentResult::new(round, a, transfer)
        })
    };
    net::send_bundle(conn, 1, &nan).await.expect("bundle");
    net::write_frame(send, &result(plan.round + 1000, 1))
        .await
        .expect("stale result");
    net::send_bundle(conn, 2, &nan).await.expect("bundle");
    net::write_frame(send, &result(plan.round, 2))
        .await
        .expect("NaN result");
    // The coordinator drops us: the control stream ends or the connection closes.
    let dropped = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(_)) = net::read_frame::<CoordinatorMsg>(recv, "after lying").await {}
    })
    .await;
    assert!(dropped.is_ok(), "the liar was not dropped");

    let status = tokio::task::spawn_blocking(move || {
        let s = wait_for(&mut coord, Duration::from_secs(120));
        wait_for(&mut honest, Duration::from_secs(30));
        s
    })
    .await
    .expect("join");
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(dir.path().join("coordinator.stderr")).unwrap_or_default()
    );
    let got = summary(&dir.path().join("run"));
    assert_eq!(got["rejected"]["stale_round"], 1, "{got}");
    assert_eq!(got["rejected"]["non_finite"], 1, "{got}");
    assert_eq!(got["workers_lost"]["malformed_result"], 1, "{got}");
    assert_eq!(got["final_state_checksum"], reference["final_state_checksum"]);
}

#[test]
fn a_coordinator_killed_mid_run_resumes_from_its_checkpoint() {
    killed_coordinator_resumes_exactly(&["--rounds", "100", "--seed", "11"], 100);
}

/// The same with a learned task policy: the LSTM's parameters, hidden state, last weights and
/// rewards and the reward baseline are in the checkpoint, and the fine-tuning phase follows.
#[test]
fn a_task_policy_run_resumes_exactly_after_a_kill() {
    killed_coordinator_resumes_exactly(
        &["--config", "configs/task-policy.toml", "--rounds", "60", "--seed", "3"],
        60,
    );
}

fn killed_coordinator_resumes_exactly(job: &[&str], rounds: usize) {
    let reference = reference_run(job, "2");

    let dir = tempfile::tempdir().expect("tmp");
    metaloop_common::net::write_pki(&dir.path().join("certs")).expect("pki");
    let args = [job, &["--min-workers", "2"]].concat();
    let (mut first, addr) = coordinator(dir.path(), &args);
    let mut workers = [worker(dir.path(), &addr, "w0"), worker(dir.path(), &addr, "w1")];
    let run = dir.path().join("run");
    wait_for_rounds(&run, 25);
    first.kill().expect("SIGKILL the coordinator");
    first.wait().expect("reap");
    let killed_at = rounds_done(&run);
    assert!(killed_at < rounds, "the coordinator must die mid-run");

    let restarted = Instant::now();
    let (mut second, _) = coordinator_on(
        dir.path(),
        &addr,
        "coordinator2.stderr",
        &[&args[..], &["--resume"]].concat(),
    );
    // The restarted coordinator answers the workers' next keep-alive with a stateless reset,
    // and they rejoin at once: well before the 10 s idle timeout that used to find it.
    let listening = Instant::now();
    let rejoined = |name: &str| {
        let log = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap_or_default();
        log.matches("joined the job").count() >= 2
    };
    while !(rejoined("w0") && rejoined("w1")) {
        assert!(
            listening.elapsed() < Duration::from_secs(6),
            "the workers did not rejoin within 6 s of the restart"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let rejoin_seconds = listening.elapsed().as_secs_f64();
    assert!(wait_for(&mut second, Duration::from_secs(120)).success());
    let resume_seconds = restarted.elapsed().as_secs_f64();
    for w in &mut workers {
        assert!(
            wait_for(w, Duration::from_secs(30)).success(),
            "workers reconnect and finish cleanly"
        );
    }
    let log = std::fs::read_to_string(dir.path().join("coordinator2.stderr")).expect("log");
    assert!(log.contains("resuming from") && log.contains("round-000000"), "{log}");
    let got = summary(&run);
    assert_eq!(got["rounds"], rounds);
    assert_eq!(got["completed"], true);
    assert_eq!(
        got["final_state_checksum"], reference["final_state_checksum"],
        "resumed run must end bit for bit where the undisturbed one ends"
    );
    // The best-meta tally is checkpointed with the evaluation of the checkpoint's round (which
    // runs while the next round trains): the resumed run picks the same round.
    for key in ["best_meta_round", "test_accuracy_at_best_meta", "test_accuracy"] {
        assert_eq!(got[key], reference[key], "{key}");
    }
    assert_eq!(rounds_done(&run), rounds, "one metrics.jsonl line per round");
    eprintln!("killed after {killed_at} rounds; the workers rejoined {rejoin_seconds:.2}s after the restart; the restarted coordinator finished the remaining rounds in {resume_seconds:.1}s");
}

/// A worker that takes its assignments and then says nothing, while its connection stays alive
/// (keep-alives flow): the assignment timeout drops it and an honest worker does its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_worker_is_dropped_at_the_assignment_timeout() {
    use metaloop_proto::proto::CoordinatorMsg;
    let job = ["--rounds", "10", "--seed", "4"];
    let reference = reference_run(&job, "1");
    let dir = tempfile::tempdir().expect("tmp");
    let (_, worker_tls) = metaloop_common::net::write_pki(&dir.path().join("certs")).expect("pki");
    let (mut coord, addr) = coordinator(
        dir.path(),
        &[&job[..], &["--min-workers", "2", "--assignment-timeout", "2"]].concat(),
    );
    let mut silent = FakeWorker::join(&worker_tls, &addr, "silent").await;
    let mut honest = worker(dir.path(), &addr, "honest");
    let Some(CoordinatorMsg::Round(_)) = metaloop_common::net::read_frame(&mut silent.recv, "plan")
        .await
        .expect("read")
    else {
        panic!("expected a round plan")
    };
    let started = Instant::now();
    // Say nothing; the coordinator must close the connection on us.
    let closed = tokio::time::timeout(Duration::from_secs(30), silent.conn.closed()).await;
    assert!(closed.is_ok(), "the stuck worker was never dropped");
    let dropped_after = started.elapsed();
    assert!(
        dropped_after >= Duration::from_millis(1500),
        "dropped too early: {dropped_after:?}"
    );
    let status = tokio::task::spawn_blocking(move || {
        let s = wait_for(&mut coord, Duration::from_secs(120));
        wait_for(&mut honest, Duration::from_secs(30));
        s
    })
    .await
    .expect("join");
    assert!(status.success());
    let got = summary(&dir.path().join("run"));
    assert_eq!(got["workers_lost"]["assignment_timeout"], 1, "{got}");
    assert!(got["reassigned"].as_u64().expect("reassigned") >= 1, "{got}");
    assert_eq!(got["final_state_checksum"], reference["final_state_checksum"]);
    eprintln!("stuck worker dropped {dropped_after:?} after its plan arrived (timeout 2 s)");
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// SIGTERM on the coordinator (a pod being deleted): it abandons the round, writes a checkpoint,
/// tells the workers it is stopping and exits 0; the workers wait for it, and when it comes
/// back with `--resume` they rejoin and the run ends exactly where an undisturbed run ends.
/// SIGTERM on a worker: it leaves at once and cleanly, and its work moves on.
#[test]
fn sigterm_stops_cleanly_and_the_run_resumes_exactly() {
    let job = ["--rounds", "80", "--seed", "21"];
    let reference = reference_run(&job, "2");
    let dir = tempfile::tempdir().expect("tmp");
    metaloop_common::net::write_pki(&dir.path().join("certs")).expect("pki");
    let args = [&job[..], &["--min-workers", "2"]].concat();
    let (mut first, addr) = coordinator(dir.path(), &args);
    let mut w = [worker(dir.path(), &addr, "w0"), worker(dir.path(), &addr, "w1")];
    let run = dir.path().join("run");
    wait_for_rounds(&run, 15);
    // A worker asked to stop leaves at once and cleanly; the other one carries on.
    let left_at = Instant::now();
    sigterm(&w[1]);
    assert!(
        wait_for(&mut w[1], Duration::from_secs(10)).success(),
        "a worker exits 0 on SIGTERM"
    );
    let leave = left_at.elapsed();
    let before = rounds_done(&run);
    wait_for_rounds(&run, before + 3);
    sigterm(&first);
    let stopped = wait_for(&mut first, Duration::from_secs(30));
    assert!(stopped.success(), "the coordinator exits 0 on SIGTERM");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        w[0].try_wait().expect("wait").is_none(),
        "a worker told that the coordinator is stopping waits for it to come back"
    );
    let stopped_at = rounds_done(&run);
    assert!(stopped_at < 80, "stopped mid-run");
    let checkpoints: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .expect("checkpoints")
        .flatten()
        .collect();
    assert!(!checkpoints.is_empty());

    let (mut second, _) = coordinator_on(
        dir.path(),
        &addr,
        "coordinator2.stderr",
        &[&args[..], &["--resume"]].concat(),
    );
    let mut fresh = worker(dir.path(), &addr, "w2");
    assert!(wait_for(&mut second, Duration::from_secs(120)).success());
    assert!(
        wait_for(&mut w[0], Duration::from_secs(30)).success(),
        "the waiting worker rejoined and finished with the job"
    );
    wait_for(&mut fresh, Duration::from_secs(30));
    let log = std::fs::read_to_string(dir.path().join("w0.log")).expect("w0 log");
    assert!(log.matches("joined the job").count() >= 2, "w0 rejoined: {log}");
    let got = summary(&run);
    assert_eq!(got["completed"], true);
    assert_eq!(got["final_state_checksum"], reference["final_state_checksum"]);
    eprintln!(
        "a worker left {leave:?} after SIGTERM; the coordinator stopped after {stopped_at} rounds and resumed exactly"
    );
}

/// SIGKILL while a checkpoint is being written (the write is slowed by a test hook so the kill
/// lands inside it): the previous checkpoint survives, the half-written one is never taken for
/// a checkpoint, and the resumed run ends exactly where the undisturbed one ends.
#[test]
fn a_kill_during_a_checkpoint_write_loses_nothing() {
    let job = ["--rounds", "40", "--seed", "13"];
    let reference = reference_run(&job, "2");
    let dir = tempfile::tempdir().expect("tmp");
    metaloop_common::net::write_pki(&dir.path().join("certs")).expect("pki");
    let args = [&job[..], &["--min-workers", "2"]].concat();
    // Every checkpoint write pauses 1.5 s before its rename: round 10's completes, round 20's
    // is killed.
    let (mut first, addr) = coordinator(dir.path(), &[&args[..], &["--checkpoint-pause-ms", "1500"]].concat());
    let mut w = [worker(dir.path(), &addr, "w0"), worker(dir.path(), &addr, "w1")];
    let ckpt = dir.path().join("run/checkpoints");
    let start = Instant::now();
    // The second checkpoint (round 20) is being written when its temporary file appears.
    while !ckpt.join(".round-00000020.safetensors.tmp").exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint write started");
        std::thread::sleep(Duration::from_millis(5));
    }
    first.kill().expect("SIGKILL mid-write");
    first.wait().expect("reap");
    assert!(
        !ckpt.join("round-00000020.safetensors").exists(),
        "the write never completed"
    );
    assert!(
        ckpt.join("round-00000010.safetensors").exists(),
        "the previous checkpoint survives"
    );

    let (mut second, _) = coordinator_on(
        dir.path(),
        &addr,
        "coordinator2.stderr",
        &[&args[..], &["--resume"]].concat(),
    );
    assert!(wait_for(&mut second, Duration::from_secs(120)).success());
    for x in &mut w {
        wait_for(x, Duration::from_secs(30));
    }
    let log = std::fs::read_to_string(dir.path().join("coordinator2.stderr")).expect("log");
    assert!(log.contains("resuming from") && log.contains("round-00000010"), "{log}");
    assert_eq!(
        summary(&dir.path().join("run"))["final_state_checksum"],
        reference["final_state_checksum"]
    );
}

/// With no workers left the coordinator waits (bounded by `--worker-wait`), says so, and goes
/// on when a worker comes back; if none does, it gives up with a clear error.
#[test]
fn with_no_workers_left_the_coordinator_waits_then_continues_or_gives_up() {
    let job = ["--rounds", "120", "--seed", "17"];
    let reference = reference_run(&job, "1");
    let dir = tempfile::tempdir().expect("tmp");
    metaloop_common::net::write_pki(&dir.path().join("certs")).expect("pki");
    let (mut coord, addr) = coordinator(dir.path(), &[&job[..], &["--worker-wait", "30"]].concat());
    let mut first = worker(dir.path(), &addr, "first");
    let run = dir.path().join("run");
    wait_for_rounds(&run, 10);
    sigterm(&first);
    assert!(wait_for(&mut first, Duration::from_secs(10)).success());
    let log = dir.path().join("coordinator.stderr");
    let start = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("no workers connected")
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the coordinator never said it waits"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut second = worker(dir.path(), &addr, "second");
    assert!(wait_for(&mut coord, Duration::from_secs(120)).success());
    wait_for(&mut second, Duration::from_secs(30));
    assert_eq!(summary(&run)["final_state_checksum"], reference["final_state_checksum"]);

    // Nobody comes back: a clear error after the wait.
    let dir = tempfile::tempdir().expect("tmp");
    metaloop_common::net::write_pki(&dir.path().join("certs")).expect("pki");
    let (mut coord, addr) = coordinator(dir.path(), &[&job[..], &["--worker-wait", "2"]].concat());
    let mut only = worker(dir.path(), &addr, "only");
    wait_for_rounds(&dir.path().join("run"), 5);
    sigterm(&only);
    assert!(wait_for(&mut only, Duration::from_secs(10)).success());
    assert!(!wait_for(&mut coord, Duration::from_secs(60)).success(), "gives up");
    let log = std::fs::read_to_string(dir.path().join("coordinator.stderr")).expect("log");
    assert!(log.contains("no workers connected for 2s"), "{log}");
    assert!(log.contains("continue with --resume"), "the state is kept: {log}");
}
