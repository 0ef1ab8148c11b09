//! The coordinator's QUIC side: accept workers, run the hello, then turn each connection into
//! events for the run loop and carry the loop's messages back out. Moves bytes only; every
//! decision is made by the run loop and the scheduler.

mod admission;
pub mod deltas;

use crate::identity::{self, Tls};
use crate::scheduler::WorkerId;
use admission::{Admission, Decision, Ticket};
use deltas::{DeltaGate, Permit};
use metaloop_common::net::{self, Inbox, NetError};
use metaloop_proto::proto::{
    self, AssignmentResult, BundleLayout, CoordinatorMsg, Hello, JobSpec, ModelSpec, ModuleBytes, RoundPlan, Welcome,
    WorkerMsg,
};
use metaloop_proto::tensor::Bundle;
use quinn::{Connection, RecvStream, SendStream};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// From its first packet, a connection has this long to finish TLS and say hello. A worker
/// does both in a few round trips; a peer that stalls gives its slot back this soon.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(4);
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
        /// Drop it once the delta is in the sum and the gate has the sum's new state.
        permit: Permit,
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
    /// A round plan, then the bundle it refers to (full model or update), if any.
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
    /// Connections between the first packet and the hello (TLS handshake, hello), so a flood
    /// of connection attempts cannot exhaust memory. When all are taken the oldest is evicted
    /// for the newcomer; see `admission` for the per-source limit and retries.
    pub handshakes: usize,
    /// Workers joined at the same time; a hello beyond that is answered with a rejection.
    pub workers: usize,
}

/// The pending handshakes, and how to cancel each (to evict it).
#[derive(Debug)]
struct Gate {
    admission: Admission,
    cancel: HashMap<Ticket, CancellationToken>,
}

type SharedGate = Arc<Mutex<Gate>>;

fn lock(gate: &SharedGate) -> std::sync::MutexGuard<'_, Gate> {
    gate.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A pending handshake's slot, freed when its task leaves the handshake, whichever way.
struct Slot {
    gate: SharedGate,
    ticket: Ticket,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = lock(&self.gate);
        g.admission.finished(self.ticket);
        g.cancel.remove(&self.ticket);
    }
}

