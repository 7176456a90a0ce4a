//! Tenant isolation: nothing a token of one application does can observe
//! or affect another application's sessions, tokens or data. Application
//! `mine` holds a token with every scope of its own application and tries
//! everything against application `farm`: MQTT takeover and publishes,
//! HTTP ingest, history and composite reads, reading, changing, deleting
//! and minting tokens. `farm` must see no difference.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;
use crate::mqtt_raw::*;

const SEC: Duration = Duration::from_secs(5);
const FARM_STATE: &str = "/applications/farm/devices/pump/state";

fn http_get(s: &Server, token: &str, path: &str) -> (u16, Value) {
    get_admin(s, token, path)
}

/// A token list without `lastUsedAt`, which moves as farm's token is used.
fn records(list: Value) -> Vec<Value> {
    let mut v = list.as_array().unwrap().clone();
    for r in &mut v {
        r.as_object_mut().unwrap().remove("lastUsedAt");
    }
    v
}

fn delete(s: &Server, token: &str, app: &str, id: &str) -> (u16, Value) {
    json_of(
        client()
            .delete(s.admin_url(&format!("/applications/{app}/tokens/{id}")))
            .bearer_auth(token)
            .send()
            .unwrap(),
    )
}

#[test]
fn one_application_cannot_observe_or_affect_another() {
    let s = Server::start();
    let (farm_admin_id, farm_admin) = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "farm-backend", "scope": ["all.Application"]}),
    );
    let (pump_id, pump) = mint(
        &s,
        &farm_admin,
        "farm",
        json!({"name": "pump", "scope": ["device.sendState", "device.getState"], "devices": ["pump"]}),
    );
    let (_, mine) = mint(
        &s,
        ADMIN,
        "mine",
        json!({"name": "mine-backend", "scope": ["all.Application"]}),
    );

    // farm's state and live sessions, before anything.
    let (st, _) = post_state(
        &s,
        &pump,
        "farm",
        "pump",
        r#"{"data":{"flow":12.5},"time":1000}"#,
    );
    assert_eq!(st, 200);
    let mut farm5 = Raw::connect(&s.mqtt, &Connect::v5("pump", &pump).bytes());
    assert_eq!(farm5.expect(SEC).connack(), Some((false, 0)));
    let mut farm3 = Raw::connect(&s.mqtt, &Connect::v311("pump-311", &pump).bytes());
    assert_eq!(farm3.expect(SEC).connack(), Some((false, 0)));
    let farm_history = history_all(&s, ADMIN, "farm", "pump");
    let (_, farm_composite) = http_get(&s, ADMIN, "/applications/farm/devices/pump/compositeState");
    let farm_tokens = records(http_get(&s, ADMIN, "/applications/farm/tokens").1);

    // MQTT: the same client ids in `mine` take nothing over.
    let mut m5 = Raw::connect(&s.mqtt, &Connect::v5("pump", &mine).bytes());
    assert_eq!(m5.expect(SEC).connack(), Some((false, 0)));
    let mut m3 = Raw::connect(&s.mqtt, &Connect::v311("pump-311", &mine).bytes());
    assert_eq!(m3.expect(SEC).connack(), Some((false, 0)));
    // MQTT: publishing into farm's topics is not authorized (MQTT 5 PUBACK
    // 0x87 and the session goes on; 3.1.1 is closed).
    m5.send(&publish(
        true,
        "applications/farm/devices/pump/state",
        1,
        1,
        false,
        &[],
        br#"{"data":{"flow":0}}"#,
    ));
    assert_eq!(m5.expect(SEC).puback(), Some((1, 0x87)));
    assert!(m5.alive());
    m3.send(&publish(
        false,
        "applications/farm/devices/pump/state",
        1,
        1,
        false,
        &[],
        br#"{"data":{"flow":0}}"#,
    ));
    assert!(m3.until_closed(SEC).is_empty());

    // HTTP ingest into farm: forbidden.
    let (st, body) = post_state(&s, &mine, "farm", "pump", r#"{"data":{"flow":0}}"#);
    assert_eq!((st, body), (403, json!({"error": "forbidden"})));

    // Reads of farm's data: forbidden; the same device id in `mine` is
    // another device, with none of farm's data.
    for path in [
        FARM_STATE.to_string(),
        "/applications/farm/devices/pump/compositeState".to_string(),
    ] {
        assert_eq!(
            http_get(&s, &mine, &path),
            (403, json!({"error": "forbidden"})),
            "{path}"
        );
    }
    assert!(history_all(&s, &mine, "mine", "pump").is_empty());
    assert_eq!(
        http_get(&s, &mine, "/applications/mine/devices/pump/compositeState"),
        (200, json!({}))
    );

    // Tokens: farm's list and records are forbidden; through `mine`'s own
    // path a farm token id does not exist. Answers are the same for ids
    // that exist and ids that do not, so nothing is learned either.
    let unknown = "0123456789abcdef0123456789abcdef";
    assert_eq!(
        http_get(&s, &mine, "/applications/farm/tokens"),
        (403, json!({"error": "forbidden"}))
    );
    for id in [pump_id.as_str(), farm_admin_id.as_str(), unknown] {
        let farm_path = format!("/applications/farm/tokens/{id}");
        let mine_path = format!("/applications/mine/tokens/{id}");
        assert_eq!(
            http_get(&s, &mine, &farm_path),
            (403, json!({"error": "forbidden"}))
        );
        assert_eq!(
            http_get(&s, &mine, &mine_path),
            (404, json!({"error": "not_found"}))
        );
        for app in ["farm", "mine"] {
            let (st, _) = patch_token(&s, &mine, app, id, json!({"status": "inactive"}));
            assert_eq!(
                st,
                if app == "farm" { 403 } else { 404 },
                "PATCH {app} {id}"
            );
            let (st, _) = patch_token(&s, &mine, app, id, json!({"name": "owned"}));
            assert_eq!(
                st,
                if app == "farm" { 403 } else { 404 },
                "rename {app} {id}"
            );
            let (st, _) = delete(&s, &mine, app, id);
            assert_eq!(
                st,
                if app == "farm" { 403 } else { 404 },
                "DELETE {app} {id}"
            );
        }
    }
    let (_, mine_list) = http_get(&s, &mine, "/applications/mine/tokens");
    let listed = mine_list.to_string();
    assert!(!listed.contains(&pump_id) && !listed.contains(&farm_admin_id));

    // Minting into farm: refused, nothing created.
    let (st, _) = create_token(
        &s,
        &mine,
        "farm",
        json!({"name": "intruder", "scope": ["device.sendState"]}),
    );
    assert_eq!(st, 403);

    // Revoking its own tokens touches only `mine`'s sessions.
    let (mine_child_id, mine_child) = mint(
        &s,
        &mine,
        "mine",
        json!({"name": "c", "scope": ["device.sendState"]}),
    );
    let mut mc = Raw::connect(&s.mqtt, &Connect::v5("pump", &mine_child).bytes());
    assert_eq!(mc.expect(SEC).connack(), Some((false, 0)));
    // (`mine`'s own takeover of its "pump" session happened just now.)
    assert_eq!(m5.until_closed(SEC)[0].disconnect(), Some(0x8E));
    let (st, _) = delete(&s, &mine, "mine", &mine_child_id);
    assert_eq!(st, 204);
    assert_eq!(mc.until_closed(SEC)[0].disconnect(), Some(0x87));

    // farm sees no difference: sessions alive, data and tokens unchanged,
    // and its token still works everywhere.
    assert!(farm5.alive(), "farm's MQTT 5 session was ended");
    assert!(farm3.alive(), "farm's MQTT 3.1.1 session was ended");
    assert_eq!(history_all(&s, ADMIN, "farm", "pump"), farm_history);
    assert_eq!(
        http_get(&s, ADMIN, "/applications/farm/devices/pump/compositeState").1,
        farm_composite
    );
    assert_eq!(
        records(http_get(&s, ADMIN, "/applications/farm/tokens").1),
        farm_tokens
    );
    farm5.send(&publish(
        true,
        "applications/farm/devices/pump/state",
        1,
        9,
        false,
        &[],
        br#"{"data":{"flow":13},"time":2000}"#,
    ));
    assert_eq!(farm5.expect(SEC).puback(), Some((9, 0)));
    let (st, _) = post_state(
        &s,
        &pump,
        "farm",
        "pump",
        r#"{"data":{"flow":14},"time":3000}"#,
    );
    assert_eq!(st, 200);
    assert_eq!(history_all(&s, ADMIN, "farm", "pump").len(), 3);
}
