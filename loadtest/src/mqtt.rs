//! The native MQTT client: one task per connection, no per-message
//! allocation.
//!
//! CONNECT and CONNACK go through rumqttc's codec (`rumqttc::mqttbytes`),
//! which is cold code. The hot path is hand-rolled because it is tiny and
//! fixed: PUBLISH is a header, the topic, a packet id and the payload,
//! written into one reused buffer; the only packets a broker sends back to a
//! publisher are PUBACK (packet id, MQTT 5 reason), PINGRESP and DISCONNECT.
//! Unit tests check the hand-written encoding against the codec's decoder.
//!
//! Packet ids are slots of the in-flight window (`1..=window`): a slot is
//! reused only after its PUBACK, so a window of W has at most W publishes
//! outstanding and acks may arrive in any order.

use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::run::{ConnOutcome, Shared};
use crate::schedule::{ConnSchedule, Slot};
use crate::stats::Bits;
use crate::timer::Timer;

/// Stop encoding when this much is waiting to be written.
const OUT_HIGH_WATER: usize = 64 * 1024;
/// Largest packet we accept from the broker.
const MAX_INCOMING: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// `host:port`.
    pub addr: String,
    pub v5: bool,
    pub qos: u8,
    pub window: u16,
    pub username: String,
    pub client_id_prefix: String,
    pub keep_alive: Duration,
    pub timeout: Duration,
    /// TCP_NODELAY (the default; `--nagle` turns it off).
    pub nodelay: bool,
}

/// An open connection after a successful CONNACK.
pub struct Connected {
    stream: TcpStream,
    inbuf: BytesMut,
    window: usize,
}

/// Classifies a failed TCP connect.
pub fn connect_error_kind(e: &std::io::Error) -> &'static str {
    // EMFILE / ENFILE: the client's own limit, not the server's.
    if matches!(e.raw_os_error(), Some(23 | 24)) {
        return "connect_too_many_open_files_raise_ulimit_n";
    }
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect_refused",
        std::io::ErrorKind::TimedOut => "connect_timeout",
        _ => "connect_failed",
    }
}

pub fn strip_scheme(addr: &str) -> &str {
    addr.strip_prefix("mqtt://")
        .or_else(|| addr.strip_prefix("tcp://"))
        .unwrap_or(addr)
        .trim_end_matches('/')
}

