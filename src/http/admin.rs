//! The admin HTTP API: token management, state read-back, devices,
//! retention, metrics, liveness and readiness.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;

use super::audit::Audited;
use crate::audit::Operation;
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
    /// Largest page of the audit trail (`audit.max_page`).
    pub audit_max_page: usize,
    /// What history and composite-state reads see (and `minSeq` waits
    /// for); see `materialize::applied`.
    pub read_model: ReadModel,
    /// Cluster mode: `GET /cluster/ingest`.
    pub ingest_view: Option<IngestView>,
    /// Cluster mode: publishes removals and retention overrides onto the
    /// ingest stream, which every broker's read model applies.
    pub control: Option<crate::cluster::control::Controller>,
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
    /// Over `streams.max_streams_per_token` or `_per_ip`.
    TooManyStreams,
    /// 504: cluster mode, a change whose outcome is not confirmed in time
    /// (it may be, or is, stored on the stream, but not yet applied here).
    Unconfirmed(String),
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

impl ApiError {
    /// The status, the stable code and the detail the client is answered
    /// with (also what the audit trail records).
    pub fn parts(&self) -> (StatusCode, &'static str, Option<String>) {
        match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden", None),
            ApiError::ForbiddenBecause(d) => (StatusCode::FORBIDDEN, "forbidden", Some(d.clone())),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::ExceedsParent(d) => {
                (StatusCode::FORBIDDEN, "exceeds_parent", Some(d.clone()))
            }
            ApiError::BadRequest(d) => (StatusCode::BAD_REQUEST, "bad_request", Some(d.clone())),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None),
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None)
            }
            ApiError::TooManyStreams => (StatusCode::TOO_MANY_REQUESTS, "too_many_streams", None),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
            ApiError::Conflict => (
                StatusCode::CONFLICT,
                "conflict",
                Some("the token was changed on other brokers at the same time, repeatedly; try again".into()),
            ),
            ApiError::Unavailable(d) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", Some(d.clone())),
            ApiError::NoReadModel => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no_read_model",
                Some("this broker is ingest-only (cluster.materialize = false) and keeps no history or composite state; read from a broker that materializes".into()),
            ),
            ApiError::NotCaughtUp { applied, wanted, waited } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "not_caught_up",
                Some(format!("this broker has applied the ingest stream up to sequence {applied}; minSeq {wanted} was not reached within {waited:?}")),
            ),
            ApiError::Unconfirmed(d) => (StatusCode::GATEWAY_TIMEOUT, "unconfirmed", Some(d.clone())),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, detail) = self.parts();
        let mut body = match detail {
            Some(d) => serde_json::json!({"error": code, "detail": d}),
            None => serde_json::json!({"error": code}),
        };
        if let ApiError::NotCaughtUp { applied, .. } = self {
            body["applied"] = applied.into();
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            return (
                status,
                [(axum::http::header::RETRY_AFTER, "1")],
                axum::Json(body),
            )
                .into_response();
        }
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

/// One route of the admin listener: a method, a path template, and its
/// handler. [`routes`] lists every one; the router is built from that list
/// alone, and the OpenAPI test checks `docs/openapi.json` against it, so
/// the document and the server cannot drift apart.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    handler: MethodRouter<Arc<AdminApi>>,
}

