//! The OpenAPI document (issue 12, item 5) against the code and the running
//! server: the routes it documents are exactly the routes of the two route
//! tables (`http::admin::routes`, `http::device::ROUTES`, which the
//! listeners dispatch on), every documented route answers (not 404/405)
//! with a documented status, and the sample requests and every response
//! body validate against its schemas (JSON Schema 2020-12, the dialect of
//! OpenAPI 3.1).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

fn doc() -> Value {
    serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap()
}

/// (listener, METHOD, path template) of every documented operation.
fn documented(doc: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for listener in op["x-sluice-listener"].as_array().unwrap() {
                out.insert((
                    listener.as_str().unwrap().to_string(),
                    method.to_uppercase(),
                    path.clone(),
                ));
            }
        }
    }
    out
}

/// (listener, METHOD, path template) of every route the code serves: each
/// listener's own table and the read routes both serve.
fn served() -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in sluice::http::admin::routes() {
        out.insert(("admin".into(), r.method.to_string(), r.path.to_string()));
    }
    for (method, path) in sluice::http::device::ROUTES {
        out.insert(("device".into(), method.to_string(), path.to_string()));
    }
    for r in sluice::http::read::routes() {
        for listener in ["admin", "device"] {
            out.insert((listener.into(), "GET".into(), r.path.to_string()));
        }
    }
    out
}

/// `reference` (`#/components/...`) followed once, or `v` itself.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => doc
            .pointer(r.strip_prefix('#').unwrap())
            .unwrap_or_else(|| panic!("dangling {r}")),
        None => v,
    }
}

