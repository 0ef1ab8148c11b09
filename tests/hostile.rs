//! Hostile input over real QUIC and on disk: peers without a valid certificate, peers that lie
//! once they are in, floods of connections, a full disk, and secrets in logs. Each time the
//! honest workers finish the job exactly as an undisturbed run does.

mod common;

use common::*;
use metaloop_common::net::{self, TlsFiles};
use metaloop_proto::proto::{self, BundleHeader, CoordinatorMsg, DType, Hello, TensorMeta, WorkerMsg};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

fn hello(version: u32) -> WorkerMsg {
    WorkerMsg::Hello(Hello {
        protocol_version: version,
        name: "stranger".into(),
    })
}

/// A PKI made here, with the CA key at hand: a coordinator, a valid and an expired worker.
struct Pki {
    coordinator: TlsFiles,
    worker: TlsFiles,
    expired: TlsFiles,
}

fn test_pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir).expect("dir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write");
    let issue = |name: &str, san: &str, expired: bool| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![san.to_string()]).expect("params");
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &ca).expect("sign");
        let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        TlsFiles {
            ca: ca_path.clone(),
            cert: c,
            key: k,
        }
    };
    Pki {
        coordinator: issue("coordinator", net::SERVER_NAME, false),
        worker: issue("worker", "metaloop-worker", false),
        expired: issue("expired", "metaloop-worker", true),
    }
}

/// A client endpoint built by hand: trusts `ca`, presents `identity` (or nothing), offers `alpn`.
fn raw_client(ca: &Path, identity: Option<&TlsFiles>, alpn: &[u8]) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(c.expect("cert")).expect("add");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some(id) => {
            let chain = CertificateDer::pem_file_iter(&id.cert)
                .expect("cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("certs");
            builder
                .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&id.key).expect("key"))
                .expect("identity")
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// Connects, says hello and reads the answer; `Err` names the step that failed.
async fn try_join(endpoint: &quinn::Endpoint, addr: SocketAddr) -> Result<CoordinatorMsg, String> {
    let conn = endpoint
        .connect(addr, net::SERVER_NAME)
        .map_err(|e| format!("connect: {e}"))?
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open: {e}"))?;
    net::write_frame(&mut send, &hello(proto::PROTOCOL_VERSION))
        .await
        .map_err(|e| format!("write: {e}"))?;
    match net::read_frame::<CoordinatorMsg>(&mut recv, "welcome").await {
        Ok(Some(m)) => Ok(m),
        Ok(None) => Err("first read: the stream ended".into()),
        Err(e) => Err(format!("first read: {e}")),
    }
}

fn start_coordinator(dir: &Path, tls: &TlsFiles, extra: &[&str]) -> (std::process::Child, String) {
    let flags = tls_flags(tls);
    let args: Vec<&str> = extra.iter().copied().chain(flags.iter().map(String::as_str)).collect();
    coordinator(dir, &args)
}

async fn finish(mut coordinator: std::process::Child, mut worker: std::process::Child, dir: &Path) -> Value {
    let status = tokio::task::spawn_blocking(move || {
        let s = wait_for(&mut coordinator, Duration::from_secs(180));
        wait_for(&mut worker, Duration::from_secs(30));
        s
    })
    .await
    .expect("join");
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(dir.join("coordinator.stderr")).unwrap_or_default()
    );
    summary(&dir.join("run"))
}

