//! The node registry and the revocation barrier on a real 3-node NATS
//! cluster: every live broker must confirm, laggards are named, a silent
//! broker drops out after its TTL, and the barrier fails while the
//! registry cannot be seen.

use std::time::Duration;

use bytes::Bytes;
use sluice::cluster::kv::{BucketSpec, Change, Kv};
use sluice::cluster::registry::{BarrierError, Registry, RegistrySpec};
use sluice::cluster::Names;
use tokio::time::Instant;

use crate::nats::{cluster_config, connect, NatsCluster};

async fn registry(urls: Vec<String>, prefix: &str, node: &str) -> Registry {
    let config = cluster_config(urls.clone(), prefix);
    let nats = connect(urls, prefix, node).await;
    Registry::start(
        &nats,
        RegistrySpec {
            names: Names::new(prefix),
            node_id: node.to_string(),
            replicas: 3,
            heartbeat: config.heartbeat,
            node_ttl: config.node_ttl(),
        },
        0,
        Instant::now() + Duration::from_secs(30),
    )
    .await
    .expect("registry starts")
}

fn laggards(r: Result<(), BarrierError>) -> Vec<String> {
    match r {
        Err(BarrierError::NotConfirmed(n)) => n,
        other => panic!("expected laggards, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_waits_for_live_brokers_and_drops_silent_ones() {
    let cluster = NatsCluster::start(3);
    let a = registry(vec![cluster.url(0)], "bar", "a").await;
    let b = registry(vec![cluster.url(1)], "bar", "b").await;
    let c = registry(vec![cluster.url(2)], "bar", "c").await;
    // Every broker knows every other from the bucket (c started last; a
    // learns of it through the watch).
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.nodes().len() < 3 {
        assert!(Instant::now() < deadline, "a never saw all nodes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    a.applied(5).await;
    assert_eq!(
        laggards(a.wait_applied(5, Duration::from_millis(300)).await),
        ["b", "c"]
    );
    b.applied(5).await;
    assert_eq!(
        laggards(a.wait_applied(5, Duration::from_millis(300)).await),
        ["c"]
    );
    // The barrier completes when the last broker reports, not after a
    // heartbeat or the timeout.
    let waiting = tokio::spawn(async move {
        let r = a.wait_applied(5, Duration::from_secs(10)).await;
        (a, r)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.applied(5).await;
    let (a, r) = waiting.await.unwrap();
    assert_eq!(r, Ok(()));
    let nodes = a.nodes();
    assert_eq!(nodes.len(), 3);
    assert!(
        nodes.iter().all(|n| n.applied == 5 && !n.stale),
        "{nodes:?}"
    );

    // c goes silent (its process dies: no heartbeat, no goodbye).
    drop(c);
    a.applied(6).await;
    b.applied(6).await;
    assert_eq!(
        laggards(a.wait_applied(6, Duration::from_millis(200)).await),
        ["c"]
    );
    // After its TTL it no longer counts: the barrier completes without it.
    assert_eq!(a.wait_applied(6, Duration::from_secs(10)).await, Ok(()));
    let c_info = a.nodes().into_iter().find(|n| n.node_id == "c").unwrap();
    assert!(c_info.stale);

    // A broker that leaves cleanly disappears at once.
    b.leave().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.nodes().iter().any(|n| n.node_id == "b") {
        assert!(Instant::now() < deadline, "b still listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_fails_while_nats_is_down_and_recovers() {
    let mut cluster = NatsCluster::start(3);
    let a = registry(cluster.urls(), "down", "a").await;
    let b = registry(cluster.urls(), "down", "b").await;
    a.applied(1).await;
    b.applied(1).await;
    assert_eq!(a.wait_applied(1, Duration::from_secs(5)).await, Ok(()));

    cluster.stop_all();
    // Its view lost, the registry lets no barrier through.
    a.applied(2).await;
    assert_eq!(
        a.wait_applied(2, Duration::from_secs(3)).await,
        Err(BarrierError::ViewLost)
    );

    cluster.start_all();
    b.applied(2).await;
    // Both brokers come back by themselves; b's report reaches a through
    // its heartbeat at the latest.
    assert_eq!(a.wait_applied(2, Duration::from_secs(60)).await, Ok(()));
}

/// The whole revocation path, as the token service will use it: a write on
/// one broker, every broker's watch applies it and reports, the writer's
/// barrier completes. Prints the latency over 200 writes (a figure, not an
/// assertion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barrier_latency_over_200_revocations() {
    let cluster = NatsCluster::start(3);
    let prefix = "lat";
    let names = Names::new(prefix);
    let spec = BucketSpec {
        name: names.tokens_bucket(),
        replicas: 3,
        max_age: Duration::ZERO,
        heartbeat: Duration::from_millis(250),
    };
    let mut brokers = Vec::new();
    for (i, node) in ["a", "b", "c"].into_iter().enumerate() {
        let nats = connect(vec![cluster.url(i)], prefix, node).await;
        let kv = Kv::open(&nats, &spec, Instant::now() + Duration::from_secs(30))
            .await
            .unwrap();
        let reg = std::sync::Arc::new(registry(vec![cluster.url(i)], prefix, node).await);
        let watcher = {
            let (kv, reg) = (kv.clone(), reg.clone());
            tokio::spawn(async move {
                let mut applied = kv.snapshot().await.unwrap().revision;
                reg.applied(applied).await;
                // The token service's loop: apply, report; on a lost view
                // re-watch from the last applied revision + 1.
                loop {
                    let Ok(mut watch) = kv.watch_from(applied + 1).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    while let Ok(change) = watch.next().await {
                        let change: Change = change;
                        applied = change.revision();
                        reg.applied(applied).await;
                    }
                    eprintln!("re-watching from {}", applied + 1);
                }
            })
        };
        brokers.push((kv, reg, watcher));
    }
    let (kv, reg, _) = &brokers[0];
    let deadline = Instant::now() + Duration::from_secs(10);
    while reg.nodes().len() < 3 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut samples = Vec::new();
    for i in 0..200 {
        let t0 = Instant::now();
        let rev = kv
            .put(
                &format!("tok{}", i % 10),
                Bytes::from(format!("inactive {i}")),
            )
            .await
            .unwrap();
        reg.wait_applied(rev, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("revocation {i} (revision {rev}): {e}"));
        samples.push(t0.elapsed());
    }
    samples.sort();
    let q = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    eprintln!(
        "revocation barrier (KV write + 3 brokers apply + confirm), 200 writes: p50 {:?} p90 {:?} p99 {:?} max {:?}",
        q(0.5),
        q(0.9),
        q(0.99),
        samples[samples.len() - 1]
    );
    for (_, _, w) in brokers {
        w.abort();
    }
}