/// Accepts connections until `stop` is cancelled; every connection task is tracked. Every
/// worker's deltas are read when `deltas` lets them.
#[allow(clippy::too_many_arguments)]
pub async fn accept_loop(
    tls: Arc<Tls>,
    job: JobSpec,
    limits: Limits,
    deltas: Arc<DeltaGate>,
    events: mpsc::UnboundedSender<Event>,
    traffic: Arc<Traffic>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let endpoint = tls.endpoint().clone();
    let mut next_id: WorkerId = 0;
    let gate: SharedGate = Arc::new(Mutex::new(Gate {
        admission: Admission::new(limits.handshakes),
        cancel: HashMap::new(),
    }));
    let workers = Arc::new(Semaphore::new(limits.workers));
    // What every worker's deltas must look like: the model's tensors in the job's delta dtype.
    let delta_layout = match metaloop_common::model::layout(&job.model) {
        Ok(shapes) => Arc::new(BundleLayout::from_shapes(&shapes, job.delta_dtype)),
        Err(e) => {
            // The coordinator built this model itself, so its layout is known to be good.
            tracing::error!(error = %e, "the job's model has no layout; accepting no workers");
            return;
        }
    };
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            () = stop.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let remote = incoming.remote_address();
        let decision = lock(&gate)
            .admission
            .incoming(remote.ip(), incoming.remote_address_validated());
        let (slot, evict_me) = match decision {
            Decision::Accept { ticket, evict } => {
                let mut g = lock(&gate);
                let evicted = evict.and_then(|t| g.cancel.remove(&t));
                let token = CancellationToken::new();
                g.cancel.insert(ticket, token.clone());
                drop(g);
                if let Some(e) = evicted {
                    e.cancel();
                }
                (
                    Slot {
                        gate: gate.clone(),
                        ticket,
                    },
                    token,
                )
            }
            Decision::Retry => {
                tracing::debug!(%remote, "many handshakes in progress; asking for address validation");
                if let Err(e) = incoming.retry() {
                    e.into_incoming().ignore();
                }
                continue;
            }
            Decision::Refuse(kind) => {
                tracing::warn!(%remote, kind, "connection refused");
                incoming.refuse();
                let reason = format!("{remote}: too many handshakes in progress from this address");
                let _ = events.send(Event::Refused { kind, reason });
                continue;
            }
        };
        next_id += 1;
        let (id, job, events, traffic, stop, workers, tls, delta_layout, deltas) = (
            next_id,
            job.clone(),
            events.clone(),
            traffic.clone(),
            stop.clone(),
            workers.clone(),
            tls.clone(),
            delta_layout.clone(),
            deltas.clone(),
        );
        tracker.spawn(async move {
            let refuse = |kind: &'static str, reason: String| {
                tracing::warn!(%remote, kind, %reason, "connection refused");
                let _ = events.send(Event::Refused { kind, reason });
            };
            // TLS, the certificate's identity and the hello within the deadline, unless evicted
            // for a newcomer first; a connection that has not joined when the job ends is not
            // waited for.
            let handshake = async {
                let conn = incoming
                    .await
                    .map_err(|e| (identity::refusal_kind(&e), e.to_string()))?;
                let who = match tls.admit(&conn) {
                    Ok(who) => who,
                    Err(e) => {
                        conn.close(1u32.into(), b"refused");
                        return Err((e.reason(), e.to_string()));
                    }
                };
                match admit(&conn).await {
                    Ok(admitted) => Ok((conn, who, admitted)),
                    Err(e) => {
                        conn.close(1u32.into(), b"refused");
                        Err((e.reason(), format!("{}: {e}", who.identity)))
                    }
                }
            };
            let outcome = tokio::select! {
                r = tokio::time::timeout(HANDSHAKE_DEADLINE, handshake) => r.unwrap_or_else(|_| {
                    Err(("handshake_timeout", format!("no hello within {HANDSHAKE_DEADLINE:?}")))
                }),
                () = evict_me.cancelled() => Err(("evicted", "evicted by a newer handshake while all slots were taken".into())),
                () = stop.cancelled() => return,
            };
            drop(slot);
            let (conn, who, (mut send, mut recv, hello)) = match outcome {
                Ok(joined) => joined,
                Err((kind, reason)) => return refuse(kind, reason),
            };
            let Ok(seat) = workers.try_acquire_owned() else {
                let reason = format!("the coordinator already has {} workers", limits.workers);
                let _ = net::write_frame(&mut send, &CoordinatorMsg::Reject { reason: reason.clone() }).await;
                net::finish_and_flush(&mut send, Duration::from_secs(5)).await;
                conn.close(1u32.into(), b"refused");
                return refuse("too_many_workers", format!("{}: {reason}", who.identity));
            };
            let outcome = serve(
                (id, &who.identity),
                &conn,
                (&mut send, &mut recv),
                hello,
                job,
                (Inbox::new((*delta_layout).clone()), &deltas),
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

/// The hello: a control stream and a hello of our protocol version (the caller bounds the
/// time).
async fn admit(conn: &Connection) -> Result<(SendStream, RecvStream, Hello), NetError> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let hello = net::read_frame::<WorkerMsg>(&mut recv, "hello").await?;
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
    (bundles, deltas): (Inbox, &Arc<DeltaGate>),
    events: &mpsc::UnboundedSender<Event>,
    traffic: &Traffic,
    stop: CancellationToken,
) -> Result<(), NetError> {
    let module = match &job.model {
        ModelSpec::TorchScript {
            module: ModuleBytes(Some(bytes)),
            ..
        } => Some(bytes.clone()),
        _ => None,
    };
    let welcome = CoordinatorMsg::Welcome(Box::new(Welcome {
        protocol_version: proto::PROTOCOL_VERSION,
        worker_id: id,
        job,
    }));
    net::write_frame(send, &welcome).await?;
    // A TorchScript model's file follows the welcome, in parts under the frame limit.
    for (i, part) in module
        .iter()
        .flat_map(|m| m.chunks(proto::MODULE_PART_BYTES))
        .enumerate()
    {
        let offset = (i * proto::MODULE_PART_BYTES) as u64;
        let bytes = part.to_vec();
        net::write_frame(send, &CoordinatorMsg::ModulePart { offset, bytes }).await?;
    }
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
    tokio::select! {
        e = bundles.fill(conn) => Err(e),
        r = read_loop(id, recv, (&bundles, deltas), events, traffic) => r,
        r = write_loop(conn, send, inbox_rx, traffic) => r,
        () = stop.cancelled() => Ok(()),
    }
}

/// The worker's control messages, in order, each turned into an event. A result's delta is
/// read when the gate lets it, concurrently with the worker's other results: one waiting for
/// its turn must not hold back a later message that the sum needs first (a worker may send
/// the result of a reassigned, earlier assignment after one of its own).
async fn read_loop(
    id: WorkerId,
    recv: &mut RecvStream,
    (bundles, deltas): (&Inbox, &Arc<DeltaGate>),
    events: &mpsc::UnboundedSender<Event>,
    traffic: &Traffic,
) -> Result<(), NetError> {
    let (results_tx, mut results_rx) = mpsc::unbounded_channel();
    let messages = async move {
        loop {
            let Some(msg) = net::read_frame::<WorkerMsg>(recv, "worker message").await? else {
                return Ok(());
            };
            match msg {
                WorkerMsg::Result(result) => {
                    if results_tx.send(result).is_err() {
                        return Ok(());
                    }
                }
                WorkerMsg::Failed {
                    round,
                    assignment,
                    reason,
                } => {
                    let event = Event::Failed {
                        worker: id,
                        round,
                        assignment,
                        reason,
                    };
                    if events.send(event).is_err() {
                        return Ok(());
                    }
                }
                WorkerMsg::Hello(_) => {
                    return Err(NetError::Peer {
                        reason: "second_hello",
                        detail: "a second hello on an open connection".into(),
                    })
                }
            }
        }
    };
    let results = async {
        let mut reading = futures_util::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                r = results_rx.recv() => match r {
                    Some(result) => reading.push(receive_delta(id, result, (bundles, deltas), traffic)),
                    None if reading.is_empty() => return Ok(()),
                    None => {}
                },
                Some(done) = futures_util::StreamExt::next(&mut reading), if !reading.is_empty() => {
                    if events.send(done?).is_err() {
                        return Ok(());
                    }
                }
            }
        }
    };
    tokio::try_join!(messages, results).map(|_| ())
}

