//! Certificates made at test time with rcgen: a CA, a server certificate for 127.0.0.1 and
//! localhost, and client certificates (good, from another CA, expired).

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, SanType,
};

pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
    pub expired_cert: PathBuf,
    pub expired_key: PathBuf,
    /// From the good CA, for another service (`other.internal`), whose requester wrote a
    /// common name that reads like a DNS name: `dns:ops.internal`.
    pub lookalike_cert: PathBuf,
    pub lookalike_key: PathBuf,
    /// Like the good client certificate, but valid only until [`SHORT_LIVED`] after `make`.
    pub short_cert: PathBuf,
    pub short_key: PathBuf,
}

/// How long after `make` the short-lived client certificate expires.
pub const SHORT_LIVED: std::time::Duration = std::time::Duration::from_secs(5);

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let pem = p.self_signed(&key).unwrap().pem();
    (p, key, pem)
}

/// How long a leaf is valid.
#[derive(Clone, Copy, PartialEq)]
enum Validity {
    Long,
    Expired,
    /// Until [`SHORT_LIVED`] from now.
    Short,
}

fn leaf(
    cn: &str,
    sans: Vec<String>,
    client: bool,
    validity: Validity,
    issuer: &Issuer<'_, KeyPair>,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(sans).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    match validity {
        Validity::Long => {}
        Validity::Expired => {
            p.not_before = date_time_ymd(2020, 1, 1);
            p.not_after = date_time_ymd(2021, 1, 1);
        }
        Validity::Short => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            p.not_before = date_time_ymd(2020, 1, 1);
            p.not_after = date_time_ymd(1970, 1, 1) + now + SHORT_LIVED;
        }
    }
    (
        p.signed_by(&key, issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn make(dir: &Path) -> Pki {
    let (ca_params, ca_key, ca_pem) = ca("llm-gateway test CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let (rogue_params, rogue_key, _) = ca("some other CA");
    let rogue_issuer = Issuer::new(rogue_params, rogue_key);

    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server_key = KeyPair::generate().unwrap();
    let server_pem = server.signed_by(&server_key, &issuer).unwrap().pem();

    let (client, client_key) = leaf(
        "svc-a.internal",
        vec!["svc-a.internal".into()],
        true,
        Validity::Long,
        &issuer,
    );
    let (rogue, rogue_key) = leaf(
        "svc-a.internal",
        vec!["svc-a.internal".into()],
        true,
        Validity::Long,
        &rogue_issuer,
    );
    let (expired, expired_key) = leaf(
        "svc-a.internal",
        vec!["svc-a.internal".into()],
        true,
        Validity::Expired,
        &issuer,
    );
    let (lookalike, lookalike_key) = leaf(
        "dns:ops.internal",
        vec!["other.internal".into()],
        true,
        Validity::Long,
        &issuer,
    );
    let (short, short_key) = leaf(
        "svc-a.internal",
        vec!["svc-a.internal".into()],
        true,
        Validity::Short,
        &issuer,
    );
    Pki {
        short_cert: write(dir, "short.pem", &short),
        short_key: write(dir, "short.key", &short_key),
        ca: write(dir, "ca.pem", &ca_pem),
        server_cert: write(dir, "server.pem", &server_pem),
        server_key: write(dir, "server.key", &server_key.serialize_pem()),
        client_cert: write(dir, "client.pem", &client),
        client_key: write(dir, "client.key", &client_key),
        rogue_cert: write(dir, "rogue.pem", &rogue),
        rogue_key: write(dir, "rogue.key", &rogue_key),
        expired_cert: write(dir, "expired.pem", &expired),
        expired_key: write(dir, "expired.key", &expired_key),
        lookalike_cert: write(dir, "lookalike.pem", &lookalike),
        lookalike_key: write(dir, "lookalike.key", &lookalike_key),
    }
}

/// A TLS acceptor serving `pki`'s server certificate (for HTTPS servers the tests run:
/// JWKS endpoints, OTLP collectors).
pub fn server_acceptor(pki: &Pki) -> tokio_rustls::TlsAcceptor {
    use tokio_rustls::rustls;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &std::fs::read(&pki.server_cert).unwrap()[..])
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut &std::fs::read(&pki.server_key).unwrap()[..])
        .unwrap()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}
