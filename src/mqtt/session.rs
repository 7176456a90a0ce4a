//! One MQTT session after its CONNACK: the event loop. It reads and
//! decodes packets while its PUBACK window and the write queue allow (the
//! per-publish path is in `publish.rs`), writes replies, and ends the
//! session on DISCONNECT, takeover, revocation, expiry, keep-alive
//! timeout, protocol errors and shutdown.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::acks::Pubacks;
use super::connect::Accepted;
use super::deliver::{Keep, Subscriber};
use super::proto::{starts_with_publish, Codec, Goodbye, Incoming};
use super::MqttContext;
use crate::auth::{monotonic_ns, TokenEntry};
use crate::timefmt::now_ms;
use crate::writer::{EnqueueError, WriteRequest};

/// Why a session ended; for the debug log.
pub(super) enum End {
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
/// is read and dropped so the close does not turn into a reset. Also the
/// bound on writing a farewell to a client that does not read.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 1 << 20;

/// Far enough to mean "never" for a timer.
const NEVER: Duration = Duration::from_secs(86_400 * 365);

fn never() -> Instant {
    Instant::now() + NEVER
}

/// One session's state.
pub(super) struct Session<'c> {
    pub(super) ctx: &'c MqttContext,
    pub(super) codec: Codec,
    pub(super) grant: Arc<TokenEntry>,
    pub(super) acks: Pubacks,
    /// An accepted publish the queue had no room for; while set, no further
    /// PUBLISH is taken (TCP backpressure instead of dropping or erroring).
    pub(super) blocked: Option<WriteRequest>,
    /// Replies not yet written.
    pub(super) out: BytesMut,
    /// Set when a 3.1.1 publish could not be stored: it cannot be NACKed,
    /// so the connection is closed once earlier PUBACKs are written.
    pub(super) close_after_flush: bool,
    /// MQTT 5 session expiry from CONNECT.
    session_expiry: u32,
    /// Subscriptions and what is in flight to them; boxed, so sessions
    /// that only publish stay small.
    pub(super) sub: Option<Box<Subscriber>>,
    /// The stored session of a token that may subscribe.
    pub(super) keep: Option<Box<Keep>>,
    /// The client's Receive Maximum (MQTT 5), bounding QoS 1 deliveries.
    pub(super) receive_max: u16,
}

/// What ends a session from outside: shutdown, takeover, and revocation or
/// expiry of its token.
struct Signals<'a> {
    stop: &'a CancellationToken,
    hard_stop: &'a CancellationToken,
    kicked: &'a Notify,
    revocations: watch::Receiver<u64>,
    expiry: Instant,
}

enum Signal {
    HardStop,
    Stop,
    Kicked,
    /// Some token was revoked (`true`: the registry is gone).
    Revocation(bool),
    Expired,
}

impl Signals<'_> {
    /// The next signal; `Stop` only once (not while already draining).
    async fn next(&mut self, draining: bool) -> Signal {
        tokio::select! {
            biased;
            _ = self.hard_stop.cancelled() => Signal::HardStop,
            _ = self.stop.cancelled(), if !draining => Signal::Stop,
            _ = self.kicked.notified() => Signal::Kicked,
            r = self.revocations.changed() => Signal::Revocation(r.is_err()),
            _ = sleep_until(self.expiry) => Signal::Expired,
        }
    }
}

/// The keep-alive deadline: 1.5 × the client's Keep Alive after the last
/// read ([MQTT-3.1.2-24]), suspended while the session itself does not
/// read (a PUBLISH waits for queue space or for the PUBACK window, or the
/// session drains for shutdown). The client's packets are then waiting in
/// the socket, unread: the server's own backpressure must not count
/// against it.
struct KeepAlive {
    period: Option<Duration>,
    deadline: Instant,
    paused_at: Option<Instant>,
}

impl KeepAlive {
    fn new(keep_alive_secs: u16) -> KeepAlive {
        let period =
            (keep_alive_secs > 0).then(|| Duration::from_millis(u64::from(keep_alive_secs) * 1500));
        KeepAlive {
            period,
            deadline: Instant::now() + period.unwrap_or(NEVER),
            paused_at: None,
        }
    }

    /// The client was heard from.
    fn heard(&mut self) {
        if let Some(p) = self.period {
            self.deadline = Instant::now() + p;
        }
    }

