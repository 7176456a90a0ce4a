//! HTTP ingest against the contract: what is stored, and every refusal.

use serde_json::{json, Value};

use crate::common::*;

fn sender(s: &Server, app: &str) -> String {
    mint(
        s,
        ADMIN,
        app,
        json!({"name": "dev", "scope": ["device.sendState", "device.getState"]}),
    )
    .1
}

#[test]
fn single_and_array_are_stored_exactly_and_read_back() {
    let s = Server::start();
    let t = sender(&s, "app1");
    let one = r#"{"data":{"temp":21.5,"tags":["a",{"b":null}]},"time":1000}"#;
    assert_eq!(
        post_state(&s, &t, "app1", "d1", one),
        (200, json!({"accepted": 1}))
    );
    let many = r#"[{"data":{"temp":22},"time":"1970-01-01T00:00:02Z"},{"data":{"hum":40, "temp":23},"time":3000},{"data":{"temp":24},"time":3000}]"#;
    assert_eq!(
        post_state(&s, &t, "app1", "d1", many),
        (200, json!({"accepted": 3}))
    );

    // Default order: newest first; ties keep arrival order reversed.
    let raw = client()
        .get(s.admin_url("/applications/app1/devices/d1/state"))
        .bearer_auth(&t)
        .send()
        .unwrap()
        .text()
        .unwrap();
    // Byte-equal read-back of each `data` object, including its spacing.
    assert_eq!(
        raw,
        r#"{"items":[{"time":3000,"data":{"temp":24}},{"time":3000,"data":{"hum":40, "temp":23}},{"time":2000,"data":{"temp":22}},{"time":1000,"data":{"temp":21.5,"tags":["a",{"b":null}]}}],"next":null}"#
    );

    let (st, asc) = get_admin(
        &s,
        &t,
        "/applications/app1/devices/d1/state?order=asc&start=2000&end=1970-01-01T00:00:03Z",
    );
    assert_eq!(st, 200);
    let times: Vec<i64> = asc["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["time"].as_i64().unwrap())
        .collect();
    assert_eq!(times, vec![2000, 3000, 3000]);

    // Paging with limit and cursor visits every item once, in order.
    let mut seen = vec![];
    let mut path = "/applications/app1/devices/d1/state?limit=1".to_string();
    loop {
        let (st, page) = get_admin(&s, &t, &path);
        assert_eq!(st, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 1);
        seen.extend(items.iter().map(|i| i["data"].clone()));
        match page["next"].as_str() {
            Some(c) => path = format!("/applications/app1/devices/d1/state?limit=1&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(
        seen,
        vec![
            json!({"temp": 24}),
            json!({"hum": 40, "temp": 23}),
            json!({"temp": 22}),
            json!({"temp": 21.5, "tags": ["a", {"b": null}]})
        ]
    );

    let (st, comp) = get_admin(&s, &t, "/applications/app1/devices/d1/compositeState");
    assert_eq!(st, 200);
    assert_eq!(
        comp,
        json!({
            "temp": {"value": 24, "time": 3000},
            "hum": {"value": 40, "time": 3000},
            "tags": {"value": ["a", {"b": null}], "time": 1000}
        })
    );
    // A device that never sent anything has an empty composite state.
    assert_eq!(
        get_admin(&s, &t, "/applications/app1/devices/d9/compositeState"),
        (200, json!({}))
    );
}

#[test]
fn states_without_time_get_the_receive_time() {
    let s = Server::start();
    let t = sender(&s, "app");
    let before = sluice::timefmt::now_ms();
    assert_eq!(post_state(&s, &t, "app", "d", r#"{"data":{"x":1}}"#).0, 200);
    let after = sluice::timefmt::now_ms();
    let items = history_all(&s, &t, "app", "d");
    let time = items[0]["time"].as_i64().unwrap();
    assert!(before <= time && time <= after, "{before} {time} {after}");
}

fn status_and_error(r: (u16, Value)) -> (u16, String) {
    (r.0, r.1["error"].as_str().unwrap_or("").to_string())
}

#[test]
fn every_refusal_of_the_contract_and_nothing_stored() {
    let s = Server::start_with(&[("SLUICE_HTTP__MAX_BODY_BYTES", "2048")]);
    let good = sender(&s, "app");
    let reader = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "r", "scope": ["device.getState"]}),
    )
    .1;
    let d1_only = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "d1", "scope": ["device.sendState"], "devices": ["d1"]}),
    )
    .1;
    let other_app = sender(&s, "other");
    let (inactive_id, inactive) = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "off", "scope": ["device.sendState"], "status": "inactive"}),
    );
    let expired = mint(
        &s,
        ADMIN,
        "app",
        json!({"name": "old", "scope": ["device.sendState"], "expirationDate": "2001-01-01T00:00:00Z"}),
    )
    .1;
    let ok_body = r#"{"data":{"x":1}}"#;
    let url = s.http_url("/applications/app/devices/d2/state");

    // 401: missing, malformed, unknown, expired, inactive.
    let r = client().post(&url).body(ok_body).send().unwrap();
    assert_eq!(status_and_error(json_of(r)), (401, "unauthorized".into()));
    let r = client()
        .post(&url)
        .header("authorization", "Basic abc")
        .body(ok_body)
        .send()
        .unwrap();
    assert_eq!(status_and_error(json_of(r)), (401, "unauthorized".into()));
    // The root admin token is an admin-plane credential: refused here.
    for t in [
        "sl_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        expired.as_str(),
        inactive.as_str(),
        ADMIN,
    ] {
        assert_eq!(
            status_and_error(post_state(&s, t, "app", "d2", ok_body)),
            (401, "unauthorized".into())
        );
    }
    assert_eq!(inactive_id.len(), 24);

    // 403: wrong scope, device, application.
    for (t, app, dev) in [
        (&reader, "app", "d2"),
        (&d1_only, "app", "d2"),
        (&other_app, "app", "d2"),
    ] {
        assert_eq!(
            status_and_error(post_state(&s, t, app, dev, ok_body)),
            (403, "forbidden".into())
        );
    }
    assert_eq!(post_state(&s, &d1_only, "app", "d1", ok_body).0, 200);

    // 400 with the first problem in `detail`.
    for (body, want) in [
        ("not json", "state object"),
        (r#"{"data":[1]}"#, "must be an object"),
        (r#"{"temp":1}"#, "unknown field `temp`"),
        (r#"[{"data":{"a":1}},{"data":"x"}]"#, "must be an object"),
        ("[]", "empty"),
        (r#"{"data":{"a":1},"time":-5}"#, "out of range"),
    ] {
        let (st, v) = post_state(&s, &good, "app", "d2", body);
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["error"], "bad_request");
        let detail = v["detail"].as_str().unwrap();
        assert!(detail.contains(want), "{body}: {detail}");
    }
    let (st, v) = post_state(&s, &good, "app", "bad%20id", ok_body);
    assert_eq!((st, v["error"].as_str()), (400, Some("bad_request")), "{v}");
    let (st, v) = post_state(&s, &good, "app", "a*b", ok_body);
    assert_eq!((st, v["error"].as_str()), (400, Some("bad_request")), "{v}");
    let (st, v) = post_state(&s, &good, "app", &"x".repeat(65), ok_body);
    assert_eq!((st, v["error"].as_str()), (400, Some("bad_request")), "{v}");

    // 413, whether declared up front or streamed.
    let big = format!(r#"{{"data":{{"x":"{}"}}}}"#, "y".repeat(4096));
    assert_eq!(
        status_and_error(post_state(&s, &good, "app", "d2", &big)),
        (413, "payload_too_large".into())
    );
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(big.as_bytes()[..1000].to_vec()),
        Ok(big.as_bytes()[1000..].to_vec()),
    ];
    let r = client()
        .post(&url)
        .bearer_auth(&good)
        .body(reqwest::blocking::Body::new(ChunkReader::new(chunks)))
        .send()
        .unwrap();
    assert_eq!(
        status_and_error(json_of(r)),
        (413, "payload_too_large".into())
    );

    // Wrong media type, unknown route, wrong method.
    let r = client()
        .post(&url)
        .bearer_auth(&good)
        .header("content-type", "text/plain")
        .body(ok_body)
        .send()
        .unwrap();
    assert_eq!(
        status_and_error(json_of(r)),
        (415, "unsupported_media_type".into())
    );
    let r = client()
        .post(s.http_url("/applications/app/devices/d2/states"))
        .bearer_auth(&good)
        .body(ok_body)
        .send()
        .unwrap();
    assert_eq!(status_and_error(json_of(r)), (404, "not_found".into()));
    let r = client().put(&url).bearer_auth(&good).send().unwrap();
    assert_eq!(r.headers()["allow"], "GET, POST");
    assert_eq!(
        status_and_error(json_of(r)),
        (405, "method_not_allowed".into())
    );

    // Nothing of any refused request was stored: d2 is empty.
    assert_eq!(history_all(&s, ADMIN, "app", "d2"), Vec::<Value>::new());
    assert_eq!(
        get_admin(&s, ADMIN, "/applications/app/devices/d2/compositeState"),
        (200, json!({}))
    );
    let metrics = metrics_text(&s);
    assert!(
        metrics.contains("sluice_http_requests_total{status=\"401\"} 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_messages_stored_total 1"),
        "{metrics}"
    );
}

#[test]
fn a_full_queue_answers_503_and_loses_nothing_accepted() {
    // A queue that holds one request and an fsync per batch: concurrent
    // posts must overflow it.
    let s = Server::start_with(&[
        ("SLUICE_HTTP__MAX_BODY_BYTES", "4096"),
        ("SLUICE_BATCH__QUEUE_MAX_BYTES", "4096"),
        ("SLUICE_BATCH__QUEUE_CAPACITY", "1"),
        ("SLUICE_STORAGE__SYNC", "always"),
    ]);
    let t = sender(&s, "app");
    let body: String = format!(
        "[{}]",
        vec![r#"{"data":{"v":"0123456789012345678901234567890123456789"}}"#; 40].join(",")
    );
    let mut accepted = 0usize;
    let mut overloaded = 0usize;
    for _round in 0..20 {
        let results: Vec<(u16, Value, Option<String>)> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..32)
                .map(|_| {
                    sc.spawn(|| {
                        let r = client()
                            .post(s.http_url("/applications/app/devices/d/state"))
                            .bearer_auth(&t)
                            .body(body.clone())
                            .send()
                            .unwrap();
                        let retry = r
                            .headers()
                            .get("retry-after")
                            .map(|v| v.to_str().unwrap().to_string());
                        let (st, v) = json_of(r);
                        (st, v, retry)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (st, v, retry) in results {
            match st {
                200 => {
                    assert_eq!(v, json!({"accepted": 40}));
                    accepted += 40;
                }
                503 => {
                    assert_eq!(v, json!({"error": "overloaded"}));
                    assert!(retry.is_some());
                    overloaded += 1;
                }
                other => panic!("unexpected {other}: {v}"),
            }
        }
        if overloaded > 0 {
            break;
        }
    }
    assert!(overloaded > 0, "the queue never filled");
    assert_eq!(history_all(&s, &t, "app", "d").len(), accepted);
}

/// A body that arrives in several chunks without a Content-Length.
struct ChunkReader {
    chunks: std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>,
    cur: Vec<u8>,
    pos: usize,
}

impl ChunkReader {
    fn new(chunks: Vec<Result<Vec<u8>, std::io::Error>>) -> Self {
        ChunkReader {
            chunks: chunks.into_iter(),
            cur: vec![],
            pos: 0,
        }
    }
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.chunks.next() {
                None => return Ok(0),
                Some(c) => {
                    self.cur = c?;
                    self.pos = 0;
                }
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The value of an unlabelled series in the Prometheus text.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

/// `sluice_ack_latency_seconds` is observed once per committed batch, for
/// HTTP requests and MQTT publishes alike.
#[test]
fn ack_latency_is_observed_once_per_batch_over_http_and_mqtt() {
    let s = Server::start();
    let t = sender(&s, "app1");
    let before = metrics_text(&s);
    assert_eq!(series(&before, "sluice_ack_latency_seconds_count"), 0.0);
    for i in 0..3 {
        let body = format!(r#"{{"data":{{"n":{i}}}}}"#);
        assert_eq!(post_state(&s, &t, "app1", "d1", &body).0, 200);
    }
    let http = metrics_text(&s);
    let count = series(&http, "sluice_ack_latency_seconds_count");
    assert!(count >= 1.0, "{http}");
    assert_eq!(count, series(&http, "sluice_batches_committed_total"));
    assert!(series(&http, "sluice_ack_latency_seconds_sum") > 0.0);

    let port: u16 = s.mqtt.rsplit(':').next().unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut o = rumqttc::MqttOptions::new("lat", "127.0.0.1", port);
        o.set_credentials("user", &t);
        let (cl, mut ev) = rumqttc::AsyncClient::new(o, 10);
        cl.publish(
            "applications/app1/devices/d2/state",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"data":{"m":1}}"#,
        )
        .await
        .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                    ev.poll().await.unwrap()
                {
                    break;
                }
            }
        })
        .await
        .expect("PUBACK");
    });
    let mqtt = metrics_text(&s);
    let after = series(&mqtt, "sluice_ack_latency_seconds_count");
    assert!(after > count, "{mqtt}");
    assert_eq!(after, series(&mqtt, "sluice_batches_committed_total"));
}
