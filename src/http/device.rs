//! The device-facing HTTP listener:
//! `POST /applications/{app}/devices/{device}/state`, and the read routes
//! (`GET` history, composite state and the live stream, see `read.rs`),
//! which it hands to the same router the admin listener uses.
//!
//! Order of checks (each stops at the first failure): in cluster mode, a
//! stale view of the cluster's tokens (503) → route → hold-back
//! of an address with too many failed authentications → token (401) → ids
//! (400) → permission (403) → body size (413) → content type (415) → room
//! in the body buffer budget (503) → body (400) → rate limit (429) → token still usable (401) → queue (503) →
//! commit: 200 once the batch is in the WAL, 400 if the device would
//! exceed its attribute limit, 503 if storage failed.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response};
use tokio::sync::{oneshot, Semaphore};

use super::serve::{error_with_detail, json};
use crate::auth::{monotonic_ns, Denied, Registry, Scope};
use crate::ids::{is_valid_id, state_path};
use crate::ip_limit::IpLimiter;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::secret::parse_bearer;
use crate::state::{self, Shape};
use crate::store::device_key;
use crate::timefmt::now_ms;
use crate::tokens::STALE;
use crate::writer::{CommitError, Completion, EnqueueError, IngestQueue, WriteRequest};

/// A device-listener response: a whole body (ingest, errors) or the read
/// router's (a history page, an SSE stream).
pub type DeviceBody = Either<Full<Bytes>, axum::body::Body>;

/// Everything the device listener needs, shared by all its connections.
pub struct DeviceApi {
    /// The read routes (`read::router` with the root token refused).
    pub read: hyper_util::service::TowerToHyperService<axum::Router>,
    pub registry: Arc<Registry>,
    pub queue: Arc<IngestQueue>,
    pub metrics: Arc<Metrics>,
    /// `/readyz` (reasons only: this listener is public).
    pub readiness: Arc<Readiness>,
    /// Failed authentications per address (`http.auth_failure_rate_per_ip`).
    pub auth_failures: IpLimiter,
    /// The longest an address over its failed-authentication budget is
    /// held back before its token is checked (`http.header_read_timeout`).
    pub max_hold: Duration,
    pub max_body_bytes: usize,
    pub body_read_timeout: Duration,
    /// Bytes of request bodies being read at once, over all connections
    /// (`http.max_buffered_body_bytes`): each request reserves its declared
    /// length (or `max_body_bytes` without one) before its body is read and
    /// releases it once the body is queued (the queue's own byte bound
    /// takes over) or refused. With no room left the request is answered
    /// 503 overloaded at once, so memory stays bounded however many
    /// connections upload at the same time.
    pub body_budget: Semaphore,
}

/// A cheap, cloneable hyper service over a shared [`DeviceApi`], one per
/// connection: it knows the peer's address for the per-address limits.
#[derive(Clone)]
pub struct DeviceService {
    pub api: Arc<DeviceApi>,
    pub peer: IpAddr,
}

impl hyper::service::Service<Request<Incoming>> for DeviceService {
    type Response = Response<DeviceBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let api = self.api.clone();
        let peer = self.peer;
        Box::pin(async move {
            let resp = match is_read(req.method(), req.uri().path()) {
                true => api.read(req, peer).await.map(Either::Right),
                false => api.handle(req, peer).await.map(Either::Left),
            };
            api.metrics.http_response(resp.status().as_u16());
            Ok(resp)
        })
    }
}

/// Whether a request is for the read routes: a `GET` whose path matches
/// one of `read::PATHS` (a `{…}` segment matches any one segment), so a
/// read route added there is served here too.
fn is_read(method: &Method, path: &str) -> bool {
    method == Method::GET
        && super::read::PATHS
            .iter()
            .any(|template| matches_template(template, path))
}

fn matches_template(template: &str, path: &str) -> bool {
    let mut want = template.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some(w), Some(g)) if w.starts_with('{') || w == g => {}
            _ => return false,
        }
    }
}

