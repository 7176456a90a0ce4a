//! One MQTT connection: CONNECT with a token, then PUBLISH → check →
//! validate → writer, with PUBACKs only after commit, in order, one socket
//! write per commit.

use std::collections::VecDeque;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use bytestring::ByteString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::acks::AckSink;
use super::proto::{qos_of, AckReason, Codec, ConnectInfo, Goodbye, Incoming, ProtoError, Refusal};
use super::{ConnectOutcome, MqttContext, PublishOutcome};
use crate::auth::{monotonic_ns, Scope, TokenEntry};
use crate::ids::{is_valid_id, state_path};
use crate::state::{self, ParsedStates, Shape};
use crate::store::{device_key, DeviceKey};
use crate::timefmt::now_ms;
use crate::writer::{CommitError, Completion, EnqueueError, WriteRequest};

/// Why a session ended; for the debug log.
enum End {
    ClientClosed,
    ClientDisconnect,
    Io(std::io::Error),
    Refused(&'static str),
    Stopped,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientClosed => f.write_str("client closed the connection"),
            End::ClientDisconnect => f.write_str("client sent DISCONNECT"),
            End::Io(e) => write!(f, "socket error: {e}"),
            End::Refused(why) => f.write_str(why),
            End::Stopped => f.write_str("server shutting down"),
        }
    }
}

/// The largest a session's read buffer grows to while a client streams
/// (packets bigger than this still get the room they need).
const MAX_READ_BUFFER: usize = 64 * 1024;

/// After sending FIN, how long and how much of a client's remaining input
/// is read and dropped so the close does not turn into a reset.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 1 << 20;

/// How long a session whose request waits for queue space sleeps before it
/// retries even without a wake-up (the wake-up can race the retry).
const SPACE_RECHECK: Duration = Duration::from_millis(20);

