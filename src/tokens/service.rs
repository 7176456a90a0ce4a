//! The admin operations on tokens.
//!
//! Every change is one critical section under the change lock: check the
//! caller again, validate, persist (fsynced), then apply in memory. It runs
//! in a task of its own, so a caller that goes away (an HTTP client hanging
//! up drops its handler's future) cannot stop it between persist and apply:
//! a change happens whole, or not at all, whether or not anybody hears the
//! answer.

use std::future::Future;
use std::sync::Arc;

use ring::rand::SystemRandom;
use tokio::sync::Mutex;

use super::load::{load, Loaded};
use super::request::{CreateToken, UpdateToken};
use super::TokenError;
use crate::auth::{
    attenuate, status_change, Registry, Requested, Revoker, Status, TokenEntry, TokenRecord,
};
use crate::config::TokensConfig;
use crate::secret::TokenSecret;
use crate::store::{Store, StoreError};
use crate::timefmt;

/// The configured bounds on what admin calls may create.
#[derive(Clone, Copy, Debug)]
pub struct TokenLimits {
    /// Longest explicit device list on one token.
    pub max_devices: usize,
    /// Most tokens one application may hold.
    pub max_per_application: usize,
    /// Longest chain from the root admin token down to a token.
    pub max_chain_depth: usize,
}

impl From<&TokensConfig> for TokenLimits {
    fn from(c: &TokensConfig) -> TokenLimits {
        TokenLimits {
            max_devices: c.max_devices_per_token,
            max_per_application: c.max_per_application,
            max_chain_depth: c.max_chain_depth,
        }
    }
}

pub struct TokenService {
    registry: Arc<Registry>,
    store: Store,
    rng: SystemRandom,
    /// Serialises admin changes so "check, persist, apply" is atomic with
    /// respect to other changes. Never taken on the ingest path. Callers
    /// queue on it while they can still give up harmlessly; the change
    /// task then holds it, so at most one change is in flight.
    changes: Arc<Mutex<()>>,
    limits: TokenLimits,
}

