//! The versioned handshake over real QUIC connections: a version mismatch is a clear error on
//! both sides.

use metaloop_common::net;
use metaloop_proto::config::JobConfig;
use metaloop_proto::proto::{self, CoordinatorMsg, Hello, InnerSpec, JobSpec, ModelSpec, Welcome, WorkerMsg};
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn quickstart() -> JobConfig {
    JobConfig::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml")).expect("quickstart")
}

#[tokio::test]
async fn coordinator_rejects_a_worker_of_another_version() {
    let dir = tempfile::tempdir().expect("tmp");
    let (coord_tls, worker_tls) = net::write_pki(&dir.path().join("certs")).expect("pki");
    let coordinator = metaloop_coordinator::Coordinator::bind(metaloop_coordinator::CoordinatorOptions {
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: coord_tls,
        run_dir: dir.path().join("run"),
        min_workers: 1,
        worker_wait: Duration::from_secs(30),
        resume: false,
        assignment_timeout: None,
        checkpoint_pause: Duration::ZERO,
        max_handshakes: 64,
        max_workers: 1024,
        ready: Default::default(),
        revocation: Default::default(),
    })
    .expect("bind");
    let addr = coordinator.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let running = tokio::spawn(coordinator.run(quickstart(), |_| {}, stop.clone()));

    let endpoint = net::client_endpoint(&worker_tls, "127.0.0.1:0".parse().expect("addr")).expect("client");
    let conn = net::connect(&endpoint, addr).await.expect("connect");
    let (mut send, mut recv) = conn.open_bi().await.expect("bi");
    let hello = WorkerMsg::Hello(Hello {
        protocol_version: proto::PROTOCOL_VERSION + 1,
        name: "future".into(),
    });
    net::write_frame(&mut send, &hello).await.expect("hello");
    let reply = net::read_frame::<CoordinatorMsg>(&mut recv, "reply")
        .await
        .expect("read")
        .expect("a reply");
    match reply {
        CoordinatorMsg::Reject { reason } => assert!(reason.contains("version mismatch"), "{reason}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    stop.cancel();
    let summary = running.await.expect("join").expect("a stop request is not a failure");
    assert!(!summary.completed && summary.rounds == 0, "{summary:?}");
}

#[tokio::test]
async fn worker_refuses_a_coordinator_of_another_version() {
    let dir = tempfile::tempdir().expect("tmp");
    let (coord_tls, worker_tls) = net::write_pki(&dir.path().join("certs")).expect("pki");
    let server = net::server_endpoint("127.0.0.1:0".parse().expect("addr"), &coord_tls).expect("server");
    let addr = server.local_addr().expect("addr");
    let fake = tokio::spawn(async move {
        let conn = server.accept().await.expect("incoming").await.expect("handshake");
        let (mut send, mut recv) = conn.accept_bi().await.expect("bi");
        let hello = net::read_frame::<WorkerMsg>(&mut recv, "hello").await.expect("read");
        assert!(matches!(hello, Some(WorkerMsg::Hello(_))));
        let job = JobSpec {
            seed: 0,
            model: ModelSpec::Mlp {
                inputs: 64,
                hidden: vec![8],
                classes: 10,
                dropout: 0.0,
            },
            domains: Vec::new(),
            meta: None,
            shards: 1,
            inner: InnerSpec {
                batch_size: 8,
                lr: 0.1,
                momentum: 0.0,
                weight_decay: 0.0,
                ..InnerSpec::default()
            },
            delta_dtype: metaloop_proto::proto::DType::F32,
            text: None,
            meta_batch: 0,
        };
        let welcome = CoordinatorMsg::Welcome(Box::new(Welcome {
            protocol_version: proto::PROTOCOL_VERSION + 1,
            worker_id: 1,
            job,
        }));
        net::write_frame(&mut send, &welcome).await.expect("welcome");
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    });
    let opts = metaloop_worker::WorkerOptions {
        coordinator: addr.to_string(),
        tls: worker_tls,
        name: "w".into(),
        threads: 1,
        devices: vec![metaloop_worker::devices::Device::Cpu],
        reconnect_for: std::time::Duration::from_secs(5),
        ready: Default::default(),
    };
    let err = metaloop_worker::run(opts, CancellationToken::new())
        .await
        .expect_err("must refuse");
    assert!(format!("{err:#}").contains("version mismatch"), "{err:#}");
    fake.await.expect("fake coordinator");
}
