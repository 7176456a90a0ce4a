//! The admin HTTP API: token management, state read-back, devices,
//! retention, metrics, liveness and readiness.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;

use crate::auth::{monotonic_ns, Denied, Scope, TokenEntry};
use crate::ids::is_valid_id;
use crate::materialize::applied::{parse_min_seq, NotReady, ReadModel};
use crate::materialize::status::IngestView;
use crate::metrics::Metrics;
use crate::secret::parse_bearer;
use crate::store::Store;
use crate::timefmt::now_ms;
use crate::tokens::{parse_create, parse_update, TokenError, TokenJson, TokenService, STALE};
use crate::writer::IngestQueue;

pub struct AdminApi {
    pub tokens: Arc<TokenService>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub queue: Arc<IngestQueue>,
    /// `POST /backup` (see `http::backup`).
    pub backups: Arc<crate::backup::Backups>,
    /// `/readyz`, with the detail behind each failure.
    pub readiness: Arc<crate::readiness::Readiness>,
    /// Persistent MQTT sessions, which an application removal forgets.
    pub sessions: Arc<crate::streams::sessions::Sessions>,
    /// Bound on one history page's data (`admin.max_response_bytes`).
    pub max_response_bytes: usize,
    /// What history and composite-state reads see (and `minSeq` waits
    /// for); see `materialize::applied`.
    pub read_model: ReadModel,
    /// Cluster mode: `GET /cluster/ingest`.
    pub ingest_view: Option<IngestView>,
}

/// An error as the API shows it: a status and a stable code.
#[derive(Debug)]
pub enum ApiError {
    Unauthorized,
    Forbidden,
    /// 403 with the reason the caller may not make this change.
    ForbiddenBecause(String),
    NotFound,
    ExceedsParent(String),
    BadRequest(String),
    PayloadTooLarge,
    MethodNotAllowed,
    /// Over `streams.max_streams_per_token` or `_per_ip`.
    TooManyStreams,
    Internal,
    /// Cluster mode, ingest-only broker: no history or composite state here.
    NoReadModel,
    /// Cluster mode: `minSeq` was not applied within `cluster.min_seq_timeout`.
    NotCaughtUp {
        applied: u64,
        wanted: u64,
        waited: std::time::Duration,
    },
    /// 503 with `Retry-After` and the reason: the broker is shutting down
    /// (or its writer stopped), or in cluster mode NATS did not answer or
    /// this broker's view of the token bucket is stale.
    Unavailable(String),
    /// 409: cluster mode, and other brokers kept changing the token.
    Conflict,
    /// 501: an operation a broker in cluster mode does not do (yet).
    NotInClusterMode(&'static str),
}

impl From<NotReady> for ApiError {
    fn from(n: NotReady) -> Self {
        match n {
            NotReady::Absent => ApiError::NoReadModel,
            NotReady::Behind {
                applied,
                wanted,
                waited,
            } => ApiError::NotCaughtUp {
                applied,
                wanted,
                waited,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "unauthorized"}),
            ),
            ApiError::Forbidden => (
                StatusCode::FORBIDDEN,
                serde_json::json!({"error": "forbidden"}),
            ),
            ApiError::ForbiddenBecause(d) => (
                StatusCode::FORBIDDEN,
                serde_json::json!({"error": "forbidden", "detail": d}),
            ),
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found"}),
            ),
            ApiError::ExceedsParent(d) => (
                StatusCode::FORBIDDEN,
                serde_json::json!({"error": "exceeds_parent", "detail": d}),
            ),
            ApiError::BadRequest(d) => (
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "bad_request", "detail": d}),
            ),
            ApiError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                serde_json::json!({"error": "payload_too_large"}),
            ),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "method_not_allowed"}),
            ),
            ApiError::TooManyStreams => (
                StatusCode::TOO_MANY_REQUESTS,
                serde_json::json!({"error": "too_many_streams"}),
            ),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": "internal"}),
            ),
            ApiError::NoReadModel => (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "no_read_model", "detail": "this broker is ingest-only (cluster.materialize = false) and keeps no history or composite state; read from a broker that materializes"}),
            ),
            ApiError::NotCaughtUp {
                applied,
                wanted,
                waited,
            } => {
                let body = serde_json::json!({
                    "error": "not_caught_up",
                    "detail": format!("this broker has applied the ingest stream up to sequence {applied}; minSeq {wanted} was not reached within {waited:?}"),
                    "applied": applied,
                });
                let mut r = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
                r.headers_mut().insert(
                    axum::http::header::RETRY_AFTER,
                    axum::http::HeaderValue::from_static("1"),
                );
                return r;
            }
            ApiError::NotInClusterMode(d) => (
                StatusCode::NOT_IMPLEMENTED,
                serde_json::json!({"error": "not_in_cluster_mode", "detail": d}),
            ),
            ApiError::Conflict => (
                StatusCode::CONFLICT,
                serde_json::json!({"error": "conflict", "detail": "the token was changed on other brokers at the same time, repeatedly; try again"}),
            ),
            ApiError::Unavailable(d) => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(axum::http::header::RETRY_AFTER, "1")],
                    axum::Json(serde_json::json!({"error": "unavailable", "detail": d})),
                )
                    .into_response()
            }
        };
        (status, axum::Json(body)).into_response()
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Unauthorized => ApiError::Unauthorized,
            TokenError::NotFound => ApiError::NotFound,
            TokenError::ExceedsParent(x) => ApiError::ExceedsParent(x.to_string()),
            TokenError::Forbidden(x) => ApiError::ForbiddenBecause(x.to_string()),
            TokenError::BadRequest(d) => ApiError::BadRequest(d),
            TokenError::Store(e) => {
                tracing::error!(error = %e, "token store failed");
                ApiError::Internal
            }
            TokenError::Unavailable(d) => {
                tracing::warn!(detail = %d, "token change refused: the cluster's token bucket is unavailable");
                ApiError::Unavailable(format!("the cluster's token bucket is unavailable: {d}"))
            }
            TokenError::Conflict => ApiError::Conflict,
            e @ (TokenError::Internal(_)
            | TokenError::Unreadable { .. }
            | TokenError::Cluster(_)) => {
                tracing::error!(error = %e, "token operation failed");
                ApiError::Internal
            }
        }
    }
}

