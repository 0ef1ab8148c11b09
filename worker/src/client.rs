//! The worker's QUIC side: connect, hello, then serve rounds until the coordinator says stop.
//! All compute happens on the engine's compute threads; this task only moves bytes.

use crate::engine::Engine;
use anyhow::{bail, Context};
use metaloop_common::metrics as m;
use metaloop_common::net::{self, Inbox, TlsFiles};
use metaloop_proto::proto::{
    self, AssignmentResult, CoordinatorMsg, Hello, ModelSource, ModelSpec, ModuleBytes, ModuleReceiver, RoundPlan,
    WorkerMsg,
};
use quinn::{Connection, SendStream};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How to reach the coordinator and how to compute.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// HOST:PORT; a name is resolved again at every (re)connect, so a coordinator that comes
    /// back at another address (a rescheduled pod) is found.
    pub coordinator: String,
    pub tls: TlsFiles,
    /// Shown in the coordinator's logs.
    pub name: String,
    /// libtorch intra-op threads per replica (1 keeps several local workers from
    /// oversubscribing cores and keeps results bit-for-bit reproducible).
    pub threads: usize,
    /// One model replica per device, in rank order (`devices::resolve` makes the list).
    pub devices: Vec<tch::Device>,
    /// How long to keep trying to reach a coordinator that went away before giving up.
    pub reconnect_for: Duration,
    /// Raised while this worker has joined a job (`/readyz`).
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

/// Runs a worker until the coordinator says the job is finished, `shutdown` is cancelled, or
/// the coordinator stays unreachable for `reconnect_for`.
///
/// # Errors
/// Connection, handshake, data or compute failures, each with context.
pub async fn run(opts: WorkerOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Certificates are checked once, before anything else.
    let v4 = net::client_endpoint(&opts.tls, SocketAddr::from(([0, 0, 0, 0], 0)))?;
    let mut v6: Option<quinn::Endpoint> = None;
    let mut backoff = FIRST_BACKOFF;
    let mut unreachable_since: Option<Instant> = None;
    let mut last_immediate: Option<Instant> = None;
    let result = loop {
        let attempt = async {
            let addr = resolve(&opts.coordinator).await?;
            let endpoint = if addr.is_ipv6() {
                if v6.is_none() {
                    v6 = Some(net::client_endpoint(&opts.tls, SocketAddr::from(([0u16; 8], 0)))?);
                }
                v6.clone().context("IPv6 endpoint")?
            } else {
                v4.clone()
            };
            anyhow::Ok(net::connect(&endpoint, addr).await)
        };
        let (session, connected) = match attempt.await {
            Ok(Ok(conn)) => {
                let r = tokio::select! {
                    r = serve(&conn, &opts) => r,
                    () = shutdown.cancelled() => Ok(()),
                };
                opts.ready.store(false, std::sync::atomic::Ordering::Relaxed);
                metrics::gauge!(m::WORKER_CONNECTED).set(0.0);
                conn.close(0u32.into(), b"worker stopping");
                (r, true)
            }
            // Our CA does not vouch for the coordinator's certificate, or no common ALPN.
            Ok(Err(e @ net::NetError::Tls(_))) => (Err(fatal(e)), false),
            Ok(Err(e)) => (Err(e.into()), false),
            Err(e) => (Err(e), false),
        };
        let err = match session {
            Ok(()) => break Ok(()),
            Err(e) if e.is::<Fatal>() => break Err(e),
            Err(e) => e,
        };
        // The coordinator went away (restart, network blip, a stateless reset from a restarted
        // coordinator): reconnect at once, then with exponential backoff, and rejoin as a new
        // worker. At most one immediate retry per second, so a coordinator that drops every
        // session at once cannot make us spin.
        let immediate = connected && last_immediate.is_none_or(|t| t.elapsed() >= IMMEDIATE_RETRY_EVERY);
        if connected {
            unreachable_since = None;
            backoff = FIRST_BACKOFF;
        }
        let since = *unreachable_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= opts.reconnect_for {
            break Err(err.context(format!("gave up reconnecting after {:?}", opts.reconnect_for)));
        }
        metrics::counter!(m::WORKER_RECONNECTS).increment(1);
        if immediate {
            tracing::warn!(error = %format!("{err:#}"), "lost the coordinator; reconnecting now");
            last_immediate = Some(Instant::now());
            continue;
        }
        tracing::warn!(error = %format!("{err:#}"), retry_in = ?backoff, "lost the coordinator; reconnecting");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = shutdown.cancelled() => break Ok(()),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    };
    v4.wait_idle().await;
    if let Some(e) = v6 {
        e.wait_idle().await;
    }
    result
}

