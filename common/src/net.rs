//! QUIC and TLS set-up both sides share, and the byte movers for frames and bundles. The only
//! module of this crate that does network I/O; what the bytes mean is `proto`'s business.
//!
//! Every connection is TLS 1.3 with client certificates (mutual TLS) against one CA.

use metaloop_proto::proto::{self, ProtoError};
use metaloop_proto::tensor::Bundle;
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
/// sends no keep-alives by default. Frequent enough that a worker whose coordinator was
/// restarted sends it a packet within half a second and gets the stateless reset that ends
/// its dead connection at once (see [`server_endpoint`]); a few dozen bytes per second.
pub const KEEP_ALIVE: Duration = Duration::from_millis(500);
/// A peer silent this long (no keep-alive either) is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive windows sized for bulk tensor transfer on fast links (quinn's defaults suit
/// 100 Mbit/s): a 16 MiB stream window, 256 MiB per connection.
const STREAM_WINDOW: u32 = 16 << 20;
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
    bind_server(addr, files, server_config(files, None)?)
}

/// Binds a coordinator endpoint to `addr` with `config` and the endpoint settings derived from
/// the private key in `files` ([`endpoint_config`]: stable stateless resets across restarts).
///
/// # Errors
/// The key file, or binding the socket.
pub fn bind_server(addr: SocketAddr, files: &TlsFiles, config: ServerConfig) -> Result<Endpoint, NetError> {
    let l = load(files)?;
    endpoint(addr, endpoint_config(&l.key), Some(config))
}

