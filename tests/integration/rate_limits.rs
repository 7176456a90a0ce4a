//! Per-token rate limits on HTTP (429 + Retry-After) and MQTT (0x96).

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5 as p5;
use serde_json::json;

use crate::common::*;

const OK: &str = r#"{"data":{"x":1}}"#;

#[test]
fn http_rate_limit_refuses_with_retry_after_and_holds_the_rate() {
    let s = Server::start();
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "slow", "scope": ["device.sendState"], "rateLimit": {"perSecond": 20, "burst": 5}}),
    );
    let c = client();
    let post = |body: &str| {
        c.post(s.http_url("/applications/app/devices/d/state"))
            .bearer_auth(&t)
            .body(body.to_string())
            .send()
            .unwrap()
    };
    // The burst passes, the next is refused with a Retry-After.
    for _ in 0..5 {
        assert_eq!(post(OK).status().as_u16(), 200);
    }
    let r = post(OK);
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert_eq!(json_of(r).1, json!({"error": "rate_limited"}));
    // An array costs one per state: larger than the burst never fits.
    let six = format!("[{}]", [OK; 6].join(","));
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(post(&six).status().as_u16(), 429);

    // Offered far above the limit for 2 s, the accepted rate is ~20/s.
    std::thread::sleep(Duration::from_millis(400));
    let started = Instant::now();
    let (mut ok, mut limited) = (0u32, 0u32);
    while started.elapsed() < Duration::from_secs(2) {
        match post(OK).status().as_u16() {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = f64::from(ok) / secs;
    eprintln!("configured 20/s burst 5; measured {ok} accepted in {secs:.2}s ({rate:.1}/s), {limited} refused");
    // burst (5) + 20/s × 2 s = 45, give or take scheduling.
    assert!((40..=50).contains(&ok), "{ok} accepted");
    assert!(limited > 0);
    let metrics = metrics_text(&s);
    assert!(
        metrics.contains("sluice_rate_limited_total{token="),
        "{metrics}"
    );
    // Nothing refused was stored.
    let stored = history_all(&s, ADMIN, "app", "d").len() as u32;
    assert_eq!(stored, 5 + ok);
}

#[test]
fn mqtt_rate_limit_per_version() {
    let s = Server::start();
    let (_, t) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "slow", "scope": ["device.sendState"], "rateLimit": {"perSecond": 1, "burst": 3}}),
    );
    let port: u16 = s.mqtt.rsplit(':').next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut o = rumqttc::v5::MqttOptions::new("rl5", "127.0.0.1", port);
        o.set_credentials("u", &t);
        let (c, mut ev) = rumqttc::v5::AsyncClient::new(o, 100);
        for _ in 0..5 {
            c.publish(
                "applications/app/devices/d/state",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                OK,
            )
            .await
            .unwrap();
        }
        let mut reasons = vec![];
        while reasons.len() < 5 {
            if let rumqttc::v5::Event::Incoming(p5::Packet::PubAck(a)) = ev.poll().await.unwrap() {
                reasons.push(a.reason);
            }
        }
        assert_eq!(
            reasons,
            vec![
                p5::PubAckReason::Success,
                p5::PubAckReason::Success,
                p5::PubAckReason::Success,
                p5::PubAckReason::QuotaExceeded,
                p5::PubAckReason::QuotaExceeded
            ]
        );
        // QoS 0 over the limit: DISCONNECT 0x96.
        c.publish(
            "applications/app/devices/d/state",
            rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            false,
            OK,
        )
        .await
        .unwrap();
        let reason = loop {
            match ev.poll().await {
                Ok(_) => continue,
                Err(rumqttc::v5::ConnectionError::MqttState(
                    rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
                )) => break Some(reason_code),
                Err(_) => break None,
            }
        };
        assert_eq!(reason, Some(p5::DisconnectReasonCode::MessageRateTooHigh));

        // MQTT 3.1.1: closed.
        let mut o = rumqttc::MqttOptions::new("rl4", "127.0.0.1", port);
        o.set_credentials("u", &t);
        let (c, mut ev) = rumqttc::AsyncClient::new(o, 10);
        c.publish(
            "applications/app/devices/d/state",
            rumqttc::QoS::AtLeastOnce,
            false,
            OK,
        )
        .await
        .unwrap();
        let closed = loop {
            match ev.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break false,
                Ok(_) => continue,
                Err(_) => break true,
            }
        };
        assert!(closed, "3.1.1 publish over the limit was acknowledged");
    });
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 3);
}

