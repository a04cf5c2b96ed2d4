//! TLS for `amqps://` broker URLs.
//!
//! This file owns [`TlsOptions`] (the CA file and client certificate, from flags or the
//! `[bus]` table), [`BrokerTls`] (the same, read and checked once at start-up, and the
//! rustls client configuration built from it) and the TLS handshake of a connection
//! attempt ([`BrokerTls::connector`]). An `amqps` URL always means TLS with the server
//! certificate verified against the system's trusted CAs plus the `--ca-file` ones; an
//! `amqp` URL never uses TLS. [`tls_refusal`] words a TLS failure (an untrusted
//! certificate, a port that does not speak TLS, a broker refusing our certificate):
//! those are permanent, retrying cannot fix them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lapin::tcp::RustlsConnector;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// How long to wait, after a TLS 1.3 handshake in which the broker asked for a client
/// certificate, for the broker to refuse it before speaking AMQP (see
/// [`Attempt::asked_for_certificate`]).
pub(crate) const REFUSAL_WAIT: Duration = Duration::from_millis(300);

/// The TLS side of one connection attempt.
pub(crate) struct Attempt {
    pub connector: RustlsConnector,
    asked: Arc<AtomicBool>,
}

impl Attempt {
    /// Whether the broker asked for a client certificate during the handshake. With
    /// TLS 1.3 it judges ours (or its absence) only after our side of the handshake is
    /// done: if we then wrote AMQP at once, its refusal could reach us as a bare
    /// connection reset (a transient fault) instead of its alert (a permanent one). So
    /// then the connection first waits up to [`REFUSAL_WAIT`] for that alert.
    pub fn asked_for_certificate(&self) -> bool {
        self.asked.load(Ordering::Relaxed)
    }
}

/// A client certificate resolver that notes whether the server asked for one.
#[derive(Debug)]
struct NoteRequest {
    inner: Arc<dyn ResolvesClientCert>,
    asked: Arc<AtomicBool>,
}

impl ResolvesClientCert for NoteRequest {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.asked.store(true, Ordering::Relaxed);
        self.inner.resolve(root_hint_subjects, sigschemes)
    }

    fn only_raw_public_keys(&self) -> bool {
        self.inner.only_raw_public_keys()
    }

    fn has_certs(&self) -> bool {
        self.inner.has_certs()
    }
}

/// Where the TLS material comes from, as given (flags over the `[bus]` table).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM file of CA certificates trusted besides the system's (a private CA).
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (chain), for brokers that require one.
    pub client_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub client_key: Option<PathBuf>,
}

/// A TLS set-up that cannot work: a file that cannot be read or holds nothing usable,
/// a certificate without its key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("TLS: {0}")]
    Setup(String),
}

/// The TLS material of broker connections, read and checked once; cheap to clone.
///
/// The default trusts the system's CAs only and has no client certificate.
#[derive(Clone, Default)]
pub struct BrokerTls {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    options: TlsOptions,
    extra_roots: Vec<CertificateDer<'static>>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    /// Built at the first `amqps` connection (or at [`BrokerTls::load`]).
    config: OnceLock<Result<Arc<ClientConfig>, String>>,
}

impl std::fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerTls")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl BrokerTls {
    /// Reads and checks the files of `options`: each must exist and hold what it
    /// should (certificates, a private key matching the certificate).
    pub fn load(options: &TlsOptions) -> Result<BrokerTls, TlsError> {
        let extra_roots = match &options.ca_file {
            Some(p) => read_certs("CA file", p)?,
            None => Vec::new(),
        };
        let identity = match (&options.client_cert, &options.client_key) {
            (Some(c), Some(k)) => Some((read_certs("client certificate", c)?, read_key(k)?)),
            (None, None) => None,
            (Some(c), None) => {
                return Err(TlsError::Setup(format!(
                    "client certificate {} given without its key (--client-key)",
                    c.display()
                )))
            }
            (None, Some(k)) => {
                return Err(TlsError::Setup(format!(
                    "client key {} given without its certificate (--client-cert)",
                    k.display()
                )))
            }
        };
        let tls = BrokerTls {
            inner: Arc::new(Inner {
                options: options.clone(),
                extra_roots,
                identity,
                config: OnceLock::new(),
            }),
        };
        if *options != TlsOptions::default() {
            // A key that does not match its certificate is a start-up error.
            tls.client_config().map_err(TlsError::Setup)?;
        }
        Ok(tls)
    }

    /// The options this came from.
    pub fn options(&self) -> &TlsOptions {
        &self.inner.options
    }

    /// The TLS side of one `amqps` connection attempt (the configuration is built
    /// once).
    pub(crate) fn attempt(&self) -> Result<Attempt, String> {
        let shared = self.client_config()?;
        let asked = Arc::new(AtomicBool::new(false));
        let mut config = (*shared).clone();
        config.client_auth_cert_resolver = Arc::new(NoteRequest {
            inner: shared.client_auth_cert_resolver.clone(),
            asked: asked.clone(),
        });
        Ok(Attempt {
            connector: RustlsConnector::from(config),
            asked,
        })
    }

    fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        self.inner
            .config
            .get_or_init(|| build_config(&self.inner).map(Arc::new))
            .clone()
    }
}

