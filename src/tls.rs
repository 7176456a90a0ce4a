//! TLS for the MQTT-over-TLS listener and the device HTTPS listener:
//! rustls with the ring provider, certificate and key from PEM files.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS certificate {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("TLS key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// Acceptors for both listeners, built once from the same files.
#[derive(Clone)]
pub struct Acceptors {
    pub mqtt: TlsAcceptor,
    pub http: TlsAcceptor,
}

impl Acceptors {
    pub fn load(cert: &Path, key: &Path) -> Result<Acceptors, TlsError> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError::Cert {
                path: cert.display().to_string(),
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(TlsError::Cert {
                path: cert.display().to_string(),
                reason: "no certificate in the file".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
            path: key.display().to_string(),
            reason: e.to_string(),
        })?;
        let build = |alpn: &[&[u8]]| -> Result<TlsAcceptor, TlsError> {
            let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs.clone(), key.clone_key())?;
            cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(TlsAcceptor::from(Arc::new(cfg)))
        };
        Ok(Acceptors {
            // No ALPN for MQTT: most device stacks send none, and some send
            // vendor names; insisting on one would refuse them.
            mqtt: build(&[])?,
            http: build(&[b"http/1.1"])?,
        })
    }
}