/// Opens a connection, sends CONNECT and waits for a successful CONNACK.
/// The error is an error kind for the summary.
pub async fn connect(
    cfg: &MqttConfig,
    conn: u32,
    password: Option<&str>,
) -> Result<Connected, String> {
    let mut stream = match tokio::time::timeout(cfg.timeout, TcpStream::connect(&cfg.addr)).await {
        Err(_) => return Err("connect_timeout".into()),
        Ok(Err(e)) => return Err(connect_error_kind(&e).into()),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(cfg.nodelay);
    let client_id = format!("{}{}", cfg.client_id_prefix, conn);
    let keep_alive = cfg.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16;
    let mut out = BytesMut::with_capacity(128);
    let encoded = if cfg.v5 {
        use rumqttc::v5::mqttbytes::v5::{Connect, Login};
        let c = Connect {
            keep_alive,
            client_id,
            clean_start: true,
            properties: None,
        };
        let login = password.map(|p| Login::new(cfg.username.as_str(), p));
        c.write(&None, &login, &mut out).is_ok()
    } else {
        use rumqttc::mqttbytes::v4::Connect;
        let mut c = Connect::new(client_id);
        c.keep_alive = keep_alive;
        c.clean_session = true;
        if let Some(p) = password {
            c.set_login(cfg.username.as_str(), p);
        }
        c.write(&mut out).is_ok()
    };
    if !encoded {
        return Err("connect_encode".into());
    }
    let mut inbuf = BytesMut::with_capacity(4096);
    let handshake = async {
        stream
            .write_all(&out)
            .await
            .map_err(|_| "connect_failed".to_string())?;
        loop {
            if let Some(window) = read_connack(cfg, &mut inbuf)? {
                return Ok(window);
            }
            match stream.read_buf(&mut inbuf).await {
                Ok(0) | Err(_) => return Err("connack_closed".to_string()),
                Ok(_) => {}
            }
        }
    };
    match tokio::time::timeout(cfg.timeout, handshake).await {
        Err(_) => Err("connack_timeout".into()),
        Ok(Err(kind)) => Err(kind),
        Ok(Ok(window)) => Ok(Connected {
            stream,
            inbuf,
            window,
        }),
    }
}

/// `Ok(None)`: need more bytes. `Ok(Some(window))`: accepted.
fn read_connack(cfg: &MqttConfig, buf: &mut BytesMut) -> Result<Option<usize>, String> {
    let window = usize::from(cfg.window);
    if cfg.v5 {
        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet};
        use rumqttc::v5::mqttbytes::Error;
        match Packet::read(buf, Some(MAX_INCOMING as u32)) {
            Err(Error::InsufficientBytes(_)) => Ok(None),
            Err(_) => Err("connack_malformed".into()),
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                let max = ack
                    .properties
                    .and_then(|p| p.receive_max)
                    .map_or(window, usize::from);
                Ok(Some(window.min(max).max(1)))
            }
            Ok(Packet::ConnAck(ack)) => Err(format!("connack_{:?}", ack.code)),
            Ok(Packet::Disconnect(d)) => Err(format!("connect_disconnect_{:?}", d.reason_code)),
            Ok(_) => Err("connack_unexpected_packet".into()),
        }
    } else {
        use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
        use rumqttc::mqttbytes::Error;
        match Packet::read(buf, MAX_INCOMING) {
            Err(Error::InsufficientBytes(_)) => Ok(None),
            Err(_) => Err("connack_malformed".into()),
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => Ok(Some(window)),
            Ok(Packet::ConnAck(ack)) => Err(format!("connack_{:?}", ack.code)),
            Ok(_) => Err("connack_unexpected_packet".into()),
        }
    }
}

/// Appends a PUBLISH (no DUP, no RETAIN; MQTT 5 without properties).
pub fn encode_publish(
    out: &mut Vec<u8>,
    v5: bool,
    qos: u8,
    topic: &[u8],
    pkid: u16,
    payload: &[u8],
) {
    let rem = 2 + topic.len() + payload.len() + if qos > 0 { 2 } else { 0 } + usize::from(v5);
    out.push(0x30 | (qos << 1));
    let mut x = rem;
    loop {
        let mut byte = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if x == 0 {
            break;
        }
    }
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic);
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        out.push(0); // property length
    }
    out.extend_from_slice(payload);
}

/// A packet from the broker, as far as a publisher cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    PubAck { pkid: u16, reason: u8 },
    PingResp,
    Disconnect { reason: u8 },
    Other(u8),
}

/// Splits one packet off the front of `buf`; `Ok(None)` if incomplete.
pub fn decode_incoming(buf: &mut BytesMut, v5: bool) -> Result<Option<Incoming>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut rem = 0usize;
    let mut shift = 0;
    let mut hlen = 1;
    loop {
        if hlen >= buf.len() {
            return Ok(None);
        }
        let b = buf[hlen];
        rem |= usize::from(b & 0x7f) << shift;
        hlen += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err("protocol_error");
        }
    }
    if rem > MAX_INCOMING {
        return Err("protocol_error");
    }
    if buf.len() < hlen + rem {
        return Ok(None);
    }
    let typ = buf[0] >> 4;
    let body = &buf[hlen..hlen + rem];
    let packet = match typ {
        4 => {
            if rem < 2 {
                return Err("protocol_error");
            }
            let pkid = u16::from_be_bytes([body[0], body[1]]);
            let reason = if v5 && rem >= 3 { body[2] } else { 0 };
            Incoming::PubAck { pkid, reason }
        }
        13 => Incoming::PingResp,
        14 => Incoming::Disconnect {
            reason: body.first().copied().unwrap_or(0),
        },
        t => Incoming::Other(t),
    };
    buf.advance(hlen + rem);
    Ok(Some(packet))
}