/// Validates `instance` against `schema`, with `$ref`s resolved in `doc`.
fn check(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let mut root = doc.clone();
    root["$schema"] = "https://json-schema.org/draft/2020-12/schema".into();
    root["$defs"] = json!({ "target": schema });
    root["$ref"] = "#/$defs/target".into();
    let validator = jsonschema::validator_for(&root)
        .unwrap_or_else(|e| panic!("{what}: the schema does not compile: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: {instance} does not match {schema}: {errors:?}"
    );
}

struct Sample {
    token: String,
    path: String,
    body: Option<Value>,
}

fn no_redirects() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Sends `sample` and checks the answer against the operation `op`:
/// a documented status, and the body against that response's schema.
fn exercise(
    s: &Server,
    doc: &Value,
    listener: &str,
    method: &str,
    op: &Value,
    sample: &Sample,
) -> u16 {
    let base = match listener {
        "device" => s.http_url(&sample.path),
        _ => s.admin_url(&sample.path),
    };
    let what = format!("{method} {} on {listener}", sample.path);
    let mut req = no_redirects().request(method.parse().unwrap(), &base);
    if !sample.token.is_empty() {
        req = req.bearer_auth(&sample.token);
    }
    if let Some(body) = &sample.body {
        let schema = &resolve(doc, &op["requestBody"])["content"]["application/json"]["schema"];
        check(doc, schema, body, &format!("{what}: request body"));
        req = req.json(body);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    // An event stream never ends: its headers are the answer (dropping the
    // response closes it).
    let text = match content_type.starts_with("text/event-stream") {
        true => String::new(),
        false => resp.text().unwrap(),
    };
    let documented = op["responses"]
        .get(status.to_string())
        .or_else(|| op["responses"].get("default"))
        .unwrap_or_else(|| panic!("{what}: status {status} is not documented: {text}"));
    let documented = resolve(doc, documented);
    match documented.get("content") {
        None => assert!(text.is_empty(), "{what}: undocumented body {text}"),
        Some(content) if content_type.starts_with("text/event-stream") => {
            assert!(
                content.get("text/event-stream").is_some(),
                "{what}: undocumented stream"
            );
        }
        Some(content) => {
            let media = content_type.split(';').next().unwrap().trim();
            let entry = content
                .get(media)
                .unwrap_or_else(|| panic!("{what}: {media} is not documented for {status}"));
            if media == "application/json" {
                let body: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
                check(doc, &entry["schema"], &body, &format!("{what}: {status}"));
            }
        }
    }
    status
}

#[test]
fn the_document_describes_exactly_the_served_routes_and_their_bodies() {
    let doc = doc();
    let s = Server::start();
    // Served as kept in the repository.
    let (st, served_doc) = json_of(client().get(s.admin_url("/openapi.json")).send().unwrap());
    assert_eq!(st, 200);
    assert_eq!(served_doc, doc);
    assert_eq!(doc["openapi"], "3.1.0");

    // The route tables and the document name the same routes.
    let code = served();
    let documented = documented(&doc);
    let missing: Vec<_> = code.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&code).collect();
    assert!(missing.is_empty(), "served but not documented: {missing:?}");
    assert!(extra.is_empty(), "documented but not served: {extra:?}");

    // Real data for the samples.
    let (_, owner) = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "owner", "scope": ["all.Application"]}),
    );
    let (victim, _) = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "victim", "scope": ["device.sendState"]}),
    );
    assert_eq!(
        post_state(&s, &owner, "farm", "pump", r#"{"data":{"flow":1.5}}"#).0,
        200
    );
    let backup_dir = tempfile::tempdir().unwrap();
    let samples = |listener: &str, method: &str, path: &str| -> Sample {
        let concrete = path
            .replace("{app}", "farm")
            .replace("{device}", "pump")
            .replace("{id}", &victim)
            .replace("{file}", "app.js");
        let body = match (method, path) {
            ("POST", "/applications/{app}/devices/{device}/state") => {
                Some(json!([{"data": {"flow": 2}}, {"data": {"on": true}, "time": 1000}]))
            }
            ("POST", "/applications/{app}/tokens") => Some(
                json!({"name": "sample", "scope": ["device.sendState"], "rateLimit": {"perSecond": 5, "burst": 10}}),
            ),
            ("PATCH", _) => Some(json!({"name": "renamed", "status": "inactive"})),
            ("PUT", _) => Some(json!({"retention": "30d"})),
            ("POST", "/backup") => {
                Some(json!({"to": backup_dir.path().join("b").to_str().unwrap()}))
            }
            _ => None,
        };
        // Root is not a credential on the device listener.
        let token = match listener {
            "device" => owner.clone(),
            _ => ADMIN.to_string(),
        };
        Sample {
            token,
            path: concrete,
            body,
        }
    };
    // Deletions last, the application's very last.
    let mut order: Vec<(String, String, String)> = documented.iter().cloned().collect();
    order.sort_by_key(|(_, m, p)| (m == "DELETE", p == "/applications/{app}", p.clone()));
    let mut exercised = 0;
    for (listener, method, path) in &order {
        let op = &doc["paths"][path][method.to_lowercase()];
        let sample = samples(listener, method, path);
        let protected = op.get("security") != Some(&json!([]));
        if protected {
            // Without a token: 401, as documented.
            let anonymous = Sample {
                token: String::new(),
                path: sample.path.clone(),
                body: sample.body.clone(),
            };
            let st = exercise(&s, &doc, listener, method, op, &anonymous);
            assert_eq!(st, 401, "{method} {path} on {listener} without a token");
        }
        let st = exercise(&s, &doc, listener, method, op, &sample);
        if op.get("x-sluice-cluster-only") == Some(&json!(true)) {
            // Answered in cluster mode (see the test below); a standalone
            // broker says it has none, as documented.
            assert_eq!(st, 404, "{method} {path} on a standalone broker");
            exercised += 1;
            continue;
        }
        assert!(
            st != 404 && st != 405 && st < 500,
            "{method} {path} on {listener} answered {st}"
        );
        exercised += 1;
    }
    assert_eq!(exercised, code.len());

    // Refusals carry the documented error body too (the owner's token went
    // with its application above).
    let create = &doc["paths"]["/applications/{app}/tokens"]["post"];
    for (token, body, want) in [
        (ADMIN, json!({"name": "x", "scope": ["nope"]}), 400),
        (
            owner.as_str(),
            json!({"name": "x", "scope": ["device.sendState"]}),
            401,
        ),
    ] {
        let sample = Sample {
            token: token.to_string(),
            path: "/applications/other/tokens".into(),
            body: None,
        };
        let resp = client()
            .post(s.admin_url(&sample.path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .unwrap();
        let (st, v) = json_of(resp);
        assert_eq!(st, want, "{v}");
        let schema = &resolve(&doc, &create["responses"][st.to_string()])["content"]
            ["application/json"]["schema"];
        check(&doc, schema, &v, "refused create");
    }
    // A route nobody documents is answered 404 with the error body.
    let (st, v) = get_admin(&s, ADMIN, "/applications/farm/nothing-here");
    assert_eq!(st, 404);
    check(
        &doc,
        &json!({"$ref": "#/components/schemas/Error"}),
        &v,
        "404",
    );
}

/// The routes only a broker in cluster mode answers, on a real NATS
/// cluster: they answer, as documented.
#[test]
fn cluster_only_routes_answer_in_cluster_mode() {
    let doc = doc();
    let nats = crate::nats::NatsCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_args(
        dir.path(),
        &["--cluster", &nats.url(0)],
        &[("SLUICE_CLUSTER__PREFIX", "oapi")],
    );
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if op.get("x-sluice-cluster-only") != Some(&json!(true)) {
                continue;
            }
            let sample = Sample {
                token: ADMIN.into(),
                path: path.clone(),
                body: None,
            };
            let st = exercise(&s, &doc, "admin", &method.to_uppercase(), op, &sample);
            assert_eq!(st, 200, "{method} {path} in cluster mode");
            checked += 1;
        }
    }
    assert!(checked > 0);
    // A state accepted in cluster mode answers with its stream sequence,
    // as the document says.
    let (_, t) = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "t", "scope": ["device.sendState"]}),
    );
    let post = &doc["paths"]["/applications/{app}/devices/{device}/state"]["post"];
    let sample = Sample {
        token: t,
        path: "/applications/farm/devices/pump/state".into(),
        body: Some(json!({"data": {"x": 1}})),
    };
    assert_eq!(exercise(&s, &doc, "device", "POST", post, &sample), 200);
}
