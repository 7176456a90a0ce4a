//! MQTT 3.1.1 and 5.0 normative statements for CONNECT, CONNACK, PUBLISH,
//! PUBACK and DISCONNECT, over raw sockets so that every byte the server
//! answers is checked. `tests/MQTT_CONFORMANCE.md` maps each statement to
//! the test that shows it.

use std::time::Duration;

use serde_json::json;

use crate::common::*;
use crate::mqtt_raw::*;

const TOPIC: &str = "applications/app/devices/d1/state";
const BODY: &[u8] = br#"{"data":{"x":1}}"#;
const SEC: Duration = Duration::from_secs(5);

fn token(s: &Server) -> String {
    mint(
        s,
        ADMIN,
        "app",
        json!({"name": "dev", "scope": ["device.sendState"]}),
    )
    .1
}

fn stored(s: &Server) -> usize {
    history_all(s, ADMIN, "app", "d1").len()
}

fn connect_count(s: &Server, outcome: &str) -> u64 {
    let text = metrics_text(s);
    let line = format!("sluice_mqtt_connects_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn unsupported_protocol_level_is_answered_then_closed() {
    let s = Server::start();
    let t = token(&s);
    // 3.1.1 [MQTT-3.1.2-2]: CONNACK 0x01 for a level it does not support;
    // MQTT 5 [MQTT-3.1.2-2]: CONNACK 0x84 for a version other than 5. A
    // level above 5 is a newer client, answered the MQTT 5 way.
    for (name, level, expect) in [
        ("MQTT", 3u8, vec![0x20, 0x02, 0x00, 0x01]),
        ("MQTT", 2, vec![0x20, 0x02, 0x00, 0x01]),
        ("MQIsdp", 4, vec![0x20, 0x02, 0x00, 0x01]),
        ("MQTT", 6, vec![0x20, 0x03, 0x00, 0x84, 0x00]),
        ("MQTT", 255, vec![0x20, 0x03, 0x00, 0x84, 0x00]),
    ] {
        let c = Connect {
            name,
            level,
            ..Connect::v311("lvl", &t)
        };
        let mut r = Raw::connect(&s.mqtt, &c.bytes());
        // Nothing after the CONNECT is processed, even a pipelined publish.
        r.send(&publish(false, TOPIC, 0, 0, false, &[], BODY));
        let got = r.until_closed(SEC);
        assert_eq!(got.len(), 1, "{name} {level}: {got:?}");
        let mut bytes = vec![got[0].first];
        bytes.extend(varint(got[0].body.len()));
        bytes.extend(&got[0].body);
        assert_eq!(bytes, expect, "{name} level {level}");
    }
    assert_eq!(connect_count(&s, "unsupported_version"), 5);
    assert_eq!(stored(&s), 0);
}

#[test]
fn empty_client_id_rules_per_version() {
    let s = Server::start();
    let t = token(&s);
    // 3.1.1 [MQTT-3.1.3-8]: empty id with CleanSession 0 → CONNACK 0x02.
    let c = Connect {
        clean: false,
        ..Connect::v311("", &t)
    };
    let mut r = Raw::connect(&s.mqtt, &c.bytes());
    let got = r.until_closed(SEC);
    assert_eq!(got[0].connack(), Some((false, 0x02)), "{got:?}");
    // 3.1.1 [MQTT-3.1.3-6]: with CleanSession 1 it is accepted.
    let (mut r, code) = Raw::connack_code(&s.mqtt, &Connect::v311("", &t).bytes());
    assert_eq!(code, 0);
    assert!(r.alive());
    // MQTT 5 [MQTT-3.1.3-6/7], [MQTT-3.2.2-16]: accepted whatever Clean
    // Start says, with an Assigned Client Identifier, unique and random.
    let mut assigned = vec![];
    for clean in [false, true, false, true] {
        let c = Connect {
            clean,
            ..Connect::v5("", &t)
        };
        let mut r = Raw::connect(&s.mqtt, &c.bytes());
        let p = r.expect(SEC);
        assert_eq!(p.connack(), Some((false, 0)), "clean {clean}: {p:?}");
        let id = p
            .connack_props()
            .into_iter()
            .find(|(k, _)| *k == 0x12)
            .map(|(_, v)| String::from_utf8(v[2..].to_vec()).unwrap())
            .expect("Assigned Client Identifier");
        assert!(
            id.starts_with("sluice-") && id.len() >= 28,
            "not a random id: {id}"
        );
        assert!(r.alive());
        assigned.push(id);
    }
    assigned.sort();
    assigned.dedup();
    assert_eq!(assigned.len(), 4, "assigned ids repeat: {assigned:?}");
}

#[test]
fn connack_says_what_the_server_supports() {
    let s = Server::start_with(&[
        ("SLUICE_MQTT__MAX_PACKET_BYTES", "100000"),
        ("SLUICE_MQTT__RECEIVE_MAXIMUM", "7"),
    ]);
    let t = token(&s);
    // 3.1.1 [MQTT-3.2.0-1], [MQTT-3.2.2-1/3]: CONNACK first, session
    // present 0 (Sluice keeps no sessions), even with CleanSession 0.
    let c = Connect {
        clean: false,
        ..Connect::v311("c1", &t)
    };
    let mut r = Raw::connect(&s.mqtt, &c.bytes());
    let p = r.expect(SEC);
    assert_eq!((p.first, p.body.clone()), (0x20, vec![0, 0]));
    // MQTT 5: session present 0 [MQTT-3.2.2-3], Maximum QoS 1
    // [MQTT-3.2.2-9], Retain Available 0, no Topic Alias Maximum (so 0,
    // [MQTT-3.2.2-18]), Maximum Packet Size and Receive Maximum from
    // config, Session Expiry 0 when the client asked for more: a token
    // that may not subscribe has no session to keep.
    let c = Connect {
        clean: false,
        props: vec![0x11, 0, 0, 0x0e, 0x10],
        ..Connect::v5("c2", &t)
    };
    let mut r = Raw::connect(&s.mqtt, &c.bytes());
    let p = r.expect(SEC);
    assert_eq!(p.connack(), Some((false, 0)));
    let props = p.connack_props();
    let get = |id: u8| props.iter().find(|(k, _)| *k == id).map(|(_, v)| v.clone());
    assert_eq!(get(0x24), Some(vec![1]), "Maximum QoS");
    assert_eq!(get(0x25), Some(vec![0]), "Retain Available");
    assert_eq!(get(0x22), None, "Topic Alias Maximum");
    assert_eq!(get(0x27), Some(100_000u32.to_be_bytes().to_vec()));
    assert_eq!(get(0x21), Some(7u16.to_be_bytes().to_vec()));
    assert_eq!(get(0x11), Some(vec![0, 0, 0, 0]), "Session Expiry");
    assert_eq!(
        get(0x12),
        None,
        "no id assigned when the client named itself"
    );
    // [MQTT-3.12.4-1]: PINGREQ gets PINGRESP.
    assert!(r.alive());
}

#[test]
fn malformed_connects_close_without_connack() {
    let s = Server::start();
    let t = token(&s);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // [MQTT-3.1.2-3] (both): the reserved flag must be 0.
        (
            "reserved flag, 3.1.1",
            Connect {
                extra_flags: 0x01,
                ..Connect::v311("m", &t)
            }
            .bytes(),
        ),
        (
            "reserved flag, 5",
            Connect {
                extra_flags: 0x01,
                ..Connect::v5("m", &t)
            }
            .bytes(),
        ),
        // [MQTT-3.1.2-11/13/15]: Will QoS or Retain without a Will.
        (
            "will QoS without will, 5",
            Connect {
                extra_flags: 0x08,
                ..Connect::v5("m", &t)
            }
            .bytes(),
        ),
        (
            "will retain without will, 3.1.1",
            Connect {
                extra_flags: 0x20,
                ..Connect::v311("m", &t)
            }
            .bytes(),
        ),
        // [MQTT-3.1.2-14]: Will QoS 3.
        (
            "will QoS 3, 3.1.1",
            Connect {
                will: Some((TOPIC, BODY, 3, false)),
                ..Connect::v311("m", &t)
            }
            .bytes(),
        ),
        // [MQTT-3.1.2-21]: the Password flag set, no password present.
        ("password flag without password, 3.1.1", {
            let mut b = Connect::v311("m", &t).bytes();
            let cut = b.len() - 2 - t.len();
            b.truncate(cut);
            b[1] = (b.len() - 2) as u8;
            b
        }),
        // [MQTT-1.4.0-1] / [MQTT-1.5.4-1]: strings are well-formed UTF-8.
        ("client id not UTF-8, 3.1.1", {
            let mut b = Connect::v311("m", &t).bytes();
            // The client id's one byte follows its two length bytes.
            let at = 2 + 10 + 2;
            assert_eq!(b[at], b'm');
            b[at] = 0xff;
            b
        }),
        // 3.1.1 [MQTT-3.1.2-22]: a password needs a user name.
        (
            "password without user name, 3.1.1",
            Connect {
                user_name: false,
                ..Connect::v311("m", &t)
            }
            .bytes(),
        ),
        // [MQTT-1.4.0-2] / [MQTT-1.5.4-2]: no U+0000 in strings.
        ("NUL in client id, 3.1.1", Connect::v311("a\0b", &t).bytes()),
        ("NUL in client id, 5", Connect::v5("a\0b", &t).bytes()),
        // [MQTT-3.1.2-1]: not the MQTT protocol name.
        (
            "protocol name",
            Connect {
                name: "MQTX",
                ..Connect::v311("m", &t)
            }
            .bytes(),
        ),
        // [MQTT-3.1.0-1]: the first packet must be CONNECT.
        (
            "PUBLISH first",
            publish(false, TOPIC, 0, 0, false, &[], BODY),
        ),
    ];
    for (what, bytes) in cases {
        let mut r = Raw::connect(&s.mqtt, &bytes);
        let got = r.until_closed(SEC);
        assert!(got.is_empty(), "{what}: answered {got:?}");
    }
    // MQTT 5 allows a password without a user name.
    let c = Connect {
        user_name: false,
        ..Connect::v5("m5", &t)
    };
    assert_eq!(Raw::connack_code(&s.mqtt, &c.bytes()).1, 0);
    assert_eq!(stored(&s), 0);
}

