//! The cluster's certificate authority on disk: make one, issue a certificate per worker
//! identity, revoke one with a signed X.509 revocation list (CRL), and read the identity back out
//! of a verified certificate. Files and X.509 only; the TLS set-up that uses them is in `net`.
//!
//! A PKI directory holds what pods may mount at its top (`ca.pem`, `crl.pem`,
//! `coordinator.{pem,key}`, `NAME.{pem,key}` per worker) and the CA's private key apart, in
//! `ca/ca.key` (directory 0700, key 0600): it signs certificates and revocation lists, and never
//! goes into a Secret.

use crate::net::{NetError, TlsFiles, SERVER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, CertificateRevocationListDer, UnixTime};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The CA certificate, which both roles trust.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key, under its own directory so a Secret made from the top level never holds it.
pub const CA_KEY: &str = "ca/ca.key";
/// The revocation list the coordinator reads (`--crl`); `certs init` writes an empty one.
pub const CRL: &str = "crl.pem";
/// Names a worker identity cannot take: the files of the coordinator, the CA and the CRL, and the
/// name workers verify the coordinator by (a worker certificate must never pass for it).
const RESERVED: [&str; 4] = ["ca", "crl", "coordinator", SERVER_NAME];
/// A revocation list says when the next one is due; nothing here enforces it (the coordinator
/// keeps using the newest it has read), so it is set far out.
const CRL_VALIDITY: time::Duration = time::Duration::days(3650);

/// A worker identity that cannot name a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker name {name:?}: {why}")]
pub struct NameError {
    pub name: String,
    pub why: &'static str,
}

/// Checks a worker identity: a DNS label (1 to 63 of `a-z`, `0-9`, `-`, starting and ending with a
/// letter or digit), not one of the reserved names. It becomes a file name and the certificate's
/// DNS name, so nothing else is allowed.
///
/// # Errors
/// `NameError` saying what is wrong with it.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let fail = |why| Err(NameError { name: name.into(), why });
    if name.is_empty() || name.len() > 63 {
        return fail("must be 1 to 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return fail("may contain only lowercase letters a-z, digits and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return fail("must start and end with a letter or digit");
    }
    if RESERVED.contains(&name) {
        return fail("is reserved (the CA, the revocation list or the coordinator)");
    }
    Ok(())
}

fn file_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> NetError + 'a {
    move |source| NetError::File {
        what,
        path: path.into(),
        source,
    }
}

fn pem_err(what: &'static str, path: &Path, reason: impl ToString) -> NetError {
    NetError::Pem {
        what,
        path: path.into(),
        reason: reason.to_string(),
    }
}

/// Writes a new file; never replaces one (an existing key may be in use by a running cluster).
/// Private keys are readable by their owner only.
fn write_new(path: &Path, contents: &str) -> Result<PathBuf, NetError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if path.extension().is_some_and(|e| e == "key") {
        0o600
    } else {
        0o644
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()).and_then(|()| f.sync_all()))
        .map_err(file_err("writing", path))?;
    Ok(path.into())
}

/// Refuses before anything is written, so a refused command leaves no half-made set behind.
fn refuse_existing(paths: &[PathBuf]) -> Result<(), NetError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(NetError::File {
            what: "refusing to overwrite",
            path: p.clone(),
            source: std::io::ErrorKind::AlreadyExists.into(),
        }),
        None => Ok(()),
    }
}

fn ca_params() -> Result<CertificateParams, NetError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "metaloop CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// A certificate for `names` (the first is its identity), signed by the CA, for one role.
fn leaf(names: Vec<String>, usage: ExtendedKeyUsagePurpose) -> Result<(CertificateParams, KeyPair), NetError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.clone())?;
    params
        .distinguished_name
        .push(DnType::CommonName, names.first().cloned().unwrap_or_default());
    // Each role's certificate is good for its own side of the handshake only: a worker's key
    // cannot serve as a coordinator's, whatever name it carries.
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok((params, key))
}

