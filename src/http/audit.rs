//! The audit trail on the admin listener:
//! - every admin change handler runs through [`AdminApi::audited`], which
//!   makes the change and records its event in one task of its own, so the
//!   event is written whether or not the client waits for the answer;
//! - `GET /applications/{app}/audit?start=&end=&limit=&order=&cursor=`
//!   (`token.read` in the application, or root) reads the trail, paged
//!   like history: newest first by default, `start`/`end` inclusive (epoch
//!   ms or RFC 3339), `limit` up to `audit.max_page`, `next` passed back as
//!   `cursor`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;

use super::admin::{path, AdminApi, Api, ApiError, BodyOf, PathOf};
use super::read::{page_body, page_query, store_read};
use crate::audit::{record, Actor, Event, Operation};
use crate::auth::Scope;

/// Request bodies larger than this are not copied into an event (the
/// event says so instead): an event stays small whatever a client sends.
const MAX_RECORDED_BODY: usize = 4096;

/// What an audited change is about, before it runs; the change may add to
/// `target` and replace `change` once it knows the outcome.
pub(super) struct Audited {
    pub operation: Operation,
    pub app: String,
    pub target: serde_json::Value,
    pub change: serde_json::Value,
}

impl Audited {
    pub fn new(operation: Operation, app: &str, target: serde_json::Value) -> Audited {
        Audited {
            operation,
            app: app.to_string(),
            target,
            change: serde_json::Value::Null,
        }
    }

    /// The request body as the change asked for, if it is a small JSON
    /// document (bodies never carry secrets: a secret exists only in the
    /// response that created it).
    pub fn asking(mut self, raw: &BodyOf) -> Audited {
        self.change = match raw {
            Ok(b) if b.len() > MAX_RECORDED_BODY => {
                serde_json::json!({"omitted": format!("a body of {} bytes", b.len())})
            }
            Ok(b) => serde_json::from_slice(b).unwrap_or(serde_json::Value::Null),
            Err(_) => serde_json::Value::Null,
        };
        self
    }
}

impl AdminApi {
    /// Runs `change` to completion in a task of its own and records its
    /// audit event in that same task once it has an outcome: `done` turns
    /// a success into its status (and may add what the change made to the
    /// event); a failure is recorded with its error code. Dropping the
    /// returned future (a client hanging up) changes neither.
    pub(super) async fn audited<T, F>(
        self: &Arc<Self>,
        headers: &HeaderMap,
        mut what: Audited,
        change: F,
        done: impl FnOnce(&T, &mut Audited) -> StatusCode + Send + 'static,
    ) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        let actor = self.authenticated(headers).ok().map(|e| Actor::of(&e));
        let api = self.clone();
        tokio::spawn(async move {
            let result = change.await;
            let (status, code, detail) = match &result {
                Ok(value) => (done(value, &mut what), "ok", None),
                Err(e) => e.parts(),
            };
            let event = Event {
                application_id: what.app,
                actor,
                operation: what.operation,
                target: what.target,
                change: what.change,
                result: code,
                status: status.as_u16(),
                detail,
            };
            record(&api.store, event).await;
            result
        })
        .await
        .map_err(|_| ApiError::Internal)?
    }
}

pub(super) async fn read_audit(
    State(api): Api,
    app: PathOf<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let app = path(app)?;
    api.authorize(&headers, &app, None, Scope::TokenRead)?;
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let q = page_query(&params, api.audit_max_page, &[]).map_err(ApiError::BadRequest)?;
    let store = api.store.clone();
    let max_bytes = api.max_response_bytes;
    let page = store_read("audit", move || store.audit(&app, &q, max_bytes)).await?;
    // Each stored event is a JSON object without its id and time (the key
    // holds them): splice them in front of its fields.
    Ok(page_body(
        &page.items,
        |item| item.data.len() + 80,
        page.next.map(|p| p.to_cursor()),
        |out, item| {
            out.extend_from_slice(b"{\"id\":\"");
            out.extend_from_slice(item.at.to_cursor().as_bytes());
            out.extend_from_slice(b"\",\"time\":");
            out.extend_from_slice(itoa::Buffer::new().format(item.at.time_ms).as_bytes());
            match item.data.strip_prefix(b"{") {
                Some(rest) if rest != b"}" => {
                    out.push(b',');
                    out.extend_from_slice(rest);
                }
                _ => out.push(b'}'),
            }
        },
    ))
}