/// The first address `host:port` resolves to.
async fn resolve(target: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(target)
        .await
        .with_context(|| format!("resolving the coordinator address {target}"))?
        .next()
        .with_context(|| format!("the coordinator address {target} resolves to nothing"))
}

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// The first retry after a session ends is immediate, at most this often.
const IMMEDIATE_RETRY_EVERY: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// An error that reconnecting cannot fix (refused, wrong version, bad data).
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
struct Fatal(anyhow::Error);

fn fatal(e: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(Fatal(e.into()))
}

async fn serve(conn: &Connection, opts: &WorkerOptions) -> anyhow::Result<()> {
    // The coordinator checks our certificate after our side of the handshake is done, so its
    // refusal arrives here, on the first stream operations.
    let refused = |e: anyhow::Error| {
        match conn.close_reason() {
        Some(c) if net::tls_refusal(&c) && c.to_string().contains("Revoked") => fatal(anyhow::anyhow!(
            "the coordinator refused this worker's TLS certificate: it is revoked ({c}); ask the operator for a new identity (`metaloop certs issue`)"
        )),
        Some(c) if net::tls_refusal(&c) => fatal(anyhow::anyhow!(
            "the coordinator refused this worker's TLS certificate ({c}); check --cert and --key, and that they are signed by the CA the coordinator trusts"
        )),
        _ => e,
    }
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .context("opening the control stream")
        .map_err(refused)?;
    net::write_frame(
        &mut send,
        &WorkerMsg::Hello(Hello {
            protocol_version: proto::PROTOCOL_VERSION,
            name: opts.name.clone(),
        }),
    )
    .await
    .map_err(|e| refused(e.into()))?;
    let mut welcome = match net::read_frame::<CoordinatorMsg>(&mut recv, "welcome")
        .await
        .map_err(|e| refused(e.into()))?
    {
        Some(CoordinatorMsg::Welcome(w)) => *w,
        Some(CoordinatorMsg::Reject { reason }) => {
            return Err(fatal(anyhow::anyhow!("coordinator refused us: {reason}")))
        }
        Some(other) => {
            return Err(fatal(anyhow::anyhow!(
                "coordinator sent {other:?} instead of a welcome"
            )))
        }
        None => bail!("coordinator closed the control stream during the handshake"),
    };
    proto::check_version(welcome.protocol_version).map_err(|e| fatal(anyhow::Error::from(e).context("coordinator")))?;
    if let ModelSpec::TorchScript {
        sha256, size, module, ..
    } = &mut welcome.job.model
    {
        *module = receive_module(&mut recv, *sha256, *size).await?;
    }
    tracing::info!(worker_id = welcome.worker_id, "joined the job");
    opts.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    metrics::gauge!(m::WORKER_CONNECTED).set(1.0);

    let engine = match Engine::start(welcome.job.clone(), &opts.devices, opts.threads).await {
        Ok(e) => e,
        Err(e) if e.is_permanent() => return Err(fatal(e)),
        Err(e) => return Err(e.into()),
    };

    // Every bundle from the coordinator (the full model or a step) has the model's layout in
    // f32; a header that announces anything else is refused before its payload is read.
    let layout = metaloop_common::model::layout(&welcome.job.model).map_err(fatal)?;
    let inbox = Arc::new(Inbox::new(proto::BundleLayout::from_shapes(&layout, proto::DType::F32)));
    let filler = {
        let (inbox, conn) = (inbox.clone(), conn.clone());
        tokio::spawn(async move { inbox.fill(&conn).await })
    };
    let mut next_transfer = 0u64;
    // Deltas being sent: in the background, so the next assignment computes meanwhile (the
    // coordinator reads each delta when its ordered sum can take it).
    let mut sends = tokio::task::JoinSet::new();
    let outcome = loop {
        let msg = match net::read_frame::<CoordinatorMsg>(&mut recv, "control frame").await {
            Ok(Some(m)) => m,
            Ok(None) => break Err(anyhow::anyhow!("the coordinator closed the control stream")),
            Err(e) => break Err(anyhow::Error::from(e).context("reading from the coordinator")),
        };
        match msg {
            CoordinatorMsg::Round(plan) => {
                if let Err(e) = round(
                    (conn, &mut send, &mut sends),
                    &engine,
                    &inbox,
                    plan,
                    welcome.job.delta_dtype,
                    &mut next_transfer,
                )
                .await
                {
                    break Err(e);
                }
            }
            CoordinatorMsg::Shutdown { reason, finished: true } => {
                tracing::info!(%reason, "coordinator finished the job");
                break Ok(());
            }
            // A coordinator stopped by a signal is usually restarted (a rescheduled pod, an
            // operator's --resume): wait for it like for one that went away.
            CoordinatorMsg::Shutdown {
                reason,
                finished: false,
            } => {
                break Err(anyhow::anyhow!(
                    "the coordinator is stopping ({reason}); it may come back"
                ))
            }
            other => break Err(anyhow::anyhow!("unexpected message from the coordinator: {other:?}")),
        }
    };
    filler.abort();
    outcome
}

/// Deltas being sent in the background; each yields its bytes sent, or why it failed.
type DeltaSends = tokio::task::JoinSet<Result<usize, net::NetError>>;

/// Brings the model to the plan's version, then runs each assignment and returns its result:
/// the result first, then its delta on a stream of its own, sent in the background (`sends`).
/// A delta waits unread until the coordinator's ordered sum can take it, and the coordinator
/// decides that from the result, so the result must not wait behind the delta.
async fn round(
    (conn, send, sends): (&Connection, &mut SendStream, &mut DeltaSends),
    engine: &Engine,
    inbox: &Inbox,
    plan: RoundPlan,
    delta_dtype: proto::DType,
    next_transfer: &mut u64,
) -> anyhow::Result<()> {
    let synced = match plan.model {
        ModelSource::Full {
            version,
            checksum,
            transfer,
        } => {
            let params = inbox.take(transfer).await?;
            engine.set_model(version, checksum, params).await?
        }
        ModelSource::Step {
            base,
            version,
            checksum,
            transfer,
        } => {
            let step = inbox.take(transfer).await?;
            engine.apply_step(base, version, checksum, step).await?
        }
        ModelSource::Unchanged { version, checksum } => engine.check_version(version, checksum).await?,
    };
    let asks = Arc::new(crate::train::RoundAsks::of(&plan));
    for a in plan.assignments {
        // A delta that could not be sent: the connection is gone.
        while let Some(sent) = sends.try_join_next() {
            sent??;
        }
        let index = a.index;
        let asks = asks.clone();
        let outcome = match &synced {
            Ok(()) => engine.run(a, asks).await?,
            Err(e) => Err(crate::TrainError::Mismatch(e.to_string())),
        };
        match outcome {
            Ok(out) => {
                metrics::counter!(m::WORKER_ASSIGNMENTS, "outcome" => "ok").increment(1);
                metrics::histogram!(m::WORKER_ASSIGNMENT_DURATION).record(f64::from(out.seconds));
                metrics::counter!(m::WORKER_SAMPLES).increment(out.samples);
                metrics::gauge!(m::WORKER_INNER_LOSS).set(f64::from(out.mean_loss));
                *next_transfer += 1;
                let transfer = *next_transfer;
                let delta = net::EncodedBundle::with_dtype(&out.delta, delta_dtype);
                let result = AssignmentResult {
                    train_loss: out.mean_loss,
                    samples: out.samples,
                    compute_seconds: out.seconds,
                    meta_loss: out.meta_loss,
                    signal: out.signal,
                    ..AssignmentResult::new(plan.round, index, transfer)
                };
                net::write_frame(send, &WorkerMsg::Result(result)).await?;
                let conn = conn.clone();
                sends.spawn(async move { net::send_encoded(&conn, transfer, &delta).await });
            }
            Err(e) => {
                metrics::counter!(m::WORKER_ASSIGNMENTS, "outcome" => "failed").increment(1);
                tracing::warn!(round = plan.round, assignment = index, error = %e, "assignment failed");
                net::write_frame(
                    send,
                    &WorkerMsg::Failed {
                        round: plan.round,
                        assignment: index,
                        reason: e.to_string(),
                    },
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// The job's TorchScript module file, from the `ModulePart`s that follow the welcome, checked
/// against the spec's size and sha256. A connection lost meanwhile is retried; a file that does
/// not add up is fatal (the coordinator would send the same again).
async fn receive_module(recv: &mut quinn::RecvStream, sha256: [u8; 32], size: u64) -> anyhow::Result<ModuleBytes> {
    let mut receiver = ModuleReceiver::new(sha256, size).map_err(fatal)?;
    loop {
        match net::read_frame::<CoordinatorMsg>(recv, "TorchScript module part").await? {
            Some(CoordinatorMsg::ModulePart { offset, bytes }) => {
                if let Some(file) = receiver.part(offset, &bytes).map_err(fatal)? {
                    tracing::info!(bytes = file.len(), "received the TorchScript module");
                    return Ok(ModuleBytes(Some(file)));
                }
            }
            Some(other) => {
                return Err(fatal(anyhow::anyhow!(
                    "coordinator sent {other:?} before the whole TorchScript module"
                )))
            }
            None => bail!("coordinator closed the control stream while sending the TorchScript module"),
        }
    }
}