/// A new CA (its key kept in `ca/ca.key`, mode 0600), a coordinator certificate and an empty
/// revocation list, written into `dir`. Workers get theirs from `issue`.
///
/// # Errors
/// `File` naming a file that already exists (nothing is then written) or cannot be written.
pub fn init(dir: &Path) -> Result<TlsFiles, NetError> {
    let coordinator = TlsFiles {
        ca: dir.join(CA_CERT),
        cert: dir.join("coordinator.pem"),
        key: dir.join("coordinator.key"),
    };
    let (ca_key_path, crl_path) = (dir.join(CA_KEY), dir.join(CRL));
    refuse_existing(&[
        coordinator.ca.clone(),
        ca_key_path.clone(),
        crl_path.clone(),
        coordinator.cert.clone(),
        coordinator.key.clone(),
    ])?;
    std::fs::create_dir_all(dir).map_err(file_err("creating", dir))?;
    let ca_dir = dir.join("ca");
    {
        use std::os::unix::fs::DirBuilderExt;
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        if !ca_dir.is_dir() {
            builder.create(&ca_dir).map_err(file_err("creating", &ca_dir))?;
        }
    }
    let ca_key = KeyPair::generate()?;
    let ca = CertifiedIssuer::self_signed(ca_params()?, ca_key)?;
    write_new(&ca_key_path, &ca.key().serialize_pem())?;
    write_new(&coordinator.ca, &ca.pem())?;
    write_new(&crl_path, &crl_pem(&ca, Vec::new(), 1)?)?;
    let (params, key) = leaf(
        vec![SERVER_NAME.into(), "localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    write_new(&coordinator.cert, &params.signed_by(&key, &ca)?.pem())?;
    write_new(&coordinator.key, &key.serialize_pem())?;
    Ok(coordinator)
}

/// The CA of `dir` (made by `init`), ready to sign.
fn load_ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, NetError> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let key_pem = std::fs::read_to_string(&key_path).map_err(file_err("reading the CA key", &key_path))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| pem_err("CA key", &key_path, e))?;
    let cert_pem = std::fs::read_to_string(&cert_path).map_err(file_err("reading", &cert_path))?;
    Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| pem_err("CA certificate", &cert_path, e))
}

/// Issues a worker certificate whose identity is `name`, signed by the CA of `dir`, as
/// `dir/NAME.pem` and `dir/NAME.key` (0600).
///
/// # Errors
/// `Name` for a name that is not a DNS label or is reserved, `File` for an existing certificate
/// of that name (a name is issued once: revoke it and pick another) or a missing CA.
pub fn issue(dir: &Path, name: &str) -> Result<TlsFiles, NetError> {
    validate_name(name)?;
    let files = TlsFiles {
        ca: dir.join(CA_CERT),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    refuse_existing(&[files.cert.clone(), files.key.clone()])?;
    let ca = load_ca(dir)?;
    // The serial rcgen derives from the new public key: distinct per certificate, which is
    // what a revocation list names.
    let (params, key) = leaf(vec![name.into()], ExtendedKeyUsagePurpose::ClientAuth)?;
    let cert = params.signed_by(&key, &ca)?;
    write_new(&files.cert, &cert.pem())?;
    write_new(&files.key, &key.serialize_pem())?;
    Ok(files)
}

/// A revocation list of `revoked`, numbered `number`, signed by `ca`, as PEM.
fn crl_pem(ca: &Issuer<'_, KeyPair>, revoked: Vec<RevokedCertParams>, number: u64) -> Result<String, NetError> {
    let now = time::OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + CRL_VALIDITY,
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(ca)?.pem()?)
}

/// What `revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// The list now names the certificate; the path of the list.
    Added(PathBuf),
    /// The certificate was already on the list, which is left as it was.
    Already(PathBuf),
}