/// Reads one CONNECT (within the caller's timeout) and detects the version.
async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max_packet: u32,
) -> Result<Option<(Codec, ConnectInfo)>, ProtoError> {
    let mut codec: Option<Codec> = None;
    loop {
        if codec.is_none() {
            codec = Codec::detect(buf, max_packet)?;
        }
        if let Some(c) = codec.as_mut() {
            if let Some(info) = c.decode_connect(buf)? {
                return Ok(codec.map(|c| (c, info)));
            }
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Refuses a connection over a limit: answers its CONNECT with `why` if it
/// arrives promptly, then closes.
pub(super) async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    ctx: Arc<MqttContext>,
    why: Refusal,
) {
    let mut buf = BytesMut::with_capacity(512);
    let read = tokio::time::timeout(
        Duration::from_secs(1),
        read_connect(&mut stream, &mut buf, ctx.config.max_packet_bytes),
    )
    .await;
    if let Ok(Ok(Some((mut codec, _)))) = read {
        let mut out = BytesMut::with_capacity(16);
        codec.connack_refuse(&mut out, why);
        let _ = stream.write_all(&out).await;
    }
    ctx.metrics.connect(match why {
        Refusal::RateLimited => ConnectOutcome::RateLimited,
        _ => ConnectOutcome::ServerBusy,
    });
}

/// Waits until the writer has taken requests off the queue (or a short
/// while, in case the wake-up raced the failed attempt).
async fn queue_space(ctx: &MqttContext) {
    let _ = tokio::time::timeout(SPACE_RECHECK, ctx.queue.space.notified()).await;
}

/// Why a publish is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PublishRefusal {
    /// The grant is no longer usable, or does not cover the topic's
    /// application and device, or the topic is not a state topic.
    NotAuthorized,
    BadPayload(state::BadState),
}

/// The per-publish check, shared with benches and fuzzing: the grant is
/// still usable (revocation), the topic is `applications/{app}/devices/
/// {device}/state` for ids the grant covers, and the payload is one valid
/// state message. Topic parsing borrows; the only lookup is the chain walk.
pub fn check_publish(
    grant: &TokenEntry,
    topic: &str,
    payload: &[u8],
    now_ms: i64,
) -> Result<(DeviceKey, ParsedStates), PublishRefusal> {
    let (app, dev) = state_path(topic).ok_or(PublishRefusal::NotAuthorized)?;
    if !grant.usable(now_ms)
        || !is_valid_id(app)
        || !is_valid_id(dev)
        || !grant.permits(app, Some(dev), Scope::SendState)
    {
        return Err(PublishRefusal::NotAuthorized);
    }
    let parsed = state::parse(payload, Shape::One, now_ms).map_err(PublishRefusal::BadPayload)?;
    Ok((device_key(app, dev), parsed))
}

/// One QoS 1 publish waiting for its PUBACK, in arrival order.
struct PendingAck {
    packet_id: NonZeroU16,
    /// `None` until its commit finished; refusals are known at once.
    reason: Option<AckReason>,
}

struct Session {
    ctx: Arc<MqttContext>,
    codec: Codec,
    grant: Arc<TokenEntry>,
    /// The writer reports commits here; see [`AckSink`].
    sink: Arc<AckSink>,
    /// PUBACKs in publish order (MQTT requires that order). At most
    /// `receive_maximum` entries: reading stops at that many.
    acks: VecDeque<PendingAck>,
    /// Publishes handed to the writer and not yet reported back.
    committing: usize,
    /// A request the queue had no room for; while set, nothing is read
    /// (TCP backpressure instead of dropping or erroring).
    blocked: Option<WriteRequest>,
    out: BytesMut,
    scratch: Vec<(u16, Result<(), CommitError>)>,
    /// Set when a 3.1.1 publish could not be stored: it cannot be NACKed,
    /// so the connection is closed once earlier PUBACKs are written.
    close_after_flush: bool,
}

pub(super) async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: std::net::IpAddr,
    ctx: Arc<MqttContext>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
) {
    let cfg = &ctx.config;
    let mut buf = BytesMut::with_capacity(cfg.read_buffer_bytes);
    let first = tokio::time::timeout(
        cfg.connect_timeout,
        read_connect(&mut stream, &mut buf, cfg.max_packet_bytes),
    )
    .await;
    let (mut codec, info) = match first {
        Err(_) => return ctx.metrics.connect(ConnectOutcome::Timeout),
        Ok(Ok(None)) => return ctx.metrics.connect(ConnectOutcome::Malformed),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "bad CONNECT");
            return ctx.metrics.connect(ConnectOutcome::Malformed);
        }
        Ok(Ok(Some(x))) => x,
    };
    let mut out = BytesMut::with_capacity(64);

    // A 3.1.1 client asking to keep a session must name itself; we keep no
    // sessions, but the spec still requires refusing an empty id then.
    if info.client_id.is_empty() && !info.clean_start && !codec.is_v5() {
        codec.connack_refuse(&mut out, Refusal::BadClientId);
        let _ = stream.write_all(&out).await;
        return ctx.metrics.connect(ConnectOutcome::BadClientId);
    }
    // An address that spent its failed-authentication budget waits for it
    // to refill before its token is even looked at.
    let hold = ctx.auth_failures.wait(peer).min(cfg.connect_timeout);
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    let now = now_ms();
    let grant = info
        .password
        .as_deref()
        .ok_or(())
        .and_then(|pw| ctx.registry.authenticate(pw, now).map_err(|_| ()))
        .ok()
        // The root token is an admin-plane credential, refused here like
        // a token that may not send state.
        .filter(|g| !g.root && g.scopes.allows(Scope::SendState));
    let Some(grant) = grant else {
        tracing::debug!(client = %info.client_id, %peer, "MQTT CONNECT refused: unknown or unusable token");
        let _ = ctx.auth_failures.take(peer);
        codec.connack_refuse(&mut out, Refusal::NotAuthorized);
        let _ = stream.write_all(&out).await;
        return ctx.metrics.connect(ConnectOutcome::NotAuthorized);
    };
    if info.has_will {
        // Nobody subscribes to an ingest broker, so a Will could never be
        // delivered; it is accepted and ignored (see README).
        tracing::debug!(client = %info.client_id, "Will message ignored");
    }
    let assigned = info
        .client_id
        .is_empty()
        .then(|| ByteString::from(format!("sluice-{}", ctx.next_serial())));
    let client_id = assigned.clone().unwrap_or_else(|| info.client_id.clone());
    codec.connack_ok(
        &mut out,
        cfg.receive_maximum,
        cfg.max_packet_bytes,
        &info,
        assigned,
    );
    if out.is_empty() {
        // The client's Maximum Packet Size is too small for any CONNACK
        // (found by fuzzing): it can never be answered, so close instead of
        // leaving it waiting.
        return ctx.metrics.connect(ConnectOutcome::Malformed);
    }
    if stream.write_all(&out).await.is_err() {
        return;
    }
    out.clear();
    ctx.metrics.connect(ConnectOutcome::Accepted);
    tracing::trace!(
        client = %client_id,
        token = %grant.id,
        keep_alive = info.keep_alive,
        v5 = codec.is_v5(),
        "MQTT session started"
    );
    let _open = ctx.metrics.open_connection();
    let (serial, kicked) = ctx.takeover.register(&client_id);

    let mut s = Session {
        ctx: ctx.clone(),
        codec,
        grant,
        sink: Arc::new(AckSink::default()),
        acks: VecDeque::new(),
        committing: 0,
        blocked: None,
        out,
        scratch: Vec::new(),
        close_after_flush: false,
    };
    let end = s
        .serve(
            &mut stream,
            &mut buf,
            info.keep_alive,
            &stop,
            &hard_stop,
            &kicked,
        )
        .await;
    ctx.takeover.unregister(&client_id, serial);
    tracing::debug!(client = %client_id, end = %end, "MQTT session ended");
}

