//! The MQTT codec, wrapped: framing and the packet size limit, version
//! detection, decoding into the few packets an ingest broker acts on, the
//! protocol rules the codec leaves to its user, and the encoding of the
//! replies for 3.1.1 and 5. This is the only file that knows `rmqtt-codec`.
//!
//! Framing is done here rather than by the codec for two reasons: the
//! MQTT 5 Maximum Packet Size counts the whole packet (fixed header
//! included) while the codec compares only the remaining length, and a
//! packet over the limit must be refused from its first bytes, before any
//! of it is buffered.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::error::DecodeError;
use rmqtt_codec::types::QoS;
use rmqtt_codec::{v3, v5};
use tokio_util::codec::{Decoder, Encoder};

pub use rmqtt_codec::types::Publish;

/// Why decoding failed, reduced to what the session acts on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("packet larger than the maximum packet size")]
    TooLarge,
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// A CONNECT of MQTT for a protocol level Sluice does not speak; it is
    /// answered in the CONNACK format [`Codec::answering`] picks.
    #[error("unsupported protocol level {level}")]
    UnsupportedVersion { level: u8 },
    /// 3.1.1: an empty client id without CleanSession.
    #[error("empty client id without a clean session")]
    BadClientId,
    /// A well-formed packet that breaks a rule of the protocol; MQTT 5
    /// names the reason in the DISCONNECT.
    #[error("protocol violation ({0:?})")]
    Violation(Goodbye),
}

impl ProtoError {
    /// The DISCONNECT reason that reports this error to an MQTT 5 client.
    pub fn goodbye(&self) -> Goodbye {
        match self {
            ProtoError::TooLarge => Goodbye::PacketTooLarge,
            ProtoError::Malformed(_) => Goodbye::Malformed,
            ProtoError::Violation(g) => *g,
            ProtoError::UnsupportedVersion { .. } | ProtoError::BadClientId => {
                Goodbye::ProtocolError
            }
        }
    }
}

impl From<DecodeError> for ProtoError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::MaxSizeExceeded { .. } => ProtoError::TooLarge,
            DecodeError::InvalidClientId => ProtoError::BadClientId,
            other => ProtoError::Malformed(other.to_string()),
        }
    }
}

/// The CONNECT fields Sluice uses.
pub struct ConnectInfo {
    pub client_id: ByteString,
    pub password: Option<Bytes>,
    pub keep_alive: u16,
    /// MQTT 5 session expiry the client asked for (0 for 3.1.1).
    pub session_expiry: u32,
    pub will: Option<Will>,
    /// MQTT 5: the client asked for enhanced authentication, which Sluice
    /// does not offer.
    pub auth_method: bool,
    /// MQTT 5: the largest packet the client accepts.
    pub max_packet_size: Option<NonZeroU32>,
    /// CleanSession (3.1.1) / Clean Start (5): discard any stored session.
    pub clean_start: bool,
    /// MQTT 5: QoS 1 publishes the client accepts in flight (65535 when it
    /// says nothing, as the spec defines; 3.1.1 has no such limit).
    pub receive_max: u16,
    /// Whether the CONNECT was MQTT 5.
    pub v5: bool,
}

impl ConnectInfo {
    /// The MQTT 5 Session Expiry Interval (`None` for 3.1.1, which has
    /// none).
    pub fn session_expiry_v5(&self) -> Option<u32> {
        self.v5.then_some(self.session_expiry)
    }
}

/// What a CONNECT says about its Will message (which Sluice never
/// publishes: nothing subscribes to an ingest broker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Will {
    pub qos: u8,
    pub retain: bool,
}

impl std::fmt::Debug for ConnectInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is a token secret: never printed.
        f.debug_struct("ConnectInfo")
            .field("client_id", &self.client_id)
            .field("keep_alive", &self.keep_alive)
            .field("session_expiry", &self.session_expiry)
            .field("will", &self.will)
            .field("auth_method", &self.auth_method)
            .field("max_packet_size", &self.max_packet_size)
            .field("clean_start", &self.clean_start)
            .field("receive_max", &self.receive_max)
            .finish_non_exhaustive()
    }
}

/// Packets after CONNECT, reduced to what the session handles.
#[derive(Debug)]
pub enum Incoming {
    Publish(Box<Publish>),
    Subscribe {
        packet_id: NonZeroU16,
        /// Each topic filter and the QoS asked for it.
        filters: Vec<(ByteString, u8)>,
    },
    Unsubscribe {
        packet_id: NonZeroU16,
        filters: Vec<ByteString>,
    },
    /// The client acknowledges a QoS 1 PUBLISH the server sent.
    PubAck {
        packet_id: NonZeroU16,
    },
    PingRequest,
    /// MQTT 5 may carry a new session expiry (always `None` for 3.1.1).
    Disconnect {
        session_expiry: Option<u32>,
    },
    /// A packet a client may not send here (PUBREC, PUBREL, PUBCOMP: the
    /// server never sends QoS 2; AUTH, a second CONNECT, …): a protocol
    /// error.
    Unexpected(&'static str),
}

/// CONNACK refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 3.1.1 code 5 / 5.0 reason 0x87.
    NotAuthorized,
    /// 3.1.1 code 3 / 5.0 reason 0x89.
    ServerBusy,
    /// 3.1.1 code 2 / 5.0 reason 0x85.
    BadClientId,
    /// 3.1.1 code 3 / 5.0 reason 0x9F.
    RateLimited,
    /// 3.1.1 code 1 / 5.0 reason 0x84.
    UnsupportedVersion,
    /// 5.0 reason 0x95; 3.1.1 has no code for it (no CONNACK, close).
    PacketTooLarge,
    /// 5.0 reason 0x9B: a Will QoS above the Maximum QoS.
    QosNotSupported,
    /// 5.0 reason 0x9A: a retained Will, and retain is not available.
    RetainNotSupported,
    /// 5.0 reason 0x8C: enhanced authentication is not offered.
    BadAuthMethod,
    /// 3.1.1 code 3 / 5.0 reason 0x88: cluster mode, and this broker's
    /// view of the cluster's tokens is stale.
    Unavailable,
}