/// Revokes the worker certificate `dir/NAME.pem`: `dir/crl.pem` is rewritten (atomically) with
/// its serial added to those already revoked, signed by the CA. The coordinator refuses it once
/// it reads the list again (SIGHUP).
///
/// # Errors
/// `Name` for an invalid name, `File` for a missing certificate or CA key, `Pem` for an existing
/// list that does not parse or is not this CA's.
pub fn revoke(dir: &Path, name: &str) -> Result<Revoked, NetError> {
    validate_name(name)?;
    let cert_path = dir.join(format!("{name}.pem"));
    let cert_der = CertificateDer::from_pem_file(&cert_path).map_err(|e| pem_err("certificate", &cert_path, e))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&cert_der).map_err(|e| pem_err("certificate", &cert_path, e))?;
    let serial = cert.raw_serial().to_vec();
    let ca = load_ca(dir)?;
    let crl_path = dir.join(CRL);
    let (mut revoked, number) = if crl_path.exists() {
        let entries = read_crl(&crl_path, &dir.join(CA_CERT))?;
        (entries.revoked, entries.number)
    } else {
        (Vec::new(), 0)
    };
    if revoked.iter().any(|r| r.serial_number.as_ref() == trim_serial(&serial)) {
        return Ok(Revoked::Already(crl_path));
    }
    revoked.push(RevokedCertParams {
        serial_number: SerialNumber::from_slice(trim_serial(&serial)),
        revocation_time: time::OffsetDateTime::now_utc(),
        reason_code: None,
        invalidity_date: None,
    });
    let pem = crl_pem(&ca, revoked, number + 1)?;
    let tmp = dir.join(format!("{CRL}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, &pem)?;
    std::fs::rename(&tmp, &crl_path).map_err(file_err("replacing", &crl_path))?;
    Ok(Revoked::Added(crl_path))
}

/// A DER integer's content without the sign byte, as rcgen takes and writes serials.
fn trim_serial(s: &[u8]) -> &[u8] {
    match s {
        [0, rest @ ..] if !rest.is_empty() => rest,
        _ => s,
    }
}

/// A revocation list read back: its entries and number.
struct CrlEntries {
    revoked: Vec<RevokedCertParams>,
    number: u64,
}

/// Reads and checks a revocation list: PEM, X.509, signed by the CA in `ca_path`.
fn read_crl(path: &Path, ca_path: &Path) -> Result<CrlEntries, NetError> {
    let ders = crl_ders(path)?;
    let ca_der = CertificateDer::from_pem_file(ca_path).map_err(|e| pem_err("CA certificate", ca_path, e))?;
    let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).map_err(|e| pem_err("CA certificate", ca_path, e))?;
    let mut out = CrlEntries {
        revoked: Vec::new(),
        number: 0,
    };
    for der in &ders {
        let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| pem_err("revocation list", path, e))?;
        if crl.issuer() != ca.subject() || crl.verify_signature(ca.public_key()).is_err() {
            return Err(pem_err(
                "revocation list",
                path,
                format!("not signed by the CA in {}", ca_path.display()),
            ));
        }
        let number = crl.crl_number().and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        out.number = out.number.max(number);
        for r in crl.iter_revoked_certificates() {
            out.revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(trim_serial(r.raw_serial())),
                revocation_time: r.revocation_date.to_datetime(),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    Ok(out)
}

fn crl_ders(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, NetError> {
    let bytes = std::fs::read(path).map_err(file_err("reading", path))?;
    let ders = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err("revocation list", path, e))?;
    if ders.is_empty() {
        return Err(pem_err("revocation list", path, "no X509 CRL PEM block found"));
    }
    Ok(ders)
}

/// A revocation list the coordinator enforces: the DER for rustls and the serials it names (to
/// drop live connections of a certificate revoked since they joined).
#[derive(Debug, Clone)]
pub struct RevocationList {
    pub ders: Vec<CertificateRevocationListDer<'static>>,
    serials: Vec<Vec<u8>>,
}

impl RevocationList {
    /// Reads `path` and checks it is a CRL signed by the CA in `ca_path`.
    ///
    /// # Errors
    /// `File` when unreadable, `Pem` naming the file when it is not a CRL or not the CA's.
    pub fn load(path: &Path, ca_path: &Path) -> Result<Self, NetError> {
        let entries = read_crl(path, ca_path)?;
        Ok(Self {
            ders: crl_ders(path)?,
            serials: entries
                .revoked
                .iter()
                .map(|r| r.serial_number.as_ref().to_vec())
                .collect(),
        })
    }

    /// Whether the certificate `der` is on the list.
    pub fn revokes(&self, der: &[u8]) -> bool {
        x509_parser::parse_x509_certificate(der)
            .is_ok_and(|(_, c)| self.serials.iter().any(|s| s == trim_serial(c.raw_serial())))
    }
}

/// The identity a certificate names: its first DNS name, else its common name.
///
/// # Errors
/// A string saying why there is none (not X.509, no name).
pub fn identity(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let dns = cert.subject_alternative_name().ok().flatten().and_then(|san| {
        san.value.general_names.iter().find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_string()),
            _ => None,
        })
    });
    dns.or_else(|| {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
    })
    .ok_or_else(|| "the certificate names no DNS name or common name".into())
}

/// Wraps the client-certificate verifier so that a refused certificate is logged with the
/// identity it claims (the handshake error alone names no one).
#[derive(Debug)]
pub(crate) struct NamingVerifier(pub(crate) Arc<dyn rustls::server::danger::ClientCertVerifier>);

