//! Devices on the admin listener:
//! - `GET /applications/{app}/devices?limit=&cursor=` (`device.getState`):
//!   every device that has stored state, with when it was first and last
//!   seen and how many states it stored, in pages; a token limited to some
//!   devices sees only those.
//! - `DELETE /applications/{app}/devices/{device}` (`all.Application` for
//!   that device): its history, composite state and statistics.
//! - `DELETE /applications/{app}`: everything of the application, its
//!   tokens included. Only the root token, or a token of the application
//!   minted by root with `all.Application` over every device, may do it: a
//!   token minted by another never removes its ancestors.
//!
//! Both deletions are durable (fsynced) before they answer 204, go through
//! the writer so they are ordered with ingest, and run in their own task
//! with their audit event (`AdminApi::audited`): they finish, and are
//! audited, the same way whether or not the client waits.
//!
//! In cluster mode a deletion is a control message on the ingest stream
//! (`cluster::control`), ordered with the states there: every broker's
//! materializer removes what was stored before it, from its read model and
//! from the stream. The answer comes once this broker has applied it (204),
//! or says the stream did not take it (503 `unavailable`: nothing
//! removed), or that the outcome is not confirmed in time (504
//! `unconfirmed`: it may be, or is, applied; repeating it is safe).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::admin::{min_seq, path, AdminApi, Api, ApiError, PathOf};
use super::audit::Audited;
use super::read::{store_read, DEFAULT_LIMIT, MAX_LIMIT};
use crate::audit::Operation;
use crate::auth::{Devices, Scope};
use crate::cluster::control::{Control, ControlError, Controller};
use crate::ids::is_valid_id;
use crate::materialize::applied::NotReady;
use crate::store::{device_key, DeviceEntry, DevicePage, Store, StoreError};
use crate::timefmt::format_rfc3339;
use crate::writer::{Removal, RemoveError};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeviceJson {
    device: String,
    first_seen_at: String,
    last_seen_at: String,
    messages: u64,
}

#[derive(Serialize)]
struct PageJson {
    items: Vec<DeviceJson>,
    /// The device the next page starts at (pass back as `cursor`).
    next: Option<String>,
}

fn page_query(params: &HashMap<String, String>) -> Result<(usize, Option<String>), String> {
    for k in params.keys() {
        if !matches!(k.as_str(), "limit" | "cursor" | "minSeq") {
            return Err(format!("unknown query parameter {k:?}"));
        }
    }
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => return Err(format!("`limit` must be an integer from 1 to {MAX_LIMIT}")),
        },
    };
    let cursor = match params.get("cursor") {
        Some(c) if !is_valid_id(c) => {
            return Err("`cursor` is not a cursor returned as `next`".into())
        }
        c => c.cloned(),
    };
    Ok((limit, cursor))
}

/// One page of the devices of `app` that `devices` covers, from `cursor`.
fn list(
    store: &Store,
    app: &str,
    devices: &Devices,
    limit: usize,
    cursor: Option<&str>,
) -> Result<DevicePage, StoreError> {
    let Devices::Only(ids) = devices else {
        return store.devices(app, cursor, limit);
    };
    // A limited token lists only its own devices, in the order a full
    // listing has (by key), looked up directly rather than scanned for.
    let mut wanted: Vec<&str> = ids.iter().collect();
    wanted.sort_by_cached_key(|d| device_key(app, d));
    if let Some(c) = cursor {
        let from = device_key(app, c);
        wanted.retain(|d| device_key(app, d) >= from);
    }
    let mut page = DevicePage::default();
    for chunk in wanted.chunks(limit + 1) {
        for entry in store.device_stats(app, chunk)? {
            if page.items.len() == limit {
                page.next = Some(entry.device);
                return Ok(page);
            }
            page.items.push(entry);
        }
    }
    Ok(page)
}

pub async fn list_devices(
    State(api): Api,
    app: PathOf<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let app = path(app)?;
    let caller = api.authorize(&headers, &app, None, Scope::GetState)?;
    let Query(params) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let (limit, cursor) = page_query(&params).map_err(ApiError::BadRequest)?;
    api.read_model.ready(min_seq(&params)?).await?;
    let store = api.store.clone();
    let page = store_read("device list", move || {
        list(&store, &app, &caller.devices, limit, cursor.as_deref())
    })
    .await?;
    let items = page
        .items
        .into_iter()
        .map(|DeviceEntry { device, stats }| DeviceJson {
            device,
            first_seen_at: format_rfc3339(stats.first_seen_ms as i64),
            last_seen_at: format_rfc3339(stats.last_seen_ms as i64),
            messages: stats.messages,
        })
        .collect();
    Ok(axum::Json(PageJson {
        items,
        next: page.next,
    })
    .into_response())
}