/// No certificate, one from another CA, an expired one, the wrong ALPN: each is refused (the
/// refusal arrives on the first read: QUIC completes the client's side of the handshake before
/// the coordinator has checked its certificate), counted, and the job still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_workers_with_a_valid_certificate_get_in() {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = test_pki(&dir.path().join("pki"));
    let (_, foreign) = net::write_pki(&dir.path().join("foreign")).expect("foreign pki");
    let foreign_full = foreign.clone();
    let (coord, addr) = start_coordinator(dir.path(), &pki.coordinator, &["--rounds", "3", "--seed", "4"]);
    let at: SocketAddr = addr.parse().expect("addr");
    let ca = pki.coordinator.ca.clone();
    let foreign_identity = TlsFiles {
        ca: ca.clone(),
        ..foreign
    };
    let cases = [
        ("no certificate", raw_client(&ca, None, proto::ALPN)),
        ("another CA", raw_client(&ca, Some(&foreign_identity), proto::ALPN)),
        ("expired", raw_client(&ca, Some(&pki.expired), proto::ALPN)),
        ("wrong ALPN", raw_client(&ca, Some(&pki.worker), b"metaloop/2")),
    ];
    for (what, endpoint) in &cases {
        let outcome = try_join(endpoint, at).await;
        eprintln!("{what}: {outcome:?}");
        let err = outcome.expect_err(what);
        // TLS alerts: 116 certificate_required, 48 unknown_ca, 45 certificate_expired,
        // 120 no_application_protocol.
        // The client's side of the handshake completes before the coordinator has checked the
        // certificate, so the refusal surfaces after it: usually on the first read, sometimes
        // already when the stream is opened or written.
        let (after_handshake, alert) = match *what {
            "no certificate" => (true, "error 116"),
            "another CA" => (true, "error 48"),
            "expired" => (true, "error 45"),
            _ => (false, "error 120"),
        };
        let at_handshake = err.starts_with("connect:") || err.starts_with("handshake:");
        assert!(
            at_handshake != after_handshake && err.contains(alert),
            "{what}: expected {alert} {} the handshake: {err}",
            if after_handshake { "after" } else { "during" }
        );
    }
    // Real worker processes with such certificates stop at once with the reason, rather than
    // retrying something no retry can fix.
    let mut expired = worker_with(dir.path(), &addr, &pki.expired, "expired-worker");
    let mut stranger = worker_with(dir.path(), &addr, &foreign_full, "stranger-worker");
    for (child, name, says) in [
        (&mut expired, "expired-worker", "refused this worker's TLS certificate"),
        (&mut stranger, "stranger-worker", "refused"),
    ] {
        let status = tokio::task::block_in_place(|| wait_for(child, Duration::from_secs(20)));
        let log = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).expect("log");
        assert!(!status.success() && log.contains(says), "{name}: {log}");
    }
    let ok = raw_client(&ca, Some(&pki.worker), proto::ALPN);
    assert!(
        matches!(try_join(&ok, at).await, Ok(CoordinatorMsg::Welcome(_))),
        "the valid certificate gets in"
    );
    drop(ok);
    let honest = worker_with(dir.path(), &addr, &pki.worker, "honest");
    let got = finish(coord, honest, dir.path()).await;
    assert_eq!(got["completed"], true);
    // The four hand-made clients and the two worker processes.
    assert_eq!(got["connections_refused"]["tls_handshake"], 6, "{got}");
}

