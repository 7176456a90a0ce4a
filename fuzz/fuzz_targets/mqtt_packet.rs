//! The MQTT packet path as a session sees it: bytes from the socket →
//! version detection → CONNECT → each following packet → what the session
//! does with it (`check_publish` for PUBLISH, the replies it encodes).
//! Only the public API is used; the socket loop itself is private.
//!
//! Input: byte 0 says how the rest arrives: < 0x80 in two reads split at
//! byte0 * len / 0x80; otherwise in reads of (byte0 & 0x7f) + 1 bytes.
//! Every input is also fed in one read, and both runs must agree exactly:
//! how TCP cuts the stream must not matter.

#![no_main]

use std::sync::{Arc, OnceLock};

use bytes::BytesMut;
use bytestring::ByteString;
use libfuzzer_sys::fuzz_target;
use sluice::auth::{Devices, TokenRecord, Registry, Scope, Scopes, Status, TokenEntry};
use sluice::mqtt::{
    check_publish, Codec, Incoming, ProtoError, PublishRefusal, Refusal, SubAck, UnsubAck,
};
use sluice::secret::TokenHash;
use tokio_util::codec::Decoder;

/// The shipped defaults (config/sluice.toml).
const MAX_PACKET: u32 = 262_144;
const MAX_CONNECT: u32 = 4096;
const RECEIVE_MAX: u16 = 100;
const NOW: i64 = 1_700_000_000_000;
/// The one token's secret; the seeds use it as the CONNECT password.
const SECRET: &[u8] = b"sl_fuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzz0";

fn registry() -> &'static (Registry, Arc<TokenEntry>) {
    static R: OnceLock<(Registry, Arc<TokenEntry>)> = OnceLock::new();
    R.get_or_init(|| {
        let r = Registry::new();
        r.insert(TokenRecord {
            id: "t".into(),
            app: "app".into(),
            name: "fuzz".into(),
            scopes: Scopes::of(&[Scope::SendState]),
            devices: Devices::only(["dev1".to_string(), "dev-2".to_string()]),
            expires_at: None,
            status: Status::Active,
            parent_id: None,
            created_at: 0,
            last_used: None,
            deactivated_by: None,
            rate_limit: None,
            hash: TokenHash::of(SECRET),
        })
        .unwrap();
        let g = r.authenticate(SECRET, NOW).unwrap();
        (r, g)
    })
}

/// Everything observable about one run, for comparing runs.
#[derive(Debug, Default, PartialEq, Eq)]
struct Run {
    events: Vec<String>,
    /// Replies the session would write.
    out: Vec<u8>,
    /// `None`: waiting for more bytes; else why the connection ended.
    end: Option<String>,
    v5: Option<bool>,
}

struct Conn {
    buf: BytesMut,
    codec: Option<Codec>,
    connected: bool,
    out: BytesMut,
    run: Run,
}

impl Conn {
    fn new() -> Conn {
        Conn {
            buf: BytesMut::with_capacity(1024),
            codec: None,
            connected: false,
            out: BytesMut::new(),
            run: Run::default(),
        }
    }