/// PUBACK outcomes (only MQTT 5 can say anything but success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckReason {
    Success,
    /// 0x87
    NotAuthorized,
    /// 0x99
    PayloadInvalid,
    /// 0x97, the PUBACK code for a rate limit: "message rate too high"
    /// (0x96) exists only for DISCONNECT ([MQTT-3.4.2-1]).
    QuotaExceeded,
    /// 0x80: accepted but not stored (storage failed or shutting down).
    Failed,
    /// Cluster mode: whether the ingest stream stored it is unknown. No
    /// PUBACK is sent; the connection closes and the client resends the
    /// publish (at least once: it may then be stored twice, never lost).
    Unconfirmed,
}

/// The answer to one topic filter of a SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubAck {
    /// Subscribed with this maximum QoS (0 or 1).
    Granted(u8),
    /// 0x87: the token may not read what the filter names.
    NotAuthorized,
    /// 0x8F: a well-formed filter this server does not serve.
    FilterInvalid,
    /// 0xA2: a wildcard other than `+` for the device.
    WildcardUnsupported,
    /// 0x97: over a subscription or session limit.
    Quota,
    /// 0x80: the session could not be stored, or this broker keeps no
    /// log to deliver from (cluster mode, ingest-only).
    Failed,
}

/// The answer to one topic filter of an UNSUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsubAck {
    Done,
    NoSubscription,
}

/// DISCONNECT reasons sent by the server (MQTT 5 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goodbye {
    NotAuthorized,
    PayloadInvalid,
    /// 0x96, "message rate too high": over the token's rate limit.
    RateTooHigh,
    QosNotSupported,
    ProtocolError,
    Malformed,
    PacketTooLarge,
    TopicAliasInvalid,
    RetainNotSupported,
    ShuttingDown,
    TakenOver,
    KeepAliveTimeout,
    /// 0xA1: a SUBSCRIBE with a Subscription Identifier.
    SubscriptionIdsUnsupported,
    /// 0x89, "server busy": cluster mode, and this broker's view of the
    /// cluster's tokens is stale (0x88 "server unavailable" exists only
    /// for CONNACK).
    Unavailable,
}

impl Goodbye {
    fn code(self) -> v5::DisconnectReasonCode {
        use v5::DisconnectReasonCode as C;
        match self {
            Goodbye::NotAuthorized => C::NotAuthorized,
            Goodbye::PayloadInvalid => C::PayloadFormatInvalid,
            Goodbye::RateTooHigh => C::MessageRateTooHigh,
            Goodbye::QosNotSupported => C::QosNotSupported,
            Goodbye::ProtocolError => C::ProtocolError,
            Goodbye::Malformed => C::MalformedPacket,
            Goodbye::PacketTooLarge => C::PacketTooLarge,
            Goodbye::TopicAliasInvalid => C::TopicAliasInvalid,
            Goodbye::RetainNotSupported => C::RetainNotSupported,
            Goodbye::ShuttingDown => C::ServerShuttingDown,
            Goodbye::TakenOver => C::SessionTakenOver,
            Goodbye::KeepAliveTimeout => C::KeepAliveTimeout,
            Goodbye::SubscriptionIdsUnsupported => C::SubscriptionIdentifiersNotSupported,
            Goodbye::Unavailable => C::ServerBusy,
        }
    }
}

const CONNECT: u8 = 0x10;
const USER_PROPERTY: u8 = 0x26;
const TOPIC_HEAD: &[u8] = b"applications/";
const TOPIC_MID: &[u8] = b"/devices/";
const TOPIC_TAIL: &[u8] = b"/state";
const PAYLOAD_HEAD: &[u8] = b"{\"time\":";
const PAYLOAD_MID: &[u8] = b",\"data\":";
const PUBLISH_MIN: u8 = 0x30;
const PUBLISH_MAX: u8 = 0x3F;

/// The fixed header's length and the whole packet's length, once the
/// fixed header at the start of `buf` is complete.
fn frame(buf: &[u8]) -> Result<Option<(usize, usize)>, ProtoError> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let header = 2 + i;
            return Ok(Some((header, header + remaining)));
        }
    }
    Err(ProtoError::Malformed(
        "remaining length longer than 4 bytes".into(),
    ))
}

/// A connection's codec once the protocol version is known.
pub struct Codec {
    kind: Kind,
    /// Largest packet accepted, whole packet counted: the CONNECT limit
    /// (`mqtt.max_connect_bytes`) until the CONNECT is decoded, then
    /// `mqtt.max_packet_bytes`.
    max_packet: usize,
}

enum Kind {
    V3(v3::Codec),
    V5(v5::Codec),
}