    /// Pauses the clock while the session does not read, and moves the
    /// deadline by the paused time when it reads again.
    fn reading(&mut self, reading: bool) {
        match (reading, self.paused_at) {
            (false, None) => self.paused_at = Some(Instant::now()),
            (true, Some(at)) => {
                self.deadline += at.elapsed();
                self.paused_at = None;
            }
            _ => {}
        }
    }

    /// When the session times out, unless it hears from the client first.
    fn deadline(&self) -> Option<Instant> {
        match (self.period, self.paused_at) {
            (Some(_), None) => Some(self.deadline),
            _ => None,
        }
    }
}

/// Runs an accepted session until it ends.
pub(super) async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    mut buf: BytesMut,
    accepted: Accepted<'_>,
    ctx: &MqttContext,
    stop: &CancellationToken,
    hard_stop: &CancellationToken,
) {
    let _open = ctx.metrics.open_connection();
    let Accepted {
        codec,
        grant,
        keep_alive,
        session_expiry,
        registration,
        keep,
        resumed,
        receive_max,
    } = accepted;
    let expiry = grant.chain_expiry().map_or_else(never, |exp| {
        let left = (exp - now_ms()).max(0) as u64;
        Instant::now() + Duration::from_millis(left)
    });
    let mut signals = Signals {
        stop,
        hard_stop,
        kicked: registration.kicked(),
        revocations: ctx.registry.subscribe_revocations(&grant.app),
        expiry,
    };
    let mut s = Session {
        ctx,
        codec,
        grant,
        acks: Pubacks::new(),
        blocked: None,
        out: BytesMut::with_capacity(64),
        close_after_flush: false,
        session_expiry,
        sub: None,
        keep,
        receive_max,
    };
    if let Some(subs) = resumed {
        Box::pin(s.resume(subs)).await;
    }
    let end = s
        .serve(&mut stream, &mut buf, keep_alive, &mut signals)
        .await;
    tracing::debug!(client = ?registration.client_id(), end = %end, "MQTT session ended");
}