impl TokenService {
    /// Loads every stored token into the registry (see `load`).
    pub fn load(
        store: Store,
        registry: Arc<Registry>,
        limits: TokenLimits,
    ) -> Result<TokenService, TokenError> {
        let Loaded { tokens, orphans } = load(&store, &registry)?;
        if !orphans.is_empty() {
            tracing::warn!(
                deleted = orphans.len(),
                "deleted stored tokens whose parent no longer exists"
            );
        }
        tracing::debug!(tokens, "stored tokens loaded");
        Ok(TokenService {
            registry,
            store,
            rng: SystemRandom::new(),
            changes: Arc::new(Mutex::new(())),
            limits,
        })
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn limits(&self) -> TokenLimits {
        self.limits
    }

    /// Runs one change to completion. The lock is taken here, where
    /// dropping this future is harmless (nothing has happened yet); the
    /// change itself runs in a spawned task that holds the lock, so it
    /// finishes even if this future is dropped while awaiting it.
    async fn change<T, Fut>(
        self: &Arc<Self>,
        f: impl FnOnce(Arc<TokenService>) -> Fut,
    ) -> Result<T, TokenError>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, TokenError>> + Send + 'static,
    {
        let guard = self.changes.clone().lock_owned().await;
        let change = f(self.clone());
        tokio::spawn(async move {
            let out = change.await;
            drop(guard);
            out
        })
        .await
        .map_err(|e| TokenError::Internal(format!("admin change task: {e}")))?
    }

    /// Mints a token for `app` on behalf of `caller` (already checked to
    /// hold `token.create` there, or to be root). Returns the record and
    /// the secret, which exists nowhere else.
    pub async fn create(
        self: &Arc<Self>,
        caller: Arc<TokenEntry>,
        app: String,
        req: CreateToken,
    ) -> Result<(TokenRecord, TokenSecret), TokenError> {
        self.change(move |svc| async move { svc.create_now(&caller, app, req).await })
            .await
    }

    async fn create_now(
        &self,
        caller: &Arc<TokenEntry>,
        app: String,
        req: CreateToken,
    ) -> Result<(TokenRecord, TokenSecret), TokenError> {
        self.still_usable(caller)?;
        let granted = attenuate(
            caller,
            &app,
            Requested {
                scopes: req.scopes,
                devices: req.devices,
                expires_at: req.expires_at,
                rate_limit: req.rate_limit,
            },
        )?;
        let deepest = self.limits.max_chain_depth;
        if caller.depth() >= deepest {
            return Err(TokenError::BadRequest(format!(
                "the new token would be {} tokens below the root, more than `tokens.max_chain_depth` ({deepest}) allows",
                caller.depth() + 1
            )));
        }
        let max = self.limits.max_per_application;
        if self.registry.count(&app) >= max {
            return Err(TokenError::BadRequest(format!(
                "application {app:?} already holds {max} tokens, the most `tokens.max_per_application` allows"
            )));
        }
        let secret = TokenSecret::generate(&self.rng)
            .map_err(|_| TokenError::Internal("system random failed".into()))?;
        let record = TokenRecord {
            id: self.new_id()?,
            app,
            name: req.name,
            scopes: granted.scopes,
            devices: granted.devices,
            expires_at: granted.expires_at,
            status: req.status,
            // A token created inactive was deactivated by its minter.
            deactivated_by: (req.status == Status::Inactive).then(|| Revoker::of(caller)),
            parent_id: (!caller.root).then(|| caller.id.to_string()),
            created_at: timefmt::now_ms(),
            rate_limit: granted.rate_limit,
            hash: secret.hash(),
            last_used: None,
        };
        self.persist(&record).await?;
        self.registry
            .insert(record.clone())
            .map_err(|e| TokenError::Internal(e.to_string()))?;
        Ok((record, secret))
    }

    /// A fresh random id (96 bits, hex), checked against the resident ones
    /// so a record is never overwritten.
    fn new_id(&self) -> Result<String, TokenError> {
        loop {
            let mut raw = [0u8; 12];
            ring::rand::SecureRandom::fill(&self.rng, &mut raw)
                .map_err(|_| TokenError::Internal("system random failed".into()))?;
            let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            if self.registry.entry(&id).is_none() {
                return Ok(id);
            }
        }
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
    fn visible(&self, caller: &TokenEntry, app: &str, id: &str) -> Result<TokenRecord, TokenError> {
        let entry = self.registry.entry(id).ok_or(TokenError::NotFound)?;
        if *entry.app != *app || !(caller.root || entry.descends_from(caller)) {
            return Err(TokenError::NotFound);
        }
        self.registry.record(id).ok_or(TokenError::NotFound)
    }

    pub fn get(&self, caller: &TokenEntry, app: &str, id: &str) -> Result<TokenRecord, TokenError> {
        self.visible(caller, app, id)
    }

    pub fn list(&self, caller: &TokenEntry, app: &str) -> Vec<TokenRecord> {
        self.registry.list(app, caller)
    }

    /// Renames and/or (de)activates a token. Re-activating a token whose
    /// ancestor is inactive sets its own status but it stays unusable,
    /// because usability is derived from the whole chain; re-activating
    /// one that a token above the caller deactivated is refused.
    pub async fn update(
        self: &Arc<Self>,
        caller: Arc<TokenEntry>,
        app: String,
        id: String,
        upd: UpdateToken,
    ) -> Result<TokenRecord, TokenError> {
        self.change(move |svc| async move { svc.update_now(&caller, &app, &id, upd).await })
            .await
    }

    async fn update_now(
        &self,
        caller: &TokenEntry,
        app: &str,
        id: &str,
        upd: UpdateToken,
    ) -> Result<TokenRecord, TokenError> {
        self.still_usable(caller)?;
        let mut record = self.visible(caller, app, id)?;
        if let Some(want) = upd.status {
            let deactivator = match &record.deactivated_by {
                Some(Revoker::Token(by)) => self.registry.entry(by),
                _ => None,
            };
            record.deactivated_by = status_change(
                caller,
                record.status,
                record.deactivated_by.as_ref(),
                deactivator.as_deref(),
                want,
            )?;
            record.status = want;
        }
        if let Some(n) = upd.name {
            record.name = n;
        }
        self.persist(&record).await?;
        self.registry.set_name(id, record.name.clone());
        self.registry
            .set_status(id, record.status, record.deactivated_by.clone())
            .ok_or(TokenError::NotFound)
    }

    /// Deletes a token and its whole subtree, permanently.
    pub async fn delete(
        self: &Arc<Self>,
        caller: Arc<TokenEntry>,
        app: String,
        id: String,
    ) -> Result<(), TokenError> {
        self.change(move |svc| async move { svc.delete_now(&caller, &app, &id).await })
            .await
    }

    async fn delete_now(&self, caller: &TokenEntry, app: &str, id: &str) -> Result<(), TokenError> {
        self.still_usable(caller)?;
        self.visible(caller, app, id)?;
        let ids = self.registry.subtree(id);
        let store = self.store.clone();
        blocking(move || store.delete_tokens(&ids)).await?;
        self.registry.remove_subtree(id);
        Ok(())
    }

    /// Persists lastUsedAt of tokens used since the last flush. Holding the
    /// change lock means a token deleted meanwhile is not written back; a
    /// failed write puts the tokens back for the next flush.
    pub async fn flush_last_used(self: &Arc<Self>) -> Result<usize, TokenError> {
        self.change(|svc| async move { svc.flush_now().await })
            .await
    }

    async fn flush_now(&self) -> Result<usize, TokenError> {
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
        if let Err(e) = blocking(move || store.put_last_used(&items)).await {
            self.registry.requeue_used(used);
            return Err(e);
        }
        Ok(n)
    }

    async fn persist(&self, record: &TokenRecord) -> Result<(), TokenError> {
        let bytes = serde_json::to_vec(record).map_err(|e| TokenError::Internal(e.to_string()))?;
        let store = self.store.clone();
        let id = record.id.clone();
        blocking(move || store.put_token(&id, &bytes)).await
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