const UNAUTHORIZED: &str = r#"{"error":"unauthorized"}"#;
const FORBIDDEN: &str = r#"{"error":"forbidden"}"#;
const NOT_FOUND: &str = r#"{"error":"not_found"}"#;
const TOO_LARGE: &str = r#"{"error":"payload_too_large"}"#;
const OVERLOADED: &str = r#"{"error":"overloaded"}"#;
const RATE_LIMITED: &str = r#"{"error":"rate_limited"}"#;
const TIMEOUT: &str = r#"{"error":"request_timeout"}"#;
const UNSUPPORTED: &str = r#"{"error":"unsupported_media_type"}"#;
const METHOD: &str = r#"{"error":"method_not_allowed"}"#;

fn fixed(status: u16, body: &'static str) -> Response<Full<Bytes>> {
    json(status, Bytes::from_static(body.as_bytes()))
}

/// 429 with `Retry-After` in whole seconds, at least 1.
fn rate_limited(wait: Duration) -> Response<Full<Bytes>> {
    let mut r = fixed(429, RATE_LIMITED);
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let mut buf = itoa::Buffer::new();
    if let Ok(v) = HeaderValue::from_str(buf.format(secs.max(1))) {
        r.headers_mut().insert(RETRY_AFTER, v);
    }
    r
}