/// Workers that join with a valid certificate and then lie, one after another, each in its own
/// way. Every one is dropped with its reason counted; the honest worker that comes last ends
/// the job exactly where an undisturbed run ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_peers_are_dropped_by_reason_and_the_job_is_unharmed() {
    let job = ["--rounds", "6", "--seed", "8"];
    let reference = reference_run(&job, "1");
    let dir = tempfile::tempdir().expect("tmp");
    let (_, tls) = net::write_pki(&dir.path().join("certs")).expect("pki");
    let (coord, addr) = coordinator(dir.path(), &job);
    let at: SocketAddr = addr.parse().expect("addr");

    let prefix = |len: u32| len.to_le_bytes().to_vec();
    let raw_frames: [(&str, Vec<u8>); 3] = [
        ("frame_too_large", [prefix(2 << 20), vec![0; 16]].concat()),
        ("truncated", [prefix(100), vec![0; 10]].concat()),
        ("undecodable", [prefix(5), vec![0xFF; 5]].concat()),
    ];
    for (reason, bytes) in &raw_frames {
        let mut liar = FakeWorker::join(&tls, &addr, reason).await;
        liar.send.write_all(bytes).await.expect("write");
        liar.send.finish().expect("finish");
        assert_dropped(&mut liar, reason).await;
    }

    // A delta of the model's layout whose bytes disagree with its shapes: one byte too many.
    // (Its payload is read when a result claims it.)
    let mut liar = FakeWorker::join(&tls, &addr, "trailing").await;
    let plan = loop {
        match net::read_frame(&mut liar.recv, "plan").await.expect("read") {
            Some(CoordinatorMsg::Round(p)) => break p,
            Some(_) => continue,
            None => panic!("no plan"),
        }
    };
    let zeros = metaloop_common::model::init_params(&liar.welcome.job.model, 0).zeros_like();
    let dtype = liar.welcome.job.delta_dtype;
    let header = BundleHeader::for_bundle_as(99, &zeros, dtype);
    let mut uni = liar.conn.open_uni().await.expect("uni");
    uni.write_all(&proto::encode_frame(&header).expect("header"))
        .await
        .expect("write");
    uni.write_all(&proto::encode_payload_as(&zeros, dtype))
        .await
        .expect("write");
    uni.write_all(&[0u8]).await.expect("write");
    uni.finish().expect("finish");
    let result = WorkerMsg::Result(proto::AssignmentResult {
        train_loss: 0.1,
        samples: 1,
        ..proto::AssignmentResult::new(plan.round, plan.assignments[0].index, 99)
    });
    net::write_frame(&mut liar.send, &result).await.expect("result");
    assert_dropped(&mut liar, "trailing bytes").await;

    // A result for an assignment it was never given.
    let mut liar = FakeWorker::join(&tls, &addr, "not-assigned").await;
    let plan = loop {
        match net::read_frame(&mut liar.recv, "plan").await.expect("read") {
            Some(CoordinatorMsg::Round(p)) => break p,
            Some(_) => continue,
            None => panic!("no plan"),
        }
    };
    let zeros = metaloop_common::model::init_params(&liar.welcome.job.model, 0).zeros_like();
    net::send_bundle(&liar.conn, 1, &zeros).await.expect("bundle");
    let result = WorkerMsg::Result(proto::AssignmentResult {
        train_loss: 0.1,
        samples: 1,
        ..proto::AssignmentResult::new(plan.round, 999, 1)
    });
    net::write_frame(&mut liar.send, &result).await.expect("result");
    assert_dropped(&mut liar, "not assigned").await;

    // A second hello on an open session.
    let mut liar = FakeWorker::join(&tls, &addr, "second-hello").await;
    net::write_frame(&mut liar.send, &hello(proto::PROTOCOL_VERSION))
        .await
        .expect("hello");
    assert_dropped(&mut liar, "second hello").await;

    // Before joining: an oversized hello frame, a hello of another version.
    let endpoint = net::client_endpoint(&tls, "127.0.0.1:0".parse().expect("addr")).expect("client");
    let conn = net::connect(&endpoint, at).await.expect("connect");
    let (mut send, mut recv) = conn.open_bi().await.expect("bi");
    send.write_all(&prefix(u32::MAX)).await.expect("write");
    assert!(net::read_frame::<CoordinatorMsg>(&mut recv, "answer").await.is_err() || conn.close_reason().is_some());
    let (mut send, mut recv) = net::connect(&endpoint, at)
        .await
        .expect("connect")
        .open_bi()
        .await
        .expect("bi");
    net::write_frame(&mut send, &hello(proto::PROTOCOL_VERSION + 7))
        .await
        .expect("hello");
    let reply = net::read_frame::<CoordinatorMsg>(&mut recv, "reply")
        .await
        .expect("read");
    assert!(matches!(reply, Some(CoordinatorMsg::Reject { .. })), "{reply:?}");

    let honest = worker(dir.path(), &addr, "honest");
    let got = finish(coord, honest, dir.path()).await;
    for reason in [
        "frame_too_large",
        "truncated",
        "undecodable",
        "trailing_bytes",
        "not_assigned",
        "second_hello",
    ] {
        assert_eq!(got["workers_lost"][reason], 1, "{reason}: {got}");
    }
    assert_eq!(got["rejected"]["not_assigned"], 1, "{got}");
    assert_eq!(got["connections_refused"]["frame_too_large"], 1, "{got}");
    assert_eq!(got["connections_refused"]["version_mismatch"], 1, "{got}");
    assert_eq!(got["final_state_checksum"], reference["final_state_checksum"]);
}