#[test]
fn refused_connect_processes_nothing_after_it() {
    let s = Server::start();
    // 3.1.1 [MQTT-3.1.4-5], [MQTT-3.2.2-4/5]; 5 [MQTT-3.1.4-6],
    // [MQTT-3.2.2-6/7]: a refused CONNECT gets a CONNACK with session
    // present 0 and the code, then the close; a publish sent right behind
    // it is not processed.
    for (c, code) in [
        (Connect::v311("r", "sl_wrong"), 0x05),
        (Connect::v5("r", "sl_wrong"), 0x87),
    ] {
        let mut r = Raw::connect(&s.mqtt, &c.bytes());
        r.send(&publish(c.level == 5, TOPIC, 0, 0, false, &[], BODY));
        let got = r.until_closed(SEC);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].connack(), Some((false, code)));
    }
    assert_eq!(stored(&s), 0);
}

#[test]
fn v5_connect_features_are_refused_with_their_codes() {
    let s = Server::start();
    let t = token(&s);
    let will_topic = "applications/app/devices/d1/state";
    for (c, code) in [
        // [MQTT-3.2.2-12]: a Will QoS above the Maximum QoS.
        (
            Connect {
                will: Some((will_topic, BODY, 2, false)),
                ..Connect::v5("w", &t)
            },
            0x9B,
        ),
        // [MQTT-3.2.2-13]: a retained Will without Retain Available.
        (
            Connect {
                will: Some((will_topic, BODY, 1, true)),
                ..Connect::v5("w", &t)
            },
            0x9A,
        ),
        // [MQTT-4.12.0-1]: an Authentication Method Sluice does not offer.
        (
            Connect {
                props: [vec![0x15], field(b"SCRAM-SHA-1")].concat(),
                ..Connect::v5("w", &t)
            },
            0x8C,
        ),
    ] {
        let mut r = Raw::connect(&s.mqtt, &c.bytes());
        let got = r.until_closed(SEC);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].connack(), Some((false, code)));
    }
    assert_eq!(connect_count(&s, "unsupported_feature"), 3);
    // A Will Sluice can accept (and ignores) is fine, in both versions.
    for c in [
        Connect {
            will: Some((will_topic, BODY, 1, false)),
            ..Connect::v5("w5", &t)
        },
        Connect {
            will: Some((will_topic, BODY, 2, true)),
            ..Connect::v311("w3", &t)
        },
    ] {
        let (r, code) = Raw::connack_code(&s.mqtt, &c.bytes());
        assert_eq!(code, 0);
        // Closing without DISCONNECT would publish a Will; nothing is.
        r.sock.shutdown(std::net::Shutdown::Both).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stored(&s), 0, "a Will was published");
}