impl Codec {
    /// Detects the version from the first bytes of a CONNECT, without
    /// consuming them. `Ok(None)`: need more bytes. `max_packet` bounds the
    /// CONNECT (see [`Codec::decode_connect`]).
    pub fn detect(buf: &mut BytesMut, max_packet: u32) -> Result<Option<Codec>, ProtoError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        if first != CONNECT {
            return Err(ProtoError::Malformed("first packet is not CONNECT".into()));
        }
        let Some((header, _)) = frame(buf)? else {
            return Ok(None);
        };
        let Some(len) = buf.get(header..header + 2) else {
            return Ok(None);
        };
        let name_len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if name_len != 4 && name_len != 6 {
            return Err(ProtoError::Malformed("protocol name is not MQTT".into()));
        }
        let name_at = header + 2;
        let Some(&level) = buf.get(name_at + name_len) else {
            return Ok(None);
        };
        let v5 = match (&buf[name_at..name_at + name_len], level) {
            (b"MQTT", 4) | (b"MQIsdp", 3) => false,
            (b"MQTT", 5) => true,
            (b"MQTT", _) | (b"MQIsdp", _) => return Err(ProtoError::UnsupportedVersion { level }),
            _ => return Err(ProtoError::Malformed("protocol name is not MQTT".into())),
        };
        let kind = match v5 {
            // The codecs' own limits are off: `frame` enforces ours.
            false => Kind::V3(v3::Codec::new(0)),
            true => Kind::V5(v5::Codec::new(0, 0)),
        };
        Ok(Some(Codec {
            kind,
            max_packet: max_packet as usize,
        }))
    }

    /// A codec that can only refuse a CONNECT of an unsupported protocol
    /// `level`: a level above 5 is answered the MQTT 5 way (0x84), any
    /// other the 3.1.1 way (code 1), as each of the two specs asks.
    pub fn answering(level: u8) -> Codec {
        let kind = match level > 5 {
            true => Kind::V5(v5::Codec::new(0, 0)),
            false => Kind::V3(v3::Codec::new(0)),
        };
        Codec {
            kind,
            max_packet: 0,
        }
    }

    pub fn is_v5(&self) -> bool {
        matches!(self.kind, Kind::V5(_))
    }

    /// Sets the largest packet accepted from now on.
    pub fn set_max_packet(&mut self, max: u32) {
        self.max_packet = max as usize;
    }

    /// Whether a whole packet is buffered. A packet over the limit is
    /// refused as soon as its fixed header is in; otherwise the buffer is
    /// grown to hold exactly the packet.
    fn complete(&self, buf: &mut BytesMut) -> Result<Option<(usize, usize)>, ProtoError> {
        let Some((header, total)) = frame(buf)? else {
            return Ok(None);
        };
        if total > self.max_packet {
            return Err(ProtoError::TooLarge);
        }
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        Ok(Some((header, total)))
    }

    /// Decodes the CONNECT packet. Anything else first is malformed.
    pub fn decode_connect(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<ConnectInfo>, ProtoError> {
        let Some((header, total)) = self.complete(buf)? else {
            return Ok(None);
        };
        if buf[0] != CONNECT {
            return Err(ProtoError::Malformed("first packet is not CONNECT".into()));
        }
        // Protocol name length (checked by `detect`), name, level, flags.
        let too_short = || ProtoError::Malformed("CONNECT too short".into());
        let packet = &buf[..total];
        let name_len = packet
            .get(header..header + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
            .ok_or_else(too_short)?;
        let flags_at = header + 2 + name_len + 1;
        let flags = *packet.get(flags_at).ok_or_else(too_short)?;
        // [MQTT-3.1.2-11/13/15]: no Will QoS or Will Retain without a Will.
        if flags & 0x04 == 0 && flags & 0x38 != 0 {
            return Err(ProtoError::Malformed(
                "will QoS or retain without a will".into(),
            ));
        }
        match &mut self.kind {
            Kind::V3(c) => {
                // [MQTT-3.1.2-22]: a password needs a user name in 3.1.1.
                if flags & 0x40 != 0 && flags & 0x80 == 0 {
                    return Err(ProtoError::Malformed("password without user name".into()));
                }
                let Some((v3::Packet::Connect(c), _)) = c.decode(buf)? else {
                    return Err(ProtoError::Malformed("first packet is not CONNECT".into()));
                };
                no_nul(&c.client_id)?;
                Ok(Some(ConnectInfo {
                    will: c.last_will.as_ref().map(|w| Will {
                        qos: w.qos.value(),
                        retain: w.retain,
                    }),
                    clean_start: c.clean_session,
                    client_id: c.client_id,
                    password: c.password,
                    keep_alive: c.keep_alive,
                    session_expiry: 0,
                    auth_method: false,
                    max_packet_size: None,
                    receive_max: u16::MAX,
                    v5: false,
                }))
            }
            Kind::V5(codec) => {
                // The codec refuses an empty client id with Clean Start 0,
                // which MQTT 5 allows ([MQTT-3.1.3-6]; such a client gets a
                // new id, so there is no session to resume anyway): the bit
                // is read, then set before decoding.
                let clean_start = flags & 0x02 != 0;
                buf[flags_at] |= 0x02;
                let Some((v5::Packet::Connect(c), _)) = codec.decode(buf)? else {
                    return Err(ProtoError::Malformed("first packet is not CONNECT".into()));
                };
                no_nul(&c.client_id)?;
                if let Some(max) = c.max_packet_size {
                    codec.set_max_outbound_size(max.get());
                }
                Ok(Some(ConnectInfo {
                    will: c.last_will.as_ref().map(|w| Will {
                        qos: w.qos.value(),
                        retain: w.retain,
                    }),
                    auth_method: c.auth_method.is_some(),
                    client_id: c.client_id,
                    password: c.password,
                    keep_alive: c.keep_alive,
                    session_expiry: c.session_expiry_interval_secs,
                    max_packet_size: c.max_packet_size,
                    clean_start,
                    receive_max: c.receive_max.map_or(u16::MAX, NonZeroU16::get),
                    v5: true,
                }))
            }
        }
    }

    /// Decodes the next packet after CONNECT. `Ok(None)`: need more bytes.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, ProtoError> {
        let Some((header, total)) = self.complete(buf)? else {
            return Ok(None);
        };
        let first = buf[0];
        match &mut self.kind {
            Kind::V3(c) => {
                let Some((p, _)) = c.decode(buf)? else {
                    return Err(ProtoError::Malformed("incomplete packet".into()));
                };
                Ok(Some(match p {
                    v3::Packet::Publish(p) => {
                        no_nul(&p.topic)?;
                        Incoming::Publish(p)
                    }
                    v3::Packet::Subscribe {
                        packet_id,
                        topic_filters,
                    } => Incoming::Subscribe {
                        packet_id,
                        filters: topic_filters
                            .into_iter()
                            .map(|(f, q)| (f, q.value()))
                            .collect(),
                    },
                    v3::Packet::Unsubscribe {
                        packet_id,
                        topic_filters,
                    } => Incoming::Unsubscribe {
                        packet_id,
                        filters: topic_filters,
                    },
                    v3::Packet::PublishAck { packet_id } => Incoming::PubAck { packet_id },
                    v3::Packet::PingRequest => Incoming::PingRequest,
                    v3::Packet::Disconnect => Incoming::Disconnect {
                        session_expiry: None,
                    },
                    other => Incoming::Unexpected(v3_name(&other)),
                }))
            }
            Kind::V5(c) => {
                // Sluice's Topic Alias Maximum is 0, so any Topic Alias is
                // invalid (0 included, which the codec would only call
                // malformed): [MQTT-3.2.2-17/18], 0x94.
                if (PUBLISH_MIN..=PUBLISH_MAX).contains(&first)
                    && has_topic_alias(&buf[header..total], first)
                {
                    return Err(ProtoError::Violation(Goodbye::TopicAliasInvalid));
                }
                let Some((p, _)) = c.decode(buf)? else {
                    return Err(ProtoError::Malformed("incomplete packet".into()));
                };
                Ok(Some(match p {
                    v5::Packet::Publish(p) => {
                        check_v5_publish(&p)?;
                        Incoming::Publish(p)
                    }
                    v5::Packet::Subscribe(s) => {
                        // CONNACK said Subscription Identifiers Available 0
                        // ([MQTT-3.8.2.1.2]): 0xA1.
                        if s.id.is_some() {
                            return Err(ProtoError::Violation(Goodbye::SubscriptionIdsUnsupported));
                        }
                        Incoming::Subscribe {
                            packet_id: s.packet_id,
                            filters: s
                                .topic_filters
                                .into_iter()
                                .map(|(f, o)| (f, o.qos.value()))
                                .collect(),
                        }
                    }
                    v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
                        packet_id: u.packet_id,
                        filters: u.topic_filters,
                    },
                    v5::Packet::PublishAck(a) => Incoming::PubAck {
                        packet_id: a.packet_id,
                    },
                    v5::Packet::PingRequest => Incoming::PingRequest,
                    v5::Packet::Disconnect(d) => Incoming::Disconnect {
                        session_expiry: d.session_expiry_interval_secs,
                    },
                    other => Incoming::Unexpected(v5_name(&other)),
                }))
            }
        }
    }

    /// CONNACK accepting the connection. `session_present`: a stored
    /// session was resumed. `expiry`: for MQTT 5, the session expiry the
    /// server grants when it is less than the client asked for.
    /// `reason`: an MQTT 5 reason string (e.g. a resumed position that
    /// aged out).
    #[allow(clippy::too_many_arguments)]
    pub fn connack_ok(
        &mut self,
        out: &mut BytesMut,
        receive_max: u16,
        max_packet: u32,
        assigned_id: Option<ByteString>,
        session_present: bool,
        expiry: Option<u32>,
        reason: Option<&'static str>,
    ) {
        match &mut self.kind {
            Kind::V3(c) => enc3(
                c,
                out,
                v3::Packet::ConnectAck(v3::ConnectAck {
                    return_code: v3::ConnectAckReason::ConnectionAccepted,
                    session_present,
                }),
            ),
            Kind::V5(c) => {
                let ack = v5::ConnectAck {
                    session_present,
                    session_expiry_interval_secs: expiry,
                    receive_max: NonZeroU16::new(receive_max).unwrap_or(NonZeroU16::MIN),
                    max_qos: QoS::AtLeastOnce,
                    max_packet_size: Some(max_packet),
                    assigned_client_id: assigned_id,
                    topic_alias_max: 0,
                    retain_available: false,
                    // `+` (for the device) is served; other wildcards are
                    // refused per filter with 0xA2.
                    wildcard_subscription_available: true,
                    subscription_identifiers_available: false,
                    shared_subscription_available: true,
                    reason_string: reason.map(ByteString::from_static),
                    ..v5::ConnectAck::default()
                };
                enc5(c, out, v5::Packet::ConnectAck(Box::new(ack)))
            }
        }
    }

    /// CONNACK refusing the connection. A refusal 3.1.1 has no code for
    /// writes nothing: the caller closes without a CONNACK
    /// ([MQTT-3.2.2-6]).
    pub fn connack_refuse(&mut self, out: &mut BytesMut, why: Refusal) {
        match &mut self.kind {
            Kind::V3(c) => {
                use v3::ConnectAckReason as R;
                let code = match why {
                    Refusal::NotAuthorized => R::NotAuthorized,
                    Refusal::ServerBusy | Refusal::RateLimited | Refusal::Unavailable => {
                        R::ServiceUnavailable
                    }
                    Refusal::BadClientId => R::IdentifierRejected,
                    Refusal::UnsupportedVersion => R::UnacceptableProtocolVersion,
                    Refusal::PacketTooLarge
                    | Refusal::QosNotSupported
                    | Refusal::RetainNotSupported
                    | Refusal::BadAuthMethod => return,
                };
                let ack = v3::ConnectAck {
                    return_code: code,
                    session_present: false,
                };
                enc3(c, out, v3::Packet::ConnectAck(ack))
            }
            Kind::V5(c) => {
                use v5::ConnectAckReason as R;
                let ack = v5::ConnectAck {
                    reason_code: match why {
                        Refusal::NotAuthorized => R::NotAuthorized,
                        Refusal::ServerBusy => R::ServerBusy,
                        Refusal::BadClientId => R::ClientIdentifierNotValid,
                        Refusal::RateLimited => R::ConnectionRateExceeded,
                        Refusal::UnsupportedVersion => R::UnsupportedProtocolVersion,
                        Refusal::PacketTooLarge => R::PacketTooLarge,
                        Refusal::QosNotSupported => R::QosNotSupported,
                        Refusal::RetainNotSupported => R::RetainNotSupported,
                        Refusal::BadAuthMethod => R::BadAuthenticationMethod,
                        Refusal::Unavailable => R::ServerUnavailable,
                    },
                    ..v5::ConnectAck::default()
                };
                enc5(c, out, v5::Packet::ConnectAck(Box::new(ack)))
            }
        }
    }

    /// PUBACK. For 3.1.1 only success can be written; callers close the
    /// connection for anything else.
    pub fn puback(&mut self, out: &mut BytesMut, packet_id: NonZeroU16, why: AckReason) {
        match &mut self.kind {
            Kind::V3(c) => enc3(c, out, v3::Packet::PublishAck { packet_id }),
            Kind::V5(c) => {
                use v5::PublishAckReason as R;
                let ack = v5::PublishAck {
                    packet_id,
                    reason_code: match why {
                        AckReason::Success => R::Success,
                        AckReason::NotAuthorized => R::NotAuthorized,
                        AckReason::PayloadInvalid => R::PayloadFormatInvalid,
                        AckReason::QuotaExceeded => R::QuotaExceeded,
                        // `Unconfirmed` is never sent (see `mqtt::acks`).
                        AckReason::Failed | AckReason::Unconfirmed => R::UnspecifiedError,
                    },
                    properties: Vec::new(),
                    reason_string: None,
                };
                enc5(c, out, v5::Packet::PublishAck(ack))
            }
        }
    }

    /// Server DISCONNECT; 3.1.1 has none (the caller just closes).
    pub fn disconnect(&mut self, out: &mut BytesMut, why: Goodbye) {
        if let Kind::V5(c) = &mut self.kind {
            let d = v5::Disconnect {
                reason_code: why.code(),
                session_expiry_interval_secs: None,
                server_reference: None,
                reason_string: None,
                user_properties: Vec::new(),
            };
            enc5(c, out, v5::Packet::Disconnect(d));
        }
    }

    /// SUBACK with one outcome per filter. 3.1.1 has one failure code
    /// (0x80) for every refusal.
    pub fn suback(&mut self, out: &mut BytesMut, packet_id: NonZeroU16, outcomes: &[SubAck]) {
        match &mut self.kind {
            Kind::V3(c) => enc3(
                c,
                out,
                v3::Packet::SubscribeAck {
                    packet_id,
                    status: outcomes
                        .iter()
                        .map(|o| match o {
                            SubAck::Granted(0) => v3::SubscribeReturnCode::Success(QoS::AtMostOnce),
                            SubAck::Granted(_) => {
                                v3::SubscribeReturnCode::Success(QoS::AtLeastOnce)
                            }
                            _ => v3::SubscribeReturnCode::Failure,
                        })
                        .collect(),
                },
            ),
            // The codec sizes a SUBACK with `limit - 2 - filters`, which
            // underflows when the client's Maximum Packet Size cannot hold
            // one reason code per filter; such a SUBACK is dropped here like
            // any reply too large for the client (see `enc5`).
            Kind::V5(c)
                if c.max_outbound_size() != 0
                    && outcomes.len() + 2 > c.max_outbound_size() as usize =>
            {
                tracing::debug!(
                    filters = outcomes.len(),
                    "MQTT 5 SUBACK larger than the client accepts"
                );
            }
            Kind::V5(c) => {
                use v5::SubscribeAckReason as R;
                let status = outcomes
                    .iter()
                    .map(|o| match o {
                        SubAck::Granted(0) => R::GrantedQos0,
                        SubAck::Granted(_) => R::GrantedQos1,
                        SubAck::NotAuthorized => R::NotAuthorized,
                        SubAck::FilterInvalid => R::TopicFilterInvalid,
                        SubAck::WildcardUnsupported => R::WildcardSubscriptionsNotSupported,
                        SubAck::Quota => R::QuotaExceeded,
                        SubAck::Failed => R::UnspecifiedError,
                    })
                    .collect();
                enc5(
                    c,
                    out,
                    v5::Packet::SubscribeAck(v5::SubscribeAck {
                        packet_id,
                        properties: Vec::new(),
                        reason_string: None,
                        status,
                    }),
                )
            }
        }
    }

    /// UNSUBACK with one outcome per filter (MQTT 5; 3.1.1 has none).
    pub fn unsuback(&mut self, out: &mut BytesMut, packet_id: NonZeroU16, outcomes: &[UnsubAck]) {
        match &mut self.kind {
            Kind::V3(c) => enc3(c, out, v3::Packet::UnsubscribeAck { packet_id }),
            Kind::V5(c) => enc5(
                c,
                out,
                v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
                    packet_id,
                    properties: Vec::new(),
                    reason_string: None,
                    status: outcomes
                        .iter()
                        .map(|o| match o {
                            UnsubAck::Done => v5::UnsubscribeAckReason::Success,
                            UnsubAck::NoSubscription => {
                                v5::UnsubscribeAckReason::NoSubscriptionExisted
                            }
                        })
                        .collect(),
                }),
            ),
        }
    }

    /// Encodes a PUBLISH of one stored state to a subscriber, written
    /// directly (no packet struct, no allocation): topic
    /// `applications/{app}/devices/{device}/state`, payload
    /// `{"time":<epoch ms>,"data":<data as stored>}`, QoS 1 when
    /// `packet_id` is given, and for MQTT 5 a user property `position`
    /// with the state's position. Returns false, writing nothing, when the
    /// packet is larger than the client's Maximum Packet Size (MQTT 5: the
    /// server must not send it, [MQTT-3.1.2-25]).
    #[allow(clippy::too_many_arguments)]
    pub fn publish_state(
        &self,
        out: &mut BytesMut,
        packet_id: Option<NonZeroU16>,
        app: &str,
        device: &str,
        time_ms: u64,
        data: &[u8],
        position: u64,
    ) -> bool {
        const PROP: &[u8] = b"position";
        let mut time = itoa::Buffer::new();
        let time = time.format(time_ms).as_bytes();
        let mut pos = itoa::Buffer::new();
        let pos = pos.format(position).as_bytes();
        let topic_len =
            TOPIC_HEAD.len() + app.len() + TOPIC_MID.len() + device.len() + TOPIC_TAIL.len();
        let props_len = 1 + 2 + PROP.len() + 2 + pos.len();
        let v5 = match &self.kind {
            Kind::V5(c) => Some(c.max_outbound_size()),
            Kind::V3(_) => None,
        };
        let payload_len = PAYLOAD_HEAD.len() + time.len() + PAYLOAD_MID.len() + data.len() + 1;
        let remaining = 2
            + topic_len
            + packet_id.map_or(0, |_| 2)
            + v5.map_or(0, |_| varint_len(props_len) + props_len)
            + payload_len;
        let total = 1 + varint_len(remaining) + remaining;
        if v5.is_some_and(|max| max != 0 && total > max as usize) || topic_len > u16::MAX as usize {
            return false;
        }
        out.reserve(total);
        out.extend_from_slice(&[PUBLISH_MIN | if packet_id.is_some() { 0x02 } else { 0 }]);
        put_varint(out, remaining);
        out.extend_from_slice(&(topic_len as u16).to_be_bytes());
        out.extend_from_slice(TOPIC_HEAD);
        out.extend_from_slice(app.as_bytes());
        out.extend_from_slice(TOPIC_MID);
        out.extend_from_slice(device.as_bytes());
        out.extend_from_slice(TOPIC_TAIL);
        if let Some(id) = packet_id {
            out.extend_from_slice(&id.get().to_be_bytes());
        }
        if v5.is_some() {
            put_varint(out, props_len);
            out.extend_from_slice(&[USER_PROPERTY]);
            out.extend_from_slice(&(PROP.len() as u16).to_be_bytes());
            out.extend_from_slice(PROP);
            out.extend_from_slice(&(pos.len() as u16).to_be_bytes());
            out.extend_from_slice(pos);
        }
        out.extend_from_slice(PAYLOAD_HEAD);
        out.extend_from_slice(time);
        out.extend_from_slice(PAYLOAD_MID);
        out.extend_from_slice(data);
        out.extend_from_slice(b"}");
        true
    }

    pub fn pingresp(&mut self, out: &mut BytesMut) {
        match &mut self.kind {
            Kind::V3(c) => enc3(c, out, v3::Packet::PingResponse),
            Kind::V5(c) => enc5(c, out, v5::Packet::PingResponse),
        }
    }
}

