//! QUIC and TLS set-up both sides share, and the byte movers for frames and bundles. The only
//! module of this crate that does network I/O; what the bytes mean is `proto`'s business.
//!
//! Every connection is TLS 1.3 with client certificates (mutual TLS) against one CA.

use crate::proto::{self, ProtoError};
use crate::tensor::Bundle;
use quinn::{ClientConfig, Connection, Endpoint, RecvStream, SendStream, ServerConfig, TransportConfig};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use serde::{de::DeserializeOwned, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The name coordinator certificates are issued for and workers verify.
pub const SERVER_NAME: &str = "metaloop-coordinator";
/// Keep-alive far below the idle timeout: an inner loop can be silent for minutes, and quinn
/// sends no keep-alives by default.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A peer silent this long (no keep-alive either) is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive windows sized for bulk tensor transfer on fast links (quinn's defaults suit
/// 100 Mbit/s): a 64 MiB stream window, 256 MiB per connection.
const STREAM_WINDOW: u32 = 64 << 20;
const CONNECTION_WINDOW: u32 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad {what} in {path}: {reason}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("certificate generation: {0}")]
    Certs(#[from] rcgen::Error),
    #[error(transparent)]
    Name(#[from] crate::pki::NameError),
    #[error("connecting to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("reading from peer: {0}")]
    Read(String),
    #[error("writing to peer: {0}")]
    Write(String),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// The peer broke the session's rules (no hello in time, a second hello, a flood of
    /// bundles, a result whose delta never came).
    #[error("peer: {detail}")]
    Peer { reason: &'static str, detail: String },
}

impl NetError {
    /// A short label for metrics and summaries (bounded: one per kind of failure).
    pub fn reason(&self) -> &'static str {
        match self {
            NetError::Proto(p) => p.reason(),
            NetError::Peer { reason, .. } => reason,
            NetError::Connection(_) => "disconnected",
            NetError::Read(_) | NetError::Write(_) => "stream_error",
            NetError::File { .. }
            | NetError::Pem { .. }
            | NetError::Tls(_)
            | NetError::Certs(_)
            | NetError::Name(_) => "local_tls",
            NetError::Connect { .. } => "connect",
            NetError::Bind { .. } => "bind",
        }
    }
}

/// Where one party's certificate material lives (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate peers must chain to.
    pub ca: PathBuf,
    /// This party's certificate.
    pub cert: PathBuf,
    /// This party's private key.
    pub key: PathBuf,
}

/// Writes a fresh CA (its key in `ca/ca.key`), a coordinator certificate and one worker
/// certificate with the identity `worker` into `dir` (see `pki`), and returns the file sets for
/// (coordinator, worker). Tests and benchmarks share that one worker identity among their
/// workers; `local` issues one per worker process instead.
///
/// # Errors
/// Certificate generation, or a file that exists or cannot be written.
pub fn write_pki(dir: &Path) -> Result<(TlsFiles, TlsFiles), NetError> {
    let coordinator = crate::pki::init(dir)?;
    let worker = crate::pki::issue(dir, "worker")?;
    Ok((coordinator, worker))
}

struct Loaded {
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load(files: &TlsFiles) -> Result<Loaded, NetError> {
    let certs = |what: &'static str, path: &Path| -> Result<Vec<CertificateDer<'static>>, NetError> {
        let pem_err = |reason: String| NetError::Pem {
            what,
            path: path.into(),
            reason,
        };
        let list = CertificateDer::pem_file_iter(path)
            .map_err(|e| pem_err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(e.to_string()))?;
        if list.is_empty() {
            return Err(pem_err("no certificate found".into()));
        }
        Ok(list)
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in certs("CA certificate", &files.ca)? {
        roots.add(c).map_err(|e| NetError::Pem {
            what: "CA certificate",
            path: files.ca.clone(),
            reason: e.to_string(),
        })?;
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| NetError::Pem {
        what: "private key",
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Loaded {
        roots: Arc::new(roots),
        chain: certs("certificate", &files.cert)?,
        key,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(10_000))),
    ));
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONNECTION_WINDOW.into());
    t.send_window(u64::from(CONNECTION_WINDOW));
    t.max_concurrent_uni_streams(256u32.into());
    Arc::new(t)
}

/// A coordinator endpoint bound to `addr` that requires client certificates from the CA.
///
/// # Errors
/// Certificate files or binding the socket.
pub fn server_endpoint(addr: SocketAddr, files: &TlsFiles) -> Result<Endpoint, NetError> {
    let config = server_config(files, None)?;
    Endpoint::server(config, addr).map_err(|source| NetError::Bind { addr, source })
}