impl Session<'_> {
    /// Whether the session takes the next packet in `buf` (or reads for
    /// one). Not while draining; and while a publish waits for queue space
    /// or the PUBACK window is full, no further PUBLISH: it stays in the
    /// socket (TCP backpressure). Other packets still are: an MQTT 5 client
    /// whose window is full keeps pinging and must get its PINGRESPs.
    fn reading(&self, draining: bool, buf: &[u8]) -> bool {
        let backpressure =
            self.blocked.is_some() || self.acks.len() >= self.ctx.config.receive_maximum as usize;
        let held = backpressure && starts_with_publish(buf);
        !draining && !held
    }

    /// The session loop. Returns when the connection is closed; any
    /// farewell packet has been written by then.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        buf: &mut BytesMut,
        keep_alive: u16,
        sig: &mut Signals<'_>,
    ) -> End {
        let mut keep_alive = KeepAlive::new(keep_alive);
        let mut draining = false;
        // Locals, so the futures in `select!` do not borrow `self`.
        let sink = self.acks.sink().clone();
        let mut deliveries = None;
        loop {
            // Decode what is buffered, as far as the window and queue allow.
            while self.reading(draining, buf) {
                match self.codec.decode(buf) {
                    Ok(Some(Incoming::Subscribe { .. })) if !self.trusted() => {
                        self.codec.disconnect(&mut self.out, Goodbye::Unavailable);
                        let end = End::Refused("token view stale");
                        return self.finish(stream, end, sig).await;
                    }
                    Ok(Some(Incoming::Subscribe { packet_id, filters })) => {
                        // Boxed: rare, and it would make every session's
                        // future as large as itself.
                        Box::pin(self.subscribe(packet_id, filters)).await;
                    }
                    Ok(Some(Incoming::Unsubscribe { packet_id, filters })) => {
                        Box::pin(self.unsubscribe(packet_id, filters)).await;
                    }
                    Ok(Some(pkt)) => {
                        if let Some(end) = self.handle(pkt) {
                            return self.finish(stream, end, sig).await;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "MQTT packet refused");
                        self.codec.disconnect(&mut self.out, e.goodbye());
                        return self.finish(stream, End::Refused("bad packet"), sig).await;
                    }
                }
            }
            // A client that once sent a large packet does not keep a large
            // buffer while it idles.
            if buf.is_empty() && buf.capacity() > MAX_READ_BUFFER {
                *buf = BytesMut::with_capacity(self.ctx.config.read_buffer_bytes);
            }
            if let Err(end) = self.flush(stream, sig, &keep_alive).await {
                return self.finish(stream, end, sig).await;
            }
            if self.close_after_flush {
                let end = End::Refused("publish not stored (3.1.1)");
                return self.finish(stream, end, sig).await;
            }
            if draining && self.blocked.is_none() && self.acks.is_settled() {
                self.codec.disconnect(&mut self.out, Goodbye::ShuttingDown);
                return self.finish(stream, End::Stopped, sig).await;
            }
            if deliveries.is_none() {
                deliveries = self.sub.as_mut().and_then(|s| s.rx.take());
            }
            let can_read = self.reading(draining, buf);
            keep_alive.reading(can_read);
            let deadline = keep_alive.deadline();
            let spare = buf.capacity() - buf.len();
            tokio::select! {
                biased;
                s = sig.next(draining) => match s {
                    Signal::Stop => draining = true,
                    other => {
                        if let Some(end) = self.on_signal(other) {
                            return self.finish(stream, end, sig).await;
                        }
                    }
                },
                _ = sink.notify.notified() => self.collect_acks(),
                d = next_delivery(&mut deliveries), if !draining && self.can_deliver() => {
                    match (d, deliveries.as_mut()) {
                        // A state not delivered stays unacknowledged: a
                        // persistent session resumes from it.
                        (Some(_), Some(_)) if !self.trusted() => {
                            self.codec.disconnect(&mut self.out, Goodbye::Unavailable);
                            let end = End::Refused("token view stale");
                            return self.finish(stream, end, sig).await;
                        }
                        (Some(d), Some(rx)) => self.deliver(d, rx),
                        _ => deliveries = None,
                    }
                }
                end = self.queue_blocked(), if self.blocked.is_some() => {
                    if let Some(end) = end {
                        return self.finish(stream, end, sig).await;
                    }
                }
                // Reading comes before the keep-alive check, so input that
                // waited while the server was busy is always seen first.
                r = stream.read_buf(buf), if can_read => match r {
                    Ok(0) => return self.finish(stream, End::ClientClosed, sig).await,
                    Ok(n) => {
                        keep_alive.heard();
                        // A read that filled the buffer means the client is
                        // streaming: double the buffer (up to a bound) so it
                        // takes fewer reads. Idle devices keep the small one.
                        if n >= spare && buf.capacity() < MAX_READ_BUFFER {
                            buf.reserve(buf.capacity());
                        }
                    }
                    Err(e) => return self.finish(stream, End::Io(e), sig).await,
                },
                _ = sleep_until(deadline.unwrap_or_else(never)), if deadline.is_some() => {
                    self.codec.disconnect(&mut self.out, Goodbye::KeepAliveTimeout);
                    return self.finish(stream, End::Refused("keep-alive timeout"), sig).await;
                }
            }
        }
    }

    /// What a signal other than `Stop` does; `Some` ends the session, with
    /// its farewell in `out`.
    fn on_signal(&mut self, s: Signal) -> Option<End> {
        match s {
            Signal::HardStop => Some(End::Stopped),
            Signal::Stop => None,
            Signal::Kicked => {
                self.codec.disconnect(&mut self.out, Goodbye::TakenOver);
                Some(End::Refused("session taken over"))
            }
            Signal::Revocation(closed) => {
                (closed || !self.grant.usable(now_ms())).then(|| self.revoked_now())
            }
            Signal::Expired => Some(self.revoked_now()),
        }
    }

    /// Writes the pending replies. The client may not read them; while it
    /// does not, takeover, revocation, shutdown and its keep-alive still
    /// end the session.
    async fn flush<S: AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        sig: &mut Signals<'_>,
        keep_alive: &KeepAlive,
    ) -> Result<(), End> {
        while !self.out.is_empty() {
            let deadline = keep_alive.deadline();
            tokio::select! {
                biased;
                // `write_buf` is cancel safe: `out` keeps what is unwritten.
                r = write_out(stream, &mut self.out) => return r.map_err(End::Io),
                s = sig.next(true) => {
                    if let Some(end) = self.on_signal(s) {
                        return Err(end);
                    }
                }
                _ = sleep_until(deadline.unwrap_or_else(never)), if deadline.is_some() => {
                    self.codec.disconnect(&mut self.out, Goodbye::KeepAliveTimeout);
                    return Err(End::Refused("keep-alive timeout"));
                }
            }
        }
        Ok(())
    }

    /// Ends the session: writes its farewell (briefly), closes, queues an
    /// accepted publish that still waits for space (a publish is stored
    /// or not the same way whether or not its client stays), and drains.
    async fn finish<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        end: End,
        sig: &Signals<'_>,
    ) -> End {
        if matches!(end, End::Stopped) && sig.hard_stop.is_cancelled() {
            return end;
        }
        say_goodbye(stream, &mut self.out).await;
        self.settle_blocked(sig.hard_stop).await;
        if self.keep.is_some() {
            Box::pin(self.end_session()).await;
        }
        drain(stream).await;
        end
    }

    /// Handles one packet; `Some` ends the session.
    /// Cluster mode: whether this broker's view of the tokens is fresh
    /// enough to know the grant is still valid. A subscriber is not served
    /// while it is not (it reconnects elsewhere or later and resumes).
    fn trusted(&self) -> bool {
        self.ctx.registry.trusted(monotonic_ns())
    }

    fn handle(&mut self, pkt: Incoming) -> Option<End> {
        match pkt {
            Incoming::Publish(p) => self.publish(p),
            Incoming::PingRequest => {
                self.codec.pingresp(&mut self.out);
                None
            }
            // Handled in `serve` (they wait for storage).
            Incoming::Subscribe { .. } | Incoming::Unsubscribe { .. } => None,
            Incoming::PubAck { packet_id } => {
                self.puback_in(packet_id);
                None
            }
            Incoming::Disconnect { session_expiry } => {
                // MQTT 5: a DISCONNECT may not set a session expiry when
                // CONNECT had none (3.14.2.2.2): a protocol error.
                if self.session_expiry == 0 && session_expiry.is_some_and(|e| e > 0) {
                    self.codec.disconnect(&mut self.out, Goodbye::ProtocolError);
                    return Some(End::Refused("session expiry set at DISCONNECT"));
                }
                // Otherwise it may change it (0: not kept after all).
                if let (Some(e), Some(keep)) = (session_expiry, self.keep.as_mut()) {
                    keep.expiry = e.min(self.ctx.session_expiry_max());
                    keep.persistent = e > 0;
                }
                Some(End::ClientDisconnect)
            }
            Incoming::Unexpected(what) => {
                tracing::debug!(packet = what, "unexpected packet from client");
                self.codec.disconnect(&mut self.out, Goodbye::ProtocolError);
                Some(End::Refused("protocol error"))
            }
        }
    }

    /// Takes commit outcomes from the writer and encodes every PUBACK that
    /// is now in order.
    fn collect_acks(&mut self) {
        self.acks.collect();
        self.write_ready_acks();
    }

    pub(super) fn write_ready_acks(&mut self) {
        if self.acks.write_ready(&mut self.codec, &mut self.out) {
            self.close_after_flush = true;
        }
    }

    /// Queues the blocked publish, waiting for space as long as it takes,
    /// unless the server stops hard or the token is revoked meanwhile.
    async fn settle_blocked(&mut self, hard_stop: &CancellationToken) {
        let queue = &self.ctx.queue;
        while let Some(req) = self.blocked.take() {
            let space = queue.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            match queue.try_enqueue(req) {
                Ok(()) | Err(EnqueueError::Revoked) | Err(EnqueueError::Closed) => {}
                Err(EnqueueError::Full(req)) => {
                    self.blocked = Some(*req);
                    tokio::select! {
                        _ = hard_stop.cancelled() => return,
                        _ = space => {}
                    }
                }
            }
        }
    }
}

/// The next delivery for a subscriber; never ready for a session that has
/// no subscriber.
async fn next_delivery(
    rx: &mut Option<tokio::sync::mpsc::Receiver<crate::streams::feed::Delivery>>,
) -> Option<crate::streams::feed::Delivery> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes all of `out` and flushes (TLS buffers records).
async fn write_out<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
) -> std::io::Result<()> {
    while !out.is_empty() {
        if stream.write_buf(out).await? == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
    }
    out.clear();
    stream.flush().await
}

/// Writes a last packet (if any) and sends FIN, within [`LINGER`]: a
/// client that does not read cannot hold the connection open.
pub(super) async fn say_goodbye<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut BytesMut) {
    let _ = tokio::time::timeout(LINGER, async {
        write_out(stream, out).await?;
        stream.shutdown().await
    })
    .await;
}

/// Closing a socket with unread input makes the kernel send RST, which
/// destroys the packets still in flight to the client; so after FIN,
/// whatever the client still sends is read and dropped for a short,
/// bounded while.
pub(super) async fn drain<S: AsyncRead + Unpin>(stream: &mut S) {
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
}
