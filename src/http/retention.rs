//! An application's history retention on the admin listener:
//! - `GET /applications/{app}/retention` (`device.getState`):
//!   `{"retention": own or null, "effective": what applies}`.
//! - `PUT /applications/{app}/retention` (`all.Application` over every
//!   device, since it reaches all of the application's history) with
//!   `{"retention": "30d" | "unlimited" | null}`; null removes the override,
//!   so `storage.retention` applies again. Persisted (fsynced) before it
//!   answers, and in force for reads at once; audited like every change.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::admin::{body, path, Api, ApiError, BodyOf, PathOf};
use super::audit::Audited;
use crate::audit::Operation;
use crate::auth::{Devices, Scope};
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
    Ok(shown(api.store.retention(&app)))
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
        super::devices::refuse_in_cluster_mode(
            &a,
            "retention overrides are not supported in cluster mode yet: one broker's override would not reach the others' read models; set storage.retention alike on every broker",
        )?;
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
