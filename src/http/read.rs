//! Reading state back: history pages, composite state and the live
//! stream, served on the admin listener and on the device HTTP listener
//! alike (same paths, same scopes), so a backend can read over the device
//! listener's TLS. The one difference: the root admin token is an
//! admin-plane credential, accepted only on the admin listener.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::Router;
use tokio_util::sync::CancellationToken;

use super::admin::{min_seq, path, ApiError, PathOf};
use crate::auth::{monotonic_ns, Denied, Registry, Scope, TokenEntry};
use crate::composite;
use crate::config::StreamsConfig;
use crate::ids::is_valid_id;
use crate::materialize::applied::ReadModel;
use crate::secret::parse_bearer;
use crate::store::{device_key, HistoryQuery, Order, Position, Store};
use crate::streams::{Hub, StreamSlots};
use crate::timefmt::{self, now_ms};
use crate::tokens::STALE;

/// Default and largest page of history.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

/// Everything the read routes need; one per listener.
pub struct ReadApi {
    pub registry: Arc<Registry>,
    pub store: Store,
    pub hub: Arc<Hub>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Whether the root admin token is accepted here (the admin listener)
    /// or refused like an unknown token (the device listener).
    pub root_allowed: bool,
    /// Bound on one history page's data (`admin.max_response_bytes`).
    pub max_response_bytes: usize,
    pub streams: StreamsConfig,
    /// Open SSE streams per token and per address, shared by both
    /// listeners.
    pub slots: Arc<StreamSlots>,
    /// Cancelled at shutdown: open streams end, so draining connections
    /// does not wait for them.
    pub stop: CancellationToken,
    /// What reads see in cluster mode (and what `minSeq` waits for); see
    /// `materialize::applied`.
    pub read_model: ReadModel,
}

/// The address a request came from, put into its extensions by the
/// listener (for the per-address stream limit).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub IpAddr);

/// A connection's service that puts its peer's [`Peer`] into every
/// request (the admin listener's; the device listener does it itself).
#[derive(Clone)]
pub struct WithPeer<S> {
    pub inner: S,
    pub peer: IpAddr,
}

impl<S, B> hyper::service::Service<hyper::Request<B>> for WithPeer<S>
where
    S: hyper::service::Service<hyper::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: hyper::Request<B>) -> Self::Future {
        req.extensions_mut().insert(Peer(self.peer));
        self.inner.call(req)
    }
}

type Api = State<Arc<ReadApi>>;

/// One read route: its path and `GET` handler. [`routes`] lists every
/// one; both listeners serve exactly these, and the OpenAPI test checks
/// `docs/openapi.json` against them.
pub struct Route {
    pub path: &'static str,
    handler: MethodRouter<Arc<ReadApi>>,
}

const HISTORY: &str = "/applications/{app}/devices/{device}/state";
const COMPOSITE: &str = "/applications/{app}/devices/{device}/compositeState";
const STREAM: &str = "/applications/{app}/stream";

/// The path of every read route: what the device listener hands to the
/// read router (`device::is_read`).
pub const PATHS: &[&str] = &[HISTORY, COMPOSITE, STREAM];

/// Every read route (all `GET`), in the order of [`PATHS`].
pub fn routes() -> Vec<Route> {
    let handlers: [MethodRouter<Arc<ReadApi>>; 3] = [
        get(history),
        get(composite_state),
        get(super::stream::stream),
    ];
    PATHS
        .iter()
        .zip(handlers)
        .map(|(path, handler)| Route { path, handler })
        .collect()
}

/// The read routes, for either listener's router.
pub fn router<S: Clone + Send + Sync + 'static>(api: Arc<ReadApi>) -> Router<S> {
    let mut router = Router::new();
    for r in routes() {
        router = router.route(r.path, r.handler);
    }
    router.with_state(api)
}

impl ReadApi {
    /// Authenticates the caller and checks `device.getState` in `app` (and
    /// for `device`, if given).
    pub(super) fn authorize(
        &self,
        headers: &HeaderMap,
        app: &str,
        device: Option<&str>,
    ) -> Result<Arc<TokenEntry>, ApiError> {
        // Cluster mode: with a stale view of the cluster's tokens this
        // broker cannot know whether the token was revoked meanwhile.
        if !self.registry.trusted(monotonic_ns()) {
            return Err(ApiError::Unavailable(STALE.into()));
        }
        let cred = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|h| parse_bearer(h.as_bytes()))
            .ok_or(ApiError::Unauthorized)?;
        let caller = self
            .registry
            .authenticate(cred, now_ms())
            .map_err(|_: Denied| ApiError::Unauthorized)?;
        if caller.root && !self.root_allowed {
            return Err(ApiError::Unauthorized);
        }
        if !is_valid_id(app) || device.is_some_and(|d| !is_valid_id(d)) {
            return Err(ApiError::BadRequest(
                "application and device ids must be 1-64 characters of A-Z a-z 0-9 _ . -".into(),
            ));
        }
        if !caller.permits(app, device, Scope::GetState) {
            return Err(ApiError::Forbidden);
        }
        Ok(caller)
    }
}

/// Parses the history query string into a store query.
pub fn history_query(params: &HashMap<String, String>) -> Result<HistoryQuery, String> {
    page_query(params, MAX_LIMIT, &["minSeq"])
}