/// Cluster mode: stores `control` on the ingest stream and returns once
/// this broker's read model has applied it (read-your-writes on this
/// broker; every other broker applies it at the same place in the stream).
/// An ingest-only broker has no read model to wait for; it purges the
/// stream of what a removal covers itself, so the answer still means "gone
/// from the stream".
pub(super) async fn through_stream(
    api: &AdminApi,
    controller: &Controller,
    control: Control,
) -> Result<u64, ApiError> {
    let seq = controller.publish(&control).await.map_err(|e| match e {
        ControlError::Unknown(_) => ApiError::Unconfirmed(format!(
            "{e}; if it was, every broker applies it; repeat the request to be sure"
        )),
        ControlError::NotConnected | ControlError::Refused(_) | ControlError::Purge(_) => {
            ApiError::Unavailable(format!("{e}; nothing was changed"))
        }
    })?;
    match api.read_model.ready(Some(seq)).await {
        Ok(()) => Ok(seq),
        Err(NotReady::Behind { waited, .. }) => Err(ApiError::Unconfirmed(format!(
            "the change is stored on the ingest stream at sequence {seq} and every broker applies it, but this broker had not applied it within {waited:?}"
        ))),
        Err(NotReady::Absent) => match controller.purge(&control, seq).await {
            Ok(_) => Ok(seq),
            Err(e) => Err(ApiError::Unconfirmed(format!(
                "the change is stored on the ingest stream at sequence {seq}; {e}; every broker with a read model purges it when it applies the change"
            ))),
        },
    }
}

fn removal_failed(e: RemoveError) -> ApiError {
    match e {
        RemoveError::Closed => ApiError::Unavailable("the broker is shutting down".into()),
        RemoveError::Store(_) => ApiError::Internal,
    }
}

