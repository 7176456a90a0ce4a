//! A broker's follower of the ingest stream: its own durable consumer
//! (`follow-<node>`), reading every state and control message (see
//! `control.rs`) in stream order, in batches, from
//! the sequence the broker's read model needs next.
//!
//! The broker's read model keeps the last applied sequence in the same
//! write batch as the data, so that sequence, not the consumer, is the
//! truth: the durable consumer is (re)created from it whenever the
//! follower starts or loses its way (a missed heartbeat, a gap, a NATS
//! restart), with no acknowledgements to track. A batch is returned only
//! when it is gap-free and starts exactly where the previous one ended, so
//! dropping a `next_batch` future half-way loses nothing.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, ReplayPolicy};
use futures_util::{FutureExt, StreamExt};

use super::connect::Nats;
use super::names::Names;
use super::reader::{Meta, Record};

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("cannot create the follower's consumer: {0}")]
    Consumer(String),
    #[error("follower lost its consumer ({0}); it is recreated on the next call")]
    Lost(String),
    #[error("gap in delivery (expected consumer sequence {expected}, got {got}); the consumer is recreated on the next call")]
    Gap { expected: u64, got: u64 },
}

#[derive(Debug, Clone)]
pub struct FollowerSpec {
    pub names: Names,
    pub node_id: String,
    /// Most records one `next_batch` returns.
    pub batch: usize,
    /// Idle heartbeat of the pull requests; two missed ones reset the
    /// consumer.
    pub heartbeat: Duration,
}

pub struct Follower {
    nats: Nats,
    spec: FollowerSpec,
    stream: String,
    durable: String,
    /// Stream sequence of the next state to return.
    next_seq: u64,
    messages: Option<pull::Stream>,
    /// Consumer sequence of the last message taken from `messages`.
    consumer_seq: u64,
    /// Pause before the next (re)creation; grows while NATS is away.
    backoff: Duration,
}

impl Follower {
    /// A follower that will return states from stream sequence `next_seq`
    /// on (1 or 0: from the beginning). No NATS call is made until the
    /// first [`Follower::next_batch`].
    pub fn new(nats: &Nats, spec: FollowerSpec, next_seq: u64) -> Follower {
        Follower {
            nats: nats.clone(),
            stream: spec.names.state_stream(),
            durable: format!("follow-{}", spec.node_id),
            spec,
            next_seq: next_seq.max(1),
            messages: None,
            consumer_seq: 0,
            backoff: Duration::ZERO,
        }
    }

    /// The stream sequence the next batch starts at (or after, where the
    /// stream holds no state at that sequence).
    pub fn position(&self) -> u64 {
        self.next_seq
    }

    /// Makes the next batch start at `next_seq` again (for a caller that
    /// could not apply what it was given).
    pub fn rewind(&mut self, next_seq: u64) {
        self.next_seq = next_seq.max(1);
        self.messages = None;
    }

    /// The next states in stream order: at least one, at most
    /// `spec.batch`, waiting as long as it takes for the first. An error
    /// means the consumer was dropped; call again to resume where the last
    /// returned batch ended.
    pub async fn next_batch(&mut self) -> Result<Vec<Record>, FollowError> {
        let r = self.next_batch_inner().await;
        match r {
            Ok(_) => self.backoff = Duration::ZERO,
            Err(_) => {
                self.messages = None;
                self.backoff =
                    (self.backoff * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
            }
        }
        r
    }

    async fn next_batch_inner(&mut self) -> Result<Vec<Record>, FollowError> {
        loop {
            if self.messages.is_none() {
                tokio::time::sleep(self.backoff).await;
                self.open().await?;
            }
            let Some(messages) = self.messages.as_mut() else {
                continue;
            };
            let first = messages
                .next()
                .await
                .ok_or_else(|| FollowError::Lost("the message stream ended".into()))?;
            let mut taken = vec![first];
            while taken.len() < self.spec.batch {
                match messages.next().now_or_never() {
                    Some(Some(m)) => taken.push(m),
                    Some(None) | None => break,
                }
            }
            let mut out = Vec::with_capacity(taken.len());
            let mut consumer_seq = self.consumer_seq;
            for m in taken {
                let m = m.map_err(|e| FollowError::Lost(e.to_string()))?;
                let meta = Meta::parse(m.message.reply.as_deref())
                    .ok_or_else(|| FollowError::Lost("a message without metadata".into()))?;
                if meta.consumer_seq != consumer_seq + 1 {
                    return Err(FollowError::Gap {
                        expected: consumer_seq + 1,
                        got: meta.consumer_seq,
                    });
                }
                consumer_seq = meta.consumer_seq;
                if meta.stream_seq < self.next_seq {
                    continue;
                }
                let m = m.message;
                out.push(Record {
                    seq: meta.stream_seq,
                    subject: m.subject,
                    payload: m.payload,
                    headers: m.headers,
                    pending: meta.pending,
                    stored_ms: meta.stored_ms,
                });
            }
            self.consumer_seq = consumer_seq;
            if let Some(last) = out.last() {
                self.next_seq = last.seq.saturating_add(1);
                return Ok(out);
            }
        }
    }

    /// Replaces the durable consumer with one starting at `next_seq`.
    async fn open(&mut self) -> Result<(), FollowError> {
        let failed = |e: String| FollowError::Consumer(e);
        // Absent is fine; anything else shows up in the create below.
        let _ = self
            .nats
            .js
            .delete_consumer_from_stream(&self.durable, &self.stream)
            .await;
        let config = pull::Config {
            durable_name: Some(self.durable.clone()),
            description: Some("Sluice read-model follower".into()),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: self.next_seq,
            },
            ack_policy: AckPolicy::None,
            replay_policy: ReplayPolicy::Instant,
            filter_subjects: vec![
                self.spec.names.state_subjects(),
                self.spec.names.control_subjects(),
            ],
            ..Default::default()
        };
        let consumer = self
            .nats
            .js
            .create_consumer_on_stream(config, &self.stream)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(self.spec.batch)
            .heartbeat(self.spec.heartbeat)
            .expires((self.spec.heartbeat * 5).max(Duration::from_secs(5)))
            .messages()
            .await
            .map_err(|e| failed(e.to_string()))?;
        self.messages = Some(messages);
        self.consumer_seq = 0;
        Ok(())
    }
}
