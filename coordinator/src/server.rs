//! The coordinator's QUIC side: accept workers, run the hello, then turn each connection into
//! events for the run loop and carry the loop's messages back out. Moves bytes only; every
//! decision is made by the run loop and the scheduler.

use crate::identity::{self, Tls};
use crate::scheduler::WorkerId;
use metaloop_common::net::{self, Inbox, NetError};
use metaloop_common::proto::{self, AssignmentResult, CoordinatorMsg, Hello, JobSpec, RoundPlan, Welcome, WorkerMsg};
use metaloop_common::tensor::Bundle;
use quinn::{Connection, RecvStream, SendStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A worker that has not said hello by then is dropped.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker gets to read a shutdown and close the connection itself.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A result whose delta has not arrived by then counts as a lost worker.
const BUNDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// What happened on the network, for the run loop.
#[derive(Debug)]
pub enum Event {
    Joined {
        worker: WorkerId,
        /// The identity its verified certificate names (not the hello's name).
        name: String,
        outbox: mpsc::UnboundedSender<Outgoing>,
    },
    Result {
        worker: WorkerId,
        result: AssignmentResult,
        delta: Bundle,
    },
    Failed {
        worker: WorkerId,
        round: u64,
        assignment: u32,
        reason: String,
    },
    /// A joined worker's connection ended; `kind` is a bounded label (see `NetError::reason`).
    Lost {
        worker: WorkerId,
        kind: &'static str,
        reason: String,
    },
    /// A connection that never joined: refused at the door or failed its handshake or hello.
    Refused { kind: &'static str, reason: String },
}

/// What the run loop sends to one worker.
#[derive(Debug)]
pub enum Outgoing {
    /// A round plan, preceded by the bundle it refers to (full model or update), if any.
    Plan {
        plan: Box<RoundPlan>,
        bundle: Option<(u64, net::EncodedBundle)>,
    },
    Shutdown {
        reason: String,
        finished: bool,
    },
}

/// Tensor bytes moved (bundle streams; control frames are small and not counted).
#[derive(Debug, Default)]
pub struct Traffic {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// How much the accept loop takes on at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections between the first packet and the hello (TLS handshake, hello); more are
    /// refused at once, so a flood of connection attempts cannot exhaust memory.
    pub handshakes: usize,
    /// Workers joined at the same time; a hello beyond that is answered with a rejection.
    pub workers: usize,
}

/// Accepts connections until `stop` is cancelled; every connection task is tracked.
pub async fn accept_loop(
    tls: Arc<Tls>,
    job: JobSpec,
    limits: Limits,
    events: mpsc::UnboundedSender<Event>,
    traffic: Arc<Traffic>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let endpoint = tls.endpoint().clone();
    let mut next_id: WorkerId = 0;
    let handshakes = Arc::new(Semaphore::new(limits.handshakes));
    let workers = Arc::new(Semaphore::new(limits.workers));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            () = stop.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let remote = incoming.remote_address();
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%remote, limit = limits.handshakes, "too many handshakes in progress; connection refused");
            incoming.refuse();
            let reason = format!("more than {} handshakes in progress", limits.handshakes);
            let _ = events.send(Event::Refused {
                kind: "too_many_handshakes",
                reason,
            });
            continue;
        };
        next_id += 1;
        let (id, job, events, traffic, stop, workers, tls) = (
            next_id,
            job.clone(),
            events.clone(),
            traffic.clone(),
            stop.clone(),
            workers.clone(),
            tls.clone(),
        );
        tracker.spawn(async move {
            let refuse = |kind: &'static str, reason: String| {
                tracing::warn!(%remote, kind, %reason, "connection refused");
                let _ = events.send(Event::Refused { kind, reason });
            };
            // A connection that has not joined when the job ends is not waited for.
            let conn = tokio::select! {
                c = incoming => c,
                () = stop.cancelled() => return,
            };
            let conn = match conn {
                Ok(c) => c,
                Err(e) => return refuse(identity::refusal_kind(&e), e.to_string()),
            };
            let who = match tls.admit(&conn) {
                Ok(who) => who,
                Err(e) => {
                    conn.close(1u32.into(), b"refused");
                    return refuse(e.reason(), e.to_string());
                }
            };
            let admitted = tokio::select! {
                a = admit(&conn) => a,
                () = stop.cancelled() => return,
            };
            let (mut send, mut recv, hello) = match admitted {
                Ok(admitted) => admitted,
                Err(e) => {
                    conn.close(1u32.into(), b"refused");
                    return refuse(e.reason(), format!("{}: {e}", who.identity));
                }
            };
            let Ok(seat) = workers.try_acquire_owned() else {
                let reason = format!("the coordinator already has {} workers", limits.workers);
                let _ = net::write_frame(&mut send, &CoordinatorMsg::Reject { reason: reason.clone() }).await;
                net::finish_and_flush(&mut send, Duration::from_secs(5)).await;
                conn.close(1u32.into(), b"refused");
                return refuse("too_many_workers", format!("{}: {reason}", who.identity));
            };
            drop(handshake);
            let outcome = serve(
                (id, &who.identity),
                &conn,
                (&mut send, &mut recv),
                hello,
                job,
                &events,
                &traffic,
                stop,
            )
            .await;
            drop(seat);
            let (kind, reason) = match outcome {
                Ok(()) => ("left", "the worker closed its session".to_string()),
                Err(e) => (e.reason(), e.to_string()),
            };
            let (kind, reason) = who.why_lost(kind, reason);
            tracing::info!(worker = id, identity = %who.identity, kind, %reason, "worker connection ended");
            conn.close(0u32.into(), b"bye");
            let _ = events.send(Event::Lost {
                worker: id,
                kind,
                reason,
            });
        });
    }
}