impl rustls::server::danger::ClientCertVerifier for NamingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.0
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                let claimed = identity(end_entity).unwrap_or_else(|why| format!("unnamed ({why})"));
                tracing::warn!(identity = %claimed, error = %e, "client certificate refused");
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn names_are_dns_labels_and_not_reserved() {
        for ok in ["worker-0", "a", "gpu-node-17", &"x".repeat(63)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "1 to 63"),
            (&"x".repeat(64) as &str, "1 to 63"),
            ("Worker", "lowercase"),
            ("worker_0", "lowercase"),
            ("../ca", "lowercase"),
            ("a.b", "lowercase"),
            ("-w", "start and end"),
            ("w-", "start and end"),
            ("ca", "reserved"),
            ("crl", "reserved"),
            ("coordinator", "reserved"),
            (SERVER_NAME, "reserved"),
        ] {
            let e = validate_name(bad).expect_err(bad);
            assert!(e.to_string().contains(why), "{bad}: {e}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "names the input: {e}");
        }
    }

    #[test]
    fn init_keeps_the_ca_key_apart_and_never_overwrites() {
        let dir = tempfile::tempdir().expect("tmp");
        let pki = dir.path().join("pki");
        init(&pki).expect("init");
        assert_eq!(mode(&pki.join(CA_KEY)), 0o600);
        assert_eq!(mode(&pki.join("ca")), 0o700);
        assert_eq!(mode(&pki.join("coordinator.key")), 0o600);
        assert!(pki.join(CRL).is_file());
        // Nothing at the top level is the CA key.
        for entry in std::fs::read_dir(&pki).expect("ls") {
            let p = entry.expect("entry").path();
            if p.is_file() {
                let text = std::fs::read_to_string(&p).expect("read");
                assert!(
                    !text.contains(&std::fs::read_to_string(pki.join(CA_KEY)).expect("key")),
                    "{}",
                    p.display()
                );
            }
        }
        let before = std::fs::read(pki.join(CA_KEY)).expect("key");
        let e = init(&pki).expect_err("second init");
        assert!(e.to_string().contains("refusing to overwrite"), "{e}");
        assert_eq!(std::fs::read(pki.join(CA_KEY)).expect("key"), before);
    }

    #[test]
    fn issue_names_the_identity_and_refuses_a_second_time() {
        let dir = tempfile::tempdir().expect("tmp");
        init(dir.path()).expect("init");
        let files = issue(dir.path(), "worker-7").expect("issue");
        assert_eq!(mode(&files.key), 0o600);
        let der = CertificateDer::from_pem_file(&files.cert).expect("pem");
        assert_eq!(identity(&der).as_deref(), Ok("worker-7"));
        let e = issue(dir.path(), "worker-7").expect_err("twice");
        assert!(e.to_string().contains("worker-7.pem"), "{e}");
        let e = issue(dir.path(), "Bad_Name").expect_err("bad name");
        assert!(e.to_string().contains("Bad_Name"), "{e}");
        let other = tempfile::tempdir().expect("tmp");
        let e = issue(other.path(), "w").expect_err("no CA");
        assert!(e.to_string().contains("ca.key"), "{e}");
    }

    #[test]
    fn revoke_lists_exactly_the_revoked_certificates() {
        let dir = tempfile::tempdir().expect("tmp");
        init(dir.path()).expect("init");
        let a = issue(dir.path(), "a").expect("a");
        let b = issue(dir.path(), "b").expect("b");
        let der = |f: &TlsFiles| CertificateDer::from_pem_file(&f.cert).expect("pem").to_vec();
        let load = || RevocationList::load(&dir.path().join(CRL), &dir.path().join(CA_CERT)).expect("crl");
        assert!(!load().revokes(&der(&a)));
        assert!(matches!(revoke(dir.path(), "a"), Ok(Revoked::Added(_))));
        assert!(load().revokes(&der(&a)) && !load().revokes(&der(&b)));
        assert!(matches!(revoke(dir.path(), "a"), Ok(Revoked::Already(_))));
        assert!(matches!(revoke(dir.path(), "b"), Ok(Revoked::Added(_))));
        assert!(
            load().revokes(&der(&a)) && load().revokes(&der(&b)),
            "earlier entries are kept"
        );
        let e = revoke(dir.path(), "nobody").expect_err("no such certificate");
        assert!(e.to_string().contains("nobody.pem"), "{e}");
    }

    #[test]
    fn a_revocation_list_that_is_not_the_cas_is_refused_with_its_path() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mine, theirs) = (dir.path().join("mine"), dir.path().join("theirs"));
        init(&mine).expect("init");
        init(&theirs).expect("init");
        let e = RevocationList::load(&theirs.join(CRL), &mine.join(CA_CERT)).expect_err("foreign");
        assert!(e.to_string().contains("not signed by the CA"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n").expect("write");
        let e = RevocationList::load(&garbage, &mine.join(CA_CERT)).expect_err("garbage");
        assert!(e.to_string().contains("garbage.pem"), "{e}");
        std::fs::write(&garbage, "not a PEM file").expect("write");
        let e = RevocationList::load(&garbage, &mine.join(CA_CERT)).expect_err("not pem");
        assert!(e.to_string().contains("no X509 CRL"), "{e}");
    }
}