/// Parses a time-ordered page query (history, audit) with `limit` at most
/// `max_limit`; `also` names the other parameters the caller reads.
pub fn page_query(
    params: &HashMap<String, String>,
    max_limit: usize,
    also: &[&str],
) -> Result<HistoryQuery, String> {
    for k in params.keys() {
        let known = matches!(k.as_str(), "start" | "end" | "limit" | "order" | "cursor");
        if !known && !also.contains(&k.as_str()) {
            return Err(format!("unknown query parameter {k:?}"));
        }
    }
    let time = |k: &str| -> Result<Option<u64>, String> {
        params
            .get(k)
            .map(|v| {
                timefmt::parse_param(v)
                    .map(|ms| ms as u64)
                    .map_err(|e| format!("`{k}`: {e}"))
            })
            .transpose()
    };
    let start = time("start")?.unwrap_or(0);
    let end = time("end")?.unwrap_or(timefmt::MAX_TIME_MS as u64);
    if start > end {
        return Err("`start` is after `end`".into());
    }
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT.min(max_limit),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max_limit).contains(&n) => n,
            _ => return Err(format!("`limit` must be an integer from 1 to {max_limit}")),
        },
    };
    let order = match params.get("order").map(String::as_str) {
        None | Some("desc") => Order::Desc,
        Some("asc") => Order::Asc,
        Some(_) => return Err("`order` must be \"asc\" or \"desc\"".into()),
    };
    let cursor = match params.get("cursor") {
        None => None,
        Some(c) => {
            Some(Position::from_cursor(c).ok_or("`cursor` is not a cursor returned as `next`")?)
        }
    };
    Ok(HistoryQuery {
        start_ms: start,
        end_ms: end,
        limit,
        order,
        cursor,
    })
}

async fn history(
    State(api): Api,
    ids: PathOf<(String, String)>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (app, device) = path(ids)?;
    api.authorize(&headers, &app, Some(&device))?;
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let q = history_query(&params).map_err(ApiError::BadRequest)?;
    api.read_model.ready(min_seq(&params)?).await?;
    let store = api.store.clone();
    let key = device_key(&app, &device);
    let max_bytes = api.max_response_bytes;
    let page = store_read("history", move || store.history(&key, &q, max_bytes)).await?;
    // The stored data is the exact JSON text the device sent; splice it in
    // rather than re-encoding, so read-back is byte-equal.
    Ok(page_body(
        &page.items,
        |item| item.data.len() + 32,
        page.next.map(|p| p.to_cursor()),
        |out, item| {
            out.extend_from_slice(b"{\"time\":");
            out.extend_from_slice(itoa::Buffer::new().format(item.at.time_ms).as_bytes());
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(&item.data);
            out.push(b'}');
        },
    ))
}

/// Runs a store read on the blocking pool (RocksDB never runs on a tokio
/// worker); a failure is logged naming `what` and answered 500 without its
/// detail.
pub(super) async fn store_read<T, E>(
    what: &'static str,
    read: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(|e| {
            tracing::error!(error = %e, "{what} read failed");
            ApiError::Internal
        })
}

/// A page as `{"items":[…],"next":…}`: each item is written straight into
/// the body by `write` (stored JSON spliced in, never re-encoded; `size`
/// estimates its bytes), `next` is the cursor of the following page.
pub(super) fn page_body<T>(
    items: &[T],
    size: impl Fn(&T) -> usize,
    next: Option<String>,
    mut write: impl FnMut(&mut Vec<u8>, &T),
) -> Response {
    let mut out = Vec::with_capacity(64 + items.iter().map(&size).sum::<usize>());
    out.extend_from_slice(b"{\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(&mut out, item);
    }
    out.extend_from_slice(b"],\"next\":");
    match next {
        Some(cursor) => {
            out.push(b'"');
            out.extend_from_slice(cursor.as_bytes());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        out,
    )
        .into_response()
}

async fn composite_state(
    State(api): Api,
    ids: PathOf<(String, String)>,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (app, device) = path(ids)?;
    api.authorize(&headers, &app, Some(&device))?;
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    api.read_model.ready(min_seq(&params)?).await?;
    let store = api.store.clone();
    let key = device_key(&app, &device);
    let value = store_read("composite", move || store.composite(&key))
        .await?
        .unwrap_or_default();
    let mut out = Vec::with_capacity(value.len() + 64);
    out.push(b'{');
    for (i, e) in composite::entries(&value).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let name = String::from_utf8_lossy(e.name);
        // Writing JSON into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &name);
        out.extend_from_slice(b":{\"value\":");
        out.extend_from_slice(e.value);
        out.extend_from_slice(b",\"time\":");
        out.extend_from_slice(itoa::Buffer::new().format(e.time_ms).as_bytes());
        out.push(b'}');
    }
    out.push(b'}');
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        out,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn history_params() {
        let q = history_query(&params(&[])).unwrap();
        assert_eq!((q.start_ms, q.limit, q.order), (0, 100, Order::Desc));
        let q = history_query(&params(&[
            ("start", "1000"),
            ("end", "1970-01-01T00:00:02Z"),
            ("order", "asc"),
            ("limit", "10000"),
        ]))
        .unwrap();
        assert_eq!(
            (q.start_ms, q.end_ms, q.limit, q.order),
            (1000, 2000, 10000, Order::Asc)
        );
        for bad in [
            vec![("limit", "0")],
            vec![("limit", "10001")],
            vec![("limit", "x")],
            vec![("order", "up")],
            vec![("start", "tomorrow")],
            vec![("start", "5"), ("end", "4")],
            vec![("cursor", "zz")],
            vec![("bogus", "1")],
        ] {
            assert!(history_query(&params(&bad)).is_err(), "{bad:?}");
        }
    }
}