/// The hello: a control stream and a hello of our protocol version within the hello timeout.
async fn admit(conn: &Connection) -> Result<(SendStream, RecvStream, Hello), NetError> {
    let no_hello = |detail: &str| NetError::Peer {
        reason: "no_hello",
        detail: detail.into(),
    };
    let (mut send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| no_hello("no control stream within the hello timeout"))??;
    let hello = tokio::time::timeout(HELLO_TIMEOUT, net::read_frame::<WorkerMsg>(&mut recv, "hello"))
        .await
        .map_err(|_| no_hello("no hello within the hello timeout"))??;
    let hello = match hello {
        Some(WorkerMsg::Hello(h)) => h,
        other => {
            return Err(NetError::Peer {
                reason: "bad_hello",
                detail: format!("expected a hello, got {other:?}"),
            })
        }
    };
    if let Err(e) = proto::check_version(hello.protocol_version) {
        let _ = net::write_frame(&mut send, &CoordinatorMsg::Reject { reason: e.to_string() }).await;
        net::finish_and_flush(&mut send, Duration::from_secs(5)).await;
        return Err(e.into());
    }
    Ok((send, recv, hello))
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    (id, identity): (WorkerId, &str),
    conn: &Connection,
    (send, recv): (&mut SendStream, &mut RecvStream),
    hello: Hello,
    job: JobSpec,
    events: &mpsc::UnboundedSender<Event>,
    traffic: &Traffic,
    stop: CancellationToken,
) -> Result<(), NetError> {
    let welcome = CoordinatorMsg::Welcome(Welcome {
        protocol_version: proto::PROTOCOL_VERSION,
        worker_id: id,
        job,
    });
    net::write_frame(send, &welcome).await?;
    let (outbox, inbox_rx) = mpsc::unbounded_channel();
    tracing::info!(worker = id, %identity, name = %hello.name, remote = %conn.remote_address(), "worker joined");
    if events
        .send(Event::Joined {
            worker: id,
            name: identity.into(),
            outbox,
        })
        .is_err()
    {
        return Ok(());
    }
    let bundles = Inbox::default();
    tokio::select! {
        e = bundles.fill(conn, &traffic.bytes_in) => Err(e),
        r = read_loop(id, recv, &bundles, events) => r,
        r = write_loop(conn, send, inbox_rx, traffic) => r,
        () = stop.cancelled() => Ok(()),
    }
}

async fn read_loop(
    id: WorkerId,
    recv: &mut RecvStream,
    bundles: &Inbox,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), NetError> {
    loop {
        let Some(msg) = net::read_frame::<WorkerMsg>(recv, "worker message").await? else {
            return Ok(());
        };
        let event = match msg {
            WorkerMsg::Result(result) => {
                let delta = tokio::time::timeout(BUNDLE_TIMEOUT, bundles.take(result.delta_transfer))
                    .await
                    .map_err(|_| NetError::Peer {
                        reason: "bundle_timeout",
                        detail: format!("delta {} did not arrive in time", result.delta_transfer),
                    })??;
                Event::Result {
                    worker: id,
                    result,
                    delta,
                }
            }
            WorkerMsg::Failed {
                round,
                assignment,
                reason,
            } => Event::Failed {
                worker: id,
                round,
                assignment,
                reason,
            },
            WorkerMsg::Hello(_) => {
                return Err(NetError::Peer {
                    reason: "second_hello",
                    detail: "a second hello on an open connection".into(),
                })
            }
        };
        if events.send(event).is_err() {
            return Ok(());
        }
    }
}

async fn write_loop(
    conn: &Connection,
    send: &mut SendStream,
    mut outbox: mpsc::UnboundedReceiver<Outgoing>,
    traffic: &Traffic,
) -> Result<(), NetError> {
    while let Some(out) = outbox.recv().await {
        match out {
            Outgoing::Plan { plan, bundle } => {
                if let Some((transfer, b)) = bundle {
                    let n = net::send_encoded(conn, transfer, &b).await?;
                    traffic.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                }
                net::write_frame(send, &CoordinatorMsg::Round(*plan)).await?;
            }
            Outgoing::Shutdown { reason, finished } => {
                net::write_frame(send, &CoordinatorMsg::Shutdown { reason, finished }).await?;
                net::finish_and_flush(send, SHUTDOWN_GRACE).await;
                // A transport ACK is not enough: a worker in the middle of an assignment reads
                // the message only afterwards, and closing first would discard it. The worker
                // closes the connection once it has read it.
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn.closed()).await;
                return Ok(());
            }
        }
    }
    Ok(())
}
