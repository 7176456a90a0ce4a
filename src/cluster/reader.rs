//! An ordered, gap-checked reader of one stream: an ephemeral push consumer
//! delivering in stream order with flow control and idle heartbeats.
//!
//! It is the one way Sluice reads a stream live (the token watch, the node
//! registry, replays for downstream readers). Unlike the client library's
//! ordered consumer it never recreates itself silently: a missed heartbeat,
//! a sequence gap, a deleted consumer or a closed connection end it with an
//! error, so the caller always knows its view stopped and re-reads from the
//! last sequence it handled + 1 (no gap, and the caller decides how long a
//! stopped view may be trusted).

use std::time::Duration;

use async_nats::header::NATS_LAST_CONSUMER;
use async_nats::jetstream::consumer::{push, AckPolicy, DeliverPolicy, ReplayPolicy};
use async_nats::status::StatusCode;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures_util::StreamExt;

use super::connect::Nats;

#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error("cannot create the consumer on {stream}: {detail}")]
    Consumer { stream: String, detail: String },
    #[error("cannot subscribe: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("no message or heartbeat for {0:?}: the view is lost")]
    Silent(Duration),
    #[error("gap in delivery (expected consumer sequence {expected}, got {got})")]
    Gap { expected: u64, got: u64 },
    #[error("the consumer is gone ({0})")]
    ConsumerGone(String),
    #[error("the connection was closed")]
    Closed,
    #[error("a delivered message had no usable metadata")]
    Metadata,
}

/// Where a reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The oldest message still in the stream.
    First,
    /// Stream sequence `n` (the first message at or after it).
    At(u64),
    /// The last message of every subject, then everything new (a snapshot
    /// of a KV bucket).
    LastPerSubject,
}

impl Start {
    fn policy(self) -> DeliverPolicy {
        match self {
            Start::First | Start::At(0) => DeliverPolicy::All,
            Start::At(n) => DeliverPolicy::ByStartSequence { start_sequence: n },
            Start::LastPerSubject => DeliverPolicy::LastPerSubject,
        }
    }
}

/// One delivered message.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: u64,
    pub subject: Subject,
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    /// Messages still to be delivered after this one when it was sent.
    pub pending: u64,
    /// When the stream stored it (server clock), Unix milliseconds.
    pub stored_ms: i64,
}

pub struct Reader {
    subscriber: async_nats::Subscriber,
    client: async_nats::Client,
    /// Longest silence tolerated: two idle heartbeats.
    silence: Duration,
    /// When the server was last heard from (a message, a heartbeat, a flow
    /// control request). Silence is measured from here, not from the
    /// start of a `next` call, so a caller that drops `next` (a `select!`
    /// with a timer) cannot keep a dead reader looking alive.
    last_heard: tokio::time::Instant,
    /// Consumer sequence of the last delivered message.
    consumer_seq: u64,
    /// Messages pending when the consumer was created.
    initial_pending: u64,
    failed: bool,
}

impl Reader {
    /// Creates the consumer on `stream` for `filters` (empty: every subject)
    /// from `start`, sending idle heartbeats every `heartbeat`.
    pub async fn open(
        nats: &Nats,
        stream: &str,
        filters: Vec<String>,
        start: Start,
        heartbeat: Duration,
    ) -> Result<Reader, ReaderError> {
        let inbox = nats.client.new_inbox();
        // Subscribe before the consumer exists, so nothing it delivers is
        // missed.
        let subscriber = nats.client.subscribe(inbox.clone()).await?;
        let config = push::Config {
            deliver_subject: inbox,
            deliver_policy: start.policy(),
            ack_policy: AckPolicy::None,
            replay_policy: ReplayPolicy::Instant,
            filter_subjects: filters,
            flow_control: true,
            idle_heartbeat: heartbeat,
            // An abandoned reader's consumer is removed by the server.
            inactive_threshold: (heartbeat * 10).max(Duration::from_secs(10)),
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        };
        let consumer = nats
            .js
            .create_consumer_on_stream(config, stream)
            .await
            .map_err(|e| ReaderError::Consumer {
                stream: stream.to_string(),
                detail: e.to_string(),
            })?;
        Ok(Reader {
            subscriber,
            client: nats.client.clone(),
            silence: heartbeat * 2,
            last_heard: tokio::time::Instant::now(),
            consumer_seq: 0,
            initial_pending: consumer.cached_info().num_pending,
            failed: false,
        })
    }

    /// Messages that matched when the reader was created (before any new
    /// one arrived): with [`Start::LastPerSubject`], the snapshot's size.
    pub fn initial_pending(&self) -> u64 {
        self.initial_pending
    }