fn at<H, T>(method: Method, path: &'static str, handler: H) -> Route
where
    H: Handler<T, Arc<AdminApi>>,
    T: 'static,
{
    // Every method below is one axum routes; the table is fixed at build
    // time, so a failure here is a defect caught by any test.
    let filter = MethodFilter::try_from(method.clone()).expect("a routable method");
    Route {
        method,
        path,
        handler: on(filter, handler),
    }
}

/// Every route the admin listener answers.
pub fn routes() -> Vec<Route> {
    use super::{audit, backup, cluster, console, devices, openapi, retention};
    let (get, post, put, patch, delete) = (
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
    );
    vec![
        at(get.clone(), "/healthz", healthz),
        at(get.clone(), "/readyz", readyz),
        at(get.clone(), "/metrics", metrics),
        at(get.clone(), "/whoami", whoami),
        at(get.clone(), "/openapi.json", openapi::document),
        at(post.clone(), "/backup", backup::backup),
        at(get.clone(), "/cluster", cluster::status),
        at(get.clone(), "/cluster/ingest", cluster_ingest),
        at(get.clone(), "/applications/{app}/tokens", list_tokens),
        at(post, "/applications/{app}/tokens", create_token),
        at(get.clone(), "/applications/{app}/tokens/{id}", get_token),
        at(patch, "/applications/{app}/tokens/{id}", update_token),
        at(
            delete.clone(),
            "/applications/{app}/tokens/{id}",
            delete_token,
        ),
        at(
            delete.clone(),
            "/applications/{app}",
            devices::delete_application,
        ),
        at(
            get.clone(),
            "/applications/{app}/devices",
            devices::list_devices,
        ),
        at(
            delete,
            "/applications/{app}/devices/{device}",
            devices::delete_device,
        ),
        at(get.clone(), "/applications/{app}/audit", audit::read_audit),
        at(
            get.clone(),
            "/applications/{app}/retention",
            retention::get_retention,
        ),
        at(
            put,
            "/applications/{app}/retention",
            retention::put_retention,
        ),
        at(get.clone(), "/console", console::redirect),
        at(get.clone(), "/console/", console::index),
        at(get, "/console/{file}", console::file),
    ]
}

/// The admin listener's routes ([`routes`]), with the read routes
/// (`read.rs`) that the device listener serves too.
pub fn router(
    api: Arc<AdminApi>,
    read: Arc<super::read::ReadApi>,
    max_body_bytes: usize,
) -> Router {
    let mut router = Router::new();
    for r in routes() {
        router = router.route(r.path, r.handler);
    }
    router
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
    let what = Audited::new(Operation::TokenCreate, &app, serde_json::json!({})).asking(&raw);
    let (a, h) = (api.clone(), headers.clone());
    let change = async move {
        let body = body(raw)?;
        let caller = a.authorize(&h, &app, None, Scope::TokenCreate)?;
        let req =
            parse_create(&body, a.tokens.limits().max_devices).map_err(ApiError::BadRequest)?;
        Ok(a.tokens.create(caller, app, req).await?)
    };
    let (record, secret) = api
        .audited(&headers, what, change, |(record, _), what| {
            what.target["tokenId"] = record.id.clone().into();
            // The record as granted (attenuated), never the secret.
            what.change = serde_json::to_value(TokenJson::of(record)).unwrap_or_default();
            StatusCode::CREATED
        })
        .await?;
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
    let what = Audited::new(
        Operation::TokenUpdate,
        &app,
        serde_json::json!({ "tokenId": id }),
    )
    .asking(&raw);
    let (a, h) = (api.clone(), headers.clone());
    let change = async move {
        let body = body(raw)?;
        let caller = a.authorize(&h, &app, None, Scope::TokenRevoke)?;
        let upd = parse_update(&body).map_err(ApiError::BadRequest)?;
        Ok(a.tokens.update(caller, app, id, upd).await?)
    };
    let done = api
        .audited(&headers, what, change, |done, what| {
            unconfirmed(&done.unconfirmed, what, StatusCode::OK)
        })
        .await?;
    if done.unconfirmed.is_empty() {
        return Ok(axum::Json(TokenJson::of(&done.value)).into_response());
    }
    let mut body =
        serde_json::to_value(TokenJson::of(&done.value)).map_err(|_| ApiError::Internal)?;
    body["unconfirmed"] = serde_json::json!(done.unconfirmed);
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}

/// A revocation some brokers did not confirm in time answers 202 naming
/// them (cluster mode); the audit event names them too.
fn unconfirmed(brokers: &[String], what: &mut Audited, status: StatusCode) -> StatusCode {
    if brokers.is_empty() {
        return status;
    }
    what.target["unconfirmed"] = serde_json::json!(brokers);
    StatusCode::ACCEPTED
}

async fn delete_token(
    State(api): Api,
    ids: PathOf<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (app, id) = path(ids)?;
    let what = Audited::new(
        Operation::TokenDelete,
        &app,
        serde_json::json!({ "tokenId": id }),
    );
    let (a, h) = (api.clone(), headers.clone());
    let change = async move {
        let caller = a.authorize(&h, &app, None, Scope::TokenRevoke)?;
        Ok(a.tokens.delete(caller, app, id).await?)
    };
    let done = api
        .audited(&headers, what, change, |done, what| {
            what.target["removed"] = serde_json::json!(done.value);
            unconfirmed(&done.unconfirmed, what, StatusCode::NO_CONTENT)
        })
        .await?;
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