/// [MQTT-1.5.4-2] (5) / [MQTT-1.4.0-2] (3.1.1): no U+0000 in a string.
fn no_nul(s: &str) -> Result<(), ProtoError> {
    match s.as_bytes().contains(&0) {
        true => Err(ProtoError::Malformed("string contains U+0000".into())),
        false => Ok(()),
    }
}

/// The rules for a client's MQTT 5 PUBLISH that the codec does not check.
fn check_v5_publish(p: &Publish) -> Result<(), ProtoError> {
    // CONNACK said Retain Available 0 ([MQTT-3.2.2-14]): 0x9A.
    if p.retain {
        return Err(ProtoError::Violation(Goodbye::RetainNotSupported));
    }
    // [MQTT-3.3.4-6]: no Subscription Identifier from a client.
    if p.properties
        .as_ref()
        .is_some_and(|props| !props.subscription_ids.is_empty())
    {
        return Err(ProtoError::Violation(Goodbye::ProtocolError));
    }
    // An empty topic needs a Topic Alias, and none is allowed here.
    if p.topic.is_empty() {
        return Err(ProtoError::Violation(Goodbye::ProtocolError));
    }
    no_nul(&p.topic)
}

/// Whether the properties of an MQTT 5 PUBLISH (`body`: the packet after
/// its fixed header) hold a Topic Alias, whatever its value. Anything
/// malformed answers `false` and is left to the codec to report.
fn has_topic_alias(body: &[u8], first: u8) -> bool {
    const TOPIC_ALIAS: u8 = 0x23;
    let u16_at = |i: usize| {
        body.get(i..i + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    };
    let Some(topic_len) = u16_at(0) else {
        return false;
    };
    let qos = (first >> 1) & 3;
    let mut at = 2 + topic_len + if qos > 0 { 2 } else { 0 };
    let Some((props_len, n)) = varint(body.get(at..).unwrap_or(&[])) else {
        return false;
    };
    at += n;
    let end = at + props_len;
    if end > body.len() {
        return false;
    }
    while at < end {
        let id = body[at];
        at += 1;
        let size = match id {
            TOPIC_ALIAS => return true,
            0x01 => Some(1),
            0x02 => Some(4),
            0x03 | 0x08 | 0x09 => u16_at(at).map(|n| 2 + n),
            0x0B => varint(&body[at..end]).map(|(_, n)| n),
            0x26 => u16_at(at).and_then(|k| u16_at(at + 2 + k).map(|v| 4 + k + v)),
            _ => None,
        };
        match size {
            Some(s) => at += s,
            None => return false,
        }
    }
    false
}

/// Bytes of `n` as an MQTT variable byte integer.
fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends `n` as an MQTT variable byte integer (at most 268,435,455).
fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.extend_from_slice(&[byte]);
            return;
        }
        out.extend_from_slice(&[byte | 0x80]);
    }
}