struct InFlight {
    intended: Instant,
    /// When it was encoded for the socket (it goes out in the same write).
    sent: Instant,
    seq: u64,
    step: usize,
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// Sends this connection's messages on schedule until it is done, the
/// connection breaks, or an acknowledgement times out.
pub async fn run_conn(
    sh: &Shared,
    cfg: &MqttConfig,
    conn: u32,
    connected: Connected,
    mut sched: ConnSchedule,
    topics: &[Vec<u8>],
) -> ConnOutcome {
    let Connected {
        mut stream,
        mut inbuf,
        window,
    } = connected;
    let (mut rd, mut wr) = stream.split();
    let qos1 = cfg.qos == 1;
    let shard = conn as usize;
    let mut slots: Vec<Option<InFlight>> = if qos1 {
        (0..window).map(|_| None).collect()
    } else {
        Vec::new()
    };
    let mut next_slot = 0usize;
    let mut inflight = 0usize;
    // Grows up to about OUT_HIGH_WATER only when the socket falls behind, so
    // thousands of idle-ish connections stay small.
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut pos = 0usize;
    // QoS 0 messages encoded but not yet written (lost if the socket dies).
    let mut q0_unwritten = 0u64;
    let mut q0_step = 0usize;
    let mut body = Vec::with_capacity(sh.payload_size + 64);
    let mut seq = 0u64;
    let mut acked = Bits::default();
    let mut lat: Vec<u64> = Vec::with_capacity(window.max(16));
    let mut served: Vec<u64> = Vec::with_capacity(window.max(16));
    let mut lat_step = 0usize;
    let mut lags: Vec<u64> = Vec::with_capacity(64);
    let now = Instant::now();
    let mut last_ack = now;
    let mut last_write = now;
    let ka = cfg.keep_alive;
    let far = now + Duration::from_secs(86_400 * 365);
    let mut timer = Timer::new(far);
    let per_conn = topics.len() as u64;

    let end: Result<(), String> = loop {
        let now = Instant::now();
        let mut next_at = None;
        let mut done = false;
        while out.len() < OUT_HIGH_WATER {
            if qos1 && slots[next_slot].is_some() {
                break;
            }
            let (intended, step) = match sched.peek(now) {
                Slot::Done => {
                    done = true;
                    break;
                }
                Slot::At(t, _) if t > now => {
                    next_at = Some(t);
                    break;
                }
                Slot::At(t, s) => {
                    lags.push(micros(now.saturating_duration_since(t)));
                    (t, s)
                }
                Slot::Now(s) => (now, s),
            };
            sched.advance();
            sh.payload.write(&mut body, conn, seq);
            let topic = &topics[(seq % per_conn) as usize];
            if out.is_empty() {
                last_write = now;
            }
            if qos1 {
                encode_publish(&mut out, cfg.v5, 1, topic, next_slot as u16 + 1, &body);
                if inflight == 0 {
                    last_ack = now;
                }
                slots[next_slot] = Some(InFlight {
                    intended,
                    sent: now,
                    seq,
                    step,
                });
                inflight += 1;
                next_slot = (next_slot + 1) % window;
            } else {
                encode_publish(&mut out, cfg.v5, 0, topic, 0, &body);
                q0_unwritten += 1;
                q0_step = step;
            }
            sh.stats.sent(step, 1);
            seq += 1;
        }
        if !lags.is_empty() {
            sh.stats.lagged(shard, &lags);
            lags.clear();
        }
        if done && inflight == 0 && pos == out.len() {
            break Ok(());
        }
        let mut deadline = far;
        if let Some(t) = next_at {
            deadline = t;
        }
        if inflight > 0 {
            deadline = deadline.min(last_ack + sh.timeout);
        }
        if pos < out.len() {
            // A write that makes no progress for this long is a dead peer.
            deadline = deadline.min(last_write + sh.timeout);
        } else if !ka.is_zero() {
            if now >= last_write + ka {
                out.extend_from_slice(&[0xC0, 0x00]); // PINGREQ
                last_write = now;
                continue;
            }
            deadline = deadline.min(last_write + ka);
        }
        timer.reset(deadline);
        tokio::select! {
            biased;
            r = rd.read_buf(&mut inbuf) => {
                match r {
                    Ok(0) => break Err("disconnected".into()),
                    Err(_) => break Err("disconnected".into()),
                    Ok(_) => {}
                }
                let now = Instant::now();
                let mut failure = None;
                loop {
                    match decode_incoming(&mut inbuf, cfg.v5) {
                        Ok(None) => break,
                        Err(kind) => {
                            failure = Some(kind.to_string());
                            break;
                        }
                        Ok(Some(Incoming::PubAck { pkid, reason })) => {
                            let slot = usize::from(pkid).checked_sub(1).and_then(|i| slots.get_mut(i));
                            let Some(f) = slot.and_then(Option::take) else {
                                failure = Some("protocol_unexpected_puback".into());
                                break;
                            };
                            inflight -= 1;
                            last_ack = now;
                            if reason < 0x80 {
                                if f.step != lat_step && !lat.is_empty() {
                                    sh.stats.acked(lat_step, shard, &lat);
                                    lat.clear();
                                }
                                lat_step = f.step;
                                lat.push(micros(now.saturating_duration_since(f.intended)));
                                served.push(micros(now.saturating_duration_since(f.sent)));
                                acked.set(f.seq);
                            } else {
                                sh.stats.failed(f.step, &format!("puback_0x{reason:02x}"), 1);
                            }
                        }
                        Ok(Some(Incoming::PingResp)) => {}
                        Ok(Some(Incoming::Disconnect { reason })) => {
                            failure = Some(format!("server_disconnect_0x{reason:02x}"));
                            break;
                        }
                        Ok(Some(Incoming::Other(t))) => {
                            failure = Some(format!("protocol_unexpected_packet_type_{t}"));
                            break;
                        }
                    }
                }
                if !lat.is_empty() {
                    sh.stats.acked(lat_step, shard, &lat);
                    lat.clear();
                }
                if !served.is_empty() {
                    sh.stats.served(shard, &served);
                    served.clear();
                }
                if let Some(kind) = failure {
                    break Err(kind);
                }
            }
            r = wr.write(&out[pos..]), if pos < out.len() => {
                match r {
                    Ok(0) | Err(_) => break Err("disconnected".into()),
                    Ok(n) => {
                        pos += n;
                        last_write = Instant::now();
                        if pos == out.len() {
                            out.clear();
                            pos = 0;
                            q0_unwritten = 0;
                        }
                    }
                }
            }
            () = timer.wait() => {
                let now = Instant::now();
                if inflight > 0 && now >= last_ack + sh.timeout {
                    break Err("ack_timeout".into());
                }
                if pos < out.len() && now >= last_write + sh.timeout {
                    break Err("write_timeout".into());
                }
            }
        }
    };

    match end {
        Ok(()) => {
            // Polite goodbye; the broker has acknowledged everything already.
            let bye = async {
                let _ = wr.write_all(&[0xE0, 0x00]).await;
                let _ = wr.shutdown().await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
        }
        Err(kind) => {
            // One event for the connection, plus every message it took down.
            let lost_kind = if kind == "ack_timeout" {
                "ack_timeout"
            } else {
                sh.stats.error(&kind, 1);
                "lost_in_flight"
            };
            for f in slots.iter_mut().filter_map(Option::take) {
                sh.stats.failed(f.step, lost_kind, 1);
            }
            sh.stats.failed(q0_step, "lost_unwritten", q0_unwritten);
        }
    }
    ConnOutcome {
        conn,
        seqs: seq,
        acked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_encoding_matches_the_codec() {
        let payload = vec![b'x'; 300]; // two-byte remaining length
        for (v5, qos) in [(false, 0), (false, 1), (true, 0), (true, 1)] {
            let mut out = Vec::new();
            encode_publish(
                &mut out,
                v5,
                qos,
                b"applications/a/devices/d/state",
                77,
                &payload,
            );
            let mut buf = BytesMut::from(&out[..]);
            if v5 {
                use rumqttc::v5::mqttbytes::v5::Packet;
                let Packet::Publish(p) = Packet::read(&mut buf, None).unwrap() else {
                    panic!()
                };
                assert_eq!(&p.topic[..], b"applications/a/devices/d/state");
                assert_eq!(p.payload, payload);
                assert_eq!(p.qos as u8, qos);
                assert_eq!(p.pkid, if qos == 1 { 77 } else { 0 });
            } else {
                use rumqttc::mqttbytes::v4::Packet;
                let Packet::Publish(p) = Packet::read(&mut buf, 1 << 20).unwrap() else {
                    panic!()
                };
                assert_eq!(p.topic, "applications/a/devices/d/state");
                assert_eq!(p.payload, payload);
                assert_eq!(p.qos as u8, qos);
                assert_eq!(p.pkid, if qos == 1 { 77 } else { 0 });
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn decodes_what_a_broker_sends() {
        let mut buf = BytesMut::new();
        // v5 PUBACK success (short form), PUBACK 0x87, PINGRESP, DISCONNECT 0x8e,
        // then half a PUBACK.
        buf.extend_from_slice(&[0x40, 0x02, 0x00, 0x05]);
        buf.extend_from_slice(&[0x40, 0x04, 0x01, 0x00, 0x87, 0x00]);
        buf.extend_from_slice(&[0xD0, 0x00]);
        buf.extend_from_slice(&[0xE0, 0x01, 0x8E]);
        buf.extend_from_slice(&[0x40, 0x02, 0x00]);
        let mut got = Vec::new();
        while let Some(p) = decode_incoming(&mut buf, true).unwrap() {
            got.push(p);
        }
        assert_eq!(
            got,
            [
                Incoming::PubAck { pkid: 5, reason: 0 },
                Incoming::PubAck {
                    pkid: 256,
                    reason: 0x87
                },
                Incoming::PingResp,
                Incoming::Disconnect { reason: 0x8E },
            ]
        );
        assert_eq!(buf.len(), 3);
        buf.extend_from_slice(&[0x09]);
        assert_eq!(
            decode_incoming(&mut buf, false).unwrap(),
            Some(Incoming::PubAck { pkid: 9, reason: 0 })
        );
        let mut bad = BytesMut::from(&[0x40, 0xff, 0xff, 0xff, 0xff, 0x01][..]);
        assert!(decode_incoming(&mut bad, false).is_err());
    }

    #[test]
    fn codec_connack_is_understood() {
        let cfg = MqttConfig {
            addr: String::new(),
            v5: true,
            qos: 1,
            window: 100,
            username: "u".into(),
            client_id_prefix: "c".into(),
            keep_alive: Duration::from_secs(30),
            timeout: Duration::from_secs(1),
            nodelay: true,
        };
        // CONNACK: flags 0, reason 0, properties: Receive Maximum 20.
        let mut buf = BytesMut::from(&[0x20, 0x06, 0x00, 0x00, 0x03, 0x21, 0x00, 0x14][..]);
        let mut half = buf.split_to(3);
        assert_eq!(read_connack(&cfg, &mut half).unwrap(), None);
        half.unsplit(buf);
        assert_eq!(read_connack(&cfg, &mut half).unwrap(), Some(20));
        let mut buf = BytesMut::from(&[0x20, 0x03, 0x00, 0x87, 0x00][..]);
        assert_eq!(
            read_connack(&cfg, &mut buf).unwrap_err(),
            "connack_NotAuthorized"
        );
    }
}
