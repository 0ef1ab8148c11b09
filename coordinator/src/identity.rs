//! Who a connection is, and who may no longer connect. A worker's identity is the name in its
//! verified client certificate (`pki::identity`), never the name in its hello, which the peer
//! controls. The revocation list (`--crl`) is read when the coordinator binds and again on
//! request (SIGHUP): new handshakes of a revoked certificate are refused by TLS, and live
//! connections of one are closed. A list that fails to load on reload is logged and the one in
//! force stays.
//!
//! Several connections may present the same identity at once (the older of a restarted worker,
//! not yet timed out, or one certificate shared by a pool of pods): each is its own worker,
//! told apart by its connection number, and all are named by the identity in logs and records.

use metaloop_common::net::{self, NetError, TlsFiles};
use metaloop_common::pki::{self, RevocationList};
use quinn::{Connection, Endpoint};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The TLS alert `certificate_revoked` (RFC 8446 §6.2), which QUIC carries as transport error
/// 0x100 + 44 (RFC 9001 §4.8).
const REVOKED_ALERT: u64 = 0x100 + 44;
/// The application close code for a live connection whose certificate was revoked.
const REVOKED_CLOSE: u32 = 3;
/// The bounded label for refusals and losses caused by revocation.
pub(crate) const REVOKED: &str = "certificate_revoked";

/// Where the revocation list comes from, and the signal to read it again.
#[derive(Debug, Clone, Default)]
pub struct Revocation {
    /// The CRL (PEM) the coordinator enforces; none: every certificate the CA signed is good.
    pub crl: Option<PathBuf>,
    /// Notified (SIGHUP) to read `crl` again.
    pub reload: Arc<Notify>,
}

/// The bounded refusal label for a failed handshake.
pub(crate) fn refusal_kind(e: &quinn::ConnectionError) -> &'static str {
    match e {
        quinn::ConnectionError::TransportError(t) if u64::from(t.code) == REVOKED_ALERT => REVOKED,
        quinn::ConnectionError::ConnectionClosed(c) if u64::from(c.error_code) == REVOKED_ALERT => REVOKED,
        _ => "tls_handshake",
    }
}

/// The coordinator's endpoint with the TLS settings it was built from, the revocation list in
/// force, and the live connections by identity (to close those a new list revokes).
#[derive(Debug)]
pub(crate) struct Tls {
    endpoint: Endpoint,
    files: TlsFiles,
    crl: Option<PathBuf>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// False once the coordinator stops taking connections: a reload must not reopen it.
    open: bool,
    list: Option<RevocationList>,
    live: HashMap<usize, Live>,
}

#[derive(Debug)]
struct Live {
    identity: String,
    /// Closed by a reload that revoked its certificate.
    revoked: bool,
    cert: Vec<u8>,
    conn: Connection,
}

/// A connection's identity, registered while it lives (dropped: deregistered).
#[derive(Debug)]
pub(crate) struct Admitted {
    pub identity: String,
    id: usize,
    tls: Arc<Tls>,
}

