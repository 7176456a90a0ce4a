//! A JetStream KV bucket as Sluice uses it: the token bucket
//! (`<prefix>_tokens`, keys are token ids, values the stored token record
//! bytes, opaque here) and the node registry (`<prefix>_nodes`).
//!
//! Reads are a consistent snapshot plus a watch from the snapshot's
//! revision + 1; writes are compare-and-set on the key's revision. Every
//! write carries a random `Nats-Msg-Id`, so a write whose acknowledgement
//! was lost is resent safely: if the first attempt was stored, the stream
//! answers "duplicate" with the original revision instead of storing it
//! again or reporting a false conflict.

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, StorageType};
use bytes::Bytes;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::time::Instant;

use super::connect::{retry_until, Nats};
use super::reader::{Reader, ReaderError, Start};

/// Header that marks a KV delete (the convention every NATS client uses).
const KV_OPERATION: &str = "KV-Operation";

/// How long one write keeps resending an unacknowledged attempt.
const WRITE_BOUND: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("bucket {bucket} has {found} replicas, {wanted} were asked for")]
    TooFewReplicas {
        bucket: String,
        found: usize,
        wanted: usize,
    },
    #[error("bucket {bucket} does not use file storage")]
    NotFileStorage { bucket: String },
    #[error("cannot open bucket {bucket}: {detail}")]
    Open { bucket: String, detail: String },
    #[error("key {0:?} is not a valid KV key")]
    InvalidKey(String),
    #[error("key already exists")]
    AlreadyExists,
    #[error("the key's revision changed")]
    RevisionChanged,
    #[error("the bucket did not answer (outcome of a write unknown): {0}")]
    Unavailable(String),
    #[error("watch lost: {0}")]
    Watch(#[from] ReaderError),
}

/// One key's current value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Bytes,
    pub revision: u64,
    /// When the stream stored it (server clock), Unix milliseconds.
    pub stored_ms: i64,
}

/// Every live key at one revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub entries: Vec<Entry>,
    /// The bucket revision the entries are consistent at; watch from
    /// `revision + 1` to follow on without a gap.
    pub revision: u64,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Entry),
    /// A delete (or purge) of `key` at `revision`.
    Delete {
        key: String,
        revision: u64,
        /// When the stream stored it (server clock), Unix milliseconds.
        stored_ms: i64,
    },
}

impl Change {
    pub fn revision(&self) -> u64 {
        match self {
            Change::Put(e) => e.revision,
            Change::Delete { revision, .. } => *revision,
        }
    }
}

/// Settings a bucket is created with (or checked against).
#[derive(Debug, Clone)]
pub struct BucketSpec {
    pub name: String,
    pub replicas: usize,
    /// 0: entries never expire.
    pub max_age: Duration,
    /// Idle heartbeat of snapshot and watch readers.
    pub heartbeat: Duration,
}

#[derive(Clone)]
pub struct Kv {
    nats: Nats,
    stream: String,
    /// `$KV.<bucket>.`: subject of a key without the key.
    key_prefix: String,
    heartbeat: Duration,
    rng: SystemRandom,
}

impl Kv {
    /// Opens the bucket, creating it (history 1, file storage) if it does
    /// not exist. An existing bucket with fewer replicas than asked, or in
    /// memory, is an error: it would not keep the promises made on top of
    /// it. Transient failures (leader elections) are retried until
    /// `deadline`.
    pub async fn open(nats: &Nats, spec: &BucketSpec, deadline: Instant) -> Result<Kv, KvError> {
        let stream = format!("KV_{}", spec.name);
        let open_err = |detail: String| KvError::Open {
            bucket: spec.name.clone(),
            detail,
        };
        let existing = retry_until(
            deadline,
            || async {
                match nats.js.get_stream(&stream).await {
                    Ok(s) => Ok(Some(s.cached_info().config.clone())),
                    Err(e) if super::stream_not_found(&e) => Ok(None),
                    Err(e) => Err(e.to_string()),
                }
            },
            |_| true,
        )
        .await
        .map_err(open_err)?;
        let config = match existing {
            Some(c) => c,
            None => {
                retry_until(
                    deadline,
                    || async {
                        nats.js
                            .create_key_value(kv::Config {
                                bucket: spec.name.clone(),
                                history: 1,
                                max_age: spec.max_age,
                                storage: StorageType::File,
                                num_replicas: spec.replicas,
                                ..Default::default()
                            })
                            .await
                    },
                    |_| true,
                )
                .await
                .map_err(|e| open_err(e.to_string()))?;
                // A bucket another broker created at the same moment with
                // other settings is caught by the checks below.
                nats.js
                    .get_stream(&stream)
                    .await
                    .map_err(|e| open_err(e.to_string()))?
                    .cached_info()
                    .config
                    .clone()
            }
        };
        if config.num_replicas < spec.replicas {
            return Err(KvError::TooFewReplicas {
                bucket: spec.name.clone(),
                found: config.num_replicas,
                wanted: spec.replicas,
            });
        }
        if config.storage != StorageType::File {
            return Err(KvError::NotFileStorage {
                bucket: spec.name.clone(),
            });
        }
        Ok(Kv {
            nats: nats.clone(),
            key_prefix: format!("$KV.{}.", spec.name),
            stream,
            heartbeat: spec.heartbeat,
            rng: SystemRandom::new(),
        })
    }

