//! The per-publish path of an MQTT session without sockets, up to the
//! writer's queue: decode one PUBLISH from the read buffer → check topic and
//! grant → validate the payload → enqueue for the writer. The commit and
//! the PUBACK are not measured here. Run with
//! `cargo bench --bench mqtt_publish`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::auth::{Devices, Registry, Scope, Scopes, Status, TokenRecord};
use sluice::config::SyncMode;
use sluice::metrics::Metrics;
use sluice::mqtt::{check_publish, Codec, Incoming};
use sluice::secret::TokenHash;
use sluice::store::Store;
use sluice::writer::{BatchPolicy, Completion, WriteRequest, Writer, WriterConfig};

const SECRET: &str = "sl_benchbenchbenchbenchbenchbenchbenchbench0";
const BATCH: usize = 10_000;

/// A ~150-byte state message, like the loadtest's default payload.
fn payload(i: usize) -> String {
    let head = format!(
        r#"{{"data":{{"temp":21.5,"humidity":40.2,"pressure":1013.25,"status":"ok","seq":{i},"pad":""#
    );
    let tail = r#""},"time":1700000000000}"#;
    let pad = 150usize.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad))
}

/// CONNECT followed by `n` QoS 1 PUBLISH packets, as a client would send.
fn wire(n: usize) -> (BytesMut, BytesMut) {
    let mut connect = BytesMut::new();
    let mut c = rumqttc::mqttbytes::v4::Connect::new("bench");
    c.set_login("u", SECRET);
    c.write(&mut connect).unwrap();
    let mut publishes = BytesMut::new();
    for i in 0..n {
        let mut p = rumqttc::mqttbytes::v4::Publish::new(
            format!("applications/app/devices/dev{}/state", i % 100),
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            payload(i).into_bytes(),
        );
        p.pkid = (i % 65_000 + 1) as u16;
        p.write(&mut publishes).unwrap();
    }
    (connect, publishes)
}

fn bench(c: &mut Criterion) {
    let registry = Registry::new();
    registry
        .insert(TokenRecord {
            id: "t".into(),
            app: "app".into(),
            name: "bench".into(),
            scopes: Scopes::of(&[Scope::SendState]),
            devices: Devices::All,
            expires_at: None,
            status: Status::Active,
            deactivated_by: None,
            parent_id: None,
            created_at: 0,
            last_used: None,
            rate_limit: None,
            hash: TokenHash::of(SECRET.as_bytes()),
        })
        .unwrap();
    let grant = registry.authenticate(SECRET.as_bytes(), 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), SyncMode::None).unwrap();
    let mut config = WriterConfig::new(&sluice::Config::default());
    config.policy = BatchPolicy {
        max_messages: 8192,
        max_bytes: 8 << 20,
    };
    config.queue_capacity = 4 * BATCH;
    config.queue_max_bytes = 1 << 30;
    let writer = Writer::start(
        store,
        config,
        Arc::new(Metrics::new()),
        Arc::default(),
        Arc::new(sluice::streams::Hub::new(1 << 20, Default::default())),
    )
    .unwrap();
    let queue = writer.queue();
    let (connect, publishes) = wire(BATCH);

    let mut g = c.benchmark_group("mqtt_publish_path");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.measurement_time(Duration::from_secs(8));

    // Decode only: what the codec costs per packet.
    g.bench_function("decode", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut conn = connect.clone();
                let mut codec = Codec::detect(&mut conn, 1 << 20).unwrap().unwrap();
                codec.decode_connect(&mut conn).unwrap().unwrap();
                let mut buf = publishes.clone();
                let started = Instant::now();
                let mut n = 0;
                while let Some(Incoming::Publish(p)) = codec.decode(&mut buf).unwrap() {
                    std::hint::black_box(&p);
                    n += 1;
                }
                total += started.elapsed();
                assert_eq!(n, BATCH);
            }
            total
        })
    });

    // Decode → check → validate, without the queue.
    g.bench_function("decode_check_validate", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut conn = connect.clone();
                let mut codec = Codec::detect(&mut conn, 1 << 20).unwrap().unwrap();
                codec.decode_connect(&mut conn).unwrap().unwrap();
                let mut buf = publishes.clone();
                let started = Instant::now();
                while let Some(Incoming::Publish(p)) = codec.decode(&mut buf).unwrap() {
                    let checked = check_publish(&grant, &p.topic, &p.payload, 1).unwrap();
                    std::hint::black_box(checked);
                }
                total += started.elapsed();
            }
            total
        })
    });

    // Up to the queue: decode → check → validate → enqueue. The commit and
    // the PUBACK are not in it (the writer bench measures commits; the
    // loadtest measures the whole path, ack included).
    g.bench_function("decode_check_validate_enqueue_no_commit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut conn = connect.clone();
                let mut codec = Codec::detect(&mut conn, 1 << 20).unwrap().unwrap();
                codec.decode_connect(&mut conn).unwrap().unwrap();
                let mut buf = publishes.clone();
                let started = Instant::now();
                while let Some(Incoming::Publish(p)) = codec.decode(&mut buf).unwrap() {
                    let (device, parsed) = check_publish(&grant, &p.topic, &p.payload, 1).unwrap();
                    let req = WriteRequest {
                        grant: grant.clone(),
                        device,
                        body: p.payload,
                        parsed,
                        done: Completion::None,
                        received: Instant::now(),
                    };
                    assert!(queue.try_enqueue(req).is_ok());
                }
                total += started.elapsed();
                // Let the writer drain outside the measured time.
                while queue.depth() > 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            total
        })
    });
    g.finish();
    drop(queue);
    writer.stop().unwrap();
}

criterion_group!(benches, bench);
criterion_main!(benches);
