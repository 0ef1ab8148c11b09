//! Per-worker identities end to end: `metaloop certs init/issue/revoke` as an operator runs them,
//! a coordinator that names workers by their certificates, and a revocation list put in force by
//! SIGHUP while the job runs.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn certs(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .arg("certs")
        .arg(args[0])
        .arg(dir)
        .args(&args[1..])
        .output()
        .expect("run metaloop certs")
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

fn identity_files(pki: &Path, name: &str) -> metaloop_common::net::TlsFiles {
    metaloop_common::net::TlsFiles {
        ca: pki.join("ca.pem"),
        cert: pki.join(format!("{name}.pem")),
        key: pki.join(format!("{name}.key")),
    }
}

/// Waits (bounded) until `file` contains every one of `needles`; returns its text.
fn wait_for_log(file: &Path, needles: &[&str]) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if needles.iter().all(|n| text.contains(n)) {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never contained {needles:?}:\n{text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sighup(child: &Child) {
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Replaces `to` with `from` in one rename, as a mounted Secret is updated.
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).expect("copy");
    std::fs::rename(&tmp, to).expect("rename");
}

#[test]
fn init_keeps_the_ca_key_private_and_apart_and_never_overwrites() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = dir.path().join("pki");
    let out = ok(certs(&["init"], &pki));
    assert!(out.contains("ca/ca.key"), "{out}");
    assert_eq!(mode(&pki.join("ca/ca.key")), 0o600, "the CA key is its owner's only");
    assert_eq!(mode(&pki.join("ca")), 0o700);
    assert_eq!(mode(&pki.join("coordinator.key")), 0o600);
    for f in ["ca.pem", "coordinator.pem", "crl.pem"] {
        assert!(pki.join(f).is_file(), "{f} missing");
    }
    // What a Secret is made from (the top level) holds no CA key.
    let ca_key = std::fs::read_to_string(pki.join("ca/ca.key")).expect("key");
    for entry in std::fs::read_dir(&pki).expect("ls") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            assert_ne!(
                std::fs::read_to_string(&path).expect("read"),
                ca_key,
                "{}",
                path.display()
            );
        }
    }
    let again = certs(&["init"], &pki);
    assert!(!again.status.success(), "a second init must refuse");
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("refusing to overwrite") && err.contains("ca.pem"), "{err}");
    assert_eq!(std::fs::read_to_string(pki.join("ca/ca.key")).expect("key"), ca_key);

    let out = ok(certs(&["issue", "worker-0"], &pki));
    assert!(out.contains("worker-0.pem"), "{out}");
    assert_eq!(mode(&pki.join("worker-0.key")), 0o600);
    let twice = certs(&["issue", "worker-0"], &pki);
    assert!(!twice.status.success());
    assert!(String::from_utf8_lossy(&twice.stderr).contains("worker-0.pem"));
    for bad in ["Worker_0", "coordinator", "../x", ""] {
        let out = certs(&["issue", bad], &pki);
        assert_eq!(out.status.code(), Some(64), "{bad:?} is a usage error");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{bad:?}")), "names {bad:?}: {err}");
    }
}

