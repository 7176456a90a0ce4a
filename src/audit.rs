//! The audit trail of admin changes: what an event says, where it is kept,
//! and how it is logged.
//!
//! Every admin change (token create, update, delete; device and
//! application removal; retention change), refused attempts included,
//! becomes one [`Event`]: who (the caller's token id, or root; never a
//! secret), what (operation, target ids, the change asked for or made),
//! when (the store assigns the time and a unique sequence number), and the
//! result (`ok` or the stable error code, with the HTTP status). It is
//! written to the store (fsynced) and logged on target `sluice::audit`.
//!
//! Which trail holds an event: the target application's when the caller is
//! root or a token of that application; the caller's own application's
//! when a token of another application tried, so nothing one
//! application's token does ever writes into another application's data.
//! A request without a usable token has no application to charge and
//! anyone can send one, so it is logged but not stored.
//!
//! In cluster mode each broker records the changes made through it, in
//! its own store: reading the trail from one broker shows the changes that
//! broker made (README "Audit").

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::auth::TokenEntry;
use crate::store::Store;

/// The kinds of change audited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    TokenCreate,
    TokenUpdate,
    TokenDelete,
    DeviceDelete,
    ApplicationDelete,
    RetentionSet,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::TokenCreate => "token.create",
            Operation::TokenUpdate => "token.update",
            Operation::TokenDelete => "token.delete",
            Operation::DeviceDelete => "device.delete",
            Operation::ApplicationDelete => "application.delete",
            Operation::RetentionSet => "retention.set",
        }
    }
}

impl Serialize for Operation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Who made a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    Root,
    Token { id: String, app: String },
}

impl Actor {
    pub fn of(entry: &TokenEntry) -> Actor {
        match entry.root {
            true => Actor::Root,
            false => Actor::Token {
                id: entry.id.to_string(),
                app: entry.app.to_string(),
            },
        }
    }
}

impl Serialize for Actor {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match self {
            Actor::Root => m.serialize_entry("root", &true)?,
            Actor::Token { id, app } => {
                m.serialize_entry("tokenId", id)?;
                m.serialize_entry("applicationId", app)?;
            }
        }
        m.end()
    }
}

/// One audited change, as stored (the store adds its id and time).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// The application the change was aimed at.
    pub application_id: String,
    /// `None`: no usable token (such events are only logged).
    pub actor: Option<Actor>,
    pub operation: Operation,
    /// The ids the change is about (`tokenId`, `device`, and what a delete
    /// removed).
    pub target: serde_json::Value,
    /// What was asked for or made: the request, or the created token's
    /// record (never its secret).
    pub change: serde_json::Value,
    /// `"ok"`, or the error code the caller was answered with.
    pub result: &'static str,
    /// The HTTP status the caller was answered with.
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Event {
    /// The application whose trail holds this event (see the module doc).
    pub fn trail(&self) -> Option<&str> {
        match &self.actor {
            None => None,
            Some(Actor::Root) => Some(&self.application_id),
            Some(Actor::Token { app, .. }) => Some(app),
        }
    }
}

/// Writes `event` to its trail (on a blocking thread: the write is
/// fsynced) and logs it. A failed write is logged as an error with the
/// whole event, since the change it describes has already happened.
pub async fn record(store: &Store, event: Event) {
    let json = match serde_json::to_string(&event) {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(target: "sluice::audit", error = %e, "audit event not encodable");
            return;
        }
    };
    // An application id that is not one (a path the API refused) would
    // not be one key range: such an event is only logged.
    let trail = event.trail().filter(|t| crate::ids::is_valid_id(t));
    let Some(trail) = trail.map(str::to_string) else {
        tracing::info!(
            target: "sluice::audit",
            stored = false,
            operation = event.operation.name(),
            app = %event.application_id,
            result = event.result,
            event = %json,
            "admin change refused, not stored: no usable token or no valid application"
        );
        return;
    };
    let s = store.clone();
    let bytes = json.clone().into_bytes();
    let trail2 = trail.clone();
    let written = tokio::task::spawn_blocking(move || s.put_audit(&trail2, &bytes)).await;
    match written {
        Ok(Ok(at)) => tracing::info!(
            target: "sluice::audit",
            id = %at.to_cursor(),
            trail = %trail,
            operation = event.operation.name(),
            app = %event.application_id,
            result = event.result,
            event = %json,
            "admin change"
        ),
        Ok(Err(e)) => tracing::error!(
            target: "sluice::audit",
            error = %e,
            trail = %trail,
            event = %json,
            "audit event could not be stored"
        ),
        Err(e) => tracing::error!(
            target: "sluice::audit",
            error = %e,
            trail = %trail,
            event = %json,
            "audit event could not be stored"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(actor: Option<Actor>) -> Event {
        Event {
            application_id: "a".into(),
            actor,
            operation: Operation::TokenDelete,
            target: serde_json::json!({"tokenId": "t1"}),
            change: serde_json::Value::Null,
            result: "forbidden",
            status: 403,
            detail: None,
        }
    }

    #[test]
    fn events_go_to_the_callers_trail_and_serialise_flat() {
        assert_eq!(event(None).trail(), None);
        assert_eq!(event(Some(Actor::Root)).trail(), Some("a"));
        let foreign = Actor::Token {
            id: "x".into(),
            app: "b".into(),
        };
        assert_eq!(event(Some(foreign.clone())).trail(), Some("b"));
        assert_eq!(
            serde_json::to_value(event(Some(foreign))).unwrap(),
            serde_json::json!({
                "applicationId": "a",
                "actor": {"tokenId": "x", "applicationId": "b"},
                "operation": "token.delete",
                "target": {"tokenId": "t1"},
                "change": null,
                "result": "forbidden",
                "status": 403
            })
        );
    }
}
