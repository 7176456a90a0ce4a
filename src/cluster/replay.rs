//! Ordered reads of one application's states for downstream readers (the
//! live streams of cluster mode read the ingest stream through this): from
//! the start, from a stream sequence, or from now on.
//!
//! A replay ends with an error when its view is lost (see `reader.rs`);
//! reopen it at [`Replay::position`] to go on without a gap or a repeat.

use std::time::Duration;

use super::connect::Nats;
use super::names::Names;
use super::reader::{Reader, ReaderError, Record, Start};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read the stream: {0}")]
    Stream(String),
    #[error("replay lost: {0}")]
    Lost(#[from] ReaderError),
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// The oldest state still in the stream.
    Start,
    /// Stream sequence `n` (or the first state after it).
    Seq(u64),
    /// States stored after the replay opens (pinned to the stream's next
    /// sequence at that moment).
    Now,
}

pub struct Replay {
    reader: Reader,
    next_seq: Option<u64>,
    from: From,
}

impl Replay {
    /// Opens a replay of application `app`'s states.
    pub async fn open(
        nats: &Nats,
        names: &Names,
        app: &str,
        from: From,
        heartbeat: Duration,
    ) -> Result<Replay, ReplayError> {
        let stream = names.state_stream();
        // "Now" is pinned to a sequence, so a reopened replay resumes
        // exactly where this one started even if nothing arrived.
        let from = match from {
            From::Now => {
                let last = nats
                    .js
                    .get_stream(&stream)
                    .await
                    .map_err(|e| ReplayError::Stream(e.to_string()))?
                    .cached_info()
                    .state
                    .last_sequence;
                From::Seq(last.saturating_add(1))
            }
            other => other,
        };
        let start = match from {
            From::Start | From::Now => Start::First,
            From::Seq(n) => Start::At(n),
        };
        let reader =
            Reader::open(nats, &stream, vec![names.app_filter(app)], start, heartbeat).await?;
        Ok(Replay {
            reader,
            next_seq: None,
            from,
        })
    }

    /// The next state, in stream order.
    pub async fn next(&mut self) -> Result<Record, ReplayError> {
        let r = self.reader.next().await?;
        self.next_seq = Some(r.seq.saturating_add(1));
        Ok(r)
    }

    /// Where to reopen to continue after the last state returned.
    pub fn position(&self) -> From {
        match self.next_seq {
            Some(n) => From::Seq(n),
            None => self.from,
        }
    }
}
