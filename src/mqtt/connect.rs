//! The handshake: read one CONNECT (bounded in time and size, before the
//! client has proved anything), check its token, register the session for
//! takeover and answer with a CONNACK. Also the short refusal of
//! connections over a limit.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::BytesMut;
use bytestring::ByteString;
use ring::rand::SecureRandom;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::deliver::Keep;
use super::metrics::ConnectOutcome;
use super::proto::{Codec, ConnectInfo, ProtoError, Refusal};
use super::session::{drain, say_goodbye};
use super::takeover::Registration;
use super::MqttContext;
use crate::auth::{monotonic_ns, Scope, TokenEntry};
use crate::timefmt::now_ms;

/// A connection whose CONNECT was accepted and answered.
pub(super) struct Accepted<'c> {
    pub codec: Codec,
    pub grant: Arc<TokenEntry>,
    pub keep_alive: u16,
    /// MQTT 5 session expiry from CONNECT (DISCONNECT may not raise it
    /// from 0).
    pub session_expiry: u32,
    /// The session's place in the takeover map; dropped when it ends.
    pub registration: Registration<'c>,
    /// For a token that may subscribe: its (possibly stored) session.
    pub keep: Option<Box<Keep>>,
    /// The subscriptions of a resumed session.
    pub resumed: Option<Vec<(String, u8)>>,
    /// The client's Receive Maximum.
    pub receive_max: u16,
}

/// Told to an MQTT 5 client whose resumed session's position is no longer
/// stored.
const AGED_OUT: &str = "the session's position is no longer stored (storage.retention); delivery starts at the oldest stored state";

/// What the first packet of a connection turned out to be.
enum Hello {
    Connect(Codec, ConnectInfo),
    /// Answer with this refusal (nothing, if the version has no code for
    /// it), then close.
    Refuse(Codec, Refusal, ConnectOutcome),
    /// Not MQTT, or a CONNECT that breaks the protocol: close without a
    /// CONNACK ([MQTT-3.1.4-1]).
    Malformed(ProtoError),
    /// The client closed the connection first.
    Gone,
}

/// Reads one CONNECT. At most `max_bytes` of it are ever buffered: a
/// bigger CONNECT is refused from its fixed header.
async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_bytes: u32,
) -> Hello {
    let mut codec: Option<Codec> = None;
    loop {
        if codec.is_none() {
            match Codec::detect(buf, max_bytes) {
                Ok(c) => codec = c,
                Err(ProtoError::UnsupportedVersion { level }) => {
                    return Hello::Refuse(
                        Codec::answering(level),
                        Refusal::UnsupportedVersion,
                        ConnectOutcome::UnsupportedVersion,
                    )
                }
                Err(e) => return Hello::Malformed(e),
            }
        }
        if let Some(c) = codec.as_mut() {
            match c.decode_connect(buf) {
                Ok(Some(info)) => return codec.map_or(Hello::Gone, |c| Hello::Connect(c, info)),
                Ok(None) => {}
                Err(e) => {
                    let (why, outcome) = match e {
                        ProtoError::TooLarge => (Refusal::PacketTooLarge, ConnectOutcome::TooLarge),
                        ProtoError::BadClientId => {
                            (Refusal::BadClientId, ConnectOutcome::BadClientId)
                        }
                        other => return Hello::Malformed(other),
                    };
                    return codec.map_or(Hello::Gone, |c| Hello::Refuse(c, why, outcome));
                }
            }
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Hello::Gone,
            Ok(_) => {}
        }
    }
}