impl Admitted {
    /// Why a joined worker's connection ended, as (bounded label, detail naming its identity):
    /// a connection closed here because its certificate was revoked says so.
    pub(crate) fn why_lost(&self, kind: &'static str, reason: String) -> (&'static str, String) {
        let revoked = self.tls.lock().live.get(&self.id).is_some_and(|l| l.revoked);
        match revoked {
            true => (REVOKED, format!("{}: certificate revoked", self.identity)),
            false => (kind, format!("{}: {reason}", self.identity)),
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.tls.lock().live.remove(&self.id);
    }
}

impl Tls {
    /// Reads the certificates and the revocation list and binds the endpoint.
    ///
    /// # Errors
    /// A certificate or list that does not load (naming the file), or the socket.
    pub(crate) fn bind(addr: SocketAddr, files: TlsFiles, crl: Option<PathBuf>) -> Result<Self, NetError> {
        let list = crl.as_deref().map(|p| RevocationList::load(p, &files.ca)).transpose()?;
        let config = net::server_config(&files, list.as_ref())?;
        let endpoint = net::bind_server(addr, &files, config)?;
        Ok(Self {
            endpoint,
            files,
            crl,
            state: Mutex::new(State {
                open: true,
                list,
                live: HashMap::new(),
            }),
        })
    }

    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the revocation list again, puts it in force for new handshakes and closes the live
    /// connections it revokes; returns the identities closed. Without `--crl`, does nothing.
    ///
    /// # Errors
    /// The list (or the certificates) no longer load: nothing changes.
    pub(crate) fn reload(&self) -> Result<Vec<String>, NetError> {
        let Some(path) = &self.crl else {
            return Ok(Vec::new());
        };
        let list = RevocationList::load(path, &self.files.ca)?;
        let config = net::server_config(&self.files, Some(&list))?;
        let mut state = self.lock();
        if state.open {
            self.endpoint.set_server_config(Some(config));
        }
        let mut closed = Vec::new();
        for live in state.live.values_mut().filter(|l| list.revokes(&l.cert)) {
            live.revoked = true;
            live.conn.close(REVOKED_CLOSE.into(), b"certificate revoked");
            closed.push(live.identity.clone());
        }
        state.list = Some(list);
        Ok(closed)
    }

    /// No new sessions from now on (a worker told we are stopping must find the next
    /// coordinator, not this one); later reloads leave it so.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.open = false;
        self.endpoint.set_server_config(None);
    }

    /// The identity of a connection that passed the handshake, registered while the returned
    /// value lives.
    ///
    /// # Errors
    /// `Peer` when the certificate names no one, or is revoked by a list put in force while this
    /// handshake was under way.
    pub(crate) fn admit(self: &Arc<Self>, conn: &Connection) -> Result<Admitted, NetError> {
        let refuse = |reason, detail| NetError::Peer { reason, detail };
        let cert = conn
            .peer_identity()
            .and_then(|any| {
                any.downcast::<Vec<quinn::rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|chain| chain.first().map(|c| c.to_vec()))
            .ok_or_else(|| refuse("no_identity", "no client certificate on a verified connection".into()))?;
        let identity = pki::identity(&cert).map_err(|why| refuse("no_identity", why))?;
        let mut state = self.lock();
        if state.list.as_ref().is_some_and(|l| l.revokes(&cert)) {
            return Err(refuse(REVOKED, format!("{identity}: certificate revoked")));
        }
        let id = conn.stable_id();
        let same = state.live.values().filter(|l| l.identity == identity).count();
        if same > 0 {
            tracing::warn!(%identity, connections = same + 1, "identity connected more than once");
        }
        state.live.insert(
            id,
            Live {
                identity: identity.clone(),
                revoked: false,
                cert,
                conn: conn.clone(),
            },
        );
        Ok(Admitted {
            identity,
            id,
            tls: self.clone(),
        })
    }
}

/// Reads the revocation list again whenever `revocation.reload` is notified, until `stop`.
pub(crate) async fn reload_on_signal(tls: Arc<Tls>, reload: Arc<Notify>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = reload.notified() => {}
            () = stop.cancelled() => return,
        }
        match tls.reload() {
            Ok(closed) => {
                tracing::info!(crl = ?tls.crl, closed = ?closed, "revocation list reloaded");
                for identity in closed {
                    tracing::warn!(%identity, "worker dropped: its certificate is revoked");
                }
            }
            Err(e) => tracing::error!(error = %e, "revocation list not reloaded; the previous one stays in force"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(code: quinn::TransportErrorCode) -> quinn::ConnectionError {
        quinn::ConnectionError::TransportError(code.into())
    }

    #[test]
    fn a_revoked_certificate_is_told_from_other_handshake_refusals() {
        assert_eq!(refusal_kind(&transport(quinn::TransportErrorCode::crypto(44))), REVOKED);
        // bad_certificate (42), certificate_expired (45), unknown_ca (48): other refusals.
        for alert in [42, 45, 48] {
            assert_eq!(
                refusal_kind(&transport(quinn::TransportErrorCode::crypto(alert))),
                "tls_handshake"
            );
        }
        assert_eq!(refusal_kind(&quinn::ConnectionError::TimedOut), "tls_handshake");
    }
}
