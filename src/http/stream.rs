//! `GET /applications/{app}/stream`: an application's committed states as
//! Server-Sent Events, replayed from a position and then followed live.
//!
//! Query: `devices=` (comma list; default every device the token may read),
//! `from=` `now` (default) | `earliest` | a position. The standard
//! `Last-Event-ID` header (what an EventSource sends when it reconnects)
//! wins over `from`. Each event is
//!
//! ```text
//! id: <position>
//! data: {"device":"<id>","time":<epoch ms>,"data":<the data as stored>}
//! ```
//!
//! A resume position that retention has removed opens at the oldest
//! stored state, with a first event `event: aged_out` saying so. Comments
//! (`: heartbeat`) keep an idle stream open through proxies. The stream
//! ends at once when its token (or an ancestor) is revoked or expires, and
//! at shutdown.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Extension, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::admin::{path, ApiError, PathOf};
use super::read::{Peer, ReadApi};
use crate::auth::{monotonic_ns, Registry, Scope, TokenEntry};
use crate::ids::is_valid_id;
use crate::metrics::Metrics;
use crate::store::{Chunk, ChunkEntry};
use crate::streams::{Batch, Cursor, Opened, ReadBounds, Start, StreamSlot};
use crate::timefmt::now_ms;

/// The most states read from storage at once while a stream catches up
/// (the byte bound is `streams.consumer_buffer_bytes`).
const REPLAY_PAGE_STATES: usize = 4096;

/// Parses `from` / `Last-Event-ID`.
fn start_of(v: &str) -> Option<Start> {
    match v {
        "now" => Some(Start::Now),
        "earliest" => Some(Start::Earliest),
        p if !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse().ok().map(Start::After)
        }
        _ => None,
    }
}

/// The devices a stream is limited to: sorted, valid, each readable by the
/// token. `None`: every device the token may read.
fn devices_of(
    raw: Option<&String>,
    grant: &TokenEntry,
    app: &str,
) -> Result<Option<Vec<Box<str>>>, ApiError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let mut list: Vec<Box<str>> = Vec::new();
    for d in raw.split(',').filter(|d| !d.is_empty()) {
        if !is_valid_id(d) {
            return Err(ApiError::BadRequest(format!(
                "`devices`: {d:?} is not a device id (1-64 characters of A-Z a-z 0-9 _ . -)"
            )));
        }
        if !grant.permits(app, Some(d), Scope::GetState) {
            return Err(ApiError::Forbidden);
        }
        list.push(d.into());
    }
    if list.is_empty() {
        return Err(ApiError::BadRequest(
            "`devices` must name at least one device".into(),
        ));
    }
    list.sort_unstable();
    list.dedup();
    Ok(Some(list))
}

pub(super) async fn stream(
    State(api): State<Arc<ReadApi>>,
    app: PathOf<String>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let app = path(app)?;
    let grant = api.authorize(&headers, &app, None)?;
    // An ingest-only broker (cluster mode) has no log to stream from.
    api.read_model.ready(None).await?;
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if let Some(k) = params
        .keys()
        .find(|k| !matches!(k.as_str(), "devices" | "from"))
    {
        return Err(ApiError::BadRequest(format!(
            "unknown query parameter {k:?}"
        )));
    }
    let devices = devices_of(params.get("devices"), &grant, &app)?;
    let start = match headers.get("last-event-id") {
        Some(v) => v.to_str().ok().and_then(start_of).ok_or_else(|| {
            ApiError::BadRequest("`Last-Event-ID` is not a position of this stream".into())
        })?,
        None => match params.get("from") {
            None => Start::Now,
            Some(v) => start_of(v).ok_or_else(|| {
                ApiError::BadRequest(
                    "`from` must be \"now\", \"earliest\" or a position (an event id)".into(),
                )
            })?,
        },
    };
    let slot = api
        .slots
        .open(&grant.id, peer.map(|Extension(Peer(ip))| ip))
        .map_err(|e| {
            tracing::debug!(token = %grant.id, error = %e, "stream refused");
            ApiError::TooManyStreams
        })?;
    let bounds = ReadBounds {
        max_entries: REPLAY_PAGE_STATES,
        max_bytes: api.streams.consumer_buffer_bytes,
    };
    let (cursor, opened) = Cursor::open(&api.hub, &api.store, &app, start, bounds)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "stream could not open its log");
            ApiError::Internal
        })?;
    let first = (opened == Opened::AgedOut).then(|| {
        Bytes::from_static(
            b"event: aged_out\ndata: {\"detail\":\"the requested position is no longer stored (storage.retention); the stream starts at the oldest stored state\"}\n\n",
        )
    });
    let expiry = grant.chain_expiry().map(|exp| {
        let left = (exp - now_ms()).max(0) as u64;
        Instant::now() + Duration::from_millis(left)
    });
    let sse = Sse {
        revocations: api.registry.subscribe_revocations(&app),
        registry: api.registry.clone(),
        grant,
        app: app.into(),
        devices,
        cursor,
        pending: None,
        first,
        heartbeat: api.streams.sse_heartbeat,
        stop: api.stop.clone(),
        expiry,
        max_frame: api.streams.consumer_buffer_bytes,
        metrics: api.metrics.clone(),
        _slot: slot,
        _open: OpenStream::new(api.metrics.clone()),
    };
    let body = futures_util::stream::unfold(sse, |mut sse| async move {
        let frame = sse.next_frame().await?;
        Some((Ok::<_, Infallible>(frame), sse))
    });
    let mut r = Body::from_stream(body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(r)
}

/// Counts an open stream in `sluice_sse_streams` while it lives.
struct OpenStream(Arc<Metrics>);

