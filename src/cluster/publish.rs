//! Atomic batch publish of accepted states onto the ingest stream.
//!
//! One writer batch is one atomic batch (ADR-50: `Nats-Batch-Id`,
//! `Nats-Batch-Sequence`, `Nats-Batch-Commit`): the stream stores all of
//! its messages at consecutive sequences, or none. The protocol is spoken
//! directly on the client because the `jetstream-extra` crate refuses a
//! `Nats-Msg-Id` in a batch, and the id is how a retry stays exact.
//!
//! Deduplication: only the first message of a batch carries a
//! `Nats-Msg-Id`, `<node>.<incarnation>.<batch>` (the incarnation is drawn
//! per process, so a restarted broker's batch numbers never collide with
//! its previous life's). Because a batch is atomic, "its first message is
//! stored" means "the batch is stored", so one id per batch suffices and
//! costs nothing measurable (ids on every message cost ~30%).
//!
//! - An attempt unanswered for `publish_retry_after` is resent whole with a
//!   new batch id and the same message id. If an earlier attempt was
//!   stored, the stream rejects the resend whole (error 10201).
//! - Then, or when `publish_timeout` passes without an answer, a *fence* is
//!   published: one empty message on `<prefix>.fence.<node>` with the same
//!   id. If the batch is stored, the fence is a duplicate and its ack names
//!   the batch's first sequence. If not, the fence is stored and takes the
//!   id, so the batch can never be stored later (a late commit is rejected
//!   as a duplicate): refusing the requests is then safe.
//! - Only when the fence itself cannot be confirmed is the outcome
//!   unknown ([`PublishError::Unknown`]).
//!
//! All of this holds while the stream's duplicate window exceeds the
//! publish timeout (config validation demands twice that).

use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{
    NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE, NATS_MESSAGE_ID,
};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::ErrorCode;
use async_nats::{HeaderMap, Request, Subject};
use bytes::Bytes;
use futures_util::StreamExt;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::connect::Nats;
use super::names::Names;

/// Header with the time the accepting broker received the state, Unix ms.
pub const HEADER_RECEIVED: &str = "Sluice-Received-Ms";
/// Header with the id of the token the state was sent with.
pub const HEADER_TOKEN: &str = "Sluice-Token-Id";

/// Most messages in one atomic batch (a NATS server limit).
pub const MAX_BATCH: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("an empty batch cannot be published")]
    Empty,
    #[error("a batch holds at most {MAX_BATCH} messages, not {0}")]
    TooLarge(usize),
    #[error("not connected to NATS; nothing was sent")]
    NotConnected,
    #[error("{0} batches are already in flight; nothing was sent")]
    Busy(usize),
    #[error("the stream refused the batch; nothing was stored: {0}")]
    Refused(String),
    #[error("the stream did not acknowledge within {0:?}; nothing was stored, and a fence ensures nothing will be")]
    NotStored(Duration),
    #[error("the stream did not answer; the batch may or may not be stored: {0}")]
    Unknown(String),
}

impl PublishError {
    /// Whether refusing the batch's requests is safe: nothing of it is
    /// stored now or later. Only [`PublishError::Unknown`] is not.
    pub fn nothing_stored(&self) -> bool {
        !matches!(self, PublishError::Unknown(_))
    }
}

/// One state for the stream.
#[derive(Debug, Clone)]
pub struct StateMessage {
    /// `Names::state_subject(app, device)`.
    pub subject: Subject,
    /// The state's JSON, exactly as received.
    pub payload: Bytes,
    /// When the broker received it, Unix milliseconds.
    pub received_ms: i64,
    /// The token it was sent with (its id, never its secret).
    pub token_id: Arc<str>,
}

/// Where a batch was stored: message `i` is at sequence `first + i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub first: u64,
    pub last: u64,
}

/// Settings of a [`Publisher`].
#[derive(Debug, Clone)]
pub struct PublisherSpec {
    pub names: Names,
    pub node_id: String,
    pub publish_timeout: Duration,
    pub retry_after: Duration,
    pub max_in_flight: usize,
}

pub struct Publisher {
    nats: Nats,
    spec: PublisherSpec,
    /// Distinguishes this process's batch numbers from a previous one's.
    incarnation: String,
    fence_subject: Subject,
    /// One permit per batch in flight: NATS allows 50 open batches per
    /// stream; a publish that cannot get a permit within its timeout fails
    /// with `Busy` without sending anything.
    slots: Semaphore,
    /// Held while one attempt's messages are written (not while its ack is
    /// awaited): the stream receives batches whole and in the order they
    /// were published, so states of one device keep their order across
    /// batches in flight (a batch resent after a failure may still land
    /// after a later one).
    send_order: tokio::sync::Mutex<()>,
}