/// Issue 8, item 5: a message is charged to its token's bucket and to every
/// limited ancestor's, so children minted at their parent's rate cannot
/// together send more than the parent may.
#[test]
fn children_together_are_held_to_their_parents_limit() {
    let s = Server::start();
    let (_, parent) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "p", "scope": ["device.sendState", "token.create"],
               "rateLimit": {"perSecond": 1, "burst": 5}}),
    );
    // Each child may send at the parent's full rate on its own.
    let kids: Vec<String> = (0..3)
        .map(|i| {
            mint(
                &s,
                &parent,
                "app",
                json!({"name": format!("k{i}"), "scope": ["device.sendState"],
                       "rateLimit": {"perSecond": 1, "burst": 5}}),
            )
            .1
        })
        .collect();
    let port: u16 = s.mqtt.rsplit(':').next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // The MQTT child connects first, so that what follows takes well
        // under the parent's one-second refill.
        let mut o = rumqttc::v5::MqttOptions::new("kid2", "127.0.0.1", port);
        o.set_credentials("u", &kids[2]);
        let (c, mut ev) = rumqttc::v5::AsyncClient::new(o, 10);
        loop {
            if let rumqttc::v5::Event::Incoming(p5::Packet::ConnAck(_)) = ev.poll().await.unwrap() {
                break;
            }
        }
        // The first child spends the parent's whole burst...
        let c0 = reqwest::Client::new();
        let post = |t: &str| {
            c0.post(s.http_url("/applications/app/devices/d/state"))
                .bearer_auth(t)
                .body(OK)
                .send()
        };
        for _ in 0..5 {
            assert_eq!(post(&kids[0]).await.unwrap().status().as_u16(), 200);
        }
        // ...so its siblings, with full buckets of their own, are refused.
        let r = post(&kids[1]).await.unwrap();
        assert_eq!(r.status().as_u16(), 429);
        assert!(r.headers().contains_key("retry-after"));
        c.publish(
            "applications/app/devices/d/state",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            OK,
        )
        .await
        .unwrap();
        let reason = loop {
            if let rumqttc::v5::Event::Incoming(p5::Packet::PubAck(a)) = ev.poll().await.unwrap() {
                break a.reason;
            }
        };
        assert_eq!(reason, p5::PubAckReason::QuotaExceeded);
    });
    assert_eq!(history_all(&s, ADMIN, "app", "d").len(), 5);

    // Offered far above the limit for 2 s by four children at once, the
    // subtree's accepted rate is the parent's ~20/s, not 4 × 20/s.
    let (_, parent) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "p2", "scope": ["device.sendState", "token.create"],
               "rateLimit": {"perSecond": 20, "burst": 5}}),
    );
    let kids: Vec<String> = (0..4)
        .map(|i| {
            // Left open, the limit is inherited: each child alone 20/s.
            mint(
                &s,
                &parent,
                "app",
                json!({"name": format!("q{i}"), "scope": ["device.sendState"]}),
            )
            .1
        })
        .collect();
    let started = Instant::now();
    let counts: Vec<(u32, u32)> = std::thread::scope(|sc| {
        let hs: Vec<_> = kids
            .iter()
            .map(|t| {
                let url = s.http_url("/applications/app/devices/e/state");
                sc.spawn(move || {
                    let c = client();
                    let (mut ok, mut limited) = (0, 0);
                    while started.elapsed() < Duration::from_secs(2) {
                        match c
                            .post(&url)
                            .bearer_auth(t)
                            .body(OK)
                            .send()
                            .unwrap()
                            .status()
                            .as_u16()
                        {
                            200 => ok += 1,
                            429 => limited += 1,
                            other => panic!("unexpected {other}"),
                        }
                    }
                    (ok, limited)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let ok: u32 = counts.iter().map(|c| c.0).sum();
    eprintln!("parent 20/s burst 5, four children at 20/s each: {ok} accepted in {secs:.2}s, per child {counts:?}");
    // burst (5) + 20/s × 2 s = 45, give or take scheduling; four
    // independent buckets would have allowed about 180.
    assert!((40..=50).contains(&ok), "{ok} accepted");
    assert!(counts.iter().all(|c| c.1 > 0), "{counts:?}");
    assert_eq!(history_all(&s, ADMIN, "app", "e").len() as u32, ok);
}