/// The coordinator closes a liar's session: its control stream ends or fails, in bounded time.
async fn assert_dropped(liar: &mut FakeWorker, what: &str) {
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(_)) = net::read_frame::<CoordinatorMsg>(&mut liar.recv, "after lying").await {}
    })
    .await;
    assert!(closed.is_ok(), "the {what} liar was not dropped");
}

/// A flood of connection attempts from one address: beyond its share of the handshake slots
/// they are refused at once, a worker beyond the worker limit is told so, and the job runs on
/// to the undisturbed result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_is_refused_and_the_job_goes_on() {
    let job = ["--rounds", "80", "--seed", "9"];
    let reference = reference_run(&job, "1");
    let dir = tempfile::tempdir().expect("tmp");
    let (_, tls) = net::write_pki(&dir.path().join("certs")).expect("pki");
    let (coord, addr) = coordinator(
        dir.path(),
        &[&job[..], &["--max-handshakes", "4", "--max-workers", "1"]].concat(),
    );
    let honest = worker(dir.path(), &addr, "honest");
    let run = dir.path().join("run");
    wait_for_rounds(&run, 1);
    let at: SocketAddr = addr.parse().expect("addr");
    let endpoint = net::client_endpoint(&tls, "127.0.0.1:0".parse().expect("addr")).expect("client");
    // 40 connections that complete TLS and then say nothing (they would hold a handshake slot
    // until the handshake deadline). With 4 slots one address may hold one.
    let attempts: Vec<_> = (0..40)
        .map(|_| {
            let e = endpoint.clone();
            async move { net::connect(&e, at).await }
        })
        .collect();
    let outcomes = futures_join_all(attempts).await;
    let refused = outcomes.iter().filter(|o| o.is_err()).count();
    assert!(refused >= 30, "only {refused} of 40 refused");
    assert!(rounds_done(&run) < 80, "the flood came while the job ran");
    drop(outcomes); // the silent connections go away and free their slots
    tokio::time::sleep(Duration::from_millis(500)).await;
    let extra = raw_client(&tls.ca, Some(&tls), proto::ALPN);
    match try_join(&extra, at).await {
        Ok(CoordinatorMsg::Reject { reason }) => assert!(reason.contains("already has 1 workers"), "{reason}"),
        other => panic!("a second worker must be refused: {other:?}"),
    }
    assert!(rounds_done(&run) < 80, "and the refusal too");
    let got = finish(coord, honest, dir.path()).await;
    assert!(
        got["connections_refused"]["too_many_from_source"].as_u64().unwrap_or(0) >= 30,
        "{got}"
    );
    assert_eq!(got["connections_refused"]["too_many_workers"], 1, "{got}");
    assert_eq!(got["final_state_checksum"], reference["final_state_checksum"]);
}