    /// The bucket's newest revision, from its leader: a watch that has
    /// applied it has seen every write acknowledged before this call.
    pub async fn revision(&self) -> Result<u64, KvError> {
        Ok(self
            .nats
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| KvError::Unavailable(e.to_string()))?
            .cached_info()
            .state
            .last_sequence)
    }

    /// Every live key and the revision they are consistent at.
    pub async fn snapshot(&self) -> Result<Snapshot, KvError> {
        let unavailable = |e: String| KvError::Unavailable(e);
        // The stream's last sequence before the reader exists: if the
        // reader finds nothing, the bucket was empty at that revision.
        let floor = self
            .nats
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .cached_info()
            .state
            .last_sequence;
        let mut reader = Reader::open(
            &self.nats,
            &self.stream,
            vec![format!("{}>", self.key_prefix)],
            Start::LastPerSubject,
            self.heartbeat,
        )
        .await?;
        let mut snapshot = Snapshot {
            entries: Vec::new(),
            revision: floor,
        };
        if reader.initial_pending() == 0 {
            return Ok(snapshot);
        }
        let mut live = std::collections::HashMap::new();
        loop {
            let record = reader.next().await?;
            snapshot.revision = snapshot.revision.max(record.seq);
            let Some(key) = record.subject.strip_prefix(self.key_prefix.as_str()) else {
                continue;
            };
            if is_delete(record.headers.as_ref()) {
                live.remove(key);
            } else {
                live.insert(
                    key.to_string(),
                    Entry {
                        key: key.to_string(),
                        value: record.payload,
                        revision: record.seq,
                        stored_ms: record.stored_ms,
                    },
                );
            }
            if record.pending == 0 {
                break;
            }
        }
        snapshot.entries = live.into_values().collect();
        snapshot.entries.sort_by_key(|e| e.revision);
        Ok(snapshot)
    }

    /// Every change from `revision` on, in order. The watch ends with an
    /// error when its view is lost (see `reader.rs`); re-watch from the
    /// last applied revision + 1.
    pub async fn watch_from(&self, revision: u64) -> Result<Watch, KvError> {
        let reader = Reader::open(
            &self.nats,
            &self.stream,
            vec![format!("{}>", self.key_prefix)],
            Start::At(revision.max(1)),
            self.heartbeat,
        )
        .await?;
        Ok(Watch {
            pending: reader.initial_pending(),
            reader,
            key_prefix: self.key_prefix.clone(),
        })
    }

    /// The current entry of `key`, if it exists. Read from the bucket's
    /// leader, so it reflects every write acknowledged before the call
    /// (the direct-get API may answer from a lagging replica).
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, KvError> {
        if !valid_key(key) {
            return Err(KvError::InvalidKey(key.to_string()));
        }
        let unavailable = |e: String| KvError::Unavailable(e);
        let stream = self
            .nats
            .js
            .get_stream_no_info(&self.stream)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        match stream
            .get_last_raw_message_by_subject(&format!("{}{key}", self.key_prefix))
            .await
        {
            Ok(m) if is_delete(Some(&m.headers)) => Ok(None),
            Ok(m) => Ok(Some(Entry {
                key: key.to_string(),
                value: m.payload,
                revision: m.sequence,
                stored_ms: (m.time.unix_timestamp_nanos() / 1_000_000) as i64,
            })),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e.to_string())),
        }
    }

    /// Stores `value` under a key that has never existed; its revision.
    pub async fn create(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        self.write(key, value, Some(0), false)
            .await
            .map_err(|e| match e {
                KvError::RevisionChanged => KvError::AlreadyExists,
                e => e,
            })
    }

    /// Replaces `key`'s value if its revision is still `expected`.
    pub async fn update(&self, key: &str, value: Bytes, expected: u64) -> Result<u64, KvError> {
        self.write(key, value, Some(expected), false).await
    }

    /// Deletes `key` if its revision is still `expected`; the delete's
    /// revision.
    pub async fn delete(&self, key: &str, expected: u64) -> Result<u64, KvError> {
        self.write(key, Bytes::new(), Some(expected), true).await
    }

    /// Deletes `key` whatever its revision (a broker leaving the registry).
    pub async fn remove(&self, key: &str) -> Result<u64, KvError> {
        self.write(key, Bytes::new(), None, true).await
    }

    /// Stores `value` whatever the key's revision (registry heartbeats).
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64, KvError> {
        self.write(key, value, None, false).await
    }

    async fn write(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<u64>,
        delete: bool,
    ) -> Result<u64, KvError> {
        if !valid_key(key) {
            return Err(KvError::InvalidKey(key.to_string()));
        }
        let subject = format!("{}{key}", self.key_prefix);
        let id = self.write_id()?;
        let deadline = Instant::now() + WRITE_BOUND;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            let mut message = PublishMessage::build()
                .payload(value.clone())
                .message_id(&id);
            if let Some(rev) = expected {
                message = message.expected_last_subject_sequence(rev);
            }
            if delete {
                message = message.header(KV_OPERATION, "DEL");
            }
            let ack = match self.nats.js.send_publish(subject.clone(), message).await {
                Ok(future) => future.await,
                Err(e) => Err(e),
            };
            match ack {
                // A duplicate is our own earlier attempt: same id.
                Ok(ack) => return Ok(ack.sequence),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(KvError::RevisionChanged)
                }
                Err(e) => {
                    last_error = e.to_string();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(KvError::Unavailable(last_error))
    }

    fn write_id(&self) -> Result<String, KvError> {
        let mut raw = [0u8; 12];
        self.rng
            .fill(&mut raw)
            .map_err(|_| KvError::Unavailable("system random failed".into()))?;
        let mut id = String::with_capacity(27);
        id.push_str("kv-");
        for b in raw {
            id.push_str(&format!("{b:02x}"));
        }
        Ok(id)
    }
}