impl Session {
    /// The session loop. Returns when the connection is to be closed; any
    /// farewell packet has been written by then.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        buf: &mut BytesMut,
        keep_alive: u16,
        stop: &CancellationToken,
        hard_stop: &CancellationToken,
        kicked: &tokio::sync::Notify,
    ) -> End {
        let max_inflight = self.ctx.config.receive_maximum as usize;
        // 1.5 × the client's keep-alive, as the spec says; 0 disables it.
        let keep_alive =
            (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let mut deadline = keep_alive.map_or(far, |k| Instant::now() + k);
        let mut revocations = self.ctx.registry.subscribe_revocations();
        let expiry = self.grant.chain_expiry().map_or(far, |exp| {
            let left = (exp - now_ms()).max(0) as u64;
            Instant::now() + Duration::from_millis(left)
        });
        let mut draining = false;
        // Locals, so the futures in `select!` do not borrow `self`.
        let sink = self.sink.clone();
        let ctx = self.ctx.clone();
        loop {
            // Decode what is buffered, as far as the window and queue allow.
            while !draining && self.blocked.is_none() && self.acks.len() < max_inflight {
                match self.codec.decode(buf) {
                    Ok(Some(pkt)) => {
                        if let Some(end) = self.handle(pkt) {
                            return self.finish(stream, end).await;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let why = match e {
                            ProtoError::TooLarge => Goodbye::PacketTooLarge,
                            ProtoError::Malformed(_) => Goodbye::Malformed,
                        };
                        self.codec.disconnect(&mut self.out, why);
                        return self.finish(stream, End::Refused("malformed packet")).await;
                    }
                }
            }
            if let Err(e) = self.flush(stream).await {
                return End::Io(e);
            }
            if self.close_after_flush {
                return self
                    .finish(stream, End::Refused("publish not stored (3.1.1)"))
                    .await;
            }
            if draining && self.blocked.is_none() && self.acks.is_empty() && self.committing == 0 {
                self.codec.disconnect(&mut self.out, Goodbye::ShuttingDown);
                return self.finish(stream, End::Stopped).await;
            }
            let can_read = !draining && self.blocked.is_none() && self.acks.len() < max_inflight;
            let spare = buf.capacity() - buf.len();
            tokio::select! {
                biased;
                _ = hard_stop.cancelled() => return End::Stopped,
                _ = sink.notify.notified() => self.collect_acks(),
                _ = stop.cancelled(), if !draining => draining = true,
                _ = kicked.notified() => {
                    self.codec.disconnect(&mut self.out, Goodbye::TakenOver);
                    return self.finish(stream, End::Refused("session taken over")).await;
                }
                r = revocations.changed() => {
                    if r.is_err() || !self.grant.usable(now_ms()) {
                        return self.revoked(stream).await;
                    }
                }
                _ = sleep_until(expiry) => return self.revoked(stream).await,
                _ = sleep_until(deadline) => {
                    self.codec.disconnect(&mut self.out, Goodbye::KeepAliveTimeout);
                    return self.finish(stream, End::Refused("keep-alive timeout")).await;
                }
                _ = queue_space(&ctx), if self.blocked.is_some() => {
                    if let Some(end) = self.retry_blocked() {
                        return self.finish(stream, end).await;
                    }
                }
                r = stream.read_buf(buf), if can_read => match r {
                    Ok(0) => return End::ClientClosed,
                    Ok(n) => {
                        if let Some(k) = keep_alive {
                            deadline = Instant::now() + k;
                        }
                        // A read that filled the buffer means the client is
                        // streaming: double the buffer (up to a bound) so it
                        // takes fewer reads. Idle devices keep the small one.
                        if n >= spare && buf.capacity() < MAX_READ_BUFFER {
                            buf.reserve(buf.capacity());
                        }
                    }
                    Err(e) => return End::Io(e),
                },
            }
        }
    }

    async fn revoked<S: AsyncRead + AsyncWrite + Unpin>(&mut self, stream: &mut S) -> End {
        let end = self.revoked_now();
        self.finish(stream, end).await
    }

    /// Writes what is buffered (a farewell, if any) and ends the session.
    /// Closing a socket with unread input makes the kernel send RST, which
    /// destroys the PUBACKs and DISCONNECT still in flight to the client;
    /// so after FIN, whatever the client still sends is read and dropped
    /// for a short, bounded while.
    async fn finish<S: AsyncRead + AsyncWrite + Unpin>(&mut self, stream: &mut S, end: End) -> End {
        let _ = self.flush(stream).await;
        let _ = stream.shutdown().await;
        // On the heap: an array here would live in every session's future.
        let mut sink = vec![0u8; 4096];
        let mut budget = LINGER_BYTES;
        let _ = tokio::time::timeout(LINGER, async {
            while budget > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => budget = budget.saturating_sub(n),
                }
            }
        })
        .await;
        end
    }

    async fn flush<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> std::io::Result<()> {
        if !self.out.is_empty() {
            stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Handles one packet; `Some` ends the session.
    fn handle(&mut self, pkt: Incoming) -> Option<End> {
        match pkt {
            Incoming::Publish(p) => self.publish(p),
            Incoming::PingRequest => {
                self.codec.pingresp(&mut self.out);
                None
            }
            Incoming::Subscribe { packet_id, filters } => {
                self.codec.suback_refused(&mut self.out, packet_id, filters);
                None
            }
            Incoming::Unsubscribe { packet_id, filters } => {
                self.codec.unsuback(&mut self.out, packet_id, filters);
                None
            }
            Incoming::Disconnect => Some(End::ClientDisconnect),
            Incoming::Unexpected(what) => {
                tracing::debug!(packet = what, "unexpected packet from client");
                self.codec.disconnect(&mut self.out, Goodbye::ProtocolError);
                Some(End::Refused("protocol error"))
            }
        }
    }

    fn publish(&mut self, p: Box<super::proto::Publish>) -> Option<End> {
        let m = &self.ctx.metrics;
        let qos = qos_of(&p);
        if qos == 2 {
            // CONNACK advertised maximum QoS 1 (MQTT 5); 3.1.1 has no way
            // to refuse a QoS, so the connection is closed.
            m.publish(2, PublishOutcome::QosUnsupported);
            self.codec
                .disconnect(&mut self.out, Goodbye::QosNotSupported);
            return Some(End::Refused("QoS 2"));
        }
        let now = now_ms();
        let (device, parsed) = match check_publish(&self.grant, &p.topic, &p.payload, now) {
            Ok(x) => x,
            Err(PublishRefusal::NotAuthorized) => {
                m.publish(qos, PublishOutcome::NotAuthorized);
                return self.refuse(
                    qos,
                    p.packet_id,
                    AckReason::NotAuthorized,
                    Goodbye::NotAuthorized,
                );
            }
            Err(PublishRefusal::BadPayload(e)) => {
                tracing::debug!(error = %e, "invalid state payload");
                m.publish(qos, PublishOutcome::BadPayload);
                return self.refuse(
                    qos,
                    p.packet_id,
                    AckReason::PayloadInvalid,
                    Goodbye::PayloadInvalid,
                );
            }
        };
        if self.grant.admit(1, monotonic_ns()).is_err() {
            m.publish(qos, PublishOutcome::QuotaExceeded);
            self.ctx.rate_limited(&self.grant.id);
            return self.refuse(
                qos,
                p.packet_id,
                AckReason::QuotaExceeded,
                Goodbye::QuotaExceeded,
            );
        }
        self.ctx.registry.touch(&self.grant, now);
        let done = match (qos, p.packet_id) {
            (1, Some(id)) => {
                self.acks.push_back(PendingAck {
                    packet_id: id,
                    reason: None,
                });
                self.committing += 1;
                Completion::Sink {
                    sink: self.sink.clone(),
                    tag: id.get(),
                }
            }
            _ => Completion::None,
        };
        m.publish(qos, PublishOutcome::Accepted);
        tracing::trace!(topic = %p.topic, qos, "publish accepted");
        let req = WriteRequest {
            grant: self.grant.clone(),
            device,
            body: p.payload,
            parsed,
            done,
        };
        self.enqueue(req)
    }

    /// Refuses a publish the contract's way: MQTT 5 QoS 1 gets a PUBACK
    /// with the reason, MQTT 5 QoS 0 a DISCONNECT, MQTT 3.1.1 a close.
    fn refuse(
        &mut self,
        qos: u8,
        packet_id: Option<NonZeroU16>,
        ack: AckReason,
        bye: Goodbye,
    ) -> Option<End> {
        match (self.codec.is_v5(), qos, packet_id) {
            (true, 1, Some(id)) => {
                self.acks.push_back(PendingAck {
                    packet_id: id,
                    reason: Some(ack),
                });
                self.write_ready_acks();
                None
            }
            (true, _, _) => {
                self.codec.disconnect(&mut self.out, bye);
                Some(End::Refused("publish refused"))
            }
            (false, _, _) => Some(End::Refused("publish refused (3.1.1)")),
        }
    }

    fn enqueue(&mut self, req: WriteRequest) -> Option<End> {
        match self.ctx.queue.try_enqueue(req) {
            Ok(()) => None,
            Err(EnqueueError::Full(req)) => {
                self.blocked = Some(*req);
                None
            }
            Err(EnqueueError::Closed) => {
                // Shutting down: the publish cannot be stored. It was not
                // acknowledged, so the client will send it again elsewhere.
                self.codec.disconnect(&mut self.out, Goodbye::ShuttingDown);
                Some(End::Stopped)
            }
            Err(EnqueueError::Revoked) => Some(self.revoked_now()),
        }
    }

    /// The token was revoked between the publish's check and its queueing:
    /// nothing of it is stored and the session ends as on any revocation.
    fn revoked_now(&mut self) -> End {
        self.codec.disconnect(&mut self.out, Goodbye::NotAuthorized);
        self.ctx.metrics.revoked.inc();
        End::Refused("token revoked or expired")
    }

    fn retry_blocked(&mut self) -> Option<End> {
        if let Some(req) = self.blocked.take() {
            let qos1 = matches!(req.done, Completion::Sink { .. });
            match self.ctx.queue.try_enqueue(req) {
                Ok(()) => {}
                Err(EnqueueError::Full(req)) => self.blocked = Some(*req),
                Err(EnqueueError::Revoked) => return Some(self.revoked_now()),
                Err(EnqueueError::Closed) => {
                    // The blocked publish is the newest one (reading stops
                    // while blocked); if QoS 1, its PUBACK says it failed.
                    if qos1 {
                        self.committing = self.committing.saturating_sub(1);
                        if let Some(a) = self.acks.back_mut() {
                            a.reason = Some(AckReason::Failed);
                        }
                        self.write_ready_acks();
                    }
                }
            }
        }
        None
    }

    /// Takes commit outcomes from the writer and writes every PUBACK that
    /// is now in order.
    fn collect_acks(&mut self) {
        self.sink.take_into(&mut self.scratch);
        let mut outcomes = self.scratch.drain(..);
        // Commits complete in queue order, which is this session's publish
        // order, so each outcome belongs to the oldest pending PUBACK.
        for a in self.acks.iter_mut().filter(|a| a.reason.is_none()) {
            let Some((pkid, r)) = outcomes.next() else {
                break;
            };
            debug_assert_eq!(pkid, a.packet_id.get());
            self.committing = self.committing.saturating_sub(1);
            a.reason = Some(if r.is_ok() {
                AckReason::Success
            } else {
                AckReason::Failed
            });
        }
        drop(outcomes);
        self.write_ready_acks();
    }

    fn write_ready_acks(&mut self) {
        while let Some(a) = self.acks.front() {
            let Some(reason) = a.reason else { break };
            let id = a.packet_id;
            self.acks.pop_front();
            if reason == AckReason::Failed && !self.codec.is_v5() {
                // 3.1.1 cannot report a failed publish: close, so the
                // client resends it after reconnecting.
                self.close_after_flush = true;
                continue;
            }
            self.codec.puback(&mut self.out, id, reason);
        }
    }
}