/// A result's delta: claimed from the inbox (it must arrive in time), read once the gate lets
/// it (unread until then), as the result's event.
async fn receive_delta(
    id: WorkerId,
    result: AssignmentResult,
    (bundles, deltas): (&Inbox, &Arc<DeltaGate>),
    traffic: &Traffic,
) -> Result<Event, NetError> {
    let pending = tokio::time::timeout(BUNDLE_TIMEOUT, bundles.claim(result.delta_transfer))
        .await
        .map_err(|_| NetError::Peer {
            reason: "bundle_timeout",
            detail: format!("delta {} did not arrive in time", result.delta_transfer),
        })??;
    let permit = deltas.admit(result.round, result.assignment as usize).await;
    let (delta, n) = pending.read().await?;
    traffic.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    Ok(Event::Result {
        worker: id,
        result,
        delta,
        permit,
    })
}

async fn write_loop(
    conn: &Connection,
    send: &mut SendStream,
    mut outbox: mpsc::UnboundedReceiver<Outgoing>,
    traffic: &Traffic,
) -> Result<(), NetError> {
    while let Some(out) = outbox.recv().await {
        match out {
            // The plan first: a bundle stream is read when the message naming it has been (the
            // receiver decides when to read it), and one larger than QUIC's stream window would
            // otherwise wait for a reader that waits for the plan.
            Outgoing::Plan { plan, bundle } => {
                net::write_frame(send, &CoordinatorMsg::Round(*plan)).await?;
                if let Some((transfer, b)) = bundle {
                    let n = net::send_encoded(conn, transfer, &b).await?;
                    traffic.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                }
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
