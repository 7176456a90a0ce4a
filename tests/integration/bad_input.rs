//! The bad-input matrix: malformed requests over HTTP (raw sockets, so
//! nothing is normalised on the way) and MQTT 5 (raw packets), each with
//! the documented refusal, and afterwards the store holds nothing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::json;

use crate::common::*;

/// Sends raw bytes, optionally half-closes, returns (status, body).
fn raw_http(addr: &str, request: &[u8], half_close: bool) -> (u16, String) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(request).unwrap();
    if half_close {
        c.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn post(path: &str, token: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n"
    );
    if let Some(ct) = content_type {
        r.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut v = r.into_bytes();
    v.extend_from_slice(body);
    v
}

const PATH: &str = "/applications/app/devices/d/state";

#[test]
fn malformed_http_requests_get_their_documented_error_and_store_nothing() {
    let s = Server::start_with(&[("SLUICE_HTTP__MAX_BODY_BYTES", "131072")]);
    let t = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState", "device.getState"]}),
    )
    .1;
    let json_ct = Some("application/json");
    let deep = format!(
        r#"{{"data":{{"a":{}1{}}}}}"#,
        "[".repeat(40),
        "]".repeat(40)
    );
    let big_name = format!(r#"{{"data":{{"{}":1}}}}"#, "n".repeat(64 * 1024));
    let too_many = format!("[{}]", vec![r#"{"data":{"a":1}}"#; 1001].join(","));
    let too_big = format!(r#"{{"data":{{"a":"{}"}}}}"#, "x".repeat(140_000));
    let mut cases: Vec<(&str, Vec<u8>, bool, u16, &str)> = vec![
        // (name, request, half-close, status, error code)
        (
            "data string",
            post(PATH, &t, json_ct, br#"{"data":"x"}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "data array",
            post(PATH, &t, json_ct, br#"{"data":[1,2]}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "data null",
            post(PATH, &t, json_ct, br#"{"data":null}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "data number",
            post(PATH, &t, json_ct, br#"{"data":5}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "data missing",
            post(PATH, &t, json_ct, br#"{"time":5}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "data empty",
            post(PATH, &t, json_ct, br#"{"data":{}}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "time bool",
            post(PATH, &t, json_ct, br#"{"data":{"a":1},"time":true}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "time object",
            post(PATH, &t, json_ct, br#"{"data":{"a":1},"time":{}}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "time negative",
            post(PATH, &t, json_ct, br#"{"data":{"a":1},"time":-1}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "time far future",
            post(
                PATH,
                &t,
                json_ct,
                br#"{"data":{"a":1},"time":253402300800000}"#,
            ),
            false,
            400,
            "bad_request",
        ),
        (
            "time huge number",
            post(PATH, &t, json_ct, br#"{"data":{"a":1},"time":1e300}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "time 2^64",
            post(
                PATH,
                &t,
                json_ct,
                br#"{"data":{"a":1},"time":18446744073709551616}"#,
            ),
            false,
            400,
            "bad_request",
        ),
        (
            "time fraction",
            post(PATH, &t, json_ct, br#"{"data":{"a":1},"time":1.5}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "time words",
            post(PATH, &t, json_ct, br#"{"data":{"a":1},"time":"yesterday"}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "time date only",
            post(
                PATH,
                &t,
                json_ct,
                br#"{"data":{"a":1},"time":"2024-01-01"}"#,
            ),
            false,
            400,
            "bad_request",
        ),
        (
            "time month 13",
            post(
                PATH,
                &t,
                json_ct,
                br#"{"data":{"a":1},"time":"2024-13-01T00:00:00Z"}"#,
            ),
            false,
            400,
            "bad_request",
        ),
        (
            "time before 1970",
            post(
                PATH,
                &t,
                json_ct,
                br#"{"data":{"a":1},"time":"1969-07-20T20:17:00Z"}"#,
            ),
            false,
            400,
            "bad_request",
        ),
        (
            "deep nesting",
            post(PATH, &t, json_ct, deep.as_bytes()),
            false,
            400,
            "bad_request",
        ),
        (
            "invalid utf-8",
            post(PATH, &t, json_ct, b"{\"data\":{\"a\":\"\xff\xfe\"}}"),
            false,
            400,
            "bad_request",
        ),
        (
            "raw NUL",
            post(PATH, &t, json_ct, b"{\"data\":{\"a\":1}}\0"),
            false,
            400,
            "bad_request",
        ),
        (
            "NUL in name",
            post(PATH, &t, json_ct, br#"{"data":{"a\u0000":1}}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "raw control char in string",
            post(PATH, &t, json_ct, b"{\"data\":{\"a\":\"x\x01y\"}}"),
            false,
            400,
            "bad_request",
        ),
        (
            "64 KiB name",
            post(PATH, &t, json_ct, big_name.as_bytes()),
            false,
            400,
            "bad_request",
        ),
        (
            "empty name",
            post(PATH, &t, json_ct, br#"{"data":{"":1}}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "duplicate attribute",
            post(PATH, &t, json_ct, br#"{"data":{"a":1,"a":2}}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "duplicate data",
            post(PATH, &t, json_ct, br#"{"data":{"a":1},"data":{"b":1}}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "duplicate time",
            post(PATH, &t, json_ct, br#"{"data":{"a":1},"time":1,"time":2}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "unknown field",
            post(PATH, &t, json_ct, br#"{"data":{"a":1},"extra":1}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "empty array",
            post(PATH, &t, json_ct, b"[]"),
            false,
            400,
            "bad_request",
        ),
        (
            "1001 states",
            post(PATH, &t, json_ct, too_many.as_bytes()),
            false,
            400,
            "bad_request",
        ),
        (
            "array with a number",
            post(PATH, &t, json_ct, br#"[{"data":{"a":1}},7]"#),
            false,
            400,
            "bad_request",
        ),
        (
            "nested array",
            post(PATH, &t, json_ct, br#"[[{"data":{"a":1}}]]"#),
            false,
            400,
            "bad_request",
        ),
        (
            "empty body",
            post(PATH, &t, json_ct, b""),
            false,
            400,
            "bad_request",
        ),
        (
            "whitespace body",
            post(PATH, &t, json_ct, b"  \n "),
            false,
            400,
            "bad_request",
        ),
        (
            "trailing garbage",
            post(PATH, &t, json_ct, br#"{"data":{"a":1}} {"#),
            false,
            400,
            "bad_request",
        ),
        (
            "byte order mark",
            post(PATH, &t, json_ct, b"\xef\xbb\xbf{\"data\":{\"a\":1}}"),
            false,
            400,
            "bad_request",
        ),
        (
            "truncated json",
            post(PATH, &t, json_ct, br#"{"data":{"a":1"#),
            false,
            400,
            "bad_request",
        ),
        (
            "bad escape",
            post(PATH, &t, json_ct, br#"{"data":{"a":"\x"}}"#),
            false,
            400,
            "bad_request",
        ),
        (
            "single quotes",
            post(PATH, &t, json_ct, b"{'data':{'a':1}}"),
            false,
            400,
            "bad_request",
        ),
        (
            "text/plain",
            post(PATH, &t, Some("text/plain"), br#"{"data":{"a":1}}"#),
            false,
            415,
            "unsupported_media_type",
        ),
        (
            "application/xml",
            post(PATH, &t, Some("application/xml"), br#"{"data":{"a":1}}"#),
            false,
            415,
            "unsupported_media_type",
        ),
        (
            "form encoded",
            post(
                PATH,
                &t,
                Some("application/x-www-form-urlencoded"),
                br#"{"data":{"a":1}}"#,
            ),
            false,
            415,
            "unsupported_media_type",
        ),
        (
            "over max body",
            post(PATH, &t, json_ct, too_big.as_bytes()),
            false,
            413,
            "payload_too_large",
        ),
        (
            "extra path level",
            post(
                "/applications/app/devices/d/x/state",
                &t,
                json_ct,
                br#"{"data":{"a":1}}"#,
            ),
            false,
            404,
            "not_found",
        ),
        (
            "missing path level",
            post(
                "/applications/app/d/state",
                &t,
                json_ct,
                br#"{"data":{"a":1}}"#,
            ),
            false,
            404,
            "not_found",
        ),
        (
            "dot-dot device",
            post(
                "/applications/app/devices/../state",
                &t,
                json_ct,
                br#"{"data":{"a":1}}"#,
            ),
            false,
            400,
            "bad_request",
        ),
        (
            "encoded slash",
            post(
                "/applications/app/devices/a%2Fb/state",
                &t,
                json_ct,
                br#"{"data":{"a":1}}"#,
            ),
            false,
            400,
            "bad_request",
        ),
        (
            "65-char device",
            post(
                &format!("/applications/app/devices/{}/state", "d".repeat(65)),
                &t,
                json_ct,
                br#"{"data":{"a":1}}"#,
            ),
            false,
            400,
            "bad_request",
        ),
        (
            "space in app",
            post(
                "/applications/a%20pp/devices/d/state",
                &t,
                json_ct,
                br#"{"data":{"a":1}}"#,
            ),
            false,
            400,
            "bad_request",
        ),
        (
            "empty token",
            post(PATH, "", json_ct, br#"{"data":{"a":1}}"#),
            false,
            401,
            "unauthorized",
        ),
        (
            "600-char token",
            post(PATH, &"x".repeat(600), json_ct, br#"{"data":{"a":1}}"#),
            false,
            401,
            "unauthorized",
        ),
    ];
    // A body shorter than its Content-Length, then the client stops sending.
    let mut short = post(PATH, &t, json_ct, br#"{"data":{"a":1}}"#);
    let n = short.len();
    short.truncate(n - 5);
    cases.push(("truncated body", short, true, 400, "bad_request"));
    // Non-ASCII bytes in the token.
    let mut odd = post(PATH, "tok", json_ct, br#"{"data":{"a":1}}"#);
    let i = odd.windows(3).position(|w| w == b"tok").unwrap();
    odd[i] = 0xc3;
    cases.push(("non-ASCII token", odd, false, 401, "unauthorized"));

    assert!(cases.len() >= 40);
    let mut failures = vec![];
    for (name, req, half, status, code) in &cases {
        let (got, body) = raw_http(&s.http, req, *half);
        let ok = got == *status && body.contains(&format!("\"error\":\"{code}\""));
        if !ok {
            failures.push(format!(
                "{name}: expected {status} {code}, got {got} {body:?}"
            ));
        }
        if *status == 400 && *code == "bad_request" && got == 400 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(
                v["detail"].as_str().is_some_and(|d| !d.is_empty()),
                "{name}: no detail"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing of any of it was stored, anywhere.
    assert!(history_all(&s, ADMIN, "app", "d").is_empty());
    assert_eq!(
        get_admin(&s, ADMIN, "/applications/app/devices/d/compositeState").1,
        json!({})
    );
    let metrics = metrics_text(&s);
    assert!(
        metrics.contains("sluice_messages_stored_total 0"),
        "{metrics}"
    );
}

/// A raw MQTT 5 session: CONNECT with the token, then PUBLISH packets
/// built without client-side validation.
struct Raw5 {
    sock: TcpStream,
    buf: BytesMut,
}

impl Raw5 {
    fn connect(addr: &str, token: &str) -> Raw5 {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = Raw5 {
            sock,
            buf: BytesMut::new(),
        };
        let connect = p5::Connect {
            keep_alive: 30,
            client_id: "raw".into(),
            clean_start: true,
            properties: None,
        };
        let mut out = BytesMut::new();
        p5::Packet::Connect(connect, None, Some(p5::Login::new("u", token)))
            .write(&mut out, None)
            .unwrap();
        r.sock.write_all(&out).unwrap();
        assert!(matches!(r.next(), Some(p5::Packet::ConnAck(_))));
        r
    }

    fn publish(&mut self, topic: &[u8], qos: QoS, payload: &[u8]) {
        let mut p = p5::Publish::new("", qos, payload.to_vec(), None);
        p.topic = bytes::Bytes::copy_from_slice(topic);
        p.pkid = if qos == QoS::AtMostOnce { 0 } else { 7 };
        let mut out = BytesMut::new();
        p.write(&mut out).unwrap();
        self.sock.write_all(&out).unwrap();
    }

    /// The next packet, or None when the server closed.
    fn next(&mut self) -> Option<p5::Packet> {
        loop {
            if let Ok(p) = p5::Packet::read(&mut self.buf, None) {
                return Some(p);
            }
            let mut chunk = [0u8; 1024];
            match self.sock.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[test]
fn malformed_mqtt_publishes_get_their_reason_code_and_store_nothing() {
    let s = Server::start();
    let t = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d", "scope": ["device.sendState"]}),
    )
    .1;
    let ok = br#"{"data":{"a":1}}"#;
    let deep = format!(
        r#"{{"data":{{"a":{}1{}}}}}"#,
        "[".repeat(40),
        "]".repeat(40)
    );
    let topic = b"applications/app/devices/d/state";
    // (name, topic, payload, expected PUBACK reason for QoS 1)
    let cases: Vec<(&str, &[u8], &[u8], p5::PubAckReason)> = vec![
        (
            "wildcard +",
            b"applications/app/devices/+/state",
            ok,
            p5::PubAckReason::NotAuthorized,
        ),
        (
            "wildcard #",
            b"applications/app/devices/#",
            ok,
            p5::PubAckReason::NotAuthorized,
        ),
        (
            "extra level",
            b"applications/app/devices/d/state/x",
            ok,
            p5::PubAckReason::NotAuthorized,
        ),
        (
            "missing level",
            b"applications/app/d/state",
            ok,
            p5::PubAckReason::NotAuthorized,
        ),
        (
            "leading slash",
            b"/applications/app/devices/d/state",
            ok,
            p5::PubAckReason::NotAuthorized,
        ),
        (
            "dot-dot device",
            b"applications/app/devices/../state",
            ok,
            p5::PubAckReason::NotAuthorized,
        ),
        (
            "65-char device",
            format!("applications/app/devices/{}/state", "d".repeat(65))
                .leak()
                .as_bytes(),
            ok,
            p5::PubAckReason::NotAuthorized,
        ),
        (
            "not json",
            topic,
            b"hello",
            p5::PubAckReason::PayloadFormatInvalid,
        ),
        (
            "array payload",
            topic,
            br#"[{"data":{"a":1}}]"#,
            p5::PubAckReason::PayloadFormatInvalid,
        ),
        (
            "invalid utf-8",
            topic,
            b"{\"data\":{\"a\":\"\xff\"}}",
            p5::PubAckReason::PayloadFormatInvalid,
        ),
        (
            "empty payload",
            topic,
            b"",
            p5::PubAckReason::PayloadFormatInvalid,
        ),
        (
            "negative time",
            topic,
            br#"{"data":{"a":1},"time":-1}"#,
            p5::PubAckReason::PayloadFormatInvalid,
        ),
        (
            "deep nesting",
            topic,
            deep.as_bytes(),
            p5::PubAckReason::PayloadFormatInvalid,
        ),
        (
            "duplicate key",
            topic,
            br#"{"data":{"a":1,"a":2}}"#,
            p5::PubAckReason::PayloadFormatInvalid,
        ),
    ];
    let mut raw = Raw5::connect(&s.mqtt, &t);
    for (name, topic, payload, want) in &cases {
        raw.publish(topic, QoS::AtLeastOnce, payload);
        match raw.next() {
            Some(p5::Packet::PubAck(a)) => assert_eq!(a.reason, *want, "{name}"),
            other => panic!("{name}: expected PUBACK, got {other:?}"),
        }
    }
    // A topic that is not UTF-8 is a malformed packet: DISCONNECT.
    raw.publish(b"applications/\xff/devices/d/state", QoS::AtLeastOnce, ok);
    match raw.next() {
        Some(p5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, p5::DisconnectReasonCode::MalformedPacket)
        }
        other => panic!("non-UTF-8 topic: {other:?}"),
    }
    // QoS 2 is not supported.
    let mut raw = Raw5::connect(&s.mqtt, &t);
    raw.publish(topic, QoS::ExactlyOnce, ok);
    match raw.next() {
        Some(p5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, p5::DisconnectReasonCode::QoSNotSupported)
        }
        other => panic!("QoS 2: {other:?}"),
    }
    let metrics = metrics_text(&s);
    assert!(
        metrics.contains("sluice_messages_stored_total 0"),
        "{metrics}"
    );
    assert!(history_all(&s, ADMIN, "app", "d").is_empty());
}
