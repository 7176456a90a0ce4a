//! The MQTT codec, wrapped: version detection, decoding into the few
//! packets an ingest broker acts on, and encoding of its replies for 3.1.1
//! and 5. This is the only file that knows `rmqtt-codec`.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::error::DecodeError;
use rmqtt_codec::types::QoS;
use rmqtt_codec::version::{ProtocolVersion, VersionCodec};
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
}

impl From<DecodeError> for ProtoError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::MaxSizeExceeded { .. } => ProtoError::TooLarge,
            other => ProtoError::Malformed(other.to_string()),
        }
    }
}

/// The CONNECT fields Sluice uses.
pub struct ConnectInfo {
    pub client_id: ByteString,
    pub password: Option<Bytes>,
    pub keep_alive: u16,
    pub clean_start: bool,
    /// MQTT 5 session expiry the client asked for (0 for 3.1.1).
    pub session_expiry: u32,
    pub has_will: bool,
    /// MQTT 5: the largest packet the client accepts.
    pub max_packet_size: Option<NonZeroU32>,
}

impl std::fmt::Debug for ConnectInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is a token secret: never printed.
        f.debug_struct("ConnectInfo")
            .field("client_id", &self.client_id)
            .field("keep_alive", &self.keep_alive)
            .field("clean_start", &self.clean_start)
            .finish_non_exhaustive()
    }
}

/// Packets after CONNECT, reduced to what the session handles.
#[derive(Debug)]
pub enum Incoming {
    Publish(Box<Publish>),
    Subscribe {
        packet_id: NonZeroU16,
        filters: usize,
    },
    Unsubscribe {
        packet_id: NonZeroU16,
        filters: usize,
    },
    PingRequest,
    Disconnect,
    /// A packet a client may not send to an ingest-only server (PUBACK,
    /// PUBREL, AUTH, a second CONNECT, …): a protocol error.
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
}

/// PUBACK outcomes (only MQTT 5 can say anything but success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckReason {
    Success,
    /// 0x87
    NotAuthorized,
    /// 0x99
    PayloadInvalid,
    /// 0x96 (rate limits)
    QuotaExceeded,
    /// 0x80: accepted but not stored (storage failed or shutting down).
    Failed,
}

/// DISCONNECT reasons sent by the server (MQTT 5 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goodbye {
    NotAuthorized,
    PayloadInvalid,
    QuotaExceeded,
    QosNotSupported,
    ProtocolError,
    Malformed,
    PacketTooLarge,
    ShuttingDown,
    TakenOver,
    KeepAliveTimeout,
}

impl Goodbye {
    fn code(self) -> v5::DisconnectReasonCode {
        use v5::DisconnectReasonCode as C;
        match self {
            Goodbye::NotAuthorized => C::NotAuthorized,
            Goodbye::PayloadInvalid => C::PayloadFormatInvalid,
            Goodbye::QuotaExceeded => C::QuotaExceeded,
            Goodbye::QosNotSupported => C::QosNotSupported,
            Goodbye::ProtocolError => C::ProtocolError,
            Goodbye::Malformed => C::MalformedPacket,
            Goodbye::PacketTooLarge => C::PacketTooLarge,
            Goodbye::ShuttingDown => C::ServerShuttingDown,
            Goodbye::TakenOver => C::SessionTakenOver,
            Goodbye::KeepAliveTimeout => C::KeepAliveTimeout,
        }
    }
}

/// A connection's codec once the protocol version is known.
pub enum Codec {
    V3(v3::Codec),
    V5(v5::Codec),
}

impl Codec {
    /// Detects the version from the first bytes of a CONNECT, without
    /// consuming them. `Ok(None)`: need more bytes.
    pub fn detect(buf: &mut BytesMut, max_packet: u32) -> Result<Option<Codec>, ProtoError> {
        Ok(match VersionCodec.decode(buf)? {
            None => None,
            Some(ProtocolVersion::MQTT3) => Some(Codec::V3(v3::Codec::new(max_packet))),
            Some(ProtocolVersion::MQTT5) => Some(Codec::V5(v5::Codec::new(max_packet, 0))),
        })
    }

    pub fn is_v5(&self) -> bool {
        matches!(self, Codec::V5(_))
    }