#[test]
fn oversized_connect_is_refused_before_it_is_buffered() {
    let s = Server::start_with(&[("SLUICE_MQTT__MAX_CONNECT_BYTES", "512")]);
    let t = token(&s);
    // A CONNECT exactly at the limit is fine: pad it with a user property.
    let base = Connect::v5("big", &t).bytes().len();
    let pad = |n: usize| [vec![0x26], field(b"k"), field(&vec![b'v'; n])].concat();
    let mut c = Connect {
        props: pad(0),
        ..Connect::v5("big", &t)
    };
    // The user property adds 6 bytes besides its value, and the remaining
    // length and property length each take one byte more from 128 up.
    let at_limit = 512 - base - 8;
    c.props = pad(at_limit);
    let mut bytes = c.bytes();
    assert_eq!(bytes.len(), 512);
    assert_eq!(Raw::connack_code(&s.mqtt, &bytes).1, 0);
    // One byte more: CONNACK 0x95 (MQTT 5) and close.
    c.props = pad(at_limit + 1);
    bytes = c.bytes();
    assert_eq!(bytes.len(), 513);
    let mut r = Raw::connect(&s.mqtt, &bytes);
    let got = r.until_closed(SEC);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].connack(), Some((false, 0x95)));
    // It is refused from its fixed header alone: a client announcing a
    // 100 KB CONNECT gets the answer without sending the rest.
    for (v5, expect) in [(true, Some((false, 0x95))), (false, None)] {
        let level = if v5 { 5 } else { 4 };
        let mut head = vec![0x10];
        head.extend(varint(100_000));
        head.extend(field(b"MQTT"));
        head.push(level);
        let mut r = Raw::connect(&s.mqtt, &head);
        let got = r.until_closed(SEC);
        assert_eq!(got.first().and_then(Packet::connack), expect, "v5 {v5}");
    }
    assert_eq!(connect_count(&s, "too_large"), 3);
}