/// The rustls client configuration: system CAs plus the extra ones, and the client
/// certificate if any.
fn build_config(inner: &Inner) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!("loading the system's CA certificates: {e}");
    }
    let (_, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::debug!("{ignored} system CA certificates could not be parsed");
    }
    for cert in &inner.extra_roots {
        roots.add(cert.clone()).map_err(|e| {
            format!(
                "CA file {}: unusable certificate: {e}",
                inner
                    .options
                    .ca_file
                    .as_deref()
                    .map_or_else(String::new, |p| p.display().to_string())
            )
        })?;
    }
    if roots.is_empty() {
        return Err(
            "no trusted CA certificates: the system has none; give the broker's CA with \
             --ca-file"
                .to_string(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("no usable TLS versions: {e}"))?
        .with_root_certificates(roots);
    match &inner.identity {
        None => Ok(builder.with_no_client_auth()),
        Some((certs, key)) => builder
            .with_client_auth_cert(certs.clone(), key.clone_key())
            .map_err(|e| {
                format!(
                    "client certificate {} and key {} do not go together: {e}",
                    show(inner.options.client_cert.as_deref()),
                    show(inner.options.client_key.as_deref()),
                )
            }),
    }
}

fn show(p: Option<&Path>) -> String {
    p.map_or_else(String::new, |p| p.display().to_string())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// The certificates of a PEM file (at least one).
fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let bad = |reason: String| TlsError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate (BEGIN CERTIFICATE) in it".into()));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1, unencrypted).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "client key";
    let bytes = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::File {
        what,
        path: path.display().to_string(),
        reason: format!("no unencrypted PEM private key in it: {e}"),
    })
}

/// Why `e` is a TLS failure that retrying cannot fix, in words, or `None` for an
/// ordinary I/O fault (connection refused or reset: worth retrying).
pub(crate) fn tls_refusal(e: &std::io::Error) -> Option<String> {
    use rustls::{AlertDescription as A, CertificateError as C, Error as R};
    let r = e.get_ref()?.downcast_ref::<R>()?;
    Some(match r {
        R::InvalidCertificate(C::UnknownIssuer) => {
            format!("TLS: the server certificate is not trusted ({r}): give its CA with --ca-file")
        }
        R::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            format!("TLS: the server certificate is not for this host name ({r})")
        }
        R::InvalidCertificate(_) => format!("TLS: bad server certificate ({r})"),
        R::InvalidMessage(_) | R::InappropriateMessage { .. } => format!(
            "TLS handshake failed: the port does not speak TLS, or not as expected (a plain \
             AMQP port? amqps:// needs the broker's TLS port) ({r})"
        ),
        R::AlertReceived(
            a @ (A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::HandshakeFailure
            | A::AccessDenied),
        ) => format!(
            "TLS: the broker refused the handshake (alert {a:?}): it may require a client \
             certificate it trusts (--client-cert and --client-key)"
        ),
        _ => format!("TLS failure: {r}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.pem");
        let e = BrokerTls::load(&TlsOptions {
            ca_file: Some(missing.clone()),
            ..TlsOptions::default()
        })
        .expect_err("missing CA file");
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "hello\n").expect("write");
        let e = BrokerTls::load(&TlsOptions {
            ca_file: Some(empty.clone()),
            ..TlsOptions::default()
        })
        .expect_err("no certificate");
        assert!(e.to_string().contains("empty.pem"), "{e}");
        let e = BrokerTls::load(&TlsOptions {
            client_cert: Some(empty),
            ..TlsOptions::default()
        })
        .expect_err("cert without key");
        assert!(e.to_string().contains("--client-key"), "{e}");
    }

    #[test]
    fn rustls_errors_are_refusals_and_io_faults_are_not() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(tls_refusal(&io).is_none());
        let cert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let why = tls_refusal(&cert).unwrap_or_default();
        assert!(why.contains("--ca-file"), "{why}");
    }
}
