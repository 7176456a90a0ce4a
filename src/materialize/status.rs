//! `GET /cluster/ingest` on the admin listener: this broker's view of the
//! ingest stream, read fresh from NATS, so a tool (or `loadtest
//! --verify-via`) can wait until a broker holds everything acknowledged
//! anywhere: read `streamLast`, then read with `minSeq=<streamLast>`.

use std::time::Duration;

use serde::Serialize;

use super::applied::ReadModel;
use crate::cluster::{Names, Nats};

/// What the admin API needs to answer `GET /cluster/ingest`.
pub struct IngestView {
    pub nats: Nats,
    pub names: Names,
    pub node_id: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IngestStatus {
    pub node: String,
    pub stream: String,
    /// Whether this broker keeps a read model (`cluster.materialize`).
    pub materialize: bool,
    /// Last stream sequence applied to the read model (absent without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
    /// Sequence of the newest state or control message (removal,
    /// retention override) in the stream, read now.
    pub stream_last: u64,
    /// `streamLast - applied` (absent without a read model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
}

/// Longest wait for the stream's newest sequence. These views answer
/// operators during an outage too (that is when they are needed), so an
/// unanswered read is reported rather than waited out for the client's
/// whole request timeout.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

impl IngestView {
    pub async fn status(&self, read_model: &ReadModel) -> Result<IngestStatus, String> {
        let read = crate::cluster::stream::last_applicable_seq(&self.nats, &self.names);
        let stream_last = tokio::time::timeout(ANSWER_WITHIN, read)
            .await
            .map_err(|_| format!("the ingest stream did not answer within {ANSWER_WITHIN:?}"))?
            .map_err(|e| e.to_string())?;
        let applied = read_model.applied();
        Ok(IngestStatus {
            node: self.node_id.clone(),
            stream: self.names.state_stream(),
            materialize: !matches!(read_model, ReadModel::Absent),
            applied,
            stream_last,
            lag: applied.map(|a| stream_last.saturating_sub(a)),
        })
    }
}