#[test]
fn maximum_packet_size_counts_the_whole_packet() {
    let s = Server::start_with(&[("SLUICE_MQTT__MAX_PACKET_BYTES", "200")]);
    let t = token(&s);
    for v5 in [true, false] {
        let c = if v5 {
            Connect::v5("mps", &t)
        } else {
            Connect::v311("mps", &t)
        };
        let (mut r, code) = Raw::connack_code(&s.mqtt, &c.bytes());
        assert_eq!(code, 0);
        // A QoS 1 publish of exactly `total` bytes, fixed header included.
        let sized = |total: usize, id: u16| {
            let with = |pad: usize| {
                let body = format!(r#"{{"data":{{"p":"{}"}}}}"#, "p".repeat(pad));
                publish(v5, TOPIC, 1, id, false, &[], body.as_bytes())
            };
            let mut pad = total - with(0).len();
            while with(pad).len() > total {
                pad -= 1;
            }
            let p = with(pad);
            assert_eq!(p.len(), total);
            p
        };
        // Exactly the Maximum Packet Size: stored and acknowledged.
        r.send(&sized(200, 1));
        assert_eq!(r.expect(SEC).puback(), Some((1, 0)));
        // One byte over, the fixed header counted: MQTT 5 DISCONNECT 0x95
        // ([MQTT-3.2.2-15], 4.13), 3.1.1 close.
        r.send(&sized(201, 2));
        let got = r.until_closed(SEC);
        match v5 {
            true => assert_eq!(
                got.iter().map(Packet::disconnect).collect::<Vec<_>>(),
                vec![Some(0x95)]
            ),
            false => assert!(got.is_empty(), "{got:?}"),
        }
    }
    assert_eq!(stored(&s), 2);
}

#[test]
fn retain_after_retain_available_0_is_disconnect_0x9a() {
    let s = Server::start();
    let t = token(&s);
    // MQTT 5 [MQTT-3.2.2-14]: CONNACK said Retain Available 0.
    for qos in [0, 1] {
        let (mut r, _) = Raw::connack_code(&s.mqtt, &Connect::v5("ret", &t).bytes());
        r.send(&publish(true, TOPIC, qos, 1, true, &[], BODY));
        let got = r.until_closed(SEC);
        assert_eq!(
            got.iter().map(Packet::disconnect).collect::<Vec<_>>(),
            vec![Some(0x9A)],
            "QoS {qos}"
        );
    }
    assert_eq!(stored(&s), 0);
    // 3.1.1 has no Retain Available: the flag is ignored, the state stored.
    let (mut r, _) = Raw::connack_code(&s.mqtt, &Connect::v311("ret", &t).bytes());
    r.send(&publish(false, TOPIC, 1, 1, true, &[], BODY));
    assert_eq!(r.expect(SEC).puback(), Some((1, 0)));
    assert_eq!(stored(&s), 1);
}

#[test]
fn topic_alias_above_maximum_is_disconnect_0x94() {
    let s = Server::start();
    let t = token(&s);
    // [MQTT-3.2.2-17/18], [MQTT-3.3.2-8]: the Topic Alias Maximum is 0, so
    // any alias (0 included) is invalid.
    for alias in [1u16, 7, 0] {
        let (mut r, _) = Raw::connack_code(&s.mqtt, &Connect::v5("ta", &t).bytes());
        let props = [vec![0x23], alias.to_be_bytes().to_vec()].concat();
        r.send(&publish(true, TOPIC, 1, 1, false, &props, BODY));
        let got = r.until_closed(SEC);
        assert_eq!(
            got.iter().map(Packet::disconnect).collect::<Vec<_>>(),
            vec![Some(0x94)],
            "alias {alias}"
        );
    }
    // An alias with an empty topic (to use a mapping) is invalid too.
    let (mut r, _) = Raw::connack_code(&s.mqtt, &Connect::v5("ta", &t).bytes());
    r.send(&publish(true, "", 0, 0, false, &[0x23, 0, 1], BODY));
    assert_eq!(r.until_closed(SEC)[0].disconnect(), Some(0x94));
    assert_eq!(stored(&s), 0);
}

#[test]
fn publish_protocol_errors_end_the_session() {
    let s = Server::start();
    let t = token(&s);
    let cases: Vec<(&str, Vec<u8>, u8)> = vec![
        // [MQTT-3.1.0-2]: a second CONNECT.
        ("second CONNECT", Connect::v5("p", &t).bytes(), 0x82),
        // [MQTT-3.3.1-4]: both QoS bits set.
        ("QoS 3", packet(0x36, &[0, 1, b'a', 0, 1, 0]), 0x81),
        // [MQTT-3.3.4-6]: a Subscription Identifier from a client.
        (
            "subscription identifier",
            publish(true, TOPIC, 0, 0, false, &[0x0B, 0x01], BODY),
            0x82,
        ),
        // An empty topic without a Topic Alias (3.3.2.1).
        (
            "empty topic",
            publish(true, "", 0, 0, false, &[], BODY),
            0x82,
        ),
        // [MQTT-1.5.4-2]: U+0000 in the topic.
        (
            "NUL in topic",
            publish(
                true,
                "applications/app/devices/d\u{0}/state",
                0,
                0,
                false,
                &[],
                BODY,
            ),
            0x81,
        ),
        // A DISCONNECT may not set a Session Expiry when CONNECT had 0.
        (
            "session expiry at DISCONNECT",
            packet(0xE0, &[0x00, 0x05, 0x11, 0, 0, 0, 10]),
            0x82,
        ),
        // Packets a client may not send to an ingest broker.
        ("PUBREL", packet(0x62, &[0, 1]), 0x82),
    ];
    for (what, bytes, code) in cases {
        let (mut r, _) = Raw::connack_code(&s.mqtt, &Connect::v5("p", &t).bytes());
        r.send(&bytes);
        let got = r.until_closed(SEC);
        assert_eq!(
            got.iter().map(Packet::disconnect).collect::<Vec<_>>(),
            vec![Some(code)],
            "{what}"
        );
    }
    // MQTT 5 [MQTT-3.14.1-1]: DISCONNECT with reserved bits set: 0x81.
    let (mut r, _) = Raw::connack_code(&s.mqtt, &Connect::v5("p", &t).bytes());
    r.send(&packet(0xE1, &[0x00, 0x00]));
    assert_eq!(r.until_closed(SEC)[0].disconnect(), Some(0x81));
    // 3.1.1 [MQTT-3.1.0-2], [MQTT-3.3.1-4], [MQTT-4.7.3-1], [MQTT-4.7.3-2],
    // [MQTT-2.2.2-2], [MQTT-2.3.1-1], [MQTT-3.14.1-1]: closed.
    for (what, bytes) in [
        ("second CONNECT", Connect::v311("p", &t).bytes()),
        ("QoS 3", packet(0x36, &[0, 1, b'a', 0, 1])),
        ("empty topic", publish(false, "", 0, 0, false, &[], BODY)),
        (
            "NUL in topic",
            publish(
                false,
                "applications/app/devices/d\u{0}/state",
                0,
                0,
                false,
                &[],
                BODY,
            ),
        ),
        (
            "SUBSCRIBE with reserved flags 0000",
            packet(0x80, &[0, 1, 0, 1, b'a', 0]),
        ),
        (
            "QoS 1 with packet id 0",
            publish(false, TOPIC, 1, 0, false, &[], BODY),
        ),
        ("DISCONNECT with reserved bits", packet(0xE1, &[])),
    ] {
        let (mut r, _) = Raw::connack_code(&s.mqtt, &Connect::v311("p", &t).bytes());
        r.send(&bytes);
        assert!(r.until_closed(SEC).is_empty(), "{what}");
    }
    // A DISCONNECT that keeps Session Expiry 0 is a normal goodbye.
    let (mut r, _) = Raw::connack_code(&s.mqtt, &Connect::v5("p", &t).bytes());
    r.send(&packet(0xE0, &[0x00, 0x00]));
    assert!(r.until_closed(SEC).is_empty());
    assert_eq!(stored(&s), 0);
}

#[test]
fn a_topic_name_with_wildcards_names_no_device() {
    let s = Server::start();
    let t = token(&s);
    // [MQTT-3.3.2-2] / [MQTT-4.7.1-1]: wildcards are not allowed in a
    // topic name. Such a topic is not a state topic, so the publish is not
    // authorized: MQTT 5 PUBACK 0x87 (the session goes on), 3.1.1 close.
    for topic in ["applications/app/devices/+/state", "applications/app/#"] {
        let (mut r, _) = Raw::connack_code(&s.mqtt, &Connect::v5("wc", &t).bytes());
        r.send(&publish(true, topic, 1, 1, false, &[], BODY));
        assert_eq!(r.expect(SEC).puback(), Some((1, 0x87)), "{topic}");
        assert!(r.alive());
        let (mut r, _) = Raw::connack_code(&s.mqtt, &Connect::v311("wc", &t).bytes());
        r.send(&publish(false, topic, 1, 1, false, &[], BODY));
        assert!(r.until_closed(SEC).is_empty(), "{topic}");
    }
    assert_eq!(stored(&s), 0);
}

#[test]
fn keep_alive_timeout_is_disconnect_0x8d() {
    let s = Server::start();
    let t = token(&s);
    // [MQTT-3.1.2-24]: nothing for 1.5 × Keep Alive: MQTT 5 DISCONNECT
    // 0x8D, then the close (3.1.1: malformed_bytes_harm_nothing_else).
    let c = Connect {
        keep_alive: 1,
        ..Connect::v5("sleepy", &t)
    };
    let (mut r, _) = Raw::connack_code(&s.mqtt, &c.bytes());
    let started = std::time::Instant::now();
    let got = r.until_closed(SEC);
    assert_eq!(
        got.iter().map(Packet::disconnect).collect::<Vec<_>>(),
        vec![Some(0x8D)]
    );
    assert!(started.elapsed() >= Duration::from_millis(1400));
    // A client that pings in time stays.
    let (mut r, _) = Raw::connack_code(&s.mqtt, &c.bytes());
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(700));
        assert!(r.alive());
    }
}

#[test]
fn rate_limit_codes_on_the_wire() {
    let s = Server::start();
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "slow", "scope": ["device.sendState"], "rateLimit": {"perSecond": 1, "burst": 1}}),
    );
    // QoS 1 over the limit: PUBACK 0x97 "quota exceeded", the PUBACK code
    // for it (0x96 is not a PUBACK reason code, [MQTT-3.4.2-1]).
    let (mut r, _) = Raw::connack_code(&s.mqtt, &Connect::v5("rl", &t).bytes());
    r.send(&publish(true, TOPIC, 1, 1, false, &[], BODY));
    r.send(&publish(true, TOPIC, 1, 2, false, &[], BODY));
    assert_eq!(r.expect(SEC).puback(), Some((1, 0x00)));
    assert_eq!(r.expect(SEC).puback(), Some((2, 0x97)));
    // QoS 0 over the limit: DISCONNECT 0x96 "message rate too high".
    r.send(&publish(true, TOPIC, 0, 0, false, &[], BODY));
    assert_eq!(r.until_closed(SEC)[0].disconnect(), Some(0x96));
    assert_eq!(stored(&s), 1);
}
