//! A real Prometheus server scrapes a running coordinator and worker (`--metrics-listen`), and
//! its HTTP API must then hold the series docs/algorithms.md §7 asks for, moving as the job runs.
//! `./dev test` (and so CI) installs the Debian `prometheus` package when it is missing.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the processes it holds when the test ends, whichever way.
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `GET path` on a loopback HTTP server: (status, body).
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // HTTP/1.0: the server closes the connection after a plain (never chunked) body.
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The result vector of an instant query.
fn query(port: u16, q: &str) -> Vec<Value> {
    let (status, body) = http_get(port, &format!("/api/v1/query?query={}", encode(q))).expect("query");
    assert_eq!(status, 200, "{q}: {body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{q}: {e}: {body}"));
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_real_prometheus_scrapes_every_series_and_sees_them_move() {
    assert!(
        Command::new("prometheus").arg("--version").output().is_ok(),
        "the `prometheus` binary is needed: run ./dev test (it installs the Debian package) or install it"
    );
    let dir = tempfile::tempdir().expect("tmp");
    metaloop_common::net::write_pki(&dir.path().join("certs")).expect("pki");
    let (c_port, w_port, p_port) = (free_port(), free_port(), free_port());
    let mut procs = Processes(Vec::new());

    let (coord, addr) = coordinator(
        dir.path(),
        &["--rounds", "2000", "--metrics-listen", &format!("127.0.0.1:{c_port}")],
    );
    procs.0.push(coord);
    let log = std::fs::File::create(dir.path().join("worker.log")).expect("log");
    let worker = Command::new(BIN)
        .current_dir(ROOT)
        .args([
            "worker",
            "--coordinator",
            &addr,
            "--metrics-listen",
            &format!("127.0.0.1:{w_port}"),
        ])
        .args(tls_args(&dir.path().join("certs"), "worker"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("worker");
    procs.0.push(worker);

    // The endpoints themselves.
    wait_until("the worker's /readyz", Duration::from_secs(30), || {
        http_get(w_port, "/readyz").is_ok_and(|(s, _)| s == 200)
    });
    assert_eq!(http_get(c_port, "/healthz").expect("healthz").0, 200);
    assert_eq!(http_get(c_port, "/readyz").expect("readyz").0, 200);
    assert_eq!(http_get(c_port, "/nowhere").expect("404").0, 404);
    // The first round's series appear once it completes.
    wait_until(
        "the coordinator's first round on /metrics",
        Duration::from_secs(60),
        || {
            http_get(c_port, "/metrics").is_ok_and(|(_, t)| {
                t.contains("# HELP metaloop_domain_weight") && t.contains("metaloop_domain_weight{domain=\"clean\"}")
            })
        },
    );

    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  \
         - job_name: metaloop-coordinator\n    static_configs:\n      - targets: ['127.0.0.1:{c_port}']\n  \
         - job_name: metaloop-worker\n    static_configs:\n      - targets: ['127.0.0.1:{w_port}']\n"
    );
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, config).expect("config");
    let prom_log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
    let prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{p_port}"))
        .stdout(Stdio::null())
        .stderr(prom_log)
        .spawn()
        .expect("start prometheus");
    procs.0.push(prometheus);

    wait_until("Prometheus to be ready", Duration::from_secs(60), || {
        http_get(p_port, "/-/ready").is_ok_and(|(s, _)| s == 200)
    });
    wait_until("both targets to be up", Duration::from_secs(60), || {
        query(p_port, "up == 1").len() == 2
    });
    // Let a few scrapes land while the job runs.
    wait_until("several scrapes of a running job", Duration::from_secs(120), || {
        query(p_port, "count_over_time(metaloop_rounds_completed_total[1m]) >= 5").len() == 1
    });

    let present = |q: &str, n: usize| {
        let r = query(p_port, q);
        assert!(r.len() >= n, "{q}: expected {n} series, got {}", r.len());
    };
    for name in [
        "metaloop_job_info",
        "metaloop_rounds_planned",
        "metaloop_rounds_completed_total",
        "metaloop_round_duration_seconds_count",
        "metaloop_round_last_completed_timestamp_seconds",
        "metaloop_samples_total",
        "metaloop_samples_per_second",
        "metaloop_workers_connected",
        "metaloop_network_receive_bytes_total",
        "metaloop_network_transmit_bytes_total",
        "metaloop_train_loss",
        "metaloop_meta_loss",
        "metaloop_test_loss",
        "metaloop_test_accuracy_ratio",
        "metaloop_weight_entropy_ratio",
        "metaloop_hypergradient_norm",
        "metaloop_checkpoint_last_success_timestamp_seconds",
        "metaloop_worker_connected",
        "metaloop_worker_assignments_total",
        "metaloop_worker_assignment_duration_seconds_count",
        "metaloop_worker_samples_total",
        "metaloop_worker_inner_loss",
    ] {
        present(name, 1);
    }
    present("metaloop_domain_weight", 4);
    present("metaloop_round_duration_seconds_bucket", 10);
    // They move: rounds complete, samples and bytes flow, losses and the weights change.
    for moving in [
        "increase(metaloop_rounds_completed_total[1m]) > 0",
        "increase(metaloop_samples_total[1m]) > 0",
        "increase(metaloop_network_receive_bytes_total[1m]) > 0",
        "increase(metaloop_worker_assignments_total[1m]) > 0",
        "changes(metaloop_train_loss[1m]) > 0",
        "changes(metaloop_test_accuracy_ratio[1m]) > 0",
    ] {
        present(moving, 1);
    }
    present("changes(metaloop_domain_weight[1m]) > 0", 4);
    present("metaloop_workers_connected == 1", 1);
    present("metaloop_worker_connected == 1", 1);
}