impl OpenStream {
    fn new(m: Arc<Metrics>) -> OpenStream {
        m.sse_streams.inc();
        OpenStream(m)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.sse_streams.dec();
    }
}

/// One open stream: its cursor and what ends it.
struct Sse {
    grant: Arc<TokenEntry>,
    app: Box<str>,
    devices: Option<Vec<Box<str>>>,
    cursor: Cursor,
    /// A batch partly encoded: the index of the next entry to look at.
    pending: Option<(Batch, usize)>,
    /// Sent before anything else (the aged-out notice).
    first: Option<Bytes>,
    revocations: watch::Receiver<u64>,
    /// Cluster mode: once this broker's view of the tokens is stale it
    /// cannot know whether the grant was revoked, so the stream ends (the
    /// client resumes by `Last-Event-ID`, here once trusted again or on
    /// another broker).
    registry: Arc<Registry>,
    heartbeat: Duration,
    stop: CancellationToken,
    expiry: Option<Instant>,
    /// The most bytes one frame holds (`streams.consumer_buffer_bytes`).
    max_frame: usize,
    metrics: Arc<Metrics>,
    _slot: StreamSlot,
    _open: OpenStream,
}

impl Sse {
    fn wants(&self, device: &str) -> bool {
        self.grant.permits(&self.app, Some(device), Scope::GetState)
            && self
                .devices
                .as_ref()
                .is_none_or(|l| l.binary_search_by(|d| (**d).cmp(device)).is_ok())
    }

    /// Encodes the pending batch's wanted entries, up to one frame.
    fn encode(&mut self) -> Option<Bytes> {
        let (batch, mut i) = self.pending.take()?;
        let entries = batch.entries();
        let mut out = BytesMut::new();
        let mut sent = 0u64;
        while i < entries.len() && out.len() < self.max_frame {
            let e = &entries[i];
            let device = batch.chunk.device(e);
            if self.wants(device) {
                event(&mut out, &batch.chunk, e);
                sent += 1;
            }
            i += 1;
        }
        if i < entries.len() {
            self.pending = Some((batch, i));
        }
        self.metrics.stream_states_sent.inc_by(sent);
        (!out.is_empty()).then(|| out.freeze())
    }

    /// The next bytes of the stream; `None` ends it.
    async fn next_frame(&mut self) -> Option<Bytes> {
        if let Some(b) = self.first.take() {
            return Some(b);
        }
        let heartbeat_at = Instant::now() + self.heartbeat;
        loop {
            if !self.registry.trusted(monotonic_ns()) {
                tracing::debug!(token = %self.grant.id, "stream ended: token view stale");
                return None;
            }
            if self.pending.is_some() {
                if let Some(frame) = self.encode() {
                    return Some(frame);
                }
                continue;
            }
            let expiry = self.expiry;
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return None,
                r = self.revocations.changed() => {
                    if r.is_err() || !self.grant.usable(now_ms()) {
                        tracing::debug!(token = %self.grant.id, "stream ended: token revoked");
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {
                    tracing::debug!(token = %self.grant.id, "stream ended: token expired");
                    return None;
                }
                // Cancel safe: an unfinished read is simply read again.
                b = self.cursor.next() => match b {
                    Ok(batch) => self.pending = Some((batch, 0)),
                    Err(e) => {
                        tracing::warn!(error = %e, "stream ended: reading the log failed");
                        return None;
                    }
                },
                _ = tokio::time::sleep_until(heartbeat_at) => {
                    return Some(Bytes::from_static(b": heartbeat\n\n"));
                }
            }
        }
    }
}

/// Appends one event. The data is JSON whose line breaks can only be
/// whitespace between tokens (a JSON string cannot hold a raw one), and a
/// line break would end the `data:` field, so each becomes a space.
fn event(out: &mut BytesMut, chunk: &Chunk, e: &ChunkEntry) {
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(itoa::Buffer::new().format(e.position).as_bytes());
    out.extend_from_slice(b"\ndata: {\"device\":\"");
    // Device ids are [A-Za-z0-9_.-]: nothing to escape.
    out.extend_from_slice(chunk.device(e).as_bytes());
    out.extend_from_slice(b"\",\"time\":");
    out.extend_from_slice(itoa::Buffer::new().format(e.time_ms).as_bytes());
    out.extend_from_slice(b",\"data\":");
    let start = out.len();
    out.extend_from_slice(&e.data);
    for b in &mut out[start..] {
        if *b == b'\n' || *b == b'\r' {
            *b = b' ';
        }
    }
    out.extend_from_slice(b"}\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_data_line_of_json() {
        let mut c = Chunk::default();
        c.push(
            42,
            7,
            "pump-1",
            Bytes::from_static(b"{\"a\":\r\n 1,\n\"b\":\"x y\"}"),
        );
        let mut out = BytesMut::new();
        event(&mut out, &c, &c.entries()[0]);
        let text = std::str::from_utf8(&out).unwrap();
        assert_eq!(
            text,
            "id: 42\ndata: {\"device\":\"pump-1\",\"time\":7,\"data\":{\"a\":   1, \"b\":\"x y\"}}\n\n"
        );
        let data = text.lines().nth(1).unwrap().strip_prefix("data: ").unwrap();
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["data"]["a"], 1);
    }

    #[test]
    fn positions_parse() {
        assert_eq!(start_of("now"), Some(Start::Now));
        assert_eq!(start_of("earliest"), Some(Start::Earliest));
        assert_eq!(start_of("17"), Some(Start::After(17)));
        for bad in ["", "-1", "1e3", "x", "99999999999999999999999"] {
            assert_eq!(start_of(bad), None, "{bad}");
        }
    }
}