/// The coordinator's QUIC server configuration: TLS 1.3, client certificates required from the
/// CA and, given a revocation list, refused when it names them (end-entity certificates; the
/// list must be the CA's, checked by `pki::RevocationList::load`). Built again to reload the
/// list (`quinn::Endpoint::set_server_config`).
///
/// # Errors
/// Certificate or revocation-list files, naming the file.
pub fn server_config(files: &TlsFiles, crl: Option<&crate::pki::RevocationList>) -> Result<ServerConfig, NetError> {
    let l = load(files)?;
    let mut builder = rustls::server::WebPkiClientVerifier::builder_with_provider(l.roots, provider());
    if let Some(crl) = crl {
        builder = builder
            .with_crls(crl.ders.iter().cloned())
            .only_check_end_entity_revocation();
    }
    let verifier = builder.build().map_err(|e| NetError::Tls(e.to_string()))?;
    let verifier = Arc::new(crate::pki::NamingVerifier(verifier));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(l.chain, l.key)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// A worker endpoint that presents its certificate and trusts only the CA.
///
/// # Errors
/// Certificate files or binding the socket.
pub fn client_endpoint(files: &TlsFiles, bind: SocketAddr) -> Result<Endpoint, NetError> {
    let l = load(files)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_root_certificates(l.roots)
        .with_client_auth_cert(l.chain, l.key)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    let mut endpoint = Endpoint::client(bind).map_err(|source| NetError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Connects to the coordinator at `addr`.
///
/// # Errors
/// `Connect` naming the address.
pub async fn connect(endpoint: &Endpoint, addr: SocketAddr) -> Result<Connection, NetError> {
    let connecting = endpoint.connect(addr, SERVER_NAME).map_err(|e| NetError::Connect {
        addr,
        reason: e.to_string(),
    })?;
    connecting.await.map_err(|e| match tls_refusal(&e) {
        true => NetError::Tls(format!("handshake with {addr} refused: {e}")),
        false => NetError::Connect {
            addr,
            reason: e.to_string(),
        },
    })
}

/// True when a connection ended because one side refused the other's TLS handshake (a
/// certificate not signed by the CA, expired or missing, no common ALPN): retrying cannot help.
pub fn tls_refusal(e: &quinn::ConnectionError) -> bool {
    // QUIC carries TLS alerts as the transport error codes 0x100..=0x1ff (RFC 9001 §4.8).
    let crypto = |code: quinn::TransportErrorCode| (0x100..=0x1ff).contains(&u64::from(code));
    match e {
        quinn::ConnectionError::ConnectionClosed(c) => crypto(c.error_code),
        quinn::ConnectionError::TransportError(t) => crypto(t.code),
        _ => false,
    }
}

/// Writes one control frame.
///
/// # Errors
/// `Proto` for an oversized message, `Write` when the stream fails.
pub async fn write_frame<T: Serialize>(send: &mut SendStream, msg: &T) -> Result<usize, NetError> {
    let bytes = proto::encode_frame(msg)?;
    send.write_all(&bytes)
        .await
        .map_err(|e| NetError::Write(e.to_string()))?;
    Ok(bytes.len())
}

/// Reads one control frame; `Ok(None)` when the peer finished the stream cleanly between frames.
///
/// # Errors
/// `Read` for a stream that ends mid-frame or fails; `Proto` for an oversized or undecodable one.
pub async fn read_frame<T: DeserializeOwned>(recv: &mut RecvStream, what: &'static str) -> Result<Option<T>, NetError> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(have)) => return Err(ProtoError::Truncated { need: 4, have }.into()),
        // The connection's own error says why (a refused certificate, a timeout, a close).
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => return Err(e.into()),
        Err(e) => return Err(NetError::Read(format!("{what} length prefix: {e}"))),
    }
    let len = proto::frame_len(prefix)?;
    let mut body = vec![0u8; len];
    match recv.read_exact(&mut body).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(have)) => return Err(ProtoError::Truncated { need: len, have }.into()),
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => return Err(e.into()),
        Err(e) => return Err(NetError::Read(format!("{what} body ({len} bytes): {e}"))),
    }
    Ok(Some(proto::decode_body(what, &body)?))
}

/// A bundle encoded once for many receivers (one model version goes to every worker): each
/// send shares the payload bytes instead of encoding and buffering its own copy.
#[derive(Debug, Clone)]
pub struct EncodedBundle {
    tensors: Vec<proto::TensorMeta>,
    payload: bytes::Bytes,
}

impl EncodedBundle {
    /// Exact (f32).
    pub fn new(bundle: &Bundle) -> Self {
        Self::with_dtype(bundle, proto::DType::F32)
    }

