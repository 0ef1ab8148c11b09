//! Shared by the end-to-end test files: the binary, run directories, coordinator and worker
//! processes with certificates, and a worker that speaks the protocol by hand.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_metaloop");
pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

pub fn summary(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).expect("summary.json")).expect("JSON")
}

/// The CA, certificate and key `net::write_pki` wrote for `role` under `certs`.
pub fn role_files(certs: &Path, role: &str) -> metaloop_common::net::TlsFiles {
    metaloop_common::net::TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{role}.pem")),
        key: certs.join(format!("{role}.key")),
    }
}

/// `--ca --cert --key` for these files.
pub fn tls_flags(tls: &metaloop_common::net::TlsFiles) -> Vec<String> {
    [("--ca", &tls.ca), ("--cert", &tls.cert), ("--key", &tls.key)]
        .iter()
        .flat_map(|(flag, f)| [flag.to_string(), f.to_string_lossy().into_owned()])
        .collect()
}

pub fn tls_args(certs: &Path, role: &str) -> Vec<String> {
    tls_flags(&role_files(certs, role))
}

/// Starts a coordinator on a free loopback port and returns it with the address it printed.
pub fn coordinator(dir: &Path, extra: &[&str]) -> (Child, String) {
    coordinator_on(dir, "127.0.0.1:0", "coordinator.stderr", extra)
}

pub fn coordinator_on(dir: &Path, listen: &str, log: &str, extra: &[&str]) -> (Child, String) {
    let log = std::fs::File::create(dir.join(log)).expect("log");
    let config: &[&str] = if extra.contains(&"--config") {
        &[]
    } else {
        &["--config", "configs/quickstart.toml"]
    };
    // The certificates under `dir/certs`, unless `extra` names others.
    let tls = if extra.contains(&"--ca") {
        Vec::new()
    } else {
        tls_args(&dir.join("certs"), "coordinator")
    };
    let mut child = Command::new(BIN)
        .current_dir(ROOT)
        .arg("coordinator")
        .args(config)
        .args(["--listen", listen, "--run-dir"])
        .arg(dir.join("run"))
        .args(tls)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start coordinator");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (child, addr)
}

pub fn worker(dir: &Path, addr: &str, name: &str) -> Child {
    worker_with(dir, addr, &role_files(&dir.join("certs"), "worker"), name)
}

/// A worker process with these certificates; its stderr goes to `dir/<name>.log`.
pub fn worker_with(dir: &Path, addr: &str, tls: &metaloop_common::net::TlsFiles, name: &str) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    Command::new(BIN)
        .current_dir(ROOT)
        .args(["worker", "--coordinator", addr, "--name", name])
        .args(tls_flags(tls))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start worker")
}

/// The undisturbed run of `job` by `metaloop local`, for comparison: its summary.
pub fn reference_run(job: &[&str], workers: &str) -> Value {
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(BIN)
        .current_dir(ROOT)
        .args(["local", "--quiet", "--no-baseline", "--workers", workers, "--run-dir"])
        .arg(dir.path())
        .args(job)
        .output()
        .expect("reference run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    summary(dir.path())
}

pub fn rounds_done(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

/// Waits (bounded) until the run has recorded `n` rounds.
pub fn wait_for_rounds(run: &Path, n: usize) {
    let start = Instant::now();
    while rounds_done(run) < n {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the run did not reach {n} rounds"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn wait_for(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A worker process of our own making, speaking the protocol by hand over real QUIC.
pub struct FakeWorker {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub welcome: metaloop_proto::proto::Welcome,
    _endpoint: quinn::Endpoint,
}

impl FakeWorker {
    pub async fn join(tls: &metaloop_common::net::TlsFiles, addr: &str, name: &str) -> Self {
        use metaloop_common::net;
        use metaloop_proto::proto::{self, CoordinatorMsg, Hello, WorkerMsg};
        let endpoint = net::client_endpoint(tls, "127.0.0.1:0".parse().expect("addr")).expect("client");
        let conn = net::connect(&endpoint, addr.parse().expect("addr"))
            .await
            .expect("connect");
        let (mut send, mut recv) = conn.open_bi().await.expect("bi");
        let hello = WorkerMsg::Hello(Hello {
            protocol_version: proto::PROTOCOL_VERSION,
            name: name.into(),
        });
        net::write_frame(&mut send, &hello).await.expect("hello");
        let Some(CoordinatorMsg::Welcome(welcome)) = net::read_frame(&mut recv, "welcome").await.expect("read") else {
            panic!("expected a welcome")
        };
        Self {
            conn,
            send,
            recv,
            welcome: *welcome,
            _endpoint: endpoint,
        }
    }
}