/// Runs the handshake on a connection admitted under the limits. `None`
/// when the connection was refused (and answered, where MQTT allows).
pub(super) async fn handshake<'c, S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    peer: IpAddr,
    ctx: &'c MqttContext,
) -> Option<Accepted<'c>> {
    let cfg = &ctx.config;
    let hello = tokio::time::timeout(
        cfg.connect_timeout,
        read_connect(stream, buf, ctx.connect_limit()),
    )
    .await;
    let mut out = BytesMut::with_capacity(64);
    let (mut codec, info) = match hello {
        Err(_) => return none(ctx, ConnectOutcome::Timeout),
        Ok(Hello::Gone) => return none(ctx, ConnectOutcome::Malformed),
        Ok(Hello::Malformed(e)) => {
            tracing::debug!(error = %e, %peer, "bad CONNECT");
            return none(ctx, ConnectOutcome::Malformed);
        }
        Ok(Hello::Refuse(mut codec, why, outcome)) => {
            tracing::debug!(?why, %peer, "MQTT CONNECT refused");
            codec.connack_refuse(&mut out, why);
            return refuse_now(stream, &mut out, ctx, outcome).await;
        }
        Ok(Hello::Connect(codec, info)) => (codec, info),
    };

    // MQTT 5 features an ingest broker does not offer are refused the way
    // the spec asks ([MQTT-4.12.0-1], [MQTT-3.2.2-12], [MQTT-3.2.2-13]).
    // 3.1.1 has no codes for them; there the Will is simply never sent.
    let unsupported = match (&info.will, info.auth_method) {
        _ if !codec.is_v5() => None,
        (_, true) => Some(Refusal::BadAuthMethod),
        (Some(w), _) if w.qos > 1 => Some(Refusal::QosNotSupported),
        (Some(w), _) if w.retain => Some(Refusal::RetainNotSupported),
        _ => None,
    };
    if let Some(why) = unsupported {
        tracing::debug!(?why, client = ?info.client_id, %peer, "MQTT CONNECT refused");
        codec.connack_refuse(&mut out, why);
        return refuse_now(stream, &mut out, ctx, ConnectOutcome::Unsupported).await;
    }

    // Cluster mode: a broker whose view of the cluster's tokens is stale
    // cannot know whether this token was revoked; another broker can.
    if !ctx.registry.trusted(monotonic_ns()) {
        tracing::debug!(client = ?info.client_id, %peer, "MQTT CONNECT refused: token view stale");
        codec.connack_refuse(&mut out, Refusal::Unavailable);
        return refuse_now(stream, &mut out, ctx, ConnectOutcome::Unavailable).await;
    }

    // An address that spent its failed-authentication budget waits for it
    // to refill before its token is even looked at.
    let hold = ctx.auth_failures.wait(peer).min(cfg.connect_timeout);
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    let grant = info
        .password
        .as_deref()
        .ok_or(())
        .and_then(|pw| ctx.registry.authenticate(pw, now_ms()).map_err(|_| ()))
        .ok()
        // The root token is an admin-plane credential, refused here like
        // a token that may neither send nor read state.
        .filter(|g| {
            !g.root && (g.scopes.allows(Scope::SendState) || g.scopes.allows(Scope::GetState))
        });
    let Some(grant) = grant else {
        tracing::debug!(client = ?info.client_id, %peer, "MQTT CONNECT refused: unknown or unusable token");
        let _ = ctx.auth_failures.take(peer);
        codec.connack_refuse(&mut out, Refusal::NotAuthorized);
        return refuse_now(stream, &mut out, ctx, ConnectOutcome::NotAuthorized).await;
    };
    if info.will.is_some() {
        // Subscribers receive committed device state only, so a Will is
        // accepted and ignored (see README).
        tracing::debug!(client = ?info.client_id, "Will message ignored");
    }

    let assigned = match info.client_id.is_empty() {
        false => None,
        true => match assign_client_id(ctx) {
            Some(id) => Some(id),
            None => {
                codec.connack_refuse(&mut out, Refusal::ServerBusy);
                return refuse_now(stream, &mut out, ctx, ConnectOutcome::ServerBusy).await;
            }
        },
    };
    let client_id = assigned.clone().unwrap_or_else(|| info.client_id.clone());
    // Registered before the CONNACK goes out: a client that reconnects
    // after reading it is always the newer session.
    let registration = ctx.takeover.register(&grant.app, client_id);
    let session = match grant.scopes.allows(Scope::GetState) {
        // A token that may not subscribe has no session to keep: an MQTT
        // 5 client asking for one is told it lasts 0 s.
        false => Ok(Claimed {
            granted_expiry: info.session_expiry_v5().filter(|e| *e > 0).map(|_| 0),
            ..Claimed::default()
        }),
        true => claim_session(ctx, &grant, &info, &registration).await,
    };
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, client = ?info.client_id, "MQTT CONNECT refused: session not readable");
            codec.connack_refuse(&mut out, Refusal::ServerBusy);
            return refuse_now(stream, &mut out, ctx, ConnectOutcome::ServerBusy).await;
        }
    };
    codec.connack_ok(
        &mut out,
        cfg.receive_maximum,
        cfg.max_packet_bytes,
        assigned,
        session.resumed.is_some(),
        session.granted_expiry,
        session.aged_out.then_some(AGED_OUT),
    );
    if out.is_empty() {
        // The client's Maximum Packet Size is too small for any CONNACK
        // (found by fuzzing): it can never be answered, so close instead of
        // leaving it waiting.
        return none(ctx, ConnectOutcome::Malformed);
    }
    if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
        return None;
    }
    codec.set_max_packet(cfg.max_packet_bytes);
    ctx.metrics.connect(ConnectOutcome::Accepted);
    tracing::trace!(
        client = ?registration.client_id(),
        token = %grant.id,
        keep_alive = info.keep_alive,
        v5 = codec.is_v5(),
        "MQTT session started"
    );
    Some(Accepted {
        codec,
        grant,
        keep_alive: info.keep_alive,
        session_expiry: info.session_expiry,
        registration,
        keep: session.keep,
        resumed: session.resumed,
        receive_max: info.receive_max,
    })
}