    /// When the server was last heard from: while [`Reader::next`] has not
    /// failed, the view was live then, and at most one silence (two
    /// heartbeats) ago.
    pub fn last_heard(&self) -> tokio::time::Instant {
        self.last_heard
    }

    /// The next message in order. After an error the reader is finished and
    /// every later call returns [`ReaderError::Closed`]. Cancel-safe: a
    /// dropped call loses no message and does not extend the silence
    /// allowed.
    pub async fn next(&mut self) -> Result<Record, ReaderError> {
        if self.failed {
            return Err(ReaderError::Closed);
        }
        let r = self.next_inner().await;
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    async fn next_inner(&mut self) -> Result<Record, ReaderError> {
        loop {
            let deadline = self.last_heard + self.silence;
            let message = match tokio::time::timeout_at(deadline, self.subscriber.next()).await {
                Err(_) => return Err(ReaderError::Silent(self.silence)),
                Ok(None) => return Err(ReaderError::Closed),
                Ok(Some(m)) => m,
            };
            self.last_heard = tokio::time::Instant::now();
            match message.status {
                Some(StatusCode::IDLE_HEARTBEAT) => {
                    if let Some(reply) = message.reply {
                        // Flow control: the server waits for this reply
                        // before it sends more.
                        let _ = self.client.publish(reply, Bytes::new()).await;
                    }
                    let last = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(NATS_LAST_CONSUMER))
                        .and_then(|v| v.as_str().parse::<u64>().ok());
                    if let Some(last) = last {
                        if last != self.consumer_seq {
                            return Err(ReaderError::Gap {
                                expected: self.consumer_seq + 1,
                                got: last,
                            });
                        }
                    }
                }
                Some(status) => {
                    return Err(ReaderError::ConsumerGone(format!(
                        "status {status}{}",
                        message
                            .description
                            .map(|d| format!(": {d}"))
                            .unwrap_or_default()
                    )))
                }
                None => {
                    let meta =
                        Meta::parse(message.reply.as_deref()).ok_or(ReaderError::Metadata)?;
                    if meta.consumer_seq != self.consumer_seq + 1 {
                        return Err(ReaderError::Gap {
                            expected: self.consumer_seq + 1,
                            got: meta.consumer_seq,
                        });
                    }
                    self.consumer_seq = meta.consumer_seq;
                    return Ok(Record {
                        seq: meta.stream_seq,
                        subject: message.subject,
                        payload: message.payload,
                        headers: message.headers,
                        pending: meta.pending,
                        stored_ms: meta.stored_ms,
                    });
                }
            }
        }
    }
}

/// Delivery metadata from a JetStream reply subject:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>`,
/// or the newer form with domain and account hash in front
/// (`$JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>[.<token>]`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub stream_seq: u64,
    pub consumer_seq: u64,
    pub stored_ms: i64,
    pub pending: u64,
}

impl Meta {
    pub(crate) fn parse(reply: Option<&str>) -> Option<Meta> {
        let rest = reply?.strip_prefix("$JS.ACK.")?;
        let tokens: Vec<&str> = rest.split('.').collect();
        // The numbers are always the last five (six with a trailing token
        // in the newer form): delivered, stream seq, consumer seq, time,
        // pending.
        let nums = match tokens.len() {
            7 => &tokens[2..7],
            9 => &tokens[4..9],
            n if n >= 10 => &tokens[4..9],
            _ => return None,
        };
        let n = |i: usize| nums[i].parse::<u64>().ok();
        Some(Meta {
            stream_seq: n(1)?,
            consumer_seq: n(2)?,
            stored_ms: (nums[3].parse::<i128>().ok()? / 1_000_000) as i64,
            pending: n(4)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_reply_forms_parse() {
        let old = Meta::parse(Some("$JS.ACK.S.C.1.42.7.1700000000123456789.3")).unwrap();
        assert_eq!(
            old,
            Meta {
                stream_seq: 42,
                consumer_seq: 7,
                stored_ms: 1_700_000_000_123,
                pending: 3
            }
        );
        let new = Meta::parse(Some(
            "$JS.ACK.hub.ACCHASH.S.C.1.42.7.1700000000123456789.3.tok",
        ))
        .unwrap();
        assert_eq!(new, old);
        assert!(Meta::parse(Some("$JS.ACK.S.C.1.x.7.1.3")).is_none());
        assert!(Meta::parse(Some("_INBOX.abc")).is_none());
        assert!(Meta::parse(None).is_none());
    }
}