    /// Decodes the CONNECT packet. Anything else first is malformed.
    pub fn decode_connect(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<ConnectInfo>, ProtoError> {
        match self {
            Codec::V3(c) => match c.decode(buf)? {
                None => Ok(None),
                Some((v3::Packet::Connect(c), _)) => Ok(Some(ConnectInfo {
                    has_will: c.last_will.is_some(),
                    client_id: c.client_id,
                    password: c.password,
                    keep_alive: c.keep_alive,
                    clean_start: c.clean_session,
                    session_expiry: 0,
                    max_packet_size: None,
                })),
                Some(_) => Err(ProtoError::Malformed("first packet is not CONNECT".into())),
            },
            Codec::V5(c) => match c.decode(buf)? {
                None => Ok(None),
                Some((v5::Packet::Connect(c), _)) => {
                    if let Some(max) = c.max_packet_size {
                        c5_set_out(self, max);
                    }
                    Ok(Some(ConnectInfo {
                        has_will: c.last_will.is_some(),
                        client_id: c.client_id,
                        password: c.password,
                        keep_alive: c.keep_alive,
                        clean_start: c.clean_start,
                        session_expiry: c.session_expiry_interval_secs,
                        max_packet_size: c.max_packet_size,
                    }))
                }
                Some(_) => Err(ProtoError::Malformed("first packet is not CONNECT".into())),
            },
        }
    }

    /// Decodes the next packet after CONNECT. `Ok(None)`: need more bytes.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Incoming>, ProtoError> {
        Ok(match self {
            Codec::V3(c) => c.decode(buf)?.map(|(p, _)| match p {
                v3::Packet::Publish(p) => Incoming::Publish(p),
                v3::Packet::Subscribe {
                    packet_id,
                    topic_filters,
                } => Incoming::Subscribe {
                    packet_id,
                    filters: topic_filters.len(),
                },
                v3::Packet::Unsubscribe {
                    packet_id,
                    topic_filters,
                } => Incoming::Unsubscribe {
                    packet_id,
                    filters: topic_filters.len(),
                },
                v3::Packet::PingRequest => Incoming::PingRequest,
                v3::Packet::Disconnect => Incoming::Disconnect,
                other => Incoming::Unexpected(v3_name(&other)),
            }),
            Codec::V5(c) => c.decode(buf)?.map(|(p, _)| match p {
                v5::Packet::Publish(p) => Incoming::Publish(p),
                v5::Packet::Subscribe(s) => Incoming::Subscribe {
                    packet_id: s.packet_id,
                    filters: s.topic_filters.len(),
                },
                v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
                    packet_id: u.packet_id,
                    filters: u.topic_filters.len(),
                },
                v5::Packet::PingRequest => Incoming::PingRequest,
                v5::Packet::Disconnect(_) => Incoming::Disconnect,
                other => Incoming::Unexpected(v5_name(&other)),
            }),
        })
    }

    /// CONNACK accepting the connection. No session is ever present: the
    /// broker keeps none, and tells MQTT 5 clients so (session expiry 0).
    pub fn connack_ok(
        &mut self,
        out: &mut BytesMut,
        receive_max: u16,
        max_packet: u32,
        info: &ConnectInfo,
        assigned_id: Option<ByteString>,
    ) {
        match self {
            Codec::V3(c) => enc3(
                c,
                out,
                v3::Packet::ConnectAck(v3::ConnectAck {
                    return_code: v3::ConnectAckReason::ConnectionAccepted,
                    session_present: false,
                }),
            ),
            Codec::V5(c) => {
                let ack = v5::ConnectAck {
                    session_expiry_interval_secs: (info.session_expiry > 0).then_some(0),
                    receive_max: NonZeroU16::new(receive_max).unwrap_or(NonZeroU16::MIN),
                    max_qos: QoS::AtLeastOnce,
                    max_packet_size: Some(max_packet),
                    assigned_client_id: assigned_id,
                    topic_alias_max: 0,
                    retain_available: false,
                    wildcard_subscription_available: false,
                    subscription_identifiers_available: false,
                    shared_subscription_available: false,
                    ..v5::ConnectAck::default()
                };
                enc5(c, out, v5::Packet::ConnectAck(Box::new(ack)))
            }
        }
    }

    pub fn connack_refuse(&mut self, out: &mut BytesMut, why: Refusal) {
        match self {
            Codec::V3(c) => enc3(
                c,
                out,
                v3::Packet::ConnectAck(v3::ConnectAck {
                    return_code: match why {
                        Refusal::NotAuthorized => v3::ConnectAckReason::NotAuthorized,
                        Refusal::ServerBusy => v3::ConnectAckReason::ServiceUnavailable,
                        Refusal::BadClientId => v3::ConnectAckReason::IdentifierRejected,
                        Refusal::RateLimited => v3::ConnectAckReason::ServiceUnavailable,
                    },
                    session_present: false,
                }),
            ),
            Codec::V5(c) => {
                let ack = v5::ConnectAck {
                    reason_code: match why {
                        Refusal::NotAuthorized => v5::ConnectAckReason::NotAuthorized,
                        Refusal::ServerBusy => v5::ConnectAckReason::ServerBusy,
                        Refusal::BadClientId => v5::ConnectAckReason::ClientIdentifierNotValid,
                        Refusal::RateLimited => v5::ConnectAckReason::ConnectionRateExceeded,
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
        match self {
            Codec::V3(c) => enc3(c, out, v3::Packet::PublishAck { packet_id }),
            Codec::V5(c) => {
                use v5::PublishAckReason as R;
                let ack = v5::PublishAck {
                    packet_id,
                    reason_code: match why {
                        AckReason::Success => R::Success,
                        AckReason::NotAuthorized => R::NotAuthorized,
                        AckReason::PayloadInvalid => R::PayloadFormatInvalid,
                        AckReason::QuotaExceeded => R::QuotaExceeded,
                        AckReason::Failed => R::UnspecifiedError,
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
        if let Codec::V5(c) = self {
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

    /// SUBACK refusing every filter: 0x80 (3.1.1) / 0x87 (5).
    pub fn suback_refused(&mut self, out: &mut BytesMut, packet_id: NonZeroU16, filters: usize) {
        match self {
            Codec::V3(c) => enc3(
                c,
                out,
                v3::Packet::SubscribeAck {
                    packet_id,
                    status: vec![v3::SubscribeReturnCode::Failure; filters],
                },
            ),
            Codec::V5(c) => enc5(
                c,
                out,
                v5::Packet::SubscribeAck(v5::SubscribeAck {
                    packet_id,
                    properties: Vec::new(),
                    reason_string: None,
                    status: vec![v5::SubscribeAckReason::NotAuthorized; filters],
                }),
            ),
        }
    }

    /// UNSUBACK: there never was a subscription.
    pub fn unsuback(&mut self, out: &mut BytesMut, packet_id: NonZeroU16, filters: usize) {
        match self {
            Codec::V3(c) => enc3(c, out, v3::Packet::UnsubscribeAck { packet_id }),
            Codec::V5(c) => enc5(
                c,
                out,
                v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
                    packet_id,
                    properties: Vec::new(),
                    reason_string: None,
                    status: vec![v5::UnsubscribeAckReason::NoSubscriptionExisted; filters],
                }),
            ),
        }
    }

    pub fn pingresp(&mut self, out: &mut BytesMut) {
        match self {
            Codec::V3(c) => enc3(c, out, v3::Packet::PingResponse),
            Codec::V5(c) => enc5(c, out, v5::Packet::PingResponse),
        }
    }
}

fn c5_set_out(codec: &mut Codec, max: NonZeroU32) {
    if let Codec::V5(c) = codec {
        c.set_max_outbound_size(max.get());
    }
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
    fn oversized_packets_are_refused_before_buffering() {
        let mut buf = connect_v311(b"pw");
        let mut codec = Codec::detect(&mut buf, 1024).unwrap().unwrap();
        codec.decode_connect(&mut buf).unwrap().unwrap();
        // PUBLISH claiming 2 MB remaining length.
        let mut big = BytesMut::from(&b"\x30\x80\x80\x80\x01"[..]);
        assert_eq!(codec.decode(&mut big).unwrap_err(), ProtoError::TooLarge);
    }
}
