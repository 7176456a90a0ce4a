//! TLS for the MQTT-over-TLS listener and the device HTTPS listener:
//! rustls with the ring provider, certificate and key from PEM files. Both
//! listeners resolve their certificate through one `Certificate`, which
//! SIGHUP can swap: each handshake takes the pair current at that moment,
//! so live connections keep theirs and new ones get the new pair.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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

/// The certificate chain and key every TLS handshake uses.
#[derive(Debug)]
pub struct Certificate {
    /// Swapped whole by `reload`; a handshake loads it once, so it never
    /// sees a chain from one pair and a key from another.
    current: ArcSwap<CertifiedKey>,
    provider: Arc<CryptoProvider>,
}

impl Certificate {
    /// Reads and checks a pair: the chain parses, is not empty, and its
    /// first certificate matches the key.
    fn read(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
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
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
            path: key.display().to_string(),
            reason: e.to_string(),
        })?;
        CertifiedKey::from_der(certs, key_der, provider).map_err(|e| TlsError::Key {
            path: key.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Replaces the pair from the files; on any error the current pair
    /// stays and the error says why. Reads files: call off the runtime's
    /// workers.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        let pair = Self::read(cert, key, &self.provider)?;
        self.current.store(Arc::new(pair));
        Ok(())
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Acceptors for both listeners, sharing one swappable certificate.
#[derive(Clone)]
pub struct Acceptors {
    pub mqtt: TlsAcceptor,
    pub http: TlsAcceptor,
    pub certificate: Arc<Certificate>,
}

impl Acceptors {
    /// `http2`: whether the HTTPS listener offers HTTP/2 (ALPN `h2`).
    pub fn load(cert: &Path, key: &Path, http2: bool) -> Result<Acceptors, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pair = Certificate::read(cert, key, &provider)?;
        let certificate = Arc::new(Certificate {
            current: ArcSwap::from_pointee(pair),
            provider: provider.clone(),
        });
        let build = |alpn: &[&[u8]]| -> Result<TlsAcceptor, TlsError> {
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_cert_resolver(certificate.clone());
            cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(TlsAcceptor::from(Arc::new(cfg)))
        };
        Ok(Acceptors {
            // No ALPN for MQTT: most device stacks send none, and some send
            // vendor names; insisting on one would refuse them.
            mqtt: build(&[])?,
            // `h2` first: the server's order wins, so a client offering
            // both gets HTTP/2; one offering only `http/1.1` (or no ALPN
            // at all) gets HTTP/1.1.
            http: if http2 {
                build(&[b"h2", b"http/1.1"])?
            } else {
                build(&[b"http/1.1"])?
            },
            certificate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        (cert, key, ck.cert.der().to_vec())
    }

    fn served(a: &Acceptors) -> Vec<u8> {
        a.certificate.current.load().cert[0].to_vec()
    }

    #[test]
    fn reload_swaps_and_a_bad_pair_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a, der_a) = pair(dir.path(), "a");
        let (cert_b, key_b, der_b) = pair(dir.path(), "b");
        let a = Acceptors::load(&cert_a, &key_a, true).unwrap();
        assert_eq!(served(&a), der_a);
        a.certificate.reload(&cert_b, &key_b).unwrap();
        assert_eq!(served(&a), der_b);

        // A certificate with another pair's key, garbage, a missing file.
        let err = a.certificate.reload(&cert_a, &key_b).unwrap_err();
        assert!(err.to_string().contains("TLS key"), "{err}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not PEM").unwrap();
        assert!(a.certificate.reload(&junk, &key_a).is_err());
        assert!(a
            .certificate
            .reload(&dir.path().join("missing"), &key_a)
            .is_err());
        assert_eq!(served(&a), der_b);
    }

    #[test]
    fn https_offers_h2_only_with_http2_on_and_mqtt_offers_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = pair(dir.path(), "a");
        let alpn = |a: &TlsAcceptor| a.config().alpn_protocols.clone();
        let on = Acceptors::load(&cert, &key, true).unwrap();
        assert_eq!(alpn(&on.http), [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(alpn(&on.mqtt).is_empty());
        let off = Acceptors::load(&cert, &key, false).unwrap();
        assert_eq!(alpn(&off.http), [b"http/1.1".to_vec()]);
    }
}
