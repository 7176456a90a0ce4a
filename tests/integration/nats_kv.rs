//! The token KV on a real 3-node NATS cluster: compare-and-set races,
//! exact retries, snapshot + watch with no gap across a leader kill.

use std::time::Duration;

use bytes::Bytes;
use sluice::cluster::kv::{BucketSpec, Change, Kv, KvError};
use tokio::time::Instant;

use crate::nats::{connect, leader_of, NatsCluster};

fn spec(prefix: &str) -> BucketSpec {
    BucketSpec {
        name: format!("{prefix}_tokens"),
        replicas: 3,
        max_age: Duration::ZERO,
        heartbeat: Duration::from_millis(250),
    }
}

async fn open(nats: &sluice::cluster::Nats, prefix: &str) -> Kv {
    Kv::open(
        nats,
        &spec(prefix),
        Instant::now() + Duration::from_secs(30),
    )
    .await
    .expect("open bucket")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_compare_and_set_races_leave_one_winner() {
    let cluster = NatsCluster::start(3);
    // Two brokers, each reaching the cluster through a different node.
    let a = open(&connect(vec![cluster.url(0)], "cas", "a").await, "cas").await;
    let b = open(&connect(vec![cluster.url(1)], "cas", "b").await, "cas").await;

    // Two creates of one key: exactly one wins.
    let (ra, rb) = tokio::join!(
        a.create("tok1", Bytes::from_static(b"from-a")),
        b.create("tok1", Bytes::from_static(b"from-b"))
    );
    let winner = match (&ra, &rb) {
        (Ok(_), Err(KvError::AlreadyExists)) => "from-a",
        (Err(KvError::AlreadyExists), Ok(_)) => "from-b",
        other => panic!("not one winner: {other:?}"),
    };
    let entry = a.get("tok1").await.unwrap().unwrap();
    assert_eq!(entry.value, winner.as_bytes());

    // Rounds of racing updates against the same read revision.
    let mut rev = entry.revision;
    for round in 0..20 {
        let (ra, rb) = tokio::join!(
            a.update("tok1", Bytes::from(format!("a{round}")), rev),
            b.update("tok1", Bytes::from(format!("b{round}")), rev)
        );
        let (won, value) = match (ra, rb) {
            (Ok(r), Err(KvError::RevisionChanged)) => (r, format!("a{round}")),
            (Err(KvError::RevisionChanged), Ok(r)) => (r, format!("b{round}")),
            other => panic!("round {round}: not one winner: {other:?}"),
        };
        let now = b.get("tok1").await.unwrap().unwrap();
        assert_eq!((now.revision, now.value), (won, Bytes::from(value)));
        rev = won;
    }

    // A delete against a stale revision fails; against the current one it
    // succeeds, and the key reads as absent.
    assert!(matches!(
        a.delete("tok1", rev - 1).await,
        Err(KvError::RevisionChanged)
    ));
    let deleted = b.delete("tok1", rev).await.unwrap();
    assert!(deleted > rev);
    assert_eq!(a.get("tok1").await.unwrap(), None);
    // An update racing the delete with the old revision loses.
    assert!(matches!(
        a.update("tok1", Bytes::from_static(b"late"), rev).await,
        Err(KvError::RevisionChanged)
    ));
}

/// What `Kv` relies on to resend a write whose ack was lost: a resend with
/// the same `Nats-Msg-Id` and expected revision is answered "duplicate"
/// with the first attempt's revision, not refused as a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_resent_write_is_recognised_not_conflicting() {
    use async_nats::jetstream::message::PublishMessage;
    let cluster = NatsCluster::start(3);
    let nats = connect(cluster.urls(), "resend", "a").await;
    let kv = open(&nats, "resend").await;
    let first = kv.create("k", Bytes::from_static(b"v1")).await.unwrap();
    let send = || async {
        nats.js
            .send_publish(
                "$KV.resend_tokens.k",
                PublishMessage::build()
                    .payload(Bytes::from_static(b"v2"))
                    .message_id("write-1")
                    .expected_last_subject_sequence(first),
            )
            .await
            .unwrap()
            .await
    };
    let one = send().await.unwrap();
    let again = send().await.unwrap();
    assert!(!one.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.sequence, one.sequence);
    assert_eq!(kv.get("k").await.unwrap().unwrap().revision, one.sequence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_watch_resumes_after_leader_kill_with_no_gap() {
    let mut cluster = NatsCluster::start(3);
    let writer_nats = connect(cluster.urls(), "watch", "w").await;
    let writer = open(&writer_nats, "watch").await;
    let reader = open(&connect(cluster.urls(), "watch", "r").await, "watch").await;

    // Some state before the reader starts: it arrives in the snapshot.
    for i in 0..20 {
        writer
            .create(&format!("k{i}"), Bytes::from(format!("v{i}")))
            .await
            .unwrap();
    }
    writer.delete("k3", 4).await.unwrap();
    let snapshot = reader.snapshot().await.unwrap();
    assert_eq!(snapshot.revision, 21);
    assert_eq!(snapshot.entries.len(), 19);
    assert!(snapshot.entries.iter().all(|e| e.key != "k3"));

    // A writer keeps writing while the bucket's leader is killed.
    let total = 300u64;
    let writing = tokio::spawn(async move {
        let mut revisions = Vec::new();
        for i in 20..20 + total {
            let key = format!("k{i}");
            let deadline = Instant::now() + Duration::from_secs(60);
            // A write that outlasts its own resend bound (a slow election
            // on a loaded machine) has an unknown outcome: read to learn it.
            let r = loop {
                assert!(Instant::now() < deadline, "{key} never written");
                match writer.create(&key, Bytes::from(format!("v{i}"))).await {
                    Ok(r) => break r,
                    Err(KvError::Unavailable(_)) => {
                        if let Ok(Some(e)) = writer.get(&key).await {
                            break e.revision;
                        }
                    }
                    Err(e) => panic!("{key}: {e}"),
                }
            };
            revisions.push(r);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        revisions
    });

    let mut applied = snapshot.revision;
    let mut seen = Vec::new();
    let mut watch = reader.watch_from(applied + 1).await.unwrap();
    let mut rewatches = 0;
    let mut killed = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.len() < total as usize {
        assert!(Instant::now() < deadline, "watch stalled at {applied}");
        if !killed && seen.len() == 50 {
            let leader = leader_of(&writer_nats, "KV_watch_tokens").await;
            cluster.kill(cluster.index_of(&leader));
            killed = true;
        }
        match watch.next().await {
            Ok(Change::Put(e)) => {
                assert_eq!(e.revision, applied + 1, "gap or repeat");
                applied = e.revision;
                seen.push(e.revision);
            }
            Ok(Change::Delete { key, .. }) => panic!("unexpected delete of {key}"),
            Err(_) => {
                // The caller's side of the contract: re-watch from the
                // last applied revision + 1.
                rewatches += 1;
                loop {
                    match reader.watch_from(applied + 1).await {
                        Ok(w) => break watch = w,
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            }
        }
    }
    let written = writing.await.unwrap();
    assert_eq!(seen, written, "the watch saw exactly the writes, in order");
    assert!(killed);
    eprintln!("watch survived the leader kill with {rewatches} re-watch(es)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_url_is_enough_and_survives_that_node_dying() {
    let mut cluster = NatsCluster::start(3);
    // Only node 0 is named; the client learns the others from it.
    let nats = connect(vec![cluster.url(0)], "one", "a").await;
    let kv = open(&nats, "one").await;
    kv.create("before", Bytes::from_static(b"1")).await.unwrap();
    cluster.kill(0);
    // The next write goes through another node (the write itself resends
    // until the client has reconnected).
    let rev = kv.create("after", Bytes::from_static(b"2")).await.unwrap();
    assert_eq!(kv.get("after").await.unwrap().unwrap().revision, rev);
    assert_eq!(kv.get("before").await.unwrap().unwrap().value, "1");
}