/// Issue 15, defect 1: a peer with a valid certificate says hello, then sends a 20-byte
/// bundle header announcing 16 GiB (bf16 [8589934592], then f32 [4294967296]). The coordinator
/// checks it against the delta it expects (the model's tensors in the job's delta dtype) before
/// allocating anything, drops the peer, and the honest worker ends the job undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_bundle_header_is_refused_before_anything_is_allocated() {
    let job = ["--rounds", "6", "--seed", "12"];
    let reference = reference_run(&job, "1");
    let dir = tempfile::tempdir().expect("tmp");
    let (_, tls) = net::write_pki(&dir.path().join("certs")).expect("pki");
    let (coord, addr) = coordinator(dir.path(), &job);
    for (dtype, n) in [(DType::BF16, 8_589_934_592u64), (DType::F32, 4_294_967_296)] {
        let mut liar = FakeWorker::join(&tls, &addr, "huge-header").await;
        let header = BundleHeader {
            transfer: 1,
            tensors: vec![TensorMeta {
                name: "w".into(),
                dtype,
                shape: vec![n],
            }],
        };
        let bytes = proto::encode_frame(&header).expect("header");
        assert!(bytes.len() <= 20, "{} bytes", bytes.len());
        let mut uni = liar.conn.open_uni().await.expect("uni");
        uni.write_all(&bytes).await.expect("write");
        assert_dropped(&mut liar, "huge header").await;
    }
    let honest = worker(dir.path(), &addr, "honest");
    let got = finish(coord, honest, dir.path()).await;
    assert_eq!(got["workers_lost"]["unexpected_layout"], 2, "{got}");
    assert_eq!(got["final_state_checksum"], reference["final_state_checksum"]);
}

/// A client's first packet (a QUIC Initial with its TLS ClientHello), `n` times, each from a
/// fresh connection attempt aimed at a local sink: replayed to the coordinator from other
/// addresses, each opens a handshake that nobody ever continues.
async fn first_packets(tls: &TlsFiles, n: usize) -> Vec<Vec<u8>> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("sink");
    let to = sink.local_addr().expect("addr");
    let endpoint = net::client_endpoint(tls, "127.0.0.1:0".parse().expect("addr")).expect("client");
    let mut seen = std::collections::HashSet::new();
    let mut packets = Vec::with_capacity(n);
    let mut buf = vec![0u8; 2048];
    let mut attempts = Vec::with_capacity(n);
    while packets.len() < n {
        attempts.push(endpoint.connect(to, net::SERVER_NAME).expect("connect"));
        loop {
            let len = tokio::time::timeout(Duration::from_secs(10), sink.recv(&mut buf))
                .await
                .expect("a first packet")
                .expect("recv");
            // Long header: flags, version (4), DCID length, DCID. Retransmissions repeat one.
            let packet = &buf[..len];
            let dcid = packet
                .get(5)
                .and_then(|&n| packet.get(6..6 + usize::from(n)))
                .map(<[u8]>::to_vec);
            if packet.first().is_some_and(|b| b & 0x80 != 0) && dcid.is_some_and(|d| seen.insert(d)) {
                packets.push(buf[..len].to_vec());
                break;
            }
        }
    }
    drop(attempts);
    endpoint.close(0u32.into(), b"");
    packets
}

