//! Token management: the admin operations on top of the in-memory
//! [`Registry`] and the store. Every change is persisted (fsynced) before it
//! is applied in memory, and applied in memory before the call returns, so
//! a revoke is in force for every listener once its response is sent.

use std::sync::Arc;

use ring::rand::SystemRandom;
use serde::{Deserialize, Serialize};

use crate::auth::Devices;
use crate::auth::{
    attenuate, Exceeds, NewToken, RateLimit, Registry, Requested, Scope, Scopes, Status,
    TokenEntry, TokenView,
};
use crate::ids::is_valid_id;
use crate::secret::{TokenHash, TokenSecret};
use crate::store::{Store, StoreError};
use crate::timefmt;

/// Longest token name, in characters.
pub const MAX_NAME_CHARS: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The caller's token stopped being usable before the change could be
    /// made (revoked or deleted concurrently).
    #[error("unauthorized")]
    Unauthorized,
    #[error("not found")]
    NotFound,
    #[error("exceeds parent: {0}")]
    ExceedsParent(#[from] Exceeds),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A validated creation request.
#[derive(Debug, Clone)]
pub struct CreateToken {
    pub name: String,
    pub scopes: Scopes,
    pub devices: Option<Devices>,
    pub expires_at: Option<i64>,
    pub status: Status,
    pub rate_limit: Option<RateLimit>,
}

/// A validated PATCH.
#[derive(Debug, Clone, Default)]
pub struct UpdateToken {
    pub status: Option<Status>,
    pub name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateBody {
    name: Option<String>,
    scope: Option<Vec<String>>,
    devices: Option<Vec<String>>,
    expiration_date: Option<serde_json::Value>,
    status: Option<String>,
    rate_limit: Option<RateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    status: Option<String>,
    name: Option<String>,
}

/// Parses and validates a `POST …/tokens` body.
pub fn parse_create(body: &[u8], max_devices: usize) -> Result<CreateToken, String> {
    let b: CreateBody = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let name = check_name(b.name.ok_or("missing field `name`")?)?;
    let scope = b.scope.ok_or("missing field `scope`")?;
    if scope.is_empty() {
        return Err("`scope` must list at least one scope".into());
    }
    let mut list = Vec::with_capacity(scope.len());
    for s in &scope {
        list.push(Scope::parse(s).ok_or_else(|| format!("unknown scope {:?}", truncate(s)))?);
    }
    let devices = match b.devices {
        None => None,
        Some(d) => Some(parse_devices(d, max_devices)?),
    };
    let expires_at = match b.expiration_date {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => {
            Some(timefmt::parse_rfc3339(&s).map_err(|e| format!("`expirationDate`: {e}"))?)
        }
        Some(serde_json::Value::Number(n)) => Some(
            n.as_i64()
                .ok_or("`expirationDate` must be an RFC 3339 string or epoch milliseconds")
                .and_then(|ms| {
                    timefmt::check_ms(ms).map_err(|_| "`expirationDate` is out of range")
                })?,
        ),
        Some(_) => {
            return Err(
                "`expirationDate` must be an RFC 3339 string, epoch milliseconds or null".into(),
            )
        }
    };
    let status = match b.status.as_deref() {
        None => Status::Active,
        Some(s) => parse_status(s)?,
    };
    if let Some(rl) = b.rate_limit {
        if rl.per_second == 0 || rl.burst == 0 {
            return Err("`rateLimit.perSecond` and `rateLimit.burst` must be at least 1".into());
        }
    }
    Ok(CreateToken {
        name,
        scopes: Scopes::of(&list),
        devices,
        expires_at,
        status,
        rate_limit: b.rate_limit,
    })
}

/// Parses and validates a `PATCH …/tokens/{id}` body.
pub fn parse_update(body: &[u8]) -> Result<UpdateToken, String> {
    let b: PatchBody = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if b.status.is_none() && b.name.is_none() {
        return Err("give `status` and/or `name`".into());
    }
    Ok(UpdateToken {
        status: b.status.as_deref().map(parse_status).transpose()?,
        name: b.name.map(check_name).transpose()?,
    })
}

fn parse_status(s: &str) -> Result<Status, String> {
    match s {
        "active" => Ok(Status::Active),
        "inactive" => Ok(Status::Inactive),
        other => Err(format!(
            "`status` must be \"active\" or \"inactive\", not {:?}",
            truncate(other)
        )),
    }
}

fn check_name(name: String) -> Result<String, String> {
    let n = name.chars().count();
    if n == 0 || n > MAX_NAME_CHARS {
        return Err(format!("`name` must be 1 to {MAX_NAME_CHARS} characters"));
    }
    if name.chars().any(char::is_control) {
        return Err("`name` must not contain control characters".into());
    }
    Ok(name)
}

fn parse_devices(d: Vec<String>, max: usize) -> Result<Devices, String> {
    if d.is_empty() {
        return Err("`devices` must not be empty (use [\"*\"] for every device)".into());
    }
    if d.len() == 1 && d[0] == "*" {
        return Ok(Devices::All);
    }
    if d.len() > max {
        return Err(format!("`devices` lists more than {max} devices"));
    }
    if let Some(bad) = d.iter().find(|x| !is_valid_id(x)) {
        return Err(format!(
            "`devices`: {:?} is not a device id (1-64 of A-Z a-z 0-9 _ . -), and \"*\" must stand alone",
            truncate(bad)
        ));
    }
    Ok(Devices::only(d))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The persisted form of a token. Holds the secret's SHA-256, never the
/// secret.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredToken {
    id: String,
    application_id: String,
    name: String,
    scope: Vec<String>,
    devices: Vec<String>,
    expiration_date: Option<i64>,
    status: String,
    parent_id: Option<String>,
    created_at: i64,
    rate_limit: Option<RateLimit>,
    sha256: String,
}

impl StoredToken {
    fn of(v: &TokenView) -> StoredToken {
        StoredToken {
            id: v.id.clone(),
            application_id: v.app.clone(),
            name: v.name.clone(),
            scope: v.scopes.names().into_iter().map(String::from).collect(),
            devices: v.devices.to_list(),
            expiration_date: v.expires_at,
            status: v.status.name().to_string(),
            parent_id: v.parent_id.clone(),
            created_at: v.created_at,
            rate_limit: v.rate_limit,
            sha256: v.hash.to_hex(),
        }
    }

    fn into_new(self, last_used: i64) -> Result<NewToken, String> {
        let scopes: Option<Vec<Scope>> = self.scope.iter().map(|s| Scope::parse(s)).collect();
        let devices = if self.devices.len() == 1 && self.devices[0] == "*" {
            Devices::All
        } else {
            Devices::only(self.devices)
        };
        Ok(NewToken {
            hash: TokenHash::from_hex(&self.sha256).ok_or("bad sha256")?,
            scopes: Scopes::of(&scopes.ok_or("bad scope")?),
            status: parse_status(&self.status)?,
            id: self.id,
            app: self.application_id,
            name: self.name,
            devices,
            expires_at: self.expiration_date,
            parent_id: self.parent_id,
            created_at: self.created_at,
            last_used,
            rate_limit: self.rate_limit,
        })
    }
}

/// The API form of a token record (no secret, no hash).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenJson {
    pub id: String,
    pub application_id: String,
    pub name: String,
    pub scope: Vec<&'static str>,
    pub devices: Vec<String>,
    pub expiration_date: Option<String>,
    pub status: &'static str,
    pub parent_id: Option<String>,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub rate_limit: Option<RateLimit>,
    /// The secret; present only in the creation response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl TokenJson {
    pub fn of(v: &TokenView) -> TokenJson {
        TokenJson {
            id: v.id.clone(),
            application_id: v.app.clone(),
            name: v.name.clone(),
            scope: v.scopes.names(),
            devices: v.devices.to_list(),
            expiration_date: v.expires_at.map(timefmt::format_rfc3339),
            status: v.status.name(),
            parent_id: v.parent_id.clone(),
            created_at: timefmt::format_rfc3339(v.created_at),
            last_used_at: v.last_used.map(timefmt::format_rfc3339),
            rate_limit: v.rate_limit,
            token: None,
        }
    }
}

pub struct TokenService {
    registry: Arc<Registry>,
    store: Store,
    rng: SystemRandom,
    /// Serialises admin changes so "check, persist, apply" is atomic with
    /// respect to other changes. Never taken on the ingest path.
    changes: tokio::sync::Mutex<()>,
    max_devices: usize,
}

impl TokenService {
    /// Loads every stored token into the registry, parents before children.
    pub fn load(
        store: Store,
        registry: Arc<Registry>,
        max_devices: usize,
    ) -> Result<TokenService, TokenError> {
        let mut pending = Vec::new();
        for (bytes, last_used) in store.load_tokens()? {
            let st: StoredToken = serde_json::from_slice(&bytes)
                .map_err(|e| TokenError::Internal(format!("stored token: {e}")))?;
            pending.push(st.into_new(last_used).map_err(TokenError::Internal)?);
        }
        // Insert in rounds: a token goes in once its parent is in. Parents
        // are always created first, but do not rely on clocks for it.
        while !pending.is_empty() {
            let before = pending.len();
            let mut rest = Vec::new();
            for t in pending {
                let ready = match &t.parent_id {
                    None => true,
                    Some(p) => registry.entry(p).is_some(),
                };
                if ready {
                    registry
                        .insert(t)
                        .map_err(|e| TokenError::Internal(e.to_string()))?;
                } else {
                    rest.push(t);
                }
            }
            if rest.len() == before {
                // Orphans cannot exist (deletes remove whole subtrees in one
                // write); if the store says otherwise, refuse to guess.
                return Err(TokenError::Internal(format!(
                    "{} stored tokens have no parent",
                    rest.len()
                )));
            }
            pending = rest;
        }
        Ok(TokenService {
            registry,
            store,
            rng: SystemRandom::new(),
            changes: tokio::sync::Mutex::new(()),
            max_devices,
        })
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn max_devices(&self) -> usize {
        self.max_devices
    }

    /// Mints a token for `app` on behalf of `caller` (already checked to
    /// hold `token.create` there, or to be root).
    pub async fn create(
        &self,
        caller: &Arc<TokenEntry>,
        app: &str,
        req: CreateToken,
    ) -> Result<TokenJson, TokenError> {
        let _guard = self.changes.lock().await;
        self.still_usable(caller)?;
        let granted = attenuate(
            caller,
            app,
            Requested {
                scopes: req.scopes,
                devices: req.devices,
                expires_at: req.expires_at,
                rate_limit: req.rate_limit,
            },
        )?;
        let secret = TokenSecret::generate(&self.rng)
            .map_err(|_| TokenError::Internal("system random failed".into()))?;
        let mut raw_id = [0u8; 12];
        ring::rand::SecureRandom::fill(&self.rng, &mut raw_id)
            .map_err(|_| TokenError::Internal("system random failed".into()))?;
        let id: String = raw_id.iter().map(|b| format!("{b:02x}")).collect();
        let view = TokenView {
            id: id.clone(),
            app: app.to_string(),
            name: req.name,
            scopes: granted.scopes,
            devices: granted.devices,
            expires_at: granted.expires_at,
            status: req.status,
            parent_id: (!caller.root).then(|| caller.id.to_string()),
            created_at: timefmt::now_ms(),
            last_used: None,
            rate_limit: granted.rate_limit,
            hash: secret.hash(),
        };
        let record = serde_json::to_vec(&StoredToken::of(&view))
            .map_err(|e| TokenError::Internal(e.to_string()))?;
        let store = self.store.clone();
        let id2 = id.clone();
        blocking(move || store.put_token(&id2, &record)).await?;
        self.registry
            .insert(NewToken {
                id,
                app: view.app.clone(),
                name: view.name.clone(),
                scopes: view.scopes,
                devices: view.devices.clone(),
                expires_at: view.expires_at,
                status: view.status,
                parent_id: view.parent_id.clone(),
                created_at: view.created_at,
                last_used: 0,
                rate_limit: view.rate_limit,
                hash: view.hash,
            })
            .map_err(|e| TokenError::Internal(e.to_string()))?;
        let mut json = TokenJson::of(&view);
        json.token = Some(secret.expose().to_string());
        Ok(json)
    }

    /// The caller was authenticated before the change lock was taken; a
    /// concurrent revoke or delete in between must win, or a child could be
    /// minted under a deleted parent.
    fn still_usable(&self, caller: &TokenEntry) -> Result<(), TokenError> {
        if caller.root
            || (self.registry.entry(&caller.id).is_some() && caller.usable(timefmt::now_ms()))
        {
            Ok(())
        } else {
            Err(TokenError::Unauthorized)
        }
    }

    /// A token `caller` may see: in `app`, and a descendant unless root.
    fn visible(&self, caller: &TokenEntry, app: &str, id: &str) -> Result<TokenView, TokenError> {
        let entry = self.registry.entry(id).ok_or(TokenError::NotFound)?;
        if *entry.app != *app || !(caller.root || entry.descends_from(caller)) {
            return Err(TokenError::NotFound);
        }
        self.registry.view(id).ok_or(TokenError::NotFound)
    }

    pub fn get(&self, caller: &TokenEntry, app: &str, id: &str) -> Result<TokenJson, TokenError> {
        Ok(TokenJson::of(&self.visible(caller, app, id)?))
    }

    pub fn list(&self, caller: &TokenEntry, app: &str) -> Vec<TokenJson> {
        self.registry
            .list(app, caller)
            .iter()
            .map(TokenJson::of)
            .collect()
    }

    /// Renames and/or (de)activates a token. Re-activating a token whose
    /// ancestor is inactive sets its own status but it stays unusable,
    /// because usability is derived from the whole chain.
    pub async fn update(
        &self,
        caller: &TokenEntry,
        app: &str,
        id: &str,
        upd: UpdateToken,
    ) -> Result<TokenJson, TokenError> {
        let _guard = self.changes.lock().await;
        self.still_usable(caller)?;
        let mut view = self.visible(caller, app, id)?;
        if let Some(s) = upd.status {
            view.status = s;
        }
        if let Some(n) = &upd.name {
            view.name = n.clone();
        }
        let record = serde_json::to_vec(&StoredToken::of(&view))
            .map_err(|e| TokenError::Internal(e.to_string()))?;
        let store = self.store.clone();
        let id2 = id.to_string();
        blocking(move || store.put_token(&id2, &record)).await?;
        if let Some(n) = upd.name {
            self.registry.set_name(id, n);
        }
        if let Some(s) = upd.status {
            self.registry.set_status(id, s);
        }
        Ok(TokenJson::of(
            &self.registry.view(id).ok_or(TokenError::NotFound)?,
        ))
    }

    /// Deletes a token and its whole subtree, permanently.
    pub async fn delete(&self, caller: &TokenEntry, app: &str, id: &str) -> Result<(), TokenError> {
        let _guard = self.changes.lock().await;
        self.still_usable(caller)?;
        self.visible(caller, app, id)?;
        let ids = self.registry.subtree(id);
        let store = self.store.clone();
        let ids2 = ids.clone();
        blocking(move || store.delete_tokens(&ids2)).await?;
        self.registry.remove_subtree(id);
        Ok(())
    }

    /// The first half of removing an application (`DELETE
    /// /applications/{app}`): under the change lock, records the removal
    /// with the ids of every token of `app` in the store (fsynced), then
    /// removes those tokens from memory, so they stop working at once and
    /// live sessions holding them end at their next check. Returns the ids;
    /// the writer's removal batch deletes their records with the
    /// application's data, and a stop in between is finished when the
    /// store next opens (`Store::open_with`).
    pub async fn begin_application_removal(
        &self,
        caller: &TokenEntry,
        app: &str,
    ) -> Result<Vec<String>, TokenError> {
        let _guard = self.changes.lock().await;
        self.still_usable(caller)?;
        let views = self.registry.list(app, &TokenEntry::new_root());
        let ids: Vec<String> = views.iter().map(|v| v.id.clone()).collect();
        let store = self.store.clone();
        let (app2, ids2) = (app.to_string(), ids.clone());
        blocking(move || store.begin_application_removal(&app2, &ids2)).await?;
        for top in views.iter().filter(|v| v.parent_id.is_none()) {
            self.registry.remove_subtree(&top.id);
        }
        Ok(ids)
    }

    /// Persists lastUsedAt of tokens used since the last flush. Holding the
    /// change lock means a token deleted meanwhile is not written back.
    pub async fn flush_last_used(&self) -> Result<usize, TokenError> {
        let _guard = self.changes.lock().await;
        let used = self.registry.take_used();
        let items: Vec<(String, i64)> = used
            .iter()
            .filter(|e| self.registry.entry(&e.id).is_some())
            .map(|e| (e.id.to_string(), e.last_used()))
            .collect();
        if items.is_empty() {
            return Ok(0);
        }
        let n = items.len();
        let store = self.store.clone();
        blocking(move || store.put_last_used(&items)).await?;
        Ok(n)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, TokenError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TokenError::Internal(e.to_string()))?
        .map_err(TokenError::Store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_validation() {
        let ok = parse_create(
            br#"{"name":"n","scope":["device.sendState"],"devices":["d1","d2"],"expirationDate":"2030-01-01T00:00:00Z","rateLimit":{"perSecond":5,"burst":10}}"#,
            100,
        )
        .unwrap();
        assert_eq!(ok.scopes, Scopes::of(&[Scope::SendState]));
        assert_eq!(ok.expires_at, Some(1_893_456_000_000));
        assert_eq!(ok.status, Status::Active);
        for (body, want) in [
            (r#"{"scope":["device.sendState"]}"#, "missing field `name`"),
            (r#"{"name":"n"}"#, "missing field `scope`"),
            (r#"{"name":"n","scope":[]}"#, "at least one scope"),
            (r#"{"name":"n","scope":["root"]}"#, "unknown scope"),
            (
                r#"{"name":"n","scope":["device.sendState"],"devices":[]}"#,
                "must not be empty",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"devices":["a/b"]}"#,
                "not a device id",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"devices":["*","a"]}"#,
                "must stand alone",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"status":"gone"}"#,
                "`status`",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"expirationDate":"soon"}"#,
                "expirationDate",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"expirationDate":true}"#,
                "expirationDate",
            ),
            (r#"{"name":"","scope":["device.sendState"]}"#, "`name`"),
            (
                r#"{"name":"n","scope":["device.sendState"],"admin":true}"#,
                "unknown field",
            ),
            (
                r#"{"name":"n","scope":["device.sendState"],"rateLimit":{"perSecond":0,"burst":1}}"#,
                "at least 1",
            ),
            (r#"[1]"#, "invalid type"),
        ] {
            let e = parse_create(body.as_bytes(), 100).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
        let many: Vec<String> = (0..5).map(|i| format!("\"d{i}\"")).collect();
        let body = format!(
            r#"{{"name":"n","scope":["device.sendState"],"devices":[{}]}}"#,
            many.join(",")
        );
        assert!(parse_create(body.as_bytes(), 4)
            .unwrap_err()
            .contains("more than 4"));
    }

    #[test]
    fn patch_body_validation() {
        let u = parse_update(br#"{"status":"inactive"}"#).unwrap();
        assert_eq!(u.status, Some(Status::Inactive));
        assert!(parse_update(b"{}").is_err());
        assert!(parse_update(br#"{"status":"deleted"}"#).is_err());
        assert!(parse_update(br#"{"scope":["all.Application"]}"#).is_err());
    }
}