/// An MQTT variable byte integer: its value and how many bytes it took.
fn varint(b: &[u8]) -> Option<(usize, usize)> {
    let mut v = 0usize;
    for (i, &byte) in b.iter().take(4).enumerate() {
        v |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Encoding our own small, well-formed replies cannot fail except by
/// exceeding a client's tiny maximum packet size; such a reply is dropped
/// (the client asked not to receive it) and logged.
fn enc3(c: &mut v3::Codec, out: &mut BytesMut, p: v3::Packet) {
    if let Err(e) = c.encode(p, out) {
        tracing::debug!(error = %e, "MQTT 3.1.1 reply not encoded");
    }
}

fn enc5(c: &mut v5::Codec, out: &mut BytesMut, p: v5::Packet) {
    if let Err(e) = c.encode(p, out) {
        tracing::debug!(error = %e, "MQTT 5 reply not encoded");
    }
}

fn v3_name(p: &v3::Packet) -> &'static str {
    match p {
        v3::Packet::Connect(_) => "CONNECT",
        v3::Packet::ConnectAck(_) => "CONNACK",
        v3::Packet::PublishAck { .. } => "PUBACK",
        v3::Packet::PublishReceived { .. } => "PUBREC",
        v3::Packet::PublishRelease { .. } => "PUBREL",
        v3::Packet::PublishComplete { .. } => "PUBCOMP",
        v3::Packet::SubscribeAck { .. } => "SUBACK",
        v3::Packet::UnsubscribeAck { .. } => "UNSUBACK",
        v3::Packet::PingResponse => "PINGRESP",
        _ => "unexpected",
    }
}

fn v5_name(p: &v5::Packet) -> &'static str {
    match p {
        v5::Packet::Connect(_) => "CONNECT",
        v5::Packet::ConnectAck(_) => "CONNACK",
        v5::Packet::PublishAck(_) => "PUBACK",
        v5::Packet::PublishReceived(_) => "PUBREC",
        v5::Packet::PublishRelease(_) => "PUBREL",
        v5::Packet::PublishComplete(_) => "PUBCOMP",
        v5::Packet::SubscribeAck(_) => "SUBACK",
        v5::Packet::UnsubscribeAck(_) => "UNSUBACK",
        v5::Packet::PingResponse => "PINGRESP",
        v5::Packet::Auth(_) => "AUTH",
        _ => "unexpected",
    }
}