/// Issue 15, defect 6: about 70 half-open handshakes a second (first packets replayed from 40
/// addresses, never continued) and 70 connections with a valid certificate that finish TLS and
/// never say hello (from 10 addresses, reopened a second after the coordinator drops them):
/// more than the 64 handshake slots. Two honest workers join while the flood goes on and
/// finish the job, still during the flood, with the undisturbed result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_and_stalled_handshakes_cannot_keep_workers_out() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let job = ["--rounds", "150", "--seed", "14"];
    let reference = reference_run(&job, "2");
    let dir = tempfile::tempdir().expect("tmp");
    let (_, tls) = net::write_pki(&dir.path().join("certs")).expect("pki");
    let (mut coord, addr) = coordinator(dir.path(), &[&job[..], &["--min-workers", "2"]].concat());
    let at: SocketAddr = addr.parse().expect("addr");
    let flooding = Arc::new(AtomicBool::new(true));
    let (replayed, stalled) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    // A unique first packet per handshake for the first 6 s; after that the first ones are
    // replayed again (their earlier handshakes are long gone).
    let packets = first_packets(&tls, 420).await;
    let half_open = {
        let (flooding, replayed) = (flooding.clone(), replayed.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(14));
            for (i, packet) in packets.iter().cycle().enumerate() {
                if !flooding.load(Ordering::Relaxed) {
                    break;
                }
                tick.tick().await;
                let from = SocketAddr::from(([127, 0, 0, 10 + (i % 40) as u8], 0));
                let socket = tokio::net::UdpSocket::bind(from).await.expect("bind");
                socket.send_to(packet, at).await.expect("send");
                replayed.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let stallers: Vec<_> = (0..70u8)
        .map(|i| {
            let (flooding, stalled, tls) = (flooding.clone(), stalled.clone(), tls.clone());
            tokio::spawn(async move {
                let from = SocketAddr::from(([127, 0, 0, 100 + i % 10], 0));
                let endpoint = net::client_endpoint(&tls, from).expect("client");
                while flooding.load(Ordering::Relaxed) {
                    if let Ok(conn) = net::connect(&endpoint, at).await {
                        stalled.fetch_add(1, Ordering::Relaxed);
                        // TLS done, and not a word: wait to be dropped.
                        conn.closed().await;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        })
        .collect();
    // The flood is on and the slots are taken before the honest workers come.
    let start = std::time::Instant::now();
    while stalled.load(Ordering::Relaxed) < 70 || replayed.load(Ordering::Relaxed) < 70 {
        assert!(start.elapsed() < Duration::from_secs(30), "the flood did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spawned = std::time::Instant::now();
    let mut honest = [
        worker(dir.path(), &addr, "honest-0"),
        worker(dir.path(), &addr, "honest-1"),
    ];
    let joined = |name: &str| {
        std::fs::read_to_string(dir.path().join(format!("{name}.log")))
            .unwrap_or_default()
            .contains("joined the job")
    };
    let mut join_seconds = Vec::new();
    for name in ["honest-0", "honest-1"] {
        while !joined(name) {
            assert!(
                spawned.elapsed() < Duration::from_secs(60),
                "{name} was kept out by the flood"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        join_seconds.push(spawned.elapsed().as_secs_f64());
    }
    let status = tokio::task::block_in_place(|| wait_for(&mut coord, Duration::from_secs(120)));
    let still_flooding = !half_open.is_finished() && stallers.iter().all(|s| !s.is_finished());
    flooding.store(false, Ordering::Relaxed);
    for w in &mut honest {
        tokio::task::block_in_place(|| wait_for(w, Duration::from_secs(30)));
    }
    let (replayed, stalled) = (replayed.load(Ordering::Relaxed), stalled.load(Ordering::Relaxed));
    eprintln!(
        "honest workers joined {join_seconds:.2?} s after they started, under {replayed} replayed first packets and {stalled} stalled TLS connections"
    );
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(dir.path().join("coordinator.stderr")).unwrap_or_default()
    );
    assert!(still_flooding, "the job ended during the flood");
    let got = summary(&dir.path().join("run"));
    let refused = &got["connections_refused"];
    let dropped = ["evicted", "handshake_timeout"]
        .iter()
        .map(|k| refused[k].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert!(dropped >= 70, "the stalled connections were dropped: {got}");
    assert_eq!(got["final_state_checksum"], reference["final_state_checksum"]);
    half_open.abort();
    for s in stallers {
        s.abort();
    }
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(futures: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("join"));
    }
    out
}

/// A disk that fills up (here: a file-size limit the coordinator cannot write a checkpoint
/// under): the failed checkpoint is reported with the one that is kept, training goes on, and
/// a later run resumes from the kept checkpoint to the undisturbed result.
#[test]
fn a_full_disk_keeps_the_previous_checkpoint_and_loses_nothing() {
    let job = ["--rounds", "40", "--seed", "13"];
    let reference = reference_run(&job, "2");
    let dir = tempfile::tempdir().expect("tmp");
    net::write_pki(&dir.path().join("certs")).expect("pki");
    let args = [&job[..], &["--min-workers", "2"]].concat();
    let run = dir.path().join("run");

    // First run: killed after its round-10 checkpoint.
    let (mut first, addr) = coordinator(dir.path(), &args);
    let mut workers = [worker(dir.path(), &addr, "w0"), worker(dir.path(), &addr, "w1")];
    wait_for_rounds(&run, 15);
    first.kill().expect("kill");
    first.wait().expect("reap");
    let kept = run.join("checkpoints/round-00000010.safetensors");
    let before = std::fs::read(&kept).expect("round-10 checkpoint");

    // Second run, on a "full disk": no file may grow beyond 50 kB (a checkpoint is ~78 kB).
    let log = std::fs::File::create(dir.path().join("full.stderr")).expect("log");
    let mut full = Command::new("prlimit")
        .current_dir(ROOT)
        .args([
            "--fsize=50000",
            "--",
            BIN,
            "coordinator",
            "--config",
            "configs/quickstart.toml",
            "--listen",
            &addr,
        ])
        .arg("--run-dir")
        .arg(&run)
        .args(tls_args(&dir.path().join("certs"), "coordinator"))
        .args(&args)
        .arg("--resume")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start coordinator under prlimit");
    let status = wait_for(&mut full, Duration::from_secs(120));
    let stderr = std::fs::read_to_string(dir.path().join("full.stderr")).expect("log");
    assert!(
        !status.success(),
        "a final state that cannot be saved is a failure: {stderr}"
    );
    assert!(
        stderr.contains("checkpoint after round 20 failed") && stderr.contains("checkpoint after round 30 failed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the previous checkpoint") && stderr.contains("round-00000010.safetensors is kept"),
        "{stderr}"
    );
    assert!(stderr.contains("the final state could not be saved"), "{stderr}");
    assert_eq!(
        std::fs::read(&kept).expect("still there"),
        before,
        "the kept checkpoint is untouched"
    );
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "partial files are removed: {leftovers:?}");
    let got = summary(&run);
    assert_eq!(got["checkpoint_failures"], 2, "{got}");

    // The second run did complete its rounds (only the final save failed), so its workers were
    // told the job is over and left.
    for w in &mut workers {
        wait_for(w, Duration::from_secs(30));
    }

    // Third run, with room again: resumes from round 10 and ends exactly as the undisturbed run.
    let (mut third, _) = coordinator_on(dir.path(), &addr, "third.stderr", &[&args[..], &["--resume"]].concat());
    let mut fresh = [worker(dir.path(), &addr, "w2"), worker(dir.path(), &addr, "w3")];
    assert!(wait_for(&mut third, Duration::from_secs(120)).success());
    for w in &mut fresh {
        wait_for(w, Duration::from_secs(30));
    }
    let log = std::fs::read_to_string(dir.path().join("third.stderr")).expect("log");
    assert!(log.contains("round-00000010"), "{log}");
    let got = summary(&run);
    assert_eq!(got["completed"], true);
    assert_eq!(got["final_state_checksum"], reference["final_state_checksum"]);
}

/// Private keys never reach logs, metrics or summaries.
#[test]
fn keys_never_appear_in_logs_or_records() {
    let dir = tempfile::tempdir().expect("tmp");
    let run = dir.path().join("run");
    let out = Command::new(BIN)
        .current_dir(ROOT)
        .args(["local", "--quiet", "--no-baseline", "--rounds", "3", "--run-dir"])
        .arg(&run)
        .env("METALOOP_LOG", "trace")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let keys: Vec<String> = ["coordinator.key", "worker-0.key", "worker-1.key", "ca/ca.key"]
        .iter()
        .map(|k| std::fs::read_to_string(run.join("certs").join(k)).expect("key"))
        .collect();
    let key_lines: Vec<String> = keys
        .concat()
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(str::to_string)
        .collect();
    assert!(!key_lines.is_empty());
    let mut scanned = 0;
    let mut texts = vec![
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ];
    for entry in std::fs::read_dir(&run).expect("run dir").flatten() {
        let path = entry.path();
        if path.is_file() {
            if let Ok(t) = std::fs::read_to_string(&path) {
                texts.push(t);
                scanned += 1;
            }
        }
    }
    assert!(scanned >= 5, "logs, metrics and summary were scanned");
    for t in &texts {
        assert!(!t.contains("PRIVATE KEY"), "a private key in the output");
        for l in &key_lines {
            assert!(!t.contains(l.as_str()), "key material in the output");
        }
    }
}
