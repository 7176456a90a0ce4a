//! An application's history retention on the admin listener:
//! - `GET /applications/{app}/retention` (`device.getState`):
//!   `{"retention": own or null, "effective": what applies}`.
//! - `PUT /applications/{app}/retention` (`all.Application` over every
//!   device, since it reaches all of the application's history) with
//!   `{"retention": "30d" | "unlimited" | null}`; null removes the override,
//!   so `storage.retention` applies again. Persisted (fsynced) before it
//!   answers, and in force for reads at once; audited like every change.
//!
//! In cluster mode an override is a control message on the ingest stream
//! (`cluster::control`) that every broker's materializer applies to its
//! store in stream order, so every read model expires the application's
//! history alike; the answer comes once this broker has applied it. The
//! stream's own `max_age` stays global: an override trims the read
//! models, not the stream. An ingest-only broker answers 503
//! `no_read_model`.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::admin::{body, path, AdminApi, Api, ApiError, BodyOf, PathOf};
use super::audit::Audited;
use crate::audit::Operation;
use crate::auth::{Devices, Scope};
use crate::cluster::control::Control;
use crate::materialize::applied::ReadModel;
use crate::store::{AppRetention, Retention};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionBody {
    /// A string or null, and never absent: a body that forgot the field
    /// must not read as "clear the override".
    retention: serde_json::Value,
}

fn shown(r: AppRetention) -> Response {
    axum::Json(serde_json::json!({
        "retention": r.own.map(Retention::text),
        "effective": r.effective.text(),
    }))
    .into_response()
}

pub async fn get_retention(
    State(api): Api,
    app: PathOf<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let app = path(app)?;
    api.authorize(&headers, &app, None, Scope::GetState)?;
    no_read_model_here(&api)?;
    Ok(shown(api.store.retention(&app)))
}

/// An ingest-only broker (`cluster.materialize = false`) keeps no history
/// to expire and does not follow the overrides the others apply, so it
/// neither shows nor sets them: the caller is sent to a broker with a read
/// model.
fn no_read_model_here(api: &AdminApi) -> Result<(), ApiError> {
    match api.read_model {
        ReadModel::Absent => Err(ApiError::NoReadModel),
        ReadModel::Local | ReadModel::Materialized { .. } => Ok(()),
    }
}

pub async fn put_retention(
    State(api): Api,
    app: PathOf<String>,
    headers: HeaderMap,
    raw: BodyOf,
) -> Result<Response, ApiError> {
    let app = path(app)?;
    let what = Audited::new(Operation::RetentionSet, &app, serde_json::json!({})).asking(&raw);
    let (a, h) = (api.clone(), headers.clone());
    let change = async move {
        let raw = body(raw)?;
        let caller = a.authorize(&h, &app, None, Scope::AllApplication)?;
        if caller.devices != Devices::All {
            return Err(ApiError::Forbidden);
        }
        let parsed: RetentionBody = serde_json::from_slice(&raw).map_err(|e| {
            ApiError::BadRequest(format!(
                "expected {{\"retention\": \"30d\" | \"unlimited\" | null}}: {e}"
            ))
        })?;
        let own = match parsed.retention {
            serde_json::Value::Null => None,
            serde_json::Value::String(text) => {
                Some(Retention::parse(&text).map_err(ApiError::BadRequest)?)
            }
            _ => {
                return Err(ApiError::BadRequest(
                    "`retention` must be a duration like \"30d\", \"unlimited\" or null".into(),
                ))
            }
        };
        if let Some(controller) = &a.control {
            no_read_model_here(&a)?;
            let control = Control::SetRetention {
                app: app.clone(),
                retention: own.map(Retention::text),
            };
            super::devices::through_stream(&a, controller, control).await?;
            let r = a.store.retention(&app);
            tracing::info!(app, retention = %r.effective.text(), "retention set");
            return Ok(r);
        }
        let store = a.store.clone();
        tokio::task::spawn_blocking(move || {
            let result = store
                .set_retention(&app, own)
                .map(|()| store.retention(&app));
            match &result {
                Ok(r) => tracing::info!(app, retention = %r.effective.text(), "retention set"),
                Err(e) => tracing::error!(app, error = %e, "setting retention failed"),
            }
            result
        })
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(|_| ApiError::Internal)
    };
    let result = api
        .audited(&headers, what, change, |r, what| {
            what.target["effective"] = r.effective.text().into();
            StatusCode::OK
        })
        .await?;
    Ok(shown(result))
}
