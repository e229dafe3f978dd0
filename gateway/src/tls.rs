//! TLS on public listeners (rustls through Pingora), HTTP/2 by ALPN, and mTLS: client
//! certificates verified against `client_ca`, their subjects handed to the auth filter.

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::listeners::TlsAccept;
use pingora_core::protocols::tls::TlsRef;
use pingora_rustls::{
    CertificateDer, ClientCertVerified, ClientCertVerifier, DigitallySignedStruct,
    HandshakeSignatureValid, RootCertStore, RusTlsError, SignatureScheme, UnixTime,
    WebPkiClientVerifier,
};
use x509_parser::extensions::GeneralName;

use crate::config::TlsSpec;

/// Subjects of a verified client certificate: CN first, then DNS, email and URI SANs; and
/// when it stops being valid.
#[derive(Debug, Clone)]
pub struct CertSubjects {
    pub subjects: Vec<String>,
    /// The certificate's `notAfter`, in seconds since the epoch.
    pub not_after: i64,
}

impl CertSubjects {
    /// The subjects while the certificate is valid at `now` (seconds since the epoch): a
    /// connection kept alive, or a TLS session resumed (the certificate is not checked
    /// again then), outlived it.
    pub fn valid_at(&self, now: i64) -> Option<&[String]> {
        (now <= self.not_after).then_some(self.subjects.as_slice())
    }
}

struct SubjectExtractor;

#[async_trait]
impl TlsAccept for SubjectExtractor {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        let der = tls.peer_certificate_der()?;
        let (subjects, not_after) = subjects_of(der);
        (!subjects.is_empty()).then(|| {
            Arc::new(CertSubjects {
                subjects,
                not_after,
            }) as Arc<dyn Any + Send + Sync>
        })
    }
}

/// A certificate's subjects and its `notAfter` (none, and the epoch, when it does not parse).
pub fn subjects_of(der: &[u8]) -> (Vec<String>, i64) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return (Vec::new(), 0);
    };
    // Each name with its kind (`cn:`, `dns:`, `email:`, `uri:`): an `mtls_subject` may name
    // one kind, so a common name a client wrote into its request cannot pass for a DNS name
    // the CA checked.
    let mut out: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(|cn| format!("cn:{cn}")))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                // DNS names and email addresses do not depend on case: presented lower-cased,
                // as a typed `mtls_subject` is written.
                GeneralName::DNSName(s) => out.push(format!("dns:{}", s.to_ascii_lowercase())),
                GeneralName::RFC822Name(s) => out.push(format!("email:{}", s.to_ascii_lowercase())),
                GeneralName::URI(s) => out.push(format!("uri:{s}")),
                _ => {}
            }
        }
    }
    (out, cert.validity().not_after.timestamp())
}

/// What can be wrong with a listener's certificate, key or client CA.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot load the certificate {cert} with the key {key}: both must be PEM files")]
    Unreadable { cert: String, key: String },
    #[error("the key {key} does not match the certificate {cert} ({reason}); use the key the certificate was issued for")]
    Mismatch {
        cert: String,
        key: String,
        reason: String,
    },
    #[error("tls.{what}: {reason}")]
    Setting { what: &'static str, reason: String },
    #[error("tls.client_ca: cannot load {}: {reason}", path.display())]
    ClientCa { path: PathBuf, reason: String },
}

/// Checks that `cert` and `key` load and belong together, as Pingora will need them at
/// start (where a mismatch would panic instead of naming the file).
pub fn check_pair(cert: &std::path::Path, key: &std::path::Path) -> Result<(), TlsError> {
    pingora_rustls::install_default_crypto_provider();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let Ok(Some((certs, private))) = pingora_rustls::load_certs_and_key_files(&cert, &key) else {
        return Err(TlsError::Unreadable { cert, key });
    };
    match pingora_rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, private)
    {
        Ok(_) => Ok(()),
        Err(e) => Err(TlsError::Mismatch {
            cert,
            key,
            reason: e.to_string(),
        }),
    }
}

/// Most intermediate certificates a client may send: the chain search over them grows with
/// their number (ten that all name the same issuer cost 0.16 s of a proxy thread a handshake,
/// without any valid certificate), and client certificates come from a CA or one below it.
const MAX_CLIENT_INTERMEDIATES: usize = 4;

/// The WebPKI client verifier, refusing chains longer than [`MAX_CLIENT_INTERMEDIATES`]
/// before it searches them.
#[derive(Debug)]
struct ShortChains(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for ShortChains {
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
    ) -> Result<ClientCertVerified, RusTlsError> {
        if intermediates.len() > MAX_CLIENT_INTERMEDIATES {
            return Err(RusTlsError::General(format!(
                "the client sent {} intermediate certificates; at most {MAX_CLIENT_INTERMEDIATES} are taken",
                intermediates.len()
            )));
        }
        self.0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RusTlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RusTlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
}

/// Builds a listener's TLS settings, checking every file first: Pingora panics on files it
/// cannot load, and an operator deserves a message instead.
pub fn settings(t: &TlsSpec) -> Result<TlsSettings, TlsError> {
    check_pair(&t.cert, &t.key)?;
    let (cert, key) = (t.cert.display().to_string(), t.key.display().to_string());
    let setting = |what| {
        move |e: pingora_error::BError| TlsError::Setting {
            what,
            reason: e.to_string(),
        }
    };
    let mut s =
        TlsSettings::with_callbacks(Box::new(SubjectExtractor)).map_err(setting("callbacks"))?;
    s.set_certificate_chain_file(&cert)
        .map_err(setting("cert"))?;
    s.set_private_key_file(&key).map_err(setting("key"))?;
    s.enable_h2();
    if let Some(ca) = &t.client_ca {
        s.set_client_cert_verifier(ca.verifier.clone());
    }
    Ok(s)
}

/// A listener's `tls.client_ca`: the file, and the verifier built from it.
#[derive(Clone)]
pub struct ClientCa {
    pub path: PathBuf,
    pub verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for ClientCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ClientCa").field(&self.path).finish()
    }
}

/// The verifier of client certificates issued under the CAs in `ca`, built when the config
/// is read: a file that holds no certificate is refused by `check`, not only at start.
pub fn client_verifier(ca: &std::path::Path) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    pingora_rustls::install_default_crypto_provider();
    let client_ca = |reason: String| TlsError::ClientCa {
        path: ca.to_path_buf(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    pingora_rustls::load_ca_file_into_store(ca, &mut roots)
        .map_err(|e| client_ca(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .map_err(|e| client_ca(e.to_string()))?;
    Ok(Arc::new(ShortChains(verifier)))
}
