//! Control messages on the ingest stream: changes to what the read models
//! hold that every broker must make alike (removals, retention overrides).
//!
//! A control message is one JSON message on `<prefix>.ctl.<app>`, in the
//! same stream as the states, so every broker's materializer applies it at
//! the same place in the same order: a removal covers exactly the states
//! stored before its sequence, on every broker, and states accepted after
//! it stay. Readers of `<prefix>.state.>` (downstream consumers) never see
//! these messages.
//!
//! A removal also purges the stream of the states it covers (a purge with
//! the device's or application's subject as filter, below the marker's
//! sequence), so downstream consumers and brokers that join later never see
//! them. Every materializer purges before it applies the marker to its read
//! model, and a purge is idempotent: whichever broker gets there first
//! does the work, and a broker that stops half-way purges again when it
//! re-applies the marker after its restart.
//!
//! Publishing retries with one `Nats-Msg-Id` until `cluster.publish_timeout`
//! (the duplicate window is longer, so a retry never stores a second
//! marker); a duplicate's acknowledgement names the first one's sequence.

use std::time::Duration;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::HeaderMap;
use bytes::Bytes;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::connect::Nats;
use super::names::Names;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("not connected to NATS; nothing was sent")]
    NotConnected,
    #[error("the stream refused the control message; nothing was stored: {0}")]
    Refused(String),
    #[error(
        "the stream did not confirm the control message in time; it may or may not be stored: {0}"
    )]
    Unknown(String),
    #[error("cannot purge the ingest stream: {0}")]
    Purge(String),
}

/// One change every broker applies to its read model, in stream order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", deny_unknown_fields)]
pub enum Control {
    /// A device's history, composite state and statistics, as stored
    /// before the marker.
    #[serde(rename_all = "camelCase")]
    RemoveDevice { app: String, device: String },
    /// Everything of an application stored before the marker, with the
    /// local records of its tokens (already deleted from the token bucket).
    #[serde(rename_all = "camelCase")]
    RemoveApplication { app: String, tokens: Vec<String> },
    /// An application's retention override (`"30d"`, `"unlimited"`), or
    /// `None` to return to `storage.retention`.
    #[serde(rename_all = "camelCase")]
    SetRetention {
        app: String,
        retention: Option<String>,
    },
}

impl Control {
    pub fn app(&self) -> &str {
        match self {
            Control::RemoveDevice { app, .. }
            | Control::RemoveApplication { app, .. }
            | Control::SetRetention { app, .. } => app,
        }
    }

    /// The stream subjects whose states this message removes (a purge
    /// filter), if it removes any.
    pub fn purge_filter(&self, names: &Names) -> Option<String> {
        match self {
            Control::RemoveDevice { app, device } => {
                Some(names.state_subject(app, device).to_string())
            }
            Control::RemoveApplication { app, .. } => Some(names.app_filter(app)),
            Control::SetRetention { .. } => None,
        }
    }

    /// The message a stream record holds; `None` for anything Sluice does
    /// not publish (skipped alike on every broker).
    pub fn parse(payload: &[u8]) -> Option<Control> {
        serde_json::from_slice(payload).ok()
    }
}

/// Publishes control messages for this broker.
#[derive(Clone)]
pub struct Controller {
    nats: Nats,
    names: Names,
    node_id: String,
    /// How long a publish is retried (`cluster.publish_timeout`).
    timeout: Duration,
}

impl Controller {
    pub fn new(nats: &Nats, names: Names, node_id: String, timeout: Duration) -> Controller {
        Controller {
            nats: nats.clone(),
            names,
            node_id,
            timeout,
        }
    }

    /// Stores `control` on the stream; its sequence.
    pub async fn publish(&self, control: &Control) -> Result<u64, ControlError> {
        if self.nats.client.connection_state() != async_nats::connection::State::Connected {
            return Err(ControlError::NotConnected);
        }
        let payload = Bytes::from(
            serde_json::to_vec(control).map_err(|e| ControlError::Refused(e.to_string()))?,
        );
        let mut raw = [0u8; 12];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| ControlError::Refused("system random failed".into()))?;
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let msg_id = format!("{}.ctl.{id}", self.node_id);
        let subject = self.names.control_subject(control.app());
        let deadline = Instant::now() + self.timeout;
        let mut problem = String::from("no attempt finished in time");
        let mut sent = false;
        while Instant::now() < deadline {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, msg_id.as_str());
            let attempt = async {
                let ack = self
                    .nats
                    .js
                    .publish_with_headers(subject.clone(), headers, payload.clone())
                    .await
                    .map_err(|e| (false, e.to_string()))?;
                ack.await.map_err(|e| (true, e.to_string()))
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(ack)) => return Ok(ack.sequence),
                Ok(Err((reached, e))) => {
                    sent |= reached;
                    problem = e;
                }
                Err(_) => {
                    sent = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if sent {
            Err(ControlError::Unknown(problem))
        } else {
            Err(ControlError::NotConnected)
        }
    }
}

impl Controller {
    /// [`purge`] through this broker's connection.
    pub async fn purge(&self, control: &Control, marker: u64) -> Result<u64, ControlError> {
        purge(&self.nats, &self.names, control, marker).await
    }
}

/// Purges the states `control` removes that are stored below `marker`
/// (nothing for a message that removes none). Idempotent; the number of
/// messages purged.
pub async fn purge(
    nats: &Nats,
    names: &Names,
    control: &Control,
    marker: u64,
) -> Result<u64, ControlError> {
    let Some(filter) = control.purge_filter(names) else {
        return Ok(0);
    };
    let stream = nats
        .js
        .get_stream_no_info(names.state_stream())
        .await
        .map_err(|e| ControlError::Purge(e.to_string()))?;
    let done = stream
        .purge()
        .filter(filter)
        .sequence(marker)
        .await
        .map_err(|e| ControlError::Purge(e.to_string()))?;
    Ok(done.purged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_name_exact_filters() {
        let names = Names::new("sluice");
        let cases = [
            (
                Control::RemoveDevice {
                    app: "a".into(),
                    device: "d.1".into(),
                },
                Some("sluice.state.a.d%2E1"),
            ),
            (
                Control::RemoveApplication {
                    app: "a".into(),
                    tokens: vec!["t1".into()],
                },
                Some("sluice.state.a.>"),
            ),
            (
                Control::SetRetention {
                    app: "a.b".into(),
                    retention: Some("30d".into()),
                },
                None,
            ),
        ];
        for (c, filter) in cases {
            let text = serde_json::to_vec(&c).unwrap();
            assert_eq!(Control::parse(&text), Some(c.clone()));
            assert_eq!(c.purge_filter(&names).as_deref(), filter);
        }
        let text = br#"{"op":"removeDevice","app":"a","device":"d"}"#;
        assert!(Control::parse(text).is_some());
        assert_eq!(Control::parse(b"{\"op\":\"dropAll\"}"), None);
        assert_eq!(Control::parse(b"not json"), None);
    }
}
