//! `metaloop bench transport`: a model-sized tensor bundle through the project's QUIC path
//! (mutual TLS, `net::send_bundle` / `net::recv_bundle`, codec included) against the same
//! bytes through a plain TCP socket, both on loopback, in the same run. Prints a Markdown
//! table with the ratio, since only ratios mean anything on a shared machine.

use anyhow::Context;
use metaloop_common::net;
use metaloop_proto::proto::DType;
use metaloop_proto::tensor::{Bundle, HostTensor};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub async fn run(sizes: Vec<usize>, repeats: usize) -> anyhow::Result<()> {
    println!(
        "Median of {repeats}; rates in MB/s of f32 model bytes moved; {}.",
        super::machine()
    );
    println!();
    println!("| payload | QUIC f32 | QUIC bf16 deltas | raw TCP f32 | QUIC f32 / TCP | QUIC bf16 / TCP |");
    println!("|---|---|---|---|---|---|");
    for mib in sizes {
        let bundle = payload(mib);
        let bytes = (mib as f64) * 1024.0 * 1024.0;
        let (mut quic, mut bf16, mut tcp) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..repeats.max(1) {
            quic.push(quic_once(&bundle, DType::F32).await?);
            bf16.push(quic_once(&bundle, DType::BF16).await?);
            tcp.push(tcp_once(&bundle).await?);
        }
        let (q, b, t) = (median(&mut quic), median(&mut bf16), median(&mut tcp));
        let rate = |d: Duration| bytes / d.as_secs_f64() / 1e6;
        println!(
            "| {mib} MiB | {:.0} ({:.2} s) | {:.0} ({:.2} s) | {:.0} ({:.2} s) | {:.2} | {:.2} |",
            rate(q),
            q.as_secs_f64(),
            rate(b),
            b.as_secs_f64(),
            rate(t),
            t.as_secs_f64(),
            rate(q) / rate(t),
            rate(b) / rate(t)
        );
    }
    Ok(())
}

fn payload(mib: usize) -> Bundle {
    let n = mib * 1024 * 1024 / 4;
    Bundle {
        tensors: vec![HostTensor {
            name: "delta".into(),
            shape: vec![n],
            data: (0..n).map(|i| (i % 1000) as f32 * 1e-3).collect(),
        }],
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One bundle from a worker-side endpoint to a coordinator-side one, sent as `dtype`: from
/// encoding to the decoded bundle in the receiver's hands.
async fn quic_once(bundle: &Bundle, dtype: DType) -> anyhow::Result<Duration> {
    let dir = super::scratch_dir("transport")?;
    let (coord, worker) = net::write_pki(&dir)?;
    let server = net::server_endpoint("127.0.0.1:0".parse()?, &coord)?;
    let addr = server.local_addr()?;
    let expected = metaloop_proto::proto::BundleLayout::of(bundle, dtype);
    let receiver = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let recv = conn.accept_uni().await?;
        let (_, b, _) = net::recv_bundle(recv, &expected).await?;
        let done = Instant::now();
        conn.close(0u32.into(), b"done");
        server.wait_idle().await;
        anyhow::Ok((done, b.tensors[0].data.len()))
    });
    let client = net::client_endpoint(&worker, "127.0.0.1:0".parse()?)?;
    let conn = net::connect(&client, addr).await?;
    let start = Instant::now();
    net::send_encoded(&conn, 1, &net::EncodedBundle::with_dtype(bundle, dtype)).await?;
    let (done, n) = receiver.await??;
    anyhow::ensure!(n == bundle.tensors[0].data.len(), "short transfer");
    conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(done - start)
}

/// The same payload bytes through a TCP socket, read into a buffer by the receiver.
async fn tcp_once(bundle: &Bundle) -> anyhow::Result<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let len = bundle.tensors[0].data.len() * 4;
    let receiver = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut buf = Vec::with_capacity(len);
        s.read_to_end(&mut buf).await?;
        anyhow::Ok((Instant::now(), buf.len()))
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let start = Instant::now();
    let bytes = metaloop_proto::proto::encode_payload(bundle);
    s.write_all(&bytes).await?;
    s.shutdown().await?;
    let (done, n) = receiver.await??;
    anyhow::ensure!(n == len, "short transfer");
    Ok(done - start)
}