/// A QUIC endpoint on a UDP socket bound to `addr` with large kernel buffers (`udp_socket`).
fn endpoint(
    addr: SocketAddr,
    config: quinn::EndpointConfig,
    server: Option<ServerConfig>,
) -> Result<Endpoint, NetError> {
    let socket = udp_socket(addr).map_err(|source| NetError::Bind { addr, source })?;
    let runtime = quinn::default_runtime().ok_or_else(|| NetError::Tls("no async runtime for QUIC".into()))?;
    Endpoint::new(config, server, socket, runtime).map_err(|source| NetError::Bind { addr, source })
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

/// The coordinator's endpoint settings: its stateless-reset key is derived from its private
/// key, so a coordinator restarted with the same key answers a worker's next packet on a
/// connection its predecessor held with a stateless reset the worker recognises (RFC 9000
/// §10.3), and the worker reconnects at once instead of waiting for its idle timeout.
fn endpoint_config(key: &PrivateKeyDer<'_>) -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key(key)));
    // A CID generator that accepts every CID as possibly ours (quinn's default hashes CIDs with
    // a random key per process, and drops packets for CIDs it cannot vouch for, so a restarted
    // coordinator would ignore the old ones instead of resetting them).
    config.cid_generator(|| Box::new(RandomCids));
    config
}

/// The kernel's send and receive buffers of a QUIC socket. Linux's default (208 KiB) holds a
/// few milliseconds of a fast transfer; a receiver that falls that far behind drops datagrams,
/// which QUIC takes for congestion. The kernel caps the request at `net.core.rmem_max` /
/// `wmem_max` (raise those for more).
const SOCKET_BUFFER: usize = 8 << 20;

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER`]-sized buffers (as large as the kernel
/// allows).
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let s = socket2::SockRef::from(&socket);
    // Best effort: a smaller buffer than asked is slower, not wrong.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    Ok(socket)
}

/// The HMAC key for stateless resets: a hash of the private key under a label of its own, so
/// the same key always gives the same resets and the key itself is never used for anything
/// else.
fn reset_key(key: &PrivateKeyDer<'_>) -> ring::hmac::Key {
    use sha2::Digest;
    let secret = sha2::Sha256::new()
        .chain_update(b"metaloop QUIC stateless reset key v1\0")
        .chain_update(key.secret_der())
        .finalize();
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret)
}

/// Random 8-byte connection IDs from the system's secure generator.
#[derive(Debug)]
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        use ring::rand::SecureRandom;
        let mut bytes = [0u8; 8];
        // The system generator does not fail on Linux; the fallback is still unique per call.
        if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            bytes = nanos.to_le_bytes();
        }
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
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
    let mut endpoint = endpoint(bind, quinn::EndpointConfig::default(), None)?;
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
    // The body grows with the bytes that arrive, not with the length the peer announced: a
    // prefix is four bytes, a reservation of a megabyte per silent stream would not be.
    let mut body = Vec::new();
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(ProtoError::Truncated {
                    need: len,
                    have: body.len(),
                }
                .into())
            }
            Err(quinn::ReadError::ConnectionLost(e)) => return Err(e.into()),
            Err(e) => return Err(NetError::Read(format!("{what} body ({len} bytes): {e}"))),
        }
    }
    Ok(Some(proto::decode_body(what, &body)?))
}

/// A bundle encoded once for many receivers (one model version goes to every worker): each
/// send shares the payload bytes instead of encoding and buffering its own copy.
#[derive(Debug, Clone)]
pub struct EncodedBundle {
    tensors: Vec<proto::TensorMeta>,
    /// The payload, in order: one buffer, or one per tensor when it is a shared bundle's own
    /// memory.
    chunks: Vec<bytes::Bytes>,
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
            chunks: vec![proto::encode_payload_as(bundle, dtype).into()],
        }
    }

    /// Exact (f32), without a copy where f32 memory is its own wire form (little-endian
    /// machines): the payload is `bundle`'s memory, kept alive until the last send of it is
    /// done. (Elsewhere it is encoded as [`EncodedBundle::new`] does.)
    pub fn shared(bundle: Arc<Bundle>) -> Self {
        if cfg!(target_endian = "big") {
            return Self::new(&bundle);
        }
        Self {
            tensors: proto::BundleHeader::for_bundle_as(0, &bundle, proto::DType::F32).tensors,
            chunks: (0..bundle.tensors.len())
                .map(|index| {
                    bytes::Bytes::from_owner(TensorBytes {
                        bundle: bundle.clone(),
                        index,
                    })
                })
                .collect(),
        }
    }

    /// Payload bytes.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(bytes::Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One tensor of a shared bundle, as its bytes.
struct TensorBytes {
    bundle: Arc<Bundle>,
    index: usize,
}

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.bundle.tensors[self.index].data)
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
    for chunk in &bundle.chunks {
        send.write_chunk(chunk.clone()).await.map_err(write)?;
    }
    send.finish().map_err(|e| NetError::Write(e.to_string()))?;
    Ok(header.len() + bundle.len())
}

/// Receives one bundle stream: header frame, checked against `expected` before anything is
/// allocated for the payload, then exactly the payload its shapes announce, decoded chunk by
/// chunk as it arrives. Returns the transfer id, the bundle and the bytes received.
///
/// # Errors
/// `Read` when the stream fails, `Proto` when the header is not the expected layout
/// (`UnexpectedLayout`) or the bytes disagree with it.
pub async fn recv_bundle(
    mut recv: RecvStream,
    expected: &proto::BundleLayout,
) -> Result<(u64, Bundle, usize), NetError> {
    let header = read_bundle_header(&mut recv).await?;
    expected.check(&header)?;
    let (bundle, received) = read_payload(recv, &header).await?;
    Ok((header.transfer, bundle, received))
}

async fn read_bundle_header(recv: &mut RecvStream) -> Result<proto::BundleHeader, NetError> {
    read_frame(recv, "bundle header")
        .await?
        .ok_or_else(|| NetError::Read("bundle stream ended before its header".into()))
}

/// The payload `header` announces (checked by the caller), as it arrives.
async fn read_payload(mut recv: RecvStream, header: &proto::BundleHeader) -> Result<(Bundle, usize), NetError> {
    let mut decoder = proto::PayloadDecoder::new(header)?;
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
    Ok((decoder.finish()?, received))
}

/// Bundle streams received on a connection, waiting for the control message that refers to
/// them by transfer id (QUIC does not order streams against each other). Only each stream's
/// header is read on arrival (and must have the layout this inbox expects); the payload is read
/// when the bundle is claimed, so a bundle waiting here costs at most QUIC's stream window
/// (flow control holds its sender back), and the claimant decides when to read it. At most
/// [`MAX_UNCLAIMED`] streams wait at once.
#[derive(Debug)]
pub struct Inbox {
    expected: proto::BundleLayout,
    state: std::sync::Mutex<InboxState>,
    notify: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct InboxState {
    pending: std::collections::HashMap<u64, Pending>,
    closed: Option<String>,
}

/// A bundle stream whose header has been read and checked; its payload is still on the wire.
#[derive(Debug)]
pub struct Pending {
    header: proto::BundleHeader,
    recv: RecvStream,
}

impl Pending {
    /// Reads and decodes the payload, chunk by chunk as it arrives; returns the bundle and the
    /// payload bytes received.
    ///
    /// # Errors
    /// `Read` when the stream fails, `Proto` when the bytes disagree with the header.
    pub async fn read(self) -> Result<(Bundle, usize), NetError> {
        read_payload(self.recv, &self.header).await
    }
}

/// Most bundle streams waiting unclaimed; a peer that floods uni streams is cut off.
pub const MAX_UNCLAIMED: usize = 64;

impl Inbox {
    /// An inbox for bundles of `expected`'s layout.
    pub fn new(expected: proto::BundleLayout) -> Self {
        Self {
            expected,
            state: Default::default(),
            notify: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Accepts bundle streams on `conn` until it closes, filing each by transfer id once its
    /// header is read. A header that is not the expected layout, or a stream beyond
    /// [`MAX_UNCLAIMED`], ends it. Returns the reason the connection stopped delivering.
    pub async fn fill(&self, conn: &Connection) -> NetError {
        let err = loop {
            let mut recv = match conn.accept_uni().await {
                Ok(r) => r,
                Err(e) => break NetError::Connection(e),
            };
            let header = match read_bundle_header(&mut recv).await {
                Ok(h) => h,
                Err(e) => break e,
            };
            if let Err(e) = self.expected.check(&header) {
                break e.into();
            }
            let mut s = self.lock();
            if s.pending.len() >= MAX_UNCLAIMED {
                break NetError::Peer {
                    reason: "bundle_flood",
                    detail: format!(
                        "bundle {} would make {} unclaimed bundle streams (at most {MAX_UNCLAIMED})",
                        header.transfer,
                        s.pending.len() + 1,
                    ),
                };
            }
            s.pending.insert(header.transfer, Pending { header, recv });
            drop(s);
            self.notify.notify_waiters();
        };
        self.lock().closed = Some(err.to_string());
        self.notify.notify_waiters();
        err
    }

    /// Waits for bundle `id`'s stream, its payload unread.
    ///
    /// # Errors
    /// `Read` when the connection stopped delivering bundles first.
    pub async fn claim(&self, id: u64) -> Result<Pending, NetError> {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.lock();
                if let Some(p) = s.pending.remove(&id) {
                    return Ok(p);
                }
                if let Some(why) = &s.closed {
                    return Err(NetError::Read(format!("bundle {id} never arrived: {why}")));
                }
            }
            notified.await;
        }
    }

    /// Waits for bundle `id` and reads it whole.
    ///
    /// # Errors
    /// As [`Inbox::claim`] and [`Pending::read`].
    pub async fn take(&self, id: u64) -> Result<Bundle, NetError> {
        Ok(self.claim(id).await?.read().await?.0)
    }
}

/// Finishes a stream and waits (bounded) until the peer has acknowledged all of it, so a last
/// message (a rejection, a shutdown) is not lost to the connection closing right after.
pub async fn finish_and_flush(send: &mut SendStream, within: Duration) {
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(within, send.stopped()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaloop_proto::proto::{BundleHeader, BundleLayout, DType, TensorMeta};
    use metaloop_proto::tensor::HostTensor;

    fn small() -> Bundle {
        Bundle {
            tensors: vec![
                HostTensor {
                    name: "l0.weight".into(),
                    shape: vec![2, 3],
                    data: vec![0.5; 6],
                },
                HostTensor {
                    name: "l0.bias".into(),
                    shape: vec![2],
                    data: vec![-1.0; 2],
                },
            ],
        }
    }

    /// A connected pair over loopback QUIC with mutual TLS: (client side, server side).
    async fn pair(dir: &Path) -> (Endpoint, Connection, Endpoint, Connection) {
        let (coordinator, worker) = write_pki(dir).expect("pki");
        let server = server_endpoint("127.0.0.1:0".parse().expect("addr"), &coordinator).expect("server");
        let addr = server.local_addr().expect("addr");
        let client = client_endpoint(&worker, "127.0.0.1:0".parse().expect("addr")).expect("client");
        let (c, s) = tokio::join!(connect(&client, addr), async {
            server.accept().await.expect("incoming").await.expect("handshake")
        });
        (client, c.expect("connect"), server, s)
    }

    /// Issue 15's 20-byte header (bf16 [8589934592]) on a stream that expects the model's
    /// layout: refused on the header, before any payload, with a reason for the metrics.
    #[tokio::test]
    async fn an_inbox_refuses_a_lying_header_before_its_payload() {
        let dir = tempfile::tempdir().expect("tmp");
        let (_client, c, _server, s) = pair(dir.path()).await;
        let inbox = Inbox::new(BundleLayout::of(&small(), DType::BF16));
        let header = BundleHeader {
            transfer: 1,
            tensors: vec![TensorMeta {
                name: "l0.weight".into(),
                dtype: DType::BF16,
                shape: vec![8_589_934_592],
            }],
        };
        let mut uni = c.open_uni().await.expect("uni");
        uni.write_all(&proto::encode_frame(&header).expect("header"))
            .await
            .expect("write");
        let err = tokio::time::timeout(Duration::from_secs(10), inbox.fill(&s))
            .await
            .expect("refused on the header alone");
        assert_eq!(err.reason(), "unexpected_layout", "{err}");
        assert!(err.to_string().contains("8589934592"), "{err}");
        let taken = inbox.claim(1).await.expect_err("nothing was filed");
        assert!(taken.to_string().contains("never arrived"), "{taken}");
    }

    /// Streams wait unread until claimed: a peer that opens more than `MAX_UNCLAIMED` of them
    /// is cut off, and what was filed can still be claimed and read.
    #[tokio::test]
    async fn an_inbox_bounds_the_streams_it_holds_unclaimed() {
        let dir = tempfile::tempdir().expect("tmp");
        let (_client, c, _server, s) = pair(dir.path()).await;
        let inbox = Inbox::new(BundleLayout::of(&small(), DType::F32));
        let sent = async {
            for transfer in 1..=MAX_UNCLAIMED as u64 + 1 {
                if send_bundle(&c, transfer, &small()).await.is_err() {
                    break;
                }
            }
        };
        let (err, ()) = tokio::join!(tokio::time::timeout(Duration::from_secs(10), inbox.fill(&s)), sent);
        let err = err.expect("cut off");
        assert_eq!(err.reason(), "bundle_flood", "{err}");
        assert_eq!(inbox.take(1).await.expect("filed"), small());
        let (second, bytes) = inbox.claim(2).await.expect("filed").read().await.expect("read");
        assert_eq!((second, bytes), (small(), 32));
    }

    /// A shared bundle is sent from its own memory, one chunk per tensor, and arrives as the
    /// same bundle with the same bytes counted as a copied encoding's.
    #[tokio::test]
    async fn a_shared_bundle_is_sent_from_its_own_memory() {
        let dir = tempfile::tempdir().expect("tmp");
        let (_client, c, _server, s) = pair(dir.path()).await;
        let bundle = Arc::new(small());
        let shared = EncodedBundle::shared(bundle.clone());
        let copied = EncodedBundle::new(&bundle);
        assert_eq!(shared.tensors, copied.tensors);
        assert_eq!(shared.chunks.concat(), copied.chunks.concat());
        assert_eq!(shared.len(), 32);
        let inbox = Inbox::new(BundleLayout::of(&small(), DType::F32));
        let (sent, got) = tokio::join!(send_encoded(&c, 7, &shared), async {
            tokio::select! {
                b = inbox.take(7) => b,
                e = inbox.fill(&s) => Err(e),
            }
        });
        assert_eq!(sent.expect("sent"), copied_len(&copied));
        assert_eq!(&got.expect("received"), bundle.as_ref());
    }

    fn copied_len(e: &EncodedBundle) -> usize {
        proto::encode_frame(&BundleHeader {
            transfer: 7,
            tensors: e.tensors.clone(),
        })
        .expect("header")
        .len()
            + e.len()
    }

    /// The stateless-reset key is a function of the private key alone: a restarted
    /// coordinator computes the same reset tokens as its predecessor, another key does not.
    #[test]
    fn the_reset_key_is_derived_from_the_private_key() {
        let dir = tempfile::tempdir().expect("tmp");
        let (a, b) = write_pki(dir.path()).expect("pki");
        let key = |f: &TlsFiles| reset_key(&PrivateKeyDer::from_pem_file(&f.key).expect("key"));
        let token = |k: &ring::hmac::Key| ring::hmac::sign(k, b"a connection id").as_ref().to_vec();
        assert_eq!(token(&key(&a)), token(&key(&a)));
        assert_ne!(token(&key(&a)), token(&key(&b)));
    }
}