pub async fn delete_device(
    State(api): Api,
    ids: PathOf<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (app, device) = path(ids)?;
    let what = Audited::new(
        Operation::DeviceDelete,
        &app,
        serde_json::json!({ "device": device }),
    );
    let (a, h) = (api.clone(), headers.clone());
    let change = async move {
        a.authorize(&h, &app, Some(&device), Scope::AllApplication)?;
        if let Some(controller) = &a.control {
            let control = Control::RemoveDevice {
                app: app.clone(),
                device: device.clone(),
            };
            let result = through_stream(&a, controller, control).await;
            match &result {
                Ok(seq) => tracing::info!(app, device, marker = seq, "device removed"),
                Err(e) => tracing::warn!(app, device, error = ?e, "device removal failed"),
            }
            return result.map(drop);
        }
        let result = a
            .queue
            .remove(Removal::Device {
                app: app.clone(),
                device: device.clone(),
            })
            .await;
        match &result {
            Ok(()) => tracing::info!(app, device, "device removed"),
            Err(e) => tracing::warn!(app, device, error = %e, "device removal failed"),
        }
        result.map_err(removal_failed)
    };
    api.audited(&headers, what, change, |_, _| StatusCode::NO_CONTENT)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn delete_application(
    State(api): Api,
    app: PathOf<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let app = path(app)?;
    let what = Audited::new(Operation::ApplicationDelete, &app, serde_json::json!({}));
    let (a, h) = (api.clone(), headers.clone());
    let change = async move {
        let caller = a.caller(&h)?;
        if !is_valid_id(&app) {
            return Err(ApiError::BadRequest(
                "application ids must be 1-64 characters of A-Z a-z 0-9 _ . -".into(),
            ));
        }
        let owner = *caller.app == *app
            && caller.parent.is_none()
            && caller.scopes.contains(Scope::AllApplication)
            && caller.devices == Devices::All;
        if !(caller.root || owner) {
            return Err(ApiError::Forbidden);
        }
        match a.control.clone() {
            Some(controller) => remove_application_clustered(a, &controller, app).await,
            None => remove_application(a, caller, app).await,
        }
    };
    api.audited(&headers, what, change, |tokens, what| {
        what.target["removedTokens"] = serde_json::json!(tokens);
        StatusCode::NO_CONTENT
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Both halves of an application removal (see
/// `TokenService::begin_application_removal`); returns the ids of the
/// tokens removed with it.
async fn remove_application(
    api: Arc<AdminApi>,
    caller: Arc<crate::auth::TokenEntry>,
    app: String,
) -> Result<Vec<String>, ApiError> {
    let tokens = api
        .tokens
        .begin_application_removal(caller, app.clone())
        .await?;
    let n = tokens.len();
    // Its tokens are revoked now; its subscribers still ending must not
    // write their sessions back after the removal below.
    api.sessions.forget_application(&app);
    let result = api
        .queue
        .remove(Removal::Application {
            app: app.clone(),
            tokens: tokens.clone(),
        })
        .await;
    match &result {
        Ok(()) => tracing::info!(app, tokens = n, "application removed"),
        // The intent record stays: the removal finishes at the next start.
        Err(e) => {
            tracing::error!(app, error = %e, "application removal failed; it is finished at the next start")
        }
    }
    result.map_err(removal_failed)?;
    Ok(tokens)
}

/// Cluster mode's application removal: its tokens are deleted from the
/// cluster's bucket first (each top-level token with its subtree, on every
/// broker, through the revocation barrier), so nothing more of it is
/// accepted; then the removal marker goes through the stream and takes
/// everything stored before it from every read model and the stream.
/// Interrupted after the tokens went, the data stays until the request is
/// repeated (the application's data is still there to remove).
async fn remove_application_clustered(
    api: Arc<AdminApi>,
    controller: &Controller,
    app: String,
) -> Result<Vec<String>, ApiError> {
    let root = Arc::new(crate::auth::TokenEntry::new_root());
    let mut tokens = Vec::new();
    for top in api
        .tokens
        .list(&root, &app)
        .into_iter()
        .filter(|r| r.parent_id.is_none())
    {
        match api.tokens.delete(root.clone(), app.clone(), top.id).await {
            Ok(done) => tokens.extend(done.value),
            // Deleted meanwhile by someone else: gone either way.
            Err(crate::tokens::TokenError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    api.sessions.forget_application(&app);
    let control = Control::RemoveApplication {
        app: app.clone(),
        tokens: marker_tokens(&tokens),
    };
    let result = through_stream(&api, controller, control)
        .await
        .map_err(|e| match e {
            // The tokens are gone already: say so rather than "nothing
            // was changed".
            ApiError::Unavailable(why) => ApiError::Unavailable(format!(
                "the application's tokens are deleted, but its data is not removed yet ({why}); repeat the request"
            )),
            other => other,
        });
    match &result {
        Ok(seq) => tracing::info!(
            app,
            tokens = tokens.len(),
            marker = seq,
            "application removed"
        ),
        Err(e) => tracing::error!(app, error = ?e, "application removal failed; repeat it"),
    }
    result.map(|_| tokens)
}

/// Most token ids an application removal marker carries: each broker
/// deletes its local records of them (lastUsedAt) with the application's
/// data. 10,000 ids keep the message near 270 KB, well under NATS's
/// default 1 MiB `max_payload` (`tokens.max_per_application` allows
/// 100,000, whose full list would be refused and fail the removal). The
/// records of ids beyond stay until the broker's next start, which drops
/// every lastUsedAt whose token is not in the bucket.
const MAX_MARKER_TOKENS: usize = 10_000;

fn marker_tokens(tokens: &[String]) -> Vec<String> {
    tokens.iter().take(MAX_MARKER_TOKENS).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_application_marker_fits_a_nats_message_whatever_the_tokens() {
        let ids: Vec<String> = (0..100_000u64).map(|i| format!("{i:024x}")).collect();
        let marker = Control::RemoveApplication {
            app: "a".repeat(64),
            tokens: marker_tokens(&ids),
        };
        let bytes = serde_json::to_vec(&marker).unwrap().len();
        assert!(bytes < 1 << 20, "{bytes} bytes");
        assert_eq!(marker_tokens(&ids[..3]), ids[..3]);
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn page_params() {
        assert_eq!(page_query(&params(&[])), Ok((DEFAULT_LIMIT, None)));
        assert_eq!(
            page_query(&params(&[("limit", "5"), ("cursor", "d-1")])),
            Ok((5, Some("d-1".into())))
        );
        for bad in [
            vec![("limit", "0")],
            vec![("limit", "10001")],
            vec![("cursor", "a/b")],
            vec![("order", "asc")],
        ] {
            assert!(page_query(&params(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_limited_token_pages_through_its_own_devices_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::config::SyncMode::None).unwrap();
        let mut b = store.batch(256);
        for d in ["a", "b", "c", "d", "e"] {
            store
                .merge_device_stats(
                    &mut b,
                    &device_key("app", d),
                    &crate::store::DeviceStats {
                        first_seen_ms: 5,
                        last_seen_ms: 5,
                        messages: 1,
                    },
                )
                .unwrap();
        }
        store.commit(b, 0).unwrap();
        let mine = Devices::only(["e", "c", "a", "never-sent", "b"].map(String::from));
        let mut seen = vec![];
        let mut cursor = None;
        loop {
            let page = list(&store, "app", &mine, 2, cursor.as_deref()).unwrap();
            seen.extend(page.items.into_iter().map(|e| e.device));
            match page.next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, vec!["a", "b", "c", "e"]);
    }
}