pub(super) type Api = State<Arc<AdminApi>>;

/// Path parameters, with a malformed path answered as a JSON 400.
pub(super) type PathOf<T> = Result<Path<T>, PathRejection>;
/// A request body, with an oversized one answered as a JSON 413.
pub(super) type BodyOf = Result<Bytes, BytesRejection>;

pub(super) fn path<T>(p: PathOf<T>) -> Result<T, ApiError> {
    p.map(|Path(t)| t)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

pub(super) fn body(b: BodyOf) -> Result<Bytes, ApiError> {
    b.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::BadRequest(e.body_text()),
    })
}

/// The admin listener's routes, with the read routes (`read.rs`) that the
/// device listener serves too.
pub fn router(
    api: Arc<AdminApi>,
    read: Arc<super::read::ReadApi>,
    max_body_bytes: usize,
) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/whoami", get(whoami))
        .route("/backup", axum::routing::post(super::backup::backup))
        .route("/cluster", get(super::cluster::status))
        .route("/cluster/ingest", get(cluster_ingest))
        .route(
            "/applications/{app}/tokens",
            get(list_tokens).post(create_token),
        )
        .route(
            "/applications/{app}/tokens/{id}",
            get(get_token).patch(update_token).delete(delete_token),
        )
        .route(
            "/applications/{app}",
            delete(super::devices::delete_application),
        )
        .route(
            "/applications/{app}/devices",
            get(super::devices::list_devices),
        )
        .route(
            "/applications/{app}/devices/{device}",
            delete(super::devices::delete_device),
        )
        .route(
            "/applications/{app}/retention",
            get(super::retention::get_retention).put(super::retention::put_retention),
        )
        .merge(super::console::routes())
        .merge(super::read::router(read))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(api)
}

impl AdminApi {
    /// The usable token the request is made with. In cluster mode, while
    /// this broker's view of the token bucket is stale, nobody: the admin
    /// API fails closed like the device listeners.
    pub(crate) fn caller(&self, headers: &HeaderMap) -> Result<Arc<TokenEntry>, ApiError> {
        if !self.tokens.registry().trusted(monotonic_ns()) {
            return Err(ApiError::Unavailable(STALE.into()));
        }
        self.authenticated(headers)
    }

    /// The usable token the request is made with, stale view or not; for
    /// what only the root token (which is this broker's own, never from
    /// the bucket) may do.
    pub(crate) fn authenticated(&self, headers: &HeaderMap) -> Result<Arc<TokenEntry>, ApiError> {
        let cred = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|h| parse_bearer(h.as_bytes()))
            .ok_or(ApiError::Unauthorized)?;
        self.tokens
            .registry()
            .authenticate(cred, now_ms())
            .map_err(|_: Denied| ApiError::Unauthorized)
    }

    /// Authenticates the caller and checks `scope` in `app` (and `device`).
    pub(crate) fn authorize(
        &self,
        headers: &HeaderMap,
        app: &str,
        device: Option<&str>,
        scope: Scope,
    ) -> Result<Arc<TokenEntry>, ApiError> {
        let caller = self.caller(headers)?;
        if !is_valid_id(app) || device.is_some_and(|d| !is_valid_id(d)) {
            return Err(ApiError::BadRequest(
                "application and device ids must be 1-64 characters of A-Z a-z 0-9 _ . -".into(),
            ));
        }
        if !caller.permits(app, device, scope) {
            // A token of another application that may mint is told why.
            if scope == Scope::TokenCreate && !caller.root && caller.scopes.allows(scope) {
                return Err(ApiError::ExceedsParent(
                    crate::auth::Exceeds::Application.to_string(),
                ));
            }
            return Err(ApiError::Forbidden);
        }
        Ok(caller)
    }
}