#[test]
fn a_malformed_revocation_list_is_a_clear_error_at_start() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = dir.path().join("certs");
    ok(certs(&["init"], &pki));
    let bad = dir.path().join("crl.pem");
    std::fs::write(&bad, "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n").expect("write");
    let start = Instant::now();
    let out = Command::new(BIN)
        .current_dir(ROOT)
        .args([
            "coordinator",
            "--config",
            "configs/quickstart.toml",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .args(tls_args(&pki, "coordinator"))
        .arg("--crl")
        .arg(&bad)
        .output()
        .expect("coordinator");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("revocation list") && err.contains(&bad.display().to_string()),
        "{err}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "refused before listening"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// Two issued identities join under their certificate names (not the names they say in their
/// hello); a revocation list that does not parse is logged on SIGHUP and the old one kept; then
/// one identity is revoked and SIGHUP drops it and refuses its reconnection, it stops with the
/// reason, and the other finishes the job.
#[test]
fn issued_identities_are_named_and_a_revoked_one_is_refused_after_sighup() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = dir.path().join("pki");
    ok(certs(&["init"], &pki));
    ok(certs(&["issue", "alice"], &pki));
    ok(certs(&["issue", "mallory"], &pki));
    let live_crl: PathBuf = dir.path().join("live-crl.pem");
    std::fs::copy(pki.join("crl.pem"), &live_crl).expect("copy");
    let coordinator_tls = tls_flags(&identity_files(&pki, "coordinator"));
    let mut extra: Vec<&str> = coordinator_tls.iter().map(String::as_str).collect();
    let live = live_crl.to_string_lossy().into_owned();
    extra.extend(["--crl", &live]);
    let (mut coordinator, addr) = coordinator(dir.path(), &extra);
    let log = dir.path().join("coordinator.stderr");

    let mut mallory = worker_with(dir.path(), &addr, &identity_files(&pki, "mallory"), "says-alice");
    wait_for_log(&log, &["worker joined", "identity=mallory", "name=says-alice"]);

    std::fs::write(dir.path().join("garbage.pem"), "not a revocation list").expect("write");
    replace(&dir.path().join("garbage.pem"), &live_crl);
    sighup(&coordinator);
    wait_for_log(&log, &["revocation list not reloaded", "live-crl.pem: no X509 CRL"]);
    assert!(
        mallory.try_wait().expect("wait").is_none(),
        "the old list stays in force"
    );

    let out = ok(certs(&["revoke", "mallory"], &pki));
    assert!(out.contains("revoked `mallory`"), "{out}");
    replace(&pki.join("crl.pem"), &live_crl);
    sighup(&coordinator);
    let status = wait_for(&mut mallory, Duration::from_secs(60));
    assert!(
        !status.success(),
        "a revoked worker stops with an error instead of retrying"
    );
    let mallory_log = std::fs::read_to_string(dir.path().join("says-alice.log")).expect("log");
    assert!(
        mallory_log.contains("refused") && mallory_log.contains("Revoked"),
        "it says why: {mallory_log}"
    );

    let mut alice = worker_with(dir.path(), &addr, &identity_files(&pki, "alice"), "alice-process");
    let status = wait_for(&mut coordinator, Duration::from_secs(180));
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    wait_for(&mut alice, Duration::from_secs(30));
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("identity=alice"), "{text}");
    assert!(
        text.contains("worker dropped: its certificate is revoked") && text.contains("identity=mallory"),
        "{text}"
    );
    let summary = summary(&dir.path().join("run"));
    assert_eq!(summary["completed"], true, "{summary}");
    assert_eq!(summary["workers_lost"]["certificate_revoked"], 1, "{summary}");
    assert!(
        summary["connections_refused"]["certificate_revoked"].as_u64() >= Some(1),
        "the reconnection is refused at the handshake and counted: {summary}"
    );
}

/// `local` gives every worker process its own identity from its throwaway CA.
#[test]
fn local_issues_one_identity_per_worker_process() {
    let dir = tempfile::tempdir().expect("tmp");
    let run = dir.path().join("run");
    let out = Command::new(BIN)
        .current_dir(ROOT)
        .args([
            "local",
            "--quiet",
            "--no-baseline",
            "--workers",
            "2",
            "--rounds",
            "3",
            "--run-dir",
        ])
        .arg(&run)
        .output()
        .expect("local");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = std::fs::read_to_string(run.join("coordinator.log")).expect("log");
    for i in 0..2 {
        assert!(run.join(format!("certs/worker-{i}.pem")).is_file());
        assert!(log.contains(&format!("identity=worker-{i}")), "{log}");
    }
    assert_eq!(mode(&run.join("certs/ca/ca.key")), 0o600);
}
