//! What a read on this broker can see: read-your-writes across brokers.
//!
//! Standalone, a state is in the local store before it is acknowledged, so
//! a read after the acknowledgement always sees it. In cluster mode the
//! acknowledgement carries the state's stream sequence (`"seq"`) and a
//! read with `?minSeq=S` waits, at most `cluster.min_seq_timeout`, until
//! this broker's materializer has applied S. An ingest-only broker
//! (`cluster.materialize = false`) has no read model at all.

use std::time::Duration;

use tokio::sync::watch;

/// The read model behind this broker's history and composite-state reads.
#[derive(Clone)]
pub enum ReadModel {
    /// Standalone: every acknowledged state is already in the store.
    Local,
    /// Cluster mode: the materializer's last applied stream sequence, and
    /// how long a read may wait for a `minSeq`.
    Materialized {
        applied: watch::Receiver<u64>,
        wait: Duration,
    },
    /// Cluster mode, `cluster.materialize = false`.
    Absent,
}

/// Why a read cannot be answered now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// This broker keeps no read model.
    Absent,
    /// `wanted` was not applied within `waited`; `applied` was reached.
    Behind {
        applied: u64,
        wanted: u64,
        waited: Duration,
    },
}

impl ReadModel {
    /// Returns once the read model holds stream sequence `min_seq` (at
    /// once without one, or standalone), or says why it cannot.
    pub async fn ready(&self, min_seq: Option<u64>) -> Result<(), NotReady> {
        match self {
            ReadModel::Local => Ok(()),
            ReadModel::Absent => Err(NotReady::Absent),
            ReadModel::Materialized { applied, wait } => {
                let Some(wanted) = min_seq else {
                    return Ok(());
                };
                let mut rx = applied.clone();
                let reached = tokio::time::timeout(*wait, rx.wait_for(|a| *a >= wanted)).await;
                match reached {
                    Ok(Ok(_)) => Ok(()),
                    // Timed out, or the materializer stopped (shutdown).
                    _ => Err(NotReady::Behind {
                        applied: *applied.borrow(),
                        wanted,
                        waited: *wait,
                    }),
                }
            }
        }
    }

    /// The last applied stream sequence (cluster mode with a read model).
    pub fn applied(&self) -> Option<u64> {
        match self {
            ReadModel::Materialized { applied, .. } => Some(*applied.borrow()),
            ReadModel::Local | ReadModel::Absent => None,
        }
    }
}

/// `minSeq` from a query string value: a stream sequence.
pub fn parse_min_seq(v: &str) -> Result<u64, String> {
    v.parse::<u64>().map_err(|_| {
        "`minSeq` must be a stream sequence (a non-negative integer) as returned in `seq`"
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_the_sequence_or_says_how_far_it_got() {
        let (tx, rx) = watch::channel(10);
        let m = ReadModel::Materialized {
            applied: rx,
            wait: Duration::from_millis(300),
        };
        assert_eq!(m.ready(None).await, Ok(()));
        assert_eq!(m.ready(Some(10)).await, Ok(()));
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send_replace(15);
            tx
        });
        assert_eq!(m.ready(Some(12)).await, Ok(()));
        let _tx = later.await.unwrap();
        assert_eq!(
            m.ready(Some(99)).await,
            Err(NotReady::Behind {
                applied: 15,
                wanted: 99,
                waited: Duration::from_millis(300)
            })
        );
        assert_eq!(ReadModel::Local.ready(Some(99)).await, Ok(()));
        assert_eq!(ReadModel::Absent.ready(None).await, Err(NotReady::Absent));
        assert_eq!(m.applied(), Some(15));
        assert!(parse_min_seq("12").is_ok());
        assert!(parse_min_seq("-1").is_err());
    }
}