/// Liveness: 200 while the process answers (see `/readyz`).
async fn healthz() -> Response {
    axum::Json(serde_json::json!({"status": "ok"})).into_response()
}

/// As the device listener's `/readyz`, plus the error behind each failure
/// (this listener is the operator's, so the detail may name paths).
async fn readyz(State(api): Api) -> Response {
    let (status, body) = api.readiness.respond(true).await;
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn metrics(State(api): Api) -> impl IntoResponse {
    api.metrics.queue_depth.set(api.queue.depth() as i64);
    api.metrics.queue_bytes.set(api.queue.bytes() as i64);
    api.metrics
        .token_cache_entries
        .set(api.tokens.registry().len() as i64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        api.metrics.render(),
    )
}

/// `GET /whoami`: the caller's own record, so a client holding only a
/// secret (the console) learns its application and what it may do. Any
/// usable token may read itself; it reveals nothing the secret's holder
/// could not already find out by trying.
async fn whoami(State(api): Api, headers: HeaderMap) -> Result<Response, ApiError> {
    let caller = api.caller(&headers)?;
    if caller.root {
        return Ok(axum::Json(serde_json::json!({"root": true})).into_response());
    }
    let view = api
        .tokens
        .registry()
        .record(&caller.id)
        .ok_or(ApiError::Unauthorized)?;
    Ok(
        axum::Json(serde_json::json!({"root": false, "token": TokenJson::of(&view)}))
            .into_response(),
    )
}

async fn create_token(
    State(api): Api,
    app: PathOf<String>,
    headers: HeaderMap,
    raw: BodyOf,
) -> Result<Response, ApiError> {
    let app = path(app)?;
    let body = body(raw)?;
    let caller = api.authorize(&headers, &app, None, Scope::TokenCreate)?;
    let req = parse_create(&body, api.tokens.limits().max_devices).map_err(ApiError::BadRequest)?;
    let (record, secret) = api.tokens.create(caller, app, req).await?;
    let json = TokenJson {
        record: &record,
        secret: Some(secret.expose()),
    };
    Ok((StatusCode::CREATED, axum::Json(json)).into_response())
}

async fn list_tokens(
    State(api): Api,
    app: PathOf<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let app = path(app)?;
    let caller = api.authorize(&headers, &app, None, Scope::TokenRead)?;
    let records = api.tokens.list(&caller, &app);
    let list: Vec<TokenJson> = records.iter().map(TokenJson::of).collect();
    Ok(axum::Json(list).into_response())
}

async fn get_token(
    State(api): Api,
    ids: PathOf<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (app, id) = path(ids)?;
    let caller = api.authorize(&headers, &app, None, Scope::TokenRead)?;
    let record = api.tokens.get(&caller, &app, &id)?;
    Ok(axum::Json(TokenJson::of(&record)).into_response())
}

async fn update_token(
    State(api): Api,
    ids: PathOf<(String, String)>,
    headers: HeaderMap,
    raw: BodyOf,
) -> Result<Response, ApiError> {
    let (app, id) = path(ids)?;
    let body = body(raw)?;
    let caller = api.authorize(&headers, &app, None, Scope::TokenRevoke)?;
    let upd = parse_update(&body).map_err(ApiError::BadRequest)?;
    let done = api.tokens.update(caller, app, id, upd).await?;
    if done.unconfirmed.is_empty() {
        return Ok(axum::Json(TokenJson::of(&done.value)).into_response());
    }
    let mut body =
        serde_json::to_value(TokenJson::of(&done.value)).map_err(|_| ApiError::Internal)?;
    body["unconfirmed"] = serde_json::json!(done.unconfirmed);
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}

async fn delete_token(
    State(api): Api,
    ids: PathOf<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (app, id) = path(ids)?;
    let caller = api.authorize(&headers, &app, None, Scope::TokenRevoke)?;
    let done = api.tokens.delete(caller, app, id).await?;
    if done.unconfirmed.is_empty() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"unconfirmed": done.unconfirmed})),
    )
        .into_response())
}

/// `GET /cluster/ingest` (root only): this broker's position in the
/// ingest stream and the stream's newest state, read now.
async fn cluster_ingest(State(api): Api, headers: HeaderMap) -> Result<Response, ApiError> {
    // As `GET /cluster`: answered while the token view is stale too (the
    // root token is this broker's own).
    if !api.authenticated(&headers)?.root {
        return Err(ApiError::Forbidden);
    }
    let Some(view) = &api.ingest_view else {
        return Err(ApiError::NotFound);
    };
    let status = view
        .status(&api.read_model)
        .await
        .map_err(ApiError::Unavailable)?;
    Ok(axum::Json(status).into_response())
}

/// `minSeq` of a read, if given.
pub fn min_seq(
    params: &std::collections::HashMap<String, String>,
) -> Result<Option<u64>, ApiError> {
    params
        .get("minSeq")
        .map(|v| parse_min_seq(v))
        .transpose()
        .map_err(ApiError::BadRequest)
}
