//! Readiness: whether this broker should be sent traffic now, as opposed
//! to liveness (`/healthz`: the process answers at all).
//!
//! `/readyz` on the device and admin listeners runs every check of a
//! [`Readiness`] and answers 200 when all pass, 503 with each failing
//! check's reason otherwise. A load balancer or a Kubernetes readiness
//! probe uses it to stop routing devices to a broker that cannot store
//! what it accepts; restarting such a broker (what a failed liveness probe
//! does) would not help a full disk, so `/healthz` does not include these.
//!
//! The checks are a list so that each mode adds its own: standalone adds
//! storage, writer and draining (`Readiness::standalone`); cluster mode
//! adds "NATS reachable" and "token view fresh" through
//! [`Readiness::add`].

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::{monotonic_ns, Registry};
use crate::store::Store;
use crate::writer::Health;

/// Why a check fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReady {
    /// Shown on every listener: says what is wrong without naming paths or
    /// other details of the machine.
    pub reason: &'static str,
    /// The error behind it, shown on the admin listener only.
    pub detail: Option<String>,
}

/// One condition for taking traffic.
pub trait ReadinessCheck: Send + Sync {
    /// A short stable name (`storage`, `writer`, `nats`, …).
    fn name(&self) -> &'static str;
    /// Whether the condition holds now. Runs on a blocking thread, so it
    /// may read storage or take a lock, but should answer within
    /// milliseconds: probes are frequent.
    fn check(&self) -> Result<(), NotReady>;
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub name: &'static str,
    pub result: Result<(), NotReady>,
}

/// Cluster mode: this broker's view of the cluster's tokens is fresh. A
/// stale view refuses every request (it cannot know what was revoked
/// meanwhile), so a load balancer should send devices elsewhere.
pub struct TokenView {
    pub registry: Arc<Registry>,
}

impl ReadinessCheck for TokenView {
    fn name(&self) -> &'static str {
        "tokens"
    }

    fn check(&self) -> Result<(), NotReady> {
        match self.registry.trusted(monotonic_ns()) {
            true => Ok(()),
            false => Err(NotReady {
                reason: crate::tokens::STALE,
                detail: None,
            }),
        }
    }
}

/// Every check the broker must pass to be ready.
#[derive(Default)]
pub struct Readiness {
    checks: Vec<Box<dyn ReadinessCheck>>,
}

impl Readiness {
    /// The checks of every broker: storage accepts writes, the writer
    /// thread runs, and the broker is not draining for shutdown.
    pub fn standalone(
        store: Store,
        health: Arc<Health>,
        writer_exited: watch::Receiver<bool>,
        stop: CancellationToken,
    ) -> Readiness {
        let mut r = Readiness::default();
        r.add(Storage { store, health });
        r.add(Writer {
            exited: writer_exited,
        });
        r.add(Serving { stop });
        r
    }

    /// Adds a check: the extension point for what a mode needs beyond the
    /// standalone checks (cluster mode: NATS reachable, token view fresh).
    pub fn add(&mut self, check: impl ReadinessCheck + 'static) {
        self.checks.push(Box::new(check));
    }

    /// Runs every check, in the order added. Blocking.
    pub fn evaluate(&self) -> Vec<Outcome> {
        self.checks
            .iter()
            .map(|c| Outcome {
                name: c.name(),
                result: c.check(),
            })
            .collect()
    }

    /// `/readyz`: status code and JSON body, with each failure's detail
    /// when `detailed` (the admin listener).
    pub async fn respond(self: &Arc<Self>, detailed: bool) -> (u16, String) {
        let me = self.clone();
        let outcomes = match tokio::task::spawn_blocking(move || me.evaluate()).await {
            Ok(o) => o,
            Err(_) => vec![Outcome {
                name: "readiness",
                result: Err(NotReady {
                    reason: "the readiness checks could not run",
                    detail: None,
                }),
            }],
        };
        let ready = outcomes.iter().all(|o| o.result.is_ok());
        let checks: Vec<serde_json::Value> = outcomes
            .into_iter()
            .map(|o| match o.result {
                Ok(()) => serde_json::json!({"name": o.name, "ok": true}),
                Err(e) => {
                    let mut v =
                        serde_json::json!({"name": o.name, "ok": false, "reason": e.reason});
                    if let (true, Some(d)) = (detailed, e.detail) {
                        v["detail"] = d.into();
                    }
                    v
                }
            })
            .collect();
        let body = serde_json::json!({
            "status": if ready { "ready" } else { "unready" },
            "checks": checks,
        });
        (if ready { 200 } else { 503 }, body.to_string())
    }
}

/// Commits and WAL syncs succeed (as the writer last saw them) and RocksDB
/// has not stopped writes.
struct Storage {
    store: Store,
    health: Arc<Health>,
}

impl ReadinessCheck for Storage {
    fn name(&self) -> &'static str {
        "storage"
    }

    fn check(&self) -> Result<(), NotReady> {
        if let Some(f) = self.health.failure() {
            return Err(NotReady {
                reason: f.reason(),
                detail: self.health.detail(f),
            });
        }
        match self.store.writes_stopped() {
            Ok(false) => Ok(()),
            Ok(true) => Err(NotReady {
                reason: "storage has stopped accepting writes (compaction is behind or failed)",
                detail: None,
            }),
            Err(e) => Err(NotReady {
                reason: "storage state cannot be read",
                detail: Some(e.to_string()),
            }),
        }
    }
}

/// The writer thread runs (if it died the process is about to exit).
struct Writer {
    exited: watch::Receiver<bool>,
}

impl ReadinessCheck for Writer {
    fn name(&self) -> &'static str {
        "writer"
    }

    fn check(&self) -> Result<(), NotReady> {
        match *self.exited.borrow() {
            false => Ok(()),
            true => Err(NotReady {
                reason: "the writer thread has stopped",
                detail: None,
            }),
        }
    }
}

/// Not shutting down: once draining starts, a balancer should stop sending
/// new work even to connections that are still open.
struct Serving {
    stop: CancellationToken,
}

impl ReadinessCheck for Serving {
    fn name(&self) -> &'static str {
        "serving"
    }

    fn check(&self) -> Result<(), NotReady> {
        match self.stop.is_cancelled() {
            false => Ok(()),
            true => Err(NotReady {
                reason: "shutting down",
                detail: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::Failure;

    #[tokio::test]
    async fn every_check_counts_and_details_stay_on_the_admin_side() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), crate::config::SyncMode::None).unwrap();
        let health = Arc::new(Health::default());
        let (exit_tx, exited) = watch::channel(false);
        let stop = CancellationToken::new();
        let r = Arc::new(Readiness::standalone(
            store,
            health.clone(),
            exited,
            stop.clone(),
        ));
        let (status, body) = r.respond(true).await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let names: Vec<&str> = v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["storage", "writer", "serving"]);

        health.fail(Failure::WalSync, &"EIO on /secret/path");
        let (status, body) = r.respond(false).await;
        assert_eq!(status, 503);
        assert!(body.contains(Failure::WalSync.reason()), "{body}");
        assert!(!body.contains("/secret/path"), "{body}");
        let (_, body) = r.respond(true).await;
        assert!(body.contains("/secret/path"), "{body}");
        health.recover(Failure::WalSync);

        exit_tx.send_replace(true);
        let (status, body) = r.respond(false).await;
        assert_eq!(status, 503);
        assert!(body.contains("writer thread"), "{body}");
        exit_tx.send_replace(false);

        stop.cancel();
        let (status, body) = r.respond(false).await;
        assert_eq!(status, 503);
        assert!(body.contains("shutting down"), "{body}");
    }
}