fn overloaded() -> Response<Full<Bytes>> {
    let mut r = fixed(503, OVERLOADED);
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// 503 when storage failed: nothing of the request was stored. The retry
/// hint matches how often RocksDB checks whether it can resume (5 s).
fn unavailable() -> Response<Full<Bytes>> {
    let mut r = error_with_detail(
        503,
        "unavailable",
        "storage could not write this request; nothing of it was stored",
    );
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

/// `/healthz`: liveness only, 200 while the process answers; whether it
/// should get traffic is `/readyz`.
fn alive() -> Response<Full<Bytes>> {
    json(200, Bytes::from_static(b"{\"status\":\"ok\"}"))
}

/// 503 while this broker's view of the cluster's tokens is stale (cluster
/// mode): it cannot know whether a token was revoked meanwhile, so it
/// refuses every request; another broker can serve it.
fn stale() -> Response<Full<Bytes>> {
    let mut r = error_with_detail(503, "unavailable", STALE);
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// Every route the device listener answers (method, path template):
/// `handle` dispatches on exactly these, and the OpenAPI test checks
/// `docs/openapi.json` against them.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", HEALTHZ),
    ("GET", READYZ),
    ("POST", "/applications/{app}/devices/{device}/state"),
];
const HEALTHZ: &str = "/healthz";
const READYZ: &str = "/readyz";

impl DeviceApi {
    /// A read route: the same failed-authentication hold-back as ingest,
    /// then the shared read router, with the peer's address for the
    /// per-address stream limit.
    async fn read(&self, mut req: Request<Incoming>, peer: IpAddr) -> Response<axum::body::Body> {
        let hold = self.auth_failures.wait(peer).min(self.max_hold);
        if !hold.is_zero() {
            tokio::time::sleep(hold).await;
        }
        req.extensions_mut().insert(super::read::Peer(peer));
        let resp = match hyper::service::Service::call(&self.read, req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        if resp.status() == hyper::StatusCode::UNAUTHORIZED {
            let _ = self.auth_failures.take(peer);
        }
        resp
    }

    pub async fn handle(&self, req: Request<Incoming>, peer: IpAddr) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if path == HEALTHZ {
            return alive();
        }
        if path == READYZ {
            let (status, body) = self.readiness.respond(false).await;
            return json(status, body);
        }
        if !self.registry.trusted(monotonic_ns()) {
            return stale();
        }
        let Some((app, device)) = path.strip_prefix('/').and_then(state_path) else {
            return fixed(404, NOT_FOUND);
        };
        if req.method() != Method::POST {
            let mut r = fixed(405, METHOD);
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, POST"));
            return r;
        }
        // An address that spent its failed-authentication budget waits for
        // it to refill before its token is even looked at: guessing slows
        // to `http.auth_failure_rate_per_ip`, a valid token is only delayed.
        let hold = self.auth_failures.wait(peer).min(self.max_hold);
        if !hold.is_zero() {
            tokio::time::sleep(hold).await;
        }
        // Ack latency counts from here: a hold is a penalty, not latency.
        let received = std::time::Instant::now();
        let now = now_ms();
        let credential = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|h| parse_bearer(h.as_bytes()));
        let Some(credential) = credential else {
            let _ = self.auth_failures.take(peer);
            return fixed(401, UNAUTHORIZED);
        };
        // The grant is kept (one Arc clone): the rate limit can only be
        // charged once the body says how many states, and the token is
        // checked again when the request is queued.
        let verdict = self.registry.with_grant(credential, now, |grant| {
            if !is_valid_id(app) || !is_valid_id(device) {
                return Err(None);
            }
            // The root token is an admin-plane credential: it never
            // travels over a device-facing port, so it is not one here.
            if grant.root() {
                return Err(Some(Denied::Unauthorized));
            }
            if grant.permits(app, Some(device), Scope::SendState) {
                Ok(grant.entry().clone())
            } else {
                Err(Some(Denied::Forbidden))
            }
        });
        let grant = match verdict {
            Err(Denied::Unauthorized) | Ok(Err(Some(Denied::Unauthorized))) => {
                tracing::debug!(
                    app,
                    device,
                    %peer,
                    "state request with an unknown or unusable token"
                );
                let _ = self.auth_failures.take(peer);
                return fixed(401, UNAUTHORIZED);
            }
            Err(Denied::Forbidden) | Ok(Err(Some(Denied::Forbidden))) => {
                return fixed(403, FORBIDDEN)
            }
            Ok(Err(None)) => {
                return error_with_detail(
                    400,
                    "bad_request",
                    "application and device ids must be 1-64 characters of A-Z a-z 0-9 _ . -",
                )
            }
            Ok(Ok(grant)) => grant,
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return fixed(413, TOO_LARGE);
        }
        if let Some(ct) = req.headers().get(CONTENT_TYPE) {
            if !is_json_content_type(ct.as_bytes()) {
                return fixed(415, UNSUPPORTED);
            }
        }
        tracing::trace!(app, device, "state request authorized");
        // At most `max_body_bytes`, which `Config::validate` keeps within u32.
        let reserve = declared.map_or(self.max_body_bytes, |n| n as usize).max(1) as u32;
        let Ok(reserved) = self.body_budget.try_acquire_many(reserve) else {
            tracing::debug!(
                app,
                device,
                "state request refused: body buffer budget spent"
            );
            return overloaded();
        };
        let device_key = device_key(app, device);
        let limited = Limited::new(req.into_body(), self.max_body_bytes);
        let body = match tokio::time::timeout(self.body_read_timeout, limited.collect()).await {
            Err(_) => return fixed(408, TIMEOUT),
            Ok(Err(e)) => {
                if e.is::<http_body_util::LengthLimitError>() {
                    return fixed(413, TOO_LARGE);
                }
                return error_with_detail(400, "bad_request", "the request body could not be read");
            }
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        let parsed = match state::parse(&body, Shape::OneOrArray, now) {
            Ok(p) => p,
            Err(e) => return error_with_detail(400, "bad_request", &e.0),
        };
        let accepted = parsed.states.len();
        if let Err(wait) = grant.admit(accepted as u32, monotonic_ns()) {
            self.metrics.rate_limited(&grant.id);
            return rate_limited(wait);
        }
        let (tx, rx) = oneshot::channel();
        let req = WriteRequest {
            grant,
            device: device_key,
            body,
            parsed,
            done: Completion::Request(tx),
            received,
        };
        let queued = self.queue.try_enqueue(req);
        drop(reserved);
        match queued {
            Ok(()) => {}
            Err(EnqueueError::Full(req)) => {
                // Refused, so the rate budget it was charged goes back.
                req.grant.refund(accepted as u32);
                return overloaded();
            }
            Err(EnqueueError::Closed) => return overloaded(),
            Err(EnqueueError::Revoked) => {
                tracing::debug!("state request refused: token revoked while its body was read");
                return fixed(401, UNAUTHORIZED);
            }
        }
        match rx.await {
            Ok(Ok(committed)) => {
                tracing::trace!(states = accepted, "state request committed");
                json(200, accepted_body(accepted, committed.seq))
            }
            Ok(Err(CommitError::TooManyAttributes { limit })) => error_with_detail(
                400,
                "bad_request",
                &format!(
                    "the device would have more than {limit} distinct attributes (storage.max_attributes_per_device); nothing was stored"
                ),
            ),
            // The commit failed, or the writer died before it: not stored.
            Ok(Err(CommitError::Storage)) | Err(_) => unavailable(),
            Ok(Err(CommitError::Stream)) => stream_unavailable(
                "the cluster's ingest stream did not store this request; nothing of it was stored",
            ),
            Ok(Err(CommitError::StreamUnknown)) => unconfirmed(),
        }
    }
}

/// `{"accepted":N}`, with `"seq":S` in cluster mode (the stream sequence
/// of the request's last state, for `minSeq` on reads).
fn accepted_body(accepted: usize, seq: Option<u64>) -> Vec<u8> {
    let mut buf = itoa::Buffer::new();
    let mut body = Vec::with_capacity(48);
    body.extend_from_slice(b"{\"accepted\":");
    body.extend_from_slice(buf.format(accepted).as_bytes());
    if let Some(seq) = seq {
        body.extend_from_slice(b",\"seq\":");
        body.extend_from_slice(buf.format(seq).as_bytes());
    }
    body.push(b'}');
    body
}

/// 503 when the cluster's ingest stream did not store a request (cluster
/// mode). NATS elects a new stream leader within seconds, so the hint is
/// short.
fn stream_unavailable(detail: &str) -> Response<Full<Bytes>> {
    let mut r = error_with_detail(503, "unavailable", detail);
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// 504 when the cluster's ingest stream could not say in time whether it
/// stored a request (NATS went away mid-commit): not a refusal, since it
/// may be stored; a resend may store it twice, never lose it.
fn unconfirmed() -> Response<Full<Bytes>> {
    let mut r = error_with_detail(
        504,
        "unconfirmed",
        "the cluster's ingest stream did not confirm in time whether it stored this request; it may have been stored; send it again",
    );
    r.headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// `application/json`, any `+json` type, with or without parameters.
fn is_json_content_type(v: &[u8]) -> bool {
    let essence = v.split(|&b| b == b';').next().unwrap_or(b"").trim_ascii();
    essence.eq_ignore_ascii_case(b"application/json")
        || (essence.len() > 5
            && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json")
            && essence.starts_with(b"application/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_bodies() {
        assert_eq!(accepted_body(3, None), br#"{"accepted":3}"#);
        assert_eq!(
            accepted_body(1000, Some(18446744073709551615)),
            br#"{"accepted":1000,"seq":18446744073709551615}"#
        );
    }

    #[test]
    fn read_routes_are_recognised() {
        let get = Method::GET;
        assert!(is_read(&get, "/applications/a/stream"));
        assert!(is_read(&get, "/applications/a/devices/d/state"));
        assert!(is_read(&get, "/applications/a/devices/d/compositeState"));
        assert!(!is_read(&Method::POST, "/applications/a/devices/d/state"));
        assert!(!is_read(&get, "/applications/a/devices/d/state/x"));
        assert!(!is_read(&get, "/applications/a/tokens"));
        assert!(!is_read(&get, "/healthz"));
    }

    #[test]
    fn content_types() {
        assert!(is_json_content_type(b"application/json"));
        assert!(is_json_content_type(b"Application/JSON; charset=utf-8"));
        assert!(is_json_content_type(b"application/vnd.api+json"));
        assert!(!is_json_content_type(b"text/plain"));
        assert!(!is_json_content_type(b"application/x-www-form-urlencoded"));
    }
}
