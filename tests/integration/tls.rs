//! TLS: HTTPS on the device listener and MQTT over TLS, with a certificate
//! generated at test time.

use std::sync::Arc;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

pub struct Pki {
    _dir: tempfile::TempDir,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub der: rustls::pki_types::CertificateDer<'static>,
}

/// A fresh self-signed certificate for localhost and its key, as PEM files.
pub fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    Pki {
        der: ck.cert.der().clone(),
        _dir: dir,
        cert,
        key,
    }
}

/// A TLS client that trusts exactly `p`'s certificate.
pub fn connector(p: &Pki) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(p.der.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

#[test]
fn https_and_mqtts_store_state() {
    let p = pki();
    let cert = p.cert.to_str().unwrap().to_string();
    let key = p.key.to_str().unwrap().to_string();
    let s = Server::start_with(&[("SLUICE_TLS__CERT", &cert), ("SLUICE_TLS__KEY", &key)]);
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState", "device.getState"]}),
    );
    let mqtts = s.mqtts.clone().expect("listening mqtts line");
    // With TLS configured, plain MQTT is off unless kept explicitly.
    assert!(s.mqtt.is_empty(), "plain MQTT open beside TLS: {}", s.mqtt);

    // HTTPS POST with a real TLS client verifying the certificate.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let response = rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(&s.http).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector(&p).connect(name, tcp).await.unwrap();
        let body = r#"{"data":{"via":"https"},"time":1}"#;
        let req = format!(
            "POST /applications/app/devices/d/state HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        tls.read_to_string(&mut out).await.unwrap();
        out
    });
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with(r#"{"accepted":1}"#), "{response}");

    // Plain HTTP to the HTTPS port gets nothing stored.
    let plain = client()
        .post(s.http_url("/applications/app/devices/d/state"))
        .bearer_auth(&t)
        .body(r#"{"data":{"via":"plain"}}"#)
        .send();
    assert!(plain.is_err() || plain.unwrap().status().as_u16() != 200);

    // MQTT over TLS with an independent client, both protocol versions.
    let port = mqtts.rsplit(':').next().unwrap();
    for (version, via) in [("mqttv311", "mqtts-311"), ("mqttv5", "mqtts-5")] {
        let out = std::process::Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", port, "--cafile", &cert])
            .args(["-u", "x", "-P", &t, "-q", "1", "-V", version])
            .args(["-t", "applications/app/devices/d/state", "-m"])
            .arg(format!(r#"{{"data":{{"via":"{via}"}}}}"#))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A client that does not trust the certificate is refused by its own
    // verification.
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-h", "localhost", "-p", port, "--capath", "/nonexistent"])
        .args([
            "-u",
            "x",
            "-P",
            &t,
            "-q",
            "1",
            "-t",
            "applications/app/devices/d/state",
            "-m",
            "{}",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());

    let got: Vec<String> = history_all(&s, ADMIN, "app", "d")
        .iter()
        .map(|i| i["data"]["via"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, vec!["https", "mqtts-311", "mqtts-5"]);
}

#[test]
fn bad_tls_files_stop_start_up_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("nope.pem");
    std::fs::write(&bogus, "not a certificate").unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--mqtts-listen",
            "127.0.0.1:0",
        ])
        .env("SLUICE_TLS__CERT", &bogus)
        .env("SLUICE_TLS__KEY", &bogus)
        .env("SLUICE_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TLS certificate"), "{err}");
    // Only one of the two: a configuration error listing it.
    let out = std::process::Command::new(bin())
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .env("SLUICE_TLS__CERT", &bogus)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls.key"));
}