    /// Every value as `dtype` (bf16 halves the bytes and rounds).
    pub fn with_dtype(bundle: &Bundle, dtype: proto::DType) -> Self {
        Self {
            tensors: proto::BundleHeader::for_bundle_as(0, bundle, dtype).tensors,
            payload: proto::encode_payload_as(bundle, dtype).into(),
        }
    }
}

/// Sends a bundle on a new unidirectional stream; returns the bytes written.
///
/// # Errors
/// `Write` or `Connection` when the peer goes away.
pub async fn send_bundle(conn: &Connection, transfer: u64, bundle: &Bundle) -> Result<usize, NetError> {
    send_encoded(conn, transfer, &EncodedBundle::new(bundle)).await
}

/// Sends an encoded bundle on a new unidirectional stream; returns the bytes written. The
/// payload is handed to QUIC by reference: no copy per receiver.
///
/// # Errors
/// `Write` or `Connection` when the peer goes away.
pub async fn send_encoded(conn: &Connection, transfer: u64, bundle: &EncodedBundle) -> Result<usize, NetError> {
    let mut send = conn.open_uni().await?;
    let header = proto::encode_frame(&proto::BundleHeader {
        transfer,
        tensors: bundle.tensors.clone(),
    })?;
    let write = |e: quinn::WriteError| NetError::Write(e.to_string());
    send.write_all(&header).await.map_err(write)?;
    send.write_chunk(bundle.payload.clone()).await.map_err(write)?;
    send.finish().map_err(|e| NetError::Write(e.to_string()))?;
    Ok(header.len() + bundle.payload.len())
}

/// Receives one bundle stream: header frame, then exactly the payload its shapes announce,
/// decoded chunk by chunk as it arrives.
///
/// # Errors
/// `Read` when the stream fails, `Proto` when the bytes disagree with the header.
pub async fn recv_bundle(mut recv: RecvStream) -> Result<(u64, Bundle, usize), NetError> {
    let header: proto::BundleHeader = read_frame(&mut recv, "bundle header")
        .await?
        .ok_or_else(|| NetError::Read("bundle stream ended before its header".into()))?;
    let mut decoder = proto::PayloadDecoder::new(&header)?;
    let mut received = 0;
    loop {
        match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => {
                received += chunk.bytes.len();
                decoder.push(&chunk.bytes)?;
            }
            Ok(None) => break,
            Err(e) => return Err(NetError::Read(format!("bundle {} payload: {e}", header.transfer))),
        }
    }
    Ok((header.transfer, decoder.finish()?, received))
}

/// Bundles received on a connection's unidirectional streams, waiting for the control message
/// that refers to them by transfer id (QUIC does not order streams against each other).
#[derive(Debug, Default)]
pub struct Inbox {
    state: std::sync::Mutex<InboxState>,
    notify: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct InboxState {
    bundles: std::collections::HashMap<u64, Bundle>,
    closed: Option<String>,
}

/// Most bundles held unclaimed; a peer that floods uni streams is cut off.
const MAX_UNCLAIMED: usize = 64;

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Accepts bundle streams on `conn` until it closes, filing each by transfer id.
    /// Returns the reason the connection stopped delivering.
    pub async fn fill(&self, conn: &Connection, bytes_in: &std::sync::atomic::AtomicU64) -> NetError {
        let err = loop {
            let recv = match conn.accept_uni().await {
                Ok(r) => r,
                Err(e) => break NetError::Connection(e),
            };
            match recv_bundle(recv).await {
                Ok((id, bundle, n)) => {
                    bytes_in.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    let mut s = self.lock();
                    if s.bundles.len() >= MAX_UNCLAIMED {
                        break NetError::Peer {
                            reason: "bundle_flood",
                            detail: format!("more than {MAX_UNCLAIMED} unclaimed bundles"),
                        };
                    }
                    s.bundles.insert(id, bundle);
                    drop(s);
                    self.notify.notify_waiters();
                }
                Err(e) => break e,
            }
        };
        self.lock().closed = Some(err.to_string());
        self.notify.notify_waiters();
        err
    }

    /// Waits for bundle `id`.
    ///
    /// # Errors
    /// `Read` when the connection stopped delivering bundles first.
    pub async fn take(&self, id: u64) -> Result<Bundle, NetError> {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.lock();
                if let Some(b) = s.bundles.remove(&id) {
                    return Ok(b);
                }
                if let Some(why) = &s.closed {
                    return Err(NetError::Read(format!("bundle {id} never arrived: {why}")));
                }
            }
            notified.await;
        }
    }
}

/// Finishes a stream and waits (bounded) until the peer has acknowledged all of it, so a last
/// message (a rejection, a shutdown) is not lost to the connection closing right after.
pub async fn finish_and_flush(send: &mut SendStream, within: Duration) {
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(within, send.stopped()).await;
    }
}