/// The outcome of one attempt.
enum Attempt {
    /// Stored; the last message's sequence.
    Stored(u64),
    /// An earlier attempt was stored (10201).
    Duplicate,
    /// The stream refused it for a reason a resend would not change.
    Permanent(String),
    /// Worth resending (no answer, no leader, too many batches in flight).
    Transient(String),
}

#[derive(Deserialize)]
struct BatchPubAck {
    seq: u64,
}

impl Publisher {
    pub fn new(nats: &Nats, spec: PublisherSpec) -> Result<Publisher, PublishError> {
        let mut raw = [0u8; 6];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| PublishError::Refused("system random failed".into()))?;
        let incarnation = raw.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Publisher {
            nats: nats.clone(),
            fence_subject: spec.names.fence_subject(&spec.node_id),
            slots: Semaphore::new(spec.max_in_flight),
            send_order: tokio::sync::Mutex::new(()),
            incarnation,
            spec,
        })
    }

    /// Publishes `messages` as one atomic batch. `batch` numbers the
    /// publisher's batches and must never be reused for other messages. A
    /// caller retrying after [`PublishError::Unknown`] passes the same
    /// number (the batch is then stored at most once); after any other
    /// error nothing is stored and the number is spent: a retry takes a
    /// new one.
    pub async fn publish_batch(
        &self,
        messages: &[StateMessage],
        batch: u64,
    ) -> Result<Stored, PublishError> {
        if messages.is_empty() {
            return Err(PublishError::Empty);
        }
        if messages.len() > MAX_BATCH {
            return Err(PublishError::TooLarge(messages.len()));
        }
        if self.nats.client.connection_state() != async_nats::connection::State::Connected {
            return Err(PublishError::NotConnected);
        }
        let deadline = Instant::now() + self.spec.publish_timeout;
        let _permit = tokio::time::timeout_at(deadline, self.slots.acquire())
            .await
            .map_err(|_| PublishError::Busy(self.spec.max_in_flight))?
            .map_err(|_| PublishError::Busy(self.spec.max_in_flight))?;
        let msg_id = self.dedupe_id(batch);
        let n = messages.len() as u64;
        let mut last_problem = String::new();
        for attempt in 0u32.. {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let until = (now + self.spec.retry_after).min(deadline);
            let batch_id = format!("{}-{batch}-{attempt}", self.incarnation);
            let outcome =
                tokio::time::timeout_at(until, self.attempt(messages, &msg_id, &batch_id))
                    .await
                    .unwrap_or_else(|_| Attempt::Transient("no acknowledgement in time".into()));
            match outcome {
                Attempt::Stored(last) => {
                    // The ack names the batch's last sequence; the batch is
                    // contiguous, so it cannot be below n - 1.
                    if let Some(first) = last.checked_sub(n - 1) {
                        return Ok(Stored { first, last });
                    }
                    last_problem = format!("implausible acknowledgement (sequence {last})");
                }
                Attempt::Duplicate => break,
                Attempt::Permanent(p) if attempt == 0 => return Err(PublishError::Refused(p)),
                Attempt::Permanent(p) | Attempt::Transient(p) => {
                    last_problem = p;
                    tokio::time::sleep_until(
                        (Instant::now() + Duration::from_millis(20)).min(deadline),
                    )
                    .await;
                }
            }
        }
        self.fence(&msg_id, n, last_problem).await
    }

    /// Sends one attempt and waits for its pub ack: see [`Publisher::send`].
    async fn attempt(&self, messages: &[StateMessage], msg_id: &str, batch_id: &str) -> Attempt {
        let mut acks = {
            let _order = self.send_order.lock().await;
            match self.send(messages, msg_id, batch_id).await {
                Ok(acks) => acks,
                Err(outcome) => return outcome,
            }
        };
        match acks.next().await {
            Some(reply) => match classify(&reply.payload) {
                Reply::Ack(seq) => Attempt::Stored(seq),
                Reply::Empty => Attempt::Transient("empty reply to a batch commit".into()),
                Reply::Error(code, text) => error_attempt(code, text),
            },
            None => Attempt::Transient("the reply subscription ended".into()),
        }
    }

    /// Writes one attempt's messages: the first as a request (the server
    /// confirms the batch started, or refuses it at once), the middle ones
    /// as plain publishes, the commit with a reply subject whose
    /// subscription is returned (the pub ack arrives there). Called under
    /// `send_order`, and returns before the pub ack, so batches are written
    /// whole and one after the other while several await their acks.
    async fn send(
        &self,
        messages: &[StateMessage],
        msg_id: &str,
        batch_id: &str,
    ) -> Result<async_nats::Subscriber, Attempt> {
        let client = &self.nats.client;
        let inbox = client.new_inbox();
        let acks = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| Attempt::Transient(e.to_string()))?;
        let last = messages.len() - 1;
        for (i, m) in messages.iter().enumerate() {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_BATCH_ID, batch_id);
            headers.insert(NATS_BATCH_SEQUENCE, (i + 1).to_string().as_str());
            if i == 0 {
                headers.insert(NATS_MESSAGE_ID, msg_id);
            }
            if i == last {
                headers.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
            }
            headers.insert(HEADER_RECEIVED, m.received_ms.to_string().as_str());
            headers.insert(HEADER_TOKEN, &*m.token_id);
            if i == last {
                client
                    .publish_with_reply_and_headers(
                        m.subject.clone(),
                        inbox.clone(),
                        headers,
                        m.payload.clone(),
                    )
                    .await
                    .map_err(|e| Attempt::Transient(e.to_string()))?;
            } else if i == 0 {
                let request = Request::new()
                    .headers(headers)
                    .payload(m.payload.clone())
                    .timeout(Some(self.spec.publish_timeout));
                let reply = client
                    .send_request(m.subject.clone(), request)
                    .await
                    .map_err(|e| Attempt::Transient(e.to_string()))?;
                match classify(&reply.payload) {
                    Reply::Empty => {}
                    Reply::Ack(_) => {
                        return Err(Attempt::Transient(
                            "unexpected reply to a batch's first message".into(),
                        ))
                    }
                    Reply::Error(code, text) => return Err(error_attempt(code, text)),
                }
            } else {
                client
                    .publish_with_headers(m.subject.clone(), headers, m.payload.clone())
                    .await
                    .map_err(|e| Attempt::Transient(e.to_string()))?;
            }
        }
        Ok(acks)
    }

    /// Settles a batch whose outcome no attempt confirmed (see the module
    /// documentation).
    async fn fence(&self, msg_id: &str, n: u64, problem: String) -> Result<Stored, PublishError> {
        let deadline = Instant::now() + self.spec.retry_after.max(Duration::from_secs(1));
        let mut problem = problem;
        while Instant::now() < deadline {
            let message = PublishMessage::build().message_id(msg_id);
            // Sending is bounded as well as the acknowledgement: while the
            // client is disconnected, handing it a message can wait for
            // the reconnection, and the fence must answer by its deadline.
            let attempt = async {
                let ack = match self
                    .nats
                    .js
                    .send_publish(self.fence_subject.clone(), message)
                    .await
                {
                    Ok(f) => f.await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match ack {
                    // The id is taken: by this batch's first message, or by
                    // a fence an earlier call with this batch number stored.
                    Ok(ack) if ack.duplicate => self.holder_of(ack.sequence, n).await,
                    Ok(_) => Ok(Err(PublishError::NotStored(self.spec.publish_timeout))),
                    Err(e) => Err(e),
                }
            };
            let settled = tokio::time::timeout_at(deadline, attempt)
                .await
                .unwrap_or_else(|_| Err("no acknowledgement of the fence".to_string()));
            match settled {
                Ok(outcome) => return outcome,
                Err(e) => {
                    problem = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        Err(PublishError::Unknown(problem))
    }

    /// What holds the deduplication id at stream sequence `seq`: the
    /// batch's first message (stored) or a fence (never stored).
    async fn holder_of(&self, seq: u64, n: u64) -> Result<Result<Stored, PublishError>, String> {
        let stream = self
            .nats
            .js
            .get_stream_no_info(self.spec.names.state_stream())
            .await
            .map_err(|e| e.to_string())?;
        let message = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| e.to_string())?;
        Ok(if message.subject == self.fence_subject {
            Err(PublishError::NotStored(self.spec.publish_timeout))
        } else {
            Ok(Stored {
                first: seq,
                last: seq.saturating_add(n - 1),
            })
        })
    }

    /// Whether the stream answers now (its leader serves a read): how a
    /// broker whose publishes failed learns, without traffic, that the
    /// stream is back.
    pub async fn reachable(&self) -> bool {
        super::stream::last_state_seq(&self.nats, &self.spec.names)
            .await
            .is_ok()
    }

    /// Settles batch number `batch` (of `n` messages) after
    /// [`PublishError::Unknown`] without sending it again: only its fence
    /// is published, so the answer is `Ok` (it was stored, at these
    /// sequences), [`PublishError::NotStored`] (it never will be), or
    /// `Unknown` again (NATS still does not answer; call again, while the
    /// stream's duplicate window still covers the batch's last attempt).
    pub async fn settle(&self, batch: u64, n: u64) -> Result<Stored, PublishError> {
        if n == 0 {
            return Err(PublishError::Empty);
        }
        self.fence(&self.dedupe_id(batch), n, "not settled yet".into())
            .await
    }

    /// The `Nats-Msg-Id` that batch number `batch` carries on its first
    /// message (and its fence).
    pub fn dedupe_id(&self, batch: u64) -> String {
        format!("{}.{}.{batch}", self.spec.node_id, self.incarnation)
    }
}

enum Reply {
    Empty,
    Ack(u64),
    Error(ErrorCode, String),
}

fn classify(payload: &[u8]) -> Reply {
    if payload.is_empty() {
        return Reply::Empty;
    }
    #[derive(Deserialize)]
    struct ErrorBody {
        error: async_nats::jetstream::Error,
    }
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(payload) {
        return Reply::Error(e.error.error_code(), e.error.to_string());
    }
    match serde_json::from_slice::<BatchPubAck>(payload) {
        Ok(ack) => Reply::Ack(ack.seq),
        Err(_) => Reply::Error(ErrorCode(0), String::from_utf8_lossy(payload).into_owned()),
    }
}

fn error_attempt(code: ErrorCode, text: String) -> Attempt {
    match code {
        ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE => Attempt::Duplicate,
        ErrorCode::ATOMIC_PUBLISH_DISABLED
        | ErrorCode::ATOMIC_PUBLISH_UNSUPPORTED_HEADER
        | ErrorCode::ATOMIC_PUBLISH_TOO_LARGE_BATCH
        | ErrorCode::ATOMIC_PUBLISH_INVALID_BATCH_ID
        | ErrorCode::ATOMIC_PUBLISH_INVALID_BATCH_COMMIT
        | ErrorCode::ATOMIC_PUBLISH_MISSING_SEQ
        | ErrorCode::MIRROR_WITH_ATOMIC_PUBLISH => Attempt::Permanent(text),
        _ => Attempt::Transient(text),
    }
}

/// The receive time a published state carries.
pub fn received_ms(headers: Option<&HeaderMap>) -> Option<i64> {
    headers?.get(HEADER_RECEIVED)?.as_str().parse().ok()
}

/// The token id a published state carries.
pub fn token_id(headers: Option<&HeaderMap>) -> Option<&str> {
    Some(headers?.get(HEADER_TOKEN)?.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_classified() {
        assert!(matches!(classify(b""), Reply::Empty));
        assert!(matches!(
            classify(br#"{"stream":"S","seq":42,"batch":"b","count":3}"#),
            Reply::Ack(42)
        ));
        let dup = br#"{"error":{"code":400,"err_code":10201,"description":"atomic publish batch contains duplicate message id"}}"#;
        match classify(dup) {
            Reply::Error(code, _) => assert!(matches!(
                error_attempt(code, String::new()),
                Attempt::Duplicate
            )),
            _ => panic!("not an error"),
        }
        let busy = br#"{"error":{"code":429,"err_code":10210,"description":"too many inflight"}}"#;
        match classify(busy) {
            Reply::Error(code, _) => assert!(matches!(
                error_attempt(code, String::new()),
                Attempt::Transient(_)
            )),
            _ => panic!("not an error"),
        }
        assert!(matches!(classify(b"garbage"), Reply::Error(..)));
    }

    #[test]
    fn only_unknown_outcomes_forbid_a_refusal() {
        assert!(PublishError::NotConnected.nothing_stored());
        assert!(PublishError::NotStored(Duration::from_secs(1)).nothing_stored());
        assert!(!PublishError::Unknown("x".into()).nothing_stored());
    }
}