/// A live view of a bucket's changes; see [`Kv::watch_from`].
pub struct Watch {
    reader: Reader,
    key_prefix: String,
    /// Changes still to come after the last one returned, as the server
    /// counted when it sent it.
    pending: u64,
}

impl Watch {
    /// Changes that were waiting when the watch was opened: once that many
    /// (or a change with nothing [`pending`](Watch::pending) after it) have
    /// been read, the watch has caught up with the bucket as it was then.
    pub fn initial_pending(&self) -> u64 {
        self.reader.initial_pending()
    }

    /// When the bucket's server was last heard from (see
    /// [`Reader::last_heard`]).
    pub fn last_heard(&self) -> Instant {
        self.reader.last_heard()
    }

    /// Changes still to come after the last one [`next`](Watch::next)
    /// returned (0 when it was the newest).
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// The next change. An error means the view is lost and this watch is
    /// finished.
    pub async fn next(&mut self) -> Result<Change, KvError> {
        loop {
            let record = self.reader.next().await?;
            let Some(key) = record.subject.strip_prefix(self.key_prefix.as_str()) else {
                continue;
            };
            self.pending = record.pending;
            return Ok(if is_delete(record.headers.as_ref()) {
                Change::Delete {
                    key: key.to_string(),
                    revision: record.seq,
                    stored_ms: record.stored_ms,
                }
            } else {
                Change::Put(Entry {
                    key: key.to_string(),
                    value: record.payload,
                    revision: record.seq,
                    stored_ms: record.stored_ms,
                })
            });
        }
    }
}

fn is_delete(headers: Option<&async_nats::HeaderMap>) -> bool {
    headers
        .and_then(|h| h.get(KV_OPERATION))
        .is_some_and(|v| v.as_str() == "DEL" || v.as_str() == "PURGE")
}

/// Keys are token ids (hex) and node ids: one subject token of
/// `A-Z a-z 0-9 _ - =`, at most 256 bytes.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 256
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'=')
}
