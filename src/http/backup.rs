//! `POST /backup` on the admin listener, root token only: a consistent
//! backup of the store (tokens included) into a directory on the broker's
//! machine, taken while ingest runs. Body: `{"to": "/absolute/dir"}`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::admin::{AdminApi, ApiError};
use crate::backup::BackupError;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupRequest {
    to: PathBuf,
}

fn refusal(status: StatusCode, code: &str, detail: String) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"error": code, "detail": detail})),
    )
        .into_response()
}

pub async fn backup(
    State(api): State<Arc<AdminApi>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let caller = api.caller(&headers)?;
    if !caller.root {
        return Err(ApiError::Forbidden);
    }
    let raw = raw.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    let req: BackupRequest = serde_json::from_slice(&raw).map_err(|e| {
        ApiError::BadRequest(format!("expected {{\"to\": \"/absolute/dir\"}}: {e}"))
    })?;
    let backups = api.backups.clone();
    let to = req.to;
    // The backup runs to its end on its own thread even if the client goes
    // away, so it completes (or fails) the same way whatever the
    // connection does; the log records the outcome either way.
    let done = tokio::task::spawn_blocking(move || {
        let result = backups.take(&to);
        match &result {
            Ok(m) => tracing::info!(
                path = %to.display(),
                files = m.files,
                bytes = m.bytes,
                "backup written"
            ),
            Err(e) => tracing::warn!(path = %to.display(), error = %e, "backup failed"),
        }
        result.map(|m| (to, m))
    })
    .await
    .map_err(|_| ApiError::Internal)?;
    Ok(match done {
        Ok((to, m)) => axum::Json(serde_json::json!({
            "path": to,
            "created": m.created,
            "files": m.files,
            "bytes": m.bytes,
            "sluiceVersion": m.sluice_version,
        }))
        .into_response(),
        Err(e @ (BackupError::NotAbsolute(_) | BackupError::InsideStore(_))) => {
            refusal(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
        }
        Err(e @ BackupError::NotEmpty(_)) => {
            refusal(StatusCode::CONFLICT, "target_not_empty", e.to_string())
        }
        Err(e @ BackupError::Busy) => {
            refusal(StatusCode::CONFLICT, "backup_in_progress", e.to_string())
        }
        Err(e) => refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "backup_failed",
            e.to_string(),
        ),
    })
}
