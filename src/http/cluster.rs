//! `GET /cluster` on the admin listener, for the root token only: this
//! broker's view of the cluster (`sluice cluster status` prints it): the
//! token plane and the ingest log (applied sequence and lag). It
//! answers while the broker's view of the token bucket is stale too, since
//! that is when an operator needs it; the root token is the broker's own,
//! never read from the bucket.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::admin::{AdminApi, ApiError};

pub(super) async fn status(
    State(api): State<Arc<AdminApi>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !api.authenticated(&headers)?.root {
        return Err(ApiError::Forbidden);
    }
    let body = match api.tokens.plane() {
        None => serde_json::json!({"mode": "standalone"}),
        Some(plane) => {
            // The ingest log: this broker's read model against the stream
            // (as `GET /cluster/ingest`), or why the stream did not answer.
            // Read first: the token plane's state is taken after it, so a
            // slow answer from NATS never reports a view that went stale
            // meanwhile as live.
            let ingest = match &api.ingest_view {
                Some(view) => Some(match view.status(&api.read_model).await {
                    Ok(s) => serde_json::to_value(s).map_err(|_| ApiError::Internal)?,
                    Err(e) => serde_json::json!({"error": e}),
                }),
                None => None,
            };
            let mut v = serde_json::to_value(plane.status()).map_err(|_| ApiError::Internal)?;
            v["mode"] = "cluster".into();
            if let Some(ingest) = ingest {
                v["ingest"] = ingest;
            }
            v
        }
    };
    Ok(axum::Json(body).into_response())
}