/// What the handshake learns about the session of a token that may
/// subscribe.
#[derive(Default)]
struct Claimed {
    keep: Option<Box<Keep>>,
    resumed: Option<Vec<(String, u8)>>,
    /// MQTT 5: the expiry granted, when less than asked.
    granted_expiry: Option<u32>,
    aged_out: bool,
}

/// Claims the client's session: a clean start discards a stored one;
/// otherwise a stored one is resumed where its position points (or at the
/// oldest stored state, if that aged out).
async fn claim_session(
    ctx: &MqttContext,
    grant: &TokenEntry,
    info: &ConnectInfo,
    registration: &Registration<'_>,
) -> Result<Claimed, crate::streams::sessions::SessionError> {
    let max = ctx.session_expiry_max();
    // 3.1.1 names no expiry: a persistent session gets the most allowed.
    let (persistent, expiry) = match info.session_expiry_v5() {
        None => (!info.clean_start, max),
        Some(asked) => (asked > 0, asked.min(max)),
    };
    let granted_expiry = info
        .session_expiry_v5()
        .filter(|asked| *asked > max)
        .map(|_| max);
    let (owner, resumed) = ctx
        .sessions
        .claim(
            &grant.app,
            registration.client_id(),
            registration.serial(),
            info.clean_start,
        )
        .await?;
    let (resume_at, aged_out) = match &resumed {
        None => (None, false),
        Some(r) => {
            let (store, app, next) = (ctx.store.clone(), grant.app.clone(), r.next);
            let (at, opened) = tokio::task::spawn_blocking(move || {
                crate::streams::cursor::resume_point(&store, &app, next)
            })
            .await
            .map_err(|e| crate::store::StoreError::Thread(e.to_string()))??;
            (Some(at), opened == crate::streams::Opened::AgedOut)
        }
    };
    Ok(Claimed {
        keep: Some(Box::new(Keep {
            owner,
            persistent,
            expiry,
            stored: resumed.is_some(),
            resume_at,
        })),
        resumed: resumed.map(|r| r.record.subs),
        granted_expiry,
        aged_out,
    })
}

fn none<'c>(ctx: &MqttContext, outcome: ConnectOutcome) -> Option<Accepted<'c>> {
    ctx.metrics.connect(outcome);
    None
}

/// Writes a refusal (if any) and closes without losing it.
async fn refuse_now<'c, S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    ctx: &MqttContext,
    outcome: ConnectOutcome,
) -> Option<Accepted<'c>> {
    ctx.metrics.connect(outcome);
    say_goodbye(stream, out).await;
    drain(stream).await;
    None
}

/// A client id for a client that sent none: random, so that nobody can
/// guess it to take the session over ([MQTT-3.2.2-16] asks only that it be
/// unique). `None` if the system's random source failed.
fn assign_client_id(ctx: &MqttContext) -> Option<ByteString> {
    let mut raw = [0u8; 16];
    ctx.rng.fill(&mut raw).ok()?;
    let mut id = String::with_capacity(29);
    id.push_str("sluice-");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(raw, &mut id);
    Some(ByteString::from(id))
}

/// Refuses a connection over a limit: answers its CONNECT with `why` if it
/// arrives promptly, then closes. It is not read after its CONNECT: under
/// a flood these refusals must stay cheap.
pub(super) async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    ctx: Arc<MqttContext>,
    why: Refusal,
) {
    let mut buf = BytesMut::with_capacity(256);
    let read = tokio::time::timeout(
        Duration::from_secs(1),
        read_connect(&mut stream, &mut buf, ctx.connect_limit()),
    )
    .await;
    if let Ok(Hello::Connect(mut codec, _) | Hello::Refuse(mut codec, _, _)) = read {
        let mut out = BytesMut::with_capacity(16);
        codec.connack_refuse(&mut out, why);
        say_goodbye(&mut stream, &mut out).await;
    }
    ctx.metrics.connect(match why {
        Refusal::RateLimited => ConnectOutcome::RateLimited,
        _ => ConnectOutcome::ServerBusy,
    });
}