    /// One read from the socket; false once the connection has ended.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        if self.run.end.is_some() {
            return false;
        }
        self.buf.extend_from_slice(bytes);
        let end = self.process();
        self.run.out.extend_from_slice(&self.out);
        self.out.clear();
        if let Some(e) = end {
            self.run.end = Some(e);
            return false;
        }
        true
    }

    /// Decodes all that is buffered; `Some` ends the connection.
    fn process(&mut self) -> Option<String> {
        let (_, grant) = registry();
        loop {
            let codec = match &mut self.codec {
                Some(c) => c,
                None => match Codec::detect(&mut self.buf, MAX_CONNECT) {
                    Ok(None) => return None,
                    Ok(Some(c)) => {
                        self.run.v5 = Some(c.is_v5());
                        self.codec.insert(c)
                    }
                    Err(ProtoError::UnsupportedVersion { level }) => {
                        // The session answers in the format `answering` picks.
                        let mut c = Codec::answering(level);
                        self.run.v5 = Some(c.is_v5());
                        c.connack_refuse(&mut self.out, Refusal::UnsupportedVersion);
                        return Some(format!("unsupported level {level}"));
                    }
                    Err(e) => return Some(format!("detect: {e}")),
                },
            };
            if !self.connected {
                let info = match codec.decode_connect(&mut self.buf) {
                    Ok(None) => return None,
                    Ok(Some(i)) => i,
                    Err(e) => {
                        // The refusals the session answers with a CONNACK.
                        let why = match e {
                            ProtoError::TooLarge => Some(Refusal::PacketTooLarge),
                            ProtoError::BadClientId => Some(Refusal::BadClientId),
                            _ => None,
                        };
                        if let Some(why) = why {
                            codec.connack_refuse(&mut self.out, why);
                        }
                        return Some(format!("connect: {e}"));
                    }
                };
                self.run.events.push(format!("CONNECT {info:?} pw={:?}", info.password));
                let auth = info
                    .password
                    .as_deref()
                    .map(|pw| registry().0.authenticate(pw, NOW).is_ok());
                self.run.events.push(format!("auth {auth:?}"));
                let assigned = info
                    .client_id
                    .is_empty()
                    .then(|| ByteString::from_static("sluice-0"));
                let expiry = (info.session_expiry > 0).then_some(0);
                codec.connack_ok(
                    &mut self.out,
                    RECEIVE_MAX,
                    MAX_PACKET,
                    assigned,
                    !info.clean_start,
                    expiry,
                    None,
                );
                codec.set_max_packet(MAX_PACKET);
                self.connected = true;
                continue;
            }
            let pkt = match codec.decode(&mut self.buf) {
                Ok(None) => return None,
                Ok(Some(p)) => p,
                Err(e) => {
                    if self.run.v5 == Some(true) {
                        codec.disconnect(&mut self.out, e.goodbye());
                    }
                    return Some(format!("decode: {e}"));
                }
            };
            match pkt {
                Incoming::Publish(p) => {
                    self.run.events.push(format!("{p:?} payload={:?}", p.payload));
                    if p.qos.value() == 2 {
                        return Some("QoS 2".into());
                    }
                    if p.qos.value() == 1 {
                        assert!(p.packet_id.is_some(), "QoS 1 publish without packet id");
                    }
                    let r = check_publish(grant, &p.topic, &p.payload, NOW);
                    match &r {
                        Ok((_, parsed)) => {
                            assert!(matches!(
                                &*p.topic,
                                "applications/app/devices/dev1/state"
                                    | "applications/app/devices/dev-2/state"
                            ));
                            assert_eq!(parsed.states.len(), 1);
                            let s = &parsed.states[0];
                            assert!(s.data.end as usize <= p.payload.len());
                        }
                        Err(PublishRefusal::NotAuthorized) => {}
                        Err(PublishRefusal::BadPayload(_)) => {
                            assert!(p.topic.starts_with("applications/app/devices/dev"));
                        }
                    }
                    self.run.events.push(format!("check {r:?}"));
                }
                Incoming::PingRequest => {
                    self.run.events.push("PINGREQ".into());
                    codec.pingresp(&mut self.out);
                }
                Incoming::Subscribe { packet_id, filters } => {
                    self.run
                        .events
                        .push(format!("SUBSCRIBE {packet_id} {}", filters.len()));
                    assert!(filters.len() as u64 <= u64::from(MAX_PACKET));
                    // Every kind of answer, so each is encoded.
                    let outcomes: Vec<SubAck> = filters
                        .iter()
                        .enumerate()
                        .map(|(i, (_, qos))| match i % 6 {
                            0 => SubAck::Granted((*qos).min(1)),
                            1 => SubAck::NotAuthorized,
                            2 => SubAck::FilterInvalid,
                            3 => SubAck::WildcardUnsupported,
                            4 => SubAck::Quota,
                            _ => SubAck::Failed,
                        })
                        .collect();
                    codec.suback(&mut self.out, packet_id, &outcomes);
                    // And a state sent back, as a subscriber gets it.
                    codec.publish_state(
                        &mut self.out,
                        Some(packet_id),
                        "app",
                        "dev1",
                        NOW as u64,
                        b"{\"x\":1}",
                        u64::from(packet_id.get()),
                    );
                }
                Incoming::Unsubscribe { packet_id, filters } => {
                    self.run
                        .events
                        .push(format!("UNSUBSCRIBE {packet_id} {}", filters.len()));
                    assert!(filters.len() as u64 <= u64::from(MAX_PACKET));
                    let outcomes: Vec<UnsubAck> = (0..filters.len())
                        .map(|i| match i % 2 {
                            0 => UnsubAck::Done,
                            _ => UnsubAck::NoSubscription,
                        })
                        .collect();
                    codec.unsuback(&mut self.out, packet_id, &outcomes);
                }
                Incoming::PubAck { packet_id } => {
                    self.run.events.push(format!("PUBACK {packet_id}"));
                }
                Incoming::Disconnect { session_expiry } => {
                    return Some(format!("DISCONNECT {session_expiry:?}"))
                }
                Incoming::Unexpected(what) => return Some(format!("unexpected {what}")),
            }
        }
    }
}

/// The replies must be well-formed packets of the connection's version.
fn check_replies(run: &Run) {
    let mut out = BytesMut::from(&run.out[..]);
    match run.v5 {
        None => assert!(out.is_empty()),
        Some(false) => {
            let mut c = rmqtt_codec::v3::Codec::new(0);
            while !out.is_empty() {
                match c.decode(&mut out) {
                    Ok(Some(_)) => {}
                    r => panic!("bad 3.1.1 reply: {r:?}"),
                }
            }
        }
        Some(true) => {
            let mut c = rmqtt_codec::v5::Codec::new(0, 0);
            while !out.is_empty() {
                match c.decode(&mut out) {
                    Ok(Some(_)) => {}
                    r => panic!("bad MQTT 5 reply: {r:?}"),
                }
            }
        }
    }
}

/// `SLUICE_FUZZ_DEBUG=1` prints each run (to check what seeds reach).
fn debug() -> bool {
    static D: OnceLock<bool> = OnceLock::new();
    *D.get_or_init(|| std::env::var_os("SLUICE_FUZZ_DEBUG").is_some())
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };

    let mut whole = Conn::new();
    whole.feed(stream);

    let mut parts = Conn::new();
    if ctl < 0x80 {
        let at = ctl as usize * stream.len() / 0x80;
        if parts.feed(&stream[..at]) {
            parts.feed(&stream[at..]);
        }
    } else {
        for chunk in stream.chunks((ctl & 0x7f) as usize + 1) {
            if !parts.feed(chunk) {
                break;
            }
        }
    }

    if debug() {
        eprintln!("{:#?}", whole.run);
    }
    check_replies(&whole.run);
    assert_eq!(whole.run, parts.run, "result depends on how the input was split");
});