/// Whether the next packet in `buf` is a PUBLISH (known from its first
/// byte, before the packet is complete).
pub fn starts_with_publish(buf: &[u8]) -> bool {
    buf.first()
        .is_some_and(|b| (PUBLISH_MIN..=PUBLISH_MAX).contains(b))
}

/// QoS of a publish as a number (2 included, so it can be refused).
pub fn qos_of(p: &Publish) -> u8 {
    p.qos.value()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_v311(password: &[u8]) -> BytesMut {
        let mut codec = v3::Codec::new(0);
        let mut out = BytesMut::new();
        let c = v3::Connect {
            clean_session: true,
            keep_alive: 30,
            client_id: ByteString::from_static("dev1"),
            username: Some(ByteString::from_static("x")),
            password: Some(Bytes::copy_from_slice(password)),
            ..v3::Connect::default()
        };
        codec
            .encode(v3::Packet::Connect(Box::new(c)), &mut out)
            .unwrap();
        out
    }

    fn connect_v5(client_id: &'static str, clean_start: bool) -> BytesMut {
        let mut codec = v5::Codec::new(0, 0);
        let mut out = BytesMut::new();
        let c = v5::Connect {
            clean_start,
            keep_alive: 30,
            client_id: ByteString::from_static(client_id),
            password: Some(Bytes::from_static(b"pw")),
            ..v5::Connect::default()
        };
        codec
            .encode(v5::Packet::Connect(Box::new(c)), &mut out)
            .unwrap();
        out
    }

    #[test]
    fn detects_and_decodes_v311_connect() {
        let mut buf = connect_v311(b"sl_secret");
        let mut codec = Codec::detect(&mut buf, 1024).unwrap().unwrap();
        assert!(!codec.is_v5());
        let info = codec.decode_connect(&mut buf).unwrap().unwrap();
        assert_eq!(&*info.client_id, "dev1");
        assert_eq!(info.password.as_deref(), Some(&b"sl_secret"[..]));
        assert_eq!(info.keep_alive, 30);
        assert!(buf.is_empty());
        assert!(!format!("{info:?}").contains("sl_secret"));
    }

    #[test]
    fn partial_and_garbage_input() {
        let full = connect_v311(b"pw");
        let mut part = BytesMut::from(&full[..3]);
        assert!(Codec::detect(&mut part, 1024).unwrap().is_none());
        let mut junk = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(Codec::detect(&mut junk, 1024).is_err());
        // A PUBLISH before CONNECT is refused by detection.
        let mut publish_first = BytesMut::from(&b"\x30\x05\x00\x01a{}"[..]);
        assert!(Codec::detect(&mut publish_first, 1024).is_err());
    }

    #[test]
    fn unsupported_levels_are_named() {
        for (bytes, level) in [
            (&b"\x10\x0c\x00\x04MQTT\x03\x02\x00\x3c\x00\x00"[..], 3),
            (&b"\x10\x0c\x00\x04MQTT\x06\x02\x00\x3c\x00\x00"[..], 6),
            (&b"\x10\x0e\x00\x06MQIsdp\x04\x02\x00\x3c\x00\x00"[..], 4),
        ] {
            let mut buf = BytesMut::from(bytes);
            assert_eq!(
                Codec::detect(&mut buf, 1024).err(),
                Some(ProtoError::UnsupportedVersion { level })
            );
        }
        let mut out = BytesMut::new();
        Codec::answering(6).connack_refuse(&mut out, Refusal::UnsupportedVersion);
        assert_eq!(&out[..], b"\x20\x03\x00\x84\x00");
        out.clear();
        Codec::answering(3).connack_refuse(&mut out, Refusal::UnsupportedVersion);
        assert_eq!(&out[..], b"\x20\x02\x00\x01");
    }

    #[test]
    fn v5_empty_client_id_is_accepted_whatever_clean_start_says() {
        for clean in [false, true] {
            let mut buf = connect_v5("", clean);
            let mut codec = Codec::detect(&mut buf, 1024).unwrap().unwrap();
            let info = codec.decode_connect(&mut buf).unwrap().unwrap();
            assert!(info.client_id.is_empty());
        }
    }

    #[test]
    fn v311_empty_client_id_needs_clean_session() {
        let mut codec = v3::Codec::new(0);
        let mut buf = BytesMut::new();
        let c = v3::Connect {
            clean_session: false,
            client_id: ByteString::new(),
            ..v3::Connect::default()
        };
        codec
            .encode(v3::Packet::Connect(Box::new(c)), &mut buf)
            .unwrap();
        let mut codec = Codec::detect(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(
            codec.decode_connect(&mut buf).err(),
            Some(ProtoError::BadClientId)
        );
    }

    #[test]
    fn the_whole_packet_counts_against_the_limit() {
        let mut buf = connect_v311(b"pw");
        let mut codec = Codec::detect(&mut buf, 1024).unwrap().unwrap();
        codec.decode_connect(&mut buf).unwrap().unwrap();
        // PUBLISH of 100 bytes in all: 2 header + 98 remaining.
        let mut publish = BytesMut::from(&b"\x30\x62"[..]);
        publish.extend_from_slice(&[0u8; 98]);
        codec.set_max_packet(99);
        assert_eq!(
            codec.decode(&mut publish.clone()).unwrap_err(),
            ProtoError::TooLarge
        );
        // PUBLISH claiming 2 MB remaining length: refused from its header.
        let mut big = BytesMut::from(&b"\x30\x80\x80\x80\x01"[..]);
        assert_eq!(codec.decode(&mut big).unwrap_err(), ProtoError::TooLarge);
        assert!(big.capacity() < 1024, "the refused packet was buffered");
    }

    #[test]
    fn published_states_decode_as_clients_read_them() {
        for v5 in [false, true] {
            let mut buf = match v5 {
                true => connect_v5("c", true),
                false => connect_v311(b"pw"),
            };
            let mut codec = Codec::detect(&mut buf, 1024).unwrap().unwrap();
            codec.decode_connect(&mut buf).unwrap().unwrap();
            let mut out = BytesMut::new();
            // A payload long enough for a two-byte remaining length.
            let data = format!("{{\"a\":\"{}\"}}", "x".repeat(200));
            let id = NonZeroU16::new(7);
            assert!(codec.publish_state(&mut out, id, "farm", "pump-1", 1234, data.as_bytes(), 99));
            assert!(codec.publish_state(&mut out, None, "farm", "p", 5, b"{}", 100));
            let publishes: Vec<Publish> = match v5 {
                false => {
                    let mut c = v3::Codec::new(0);
                    (0..2)
                        .map(|_| match c.decode(&mut out).unwrap() {
                            Some((v3::Packet::Publish(p), _)) => *p,
                            other => panic!("{other:?}"),
                        })
                        .collect()
                }
                true => {
                    let mut c = v5::Codec::new(0, 0);
                    (0..2)
                        .map(|_| match c.decode(&mut out).unwrap() {
                            Some((v5::Packet::Publish(p), _)) => *p,
                            other => panic!("{other:?}"),
                        })
                        .collect()
                }
            };
            assert!(out.is_empty());
            let (a, b) = (&publishes[0], &publishes[1]);
            assert_eq!(&*a.topic, "applications/farm/devices/pump-1/state");
            assert_eq!(
                (a.qos, a.packet_id, a.retain, a.dup),
                (QoS::AtLeastOnce, id, false, false)
            );
            assert_eq!(a.payload, format!("{{\"time\":1234,\"data\":{data}}}"));
            assert_eq!((b.qos, b.packet_id), (QoS::AtMostOnce, None));
            assert_eq!(b.payload, &b"{\"time\":5,\"data\":{}}"[..]);
            let position = |p: &Publish| {
                p.properties
                    .as_ref()
                    .and_then(|pr| pr.user_properties.first().cloned())
                    .map(|(k, v)| format!("{k}={v}"))
            };
            match v5 {
                true => {
                    assert_eq!(position(a).as_deref(), Some("position=99"));
                    assert_eq!(position(b).as_deref(), Some("position=100"));
                }
                false => assert!(a.properties.is_none()),
            }
        }
    }

    #[test]
    fn a_state_larger_than_the_client_accepts_is_not_written() {
        let mut codec = v5::Codec::new(0, 0);
        let mut buf = BytesMut::new();
        let c = v5::Connect {
            client_id: ByteString::from_static("c"),
            max_packet_size: NonZeroU32::new(100),
            ..v5::Connect::default()
        };
        codec
            .encode(v5::Packet::Connect(Box::new(c)), &mut buf)
            .unwrap();
        let mut codec = Codec::detect(&mut buf, 1024).unwrap().unwrap();
        codec.decode_connect(&mut buf).unwrap().unwrap();
        let mut out = BytesMut::new();
        assert!(codec.publish_state(&mut out, None, "a", "d", 1, b"{}", 1));
        let small = out.len();
        assert!(small <= 100);
        assert!(!codec.publish_state(&mut out, None, "a", "d", 1, &[b' '; 100], 1));
        assert_eq!(out.len(), small, "nothing written");
    }

    #[test]
    fn topic_alias_found_in_properties() {
        // Topic "a", QoS 1, packet id 1, properties: user property then alias 0.
        let body = b"\x00\x01a\x00\x01\x0a\x26\x00\x01k\x00\x01v\x23\x00\x00{}";
        assert!(has_topic_alias(body, 0x32));
        let no_alias = b"\x00\x01a\x00\x01\x02\x01\x01{}";
        assert!(!has_topic_alias(no_alias, 0x32));
        assert!(!has_topic_alias(b"\x00", 0x30));
    }
}
