//! `deploy/`: the Grafana dashboard queries only metrics the binary
//! exports; the container image's exact start command (its ENTRYPOINT, CMD
//! and ENV, as the non-root user it names, with a temp dir for the /data
//! volume) serves; the systemd unit is sandboxed, passes
//! `systemd-analyze verify` where that exists, and its start and reload
//! commands work. Docker itself cannot run here (no engine), so the image
//! is not built by this test.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Metric names in a PromQL expression: identifiers that are neither
/// functions (followed by `(`), nor keywords, nor inside
/// label matchers `{…}`, ranges `[…]`, strings or `by (…)` label lists.
/// Unbalanced brackets are an error.
fn metric_names(expr: &str) -> Result<Vec<String>, String> {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Aggregations are keywords, and may be followed by `by (…)` before
    // their argument.
    const KEYWORDS: [&str; 18] = [
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
    ];
    let b = expr.as_bytes();
    let mut names = Vec::new();
    let mut parens = 0i32;
    let mut i = 0;
    // Skips from an opening bracket to its match, over strings.
    let skip = |mut i: usize, open: u8, close: u8| -> Result<usize, String> {
        let mut depth = 0;
        while i < b.len() {
            match b[i] {
                q @ (b'"' | b'\'') => {
                    i += 1;
                    while i < b.len() && b[i] != q {
                        i += if b[i] == b'\\' { 2 } else { 1 };
                    }
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(i + 1);
                    }
                }
                _ => {}
            }
            i += 1;
        }
        Err(format!("unclosed {} in {expr}", open as char))
    };
    while i < b.len() {
        let c = b[i];
        if c == b'{' {
            i = skip(i, b'{', b'}')?;
        } else if c == b'[' {
            i = skip(i, b'[', b']')?;
        } else if c == b'"' || c == b'\'' {
            return Err(format!("string outside a matcher in {expr}"));
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let mut next = i;
            while next < b.len() && b[next].is_ascii_whitespace() {
                next += 1;
            }
            let call = b.get(next) == Some(&b'(');
            if GROUPING.contains(&word) {
                if call {
                    i = skip(next, b'(', b')')?;
                }
            } else if !call && !KEYWORDS.contains(&word) {
                names.push(word.to_string());
            }
        } else {
            match c {
                b'(' => parens += 1,
                b')' => parens -= 1,
                b'}' | b']' => return Err(format!("stray {} in {expr}", c as char)),
                _ => {}
            }
            if parens < 0 {
                return Err(format!("unbalanced ) in {expr}"));
            }
            i += 1;
        }
    }
    match parens {
        0 => Ok(names),
        _ => Err(format!("unbalanced ( in {expr}")),
    }
}

#[test]
fn metric_names_parses_the_dashboard_dialect() {
    let e = r#"topk(10, sum by (token, le) (rate(sluice_a_total{instance=~"$x", s!="}"}[$__rate_interval]))) / on (job) sluice_b or vector(0) > bool 0.99"#;
    assert_eq!(metric_names(e).unwrap(), ["sluice_a_total", "sluice_b"]);
    assert!(metric_names("sum(rate(x[5m])").is_err());
    assert!(metric_names("x{a=\"b\"").is_err());
}

/// Every sample name in a Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_string())
        .collect()
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("deploy/grafana/sluice.json")).unwrap())
            .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for topic in [
        "Ingest rate",
        "Ack latency",
        "Batch size",
        "queue depth",
        "connections",
        "Refusals by reason",
        "Rate-limited tokens",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(topic)),
            "{topic}: {titles:?}"
        );
    }
    let mut queried = BTreeSet::new();
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let names = metric_names(expr).unwrap();
            assert!(!names.is_empty(), "no metric in {expr}");
            queried.extend(names);
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(def) = v["definition"].as_str() {
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|d| d.split(',').next())
                .unwrap();
            queried.insert(inner.trim().to_string());
        }
    }

    // Something of every kind has happened, so every series exists: a
    // stored state, a refusal, and a rate-limited token.
    let s = Server::start();
    let (_, t) = mint(
        &s,
        ADMIN,
        "farm",
        json!({"name": "slow", "scope": ["device.sendState"], "rateLimit": {"perSecond": 1, "burst": 1}}),
    );
    let statuses: Vec<u16> = (0..3)
        .map(|_| post_state(&s, &t, "farm", "d", r#"{"data":{"x":1}}"#).0)
        .collect();
    assert!(
        statuses.contains(&200) && statuses.contains(&429),
        "{statuses:?}"
    );
    let exported = exported(&metrics_text(&s));
    let missing: Vec<&String> = queried.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /metrics does not have: {missing:?}\nexported: {exported:?}"
    );
    assert!(queried.len() >= 12, "{queried:?}");
}

/// A Dockerfile's instructions, continuation lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                let (op, rest) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((op.to_ascii_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// Waits for `<data>/listening` and returns its lines as (kind, addr).
fn listening(child: &mut Child, data: &Path, log: &Path) -> HashMap<String, String> {
    let file = data.join("listening");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !file.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| {
            let p: Vec<&str> = l.split(' ').collect();
            (p[1].to_string(), p[2].to_string())
        })
        .collect()
}

/// Mints a token with `admin`, stores a state over HTTP on `http` and
/// reads it back.
fn round_trip(admin: &str, http: &str, root: &str) {
    let c = client();
    let (st, v) = json_of(
        c.post(format!("http://{admin}/applications/farm/tokens"))
            .bearer_auth(root)
            .json(&json!({"name": "d", "scope": ["device.sendState", "device.getState"]}))
            .send()
            .unwrap(),
    );
    assert_eq!(st, 201, "{v}");
    let t = v["token"].as_str().unwrap();
    let (st, _) = json_of(
        c.post(format!("http://{http}/applications/farm/devices/d/state"))
            .bearer_auth(t)
            .body(r#"{"data":{"deployed":true}}"#)
            .send()
            .unwrap(),
    );
    assert_eq!(st, 200);
    let (_, v) = json_of(
        c.get(format!("http://{admin}/applications/farm/devices/d/state"))
            .bearer_auth(t)
            .send()
            .unwrap(),
    );
    assert_eq!(v["items"][0]["data"], json!({"deployed": true}));
}

fn on_loopback(addr: &str) -> String {
    format!("127.0.0.1:{}", addr.rsplit(':').next().unwrap())
}

fn terminate(mut child: Child) -> Option<i32> {
    unsafe_kill(child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        assert!(Instant::now() < deadline, "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn image_start_command_serves_as_its_non_root_user() {
    let text = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    let all = instructions(&text);
    let stages = all.iter().filter(|(op, _)| op == "FROM").count();
    assert!(stages >= 2, "multi-stage build");
    // The runtime stage: everything after the last FROM.
    let last = all.iter().rposition(|(op, _)| op == "FROM").unwrap();
    let runtime = &all[last..];
    let get = |op: &str| -> Vec<&String> {
        runtime
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, v)| v)
            .collect()
    };
    let user = get("USER").last().copied().expect("USER").clone();
    assert!(
        !["root", "0"].contains(&user.split(':').next().unwrap()),
        "runs as {user}"
    );
    let volumes: Vec<String> = serde_json::from_str(get("VOLUME")[0]).unwrap();
    assert_eq!(volumes, ["/data"]);
    let entrypoint: Vec<String> = serde_json::from_str(get("ENTRYPOINT")[0]).unwrap();
    let cmd: Vec<String> = serde_json::from_str(get("CMD")[0]).unwrap();
    let env: Vec<(String, String)> = get("ENV")
        .iter()
        .map(|e| {
            let (k, v) = e.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    assert!(env.contains(&("SLUICE_STORAGE__DATA_DIR".into(), "/data".into())));

    // A temp dir stands for the volume, owned by the image's user as the
    // image's /data is; the binary runs as that user (distroless
    // "nonroot" is uid 65532) when this test can switch users.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let uid = 65532;
    let as_nonroot = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
        && Command::new("setpriv").arg("--version").output().is_ok();
    let mut command = match as_nonroot {
        true => {
            let bin_copy = tmp.path().join("sluice");
            std::fs::copy(bin(), &bin_copy).unwrap();
            std::os::unix::fs::chown(&data, Some(uid), Some(uid)).unwrap();
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65532", "--regid=65532", "--clear-groups", "--"])
                .arg(bin_copy);
            c
        }
        false => Command::new(bin()),
    };
    // The image's arguments after its binary, and its environment with
    // /data at the temp dir; published ports are remapped as `docker run
    // -p FREE:PORT` would, since the defaults may be taken here.
    let (mqtt, http, admin) = three_free_ports();
    command.args(&entrypoint[1..]).args(&cmd).env_clear();
    for (k, v) in &env {
        let v = v
            .replace("/data", data.to_str().unwrap())
            .replace(":9090", &format!(":{admin}"));
        command.env(k, v);
    }
    let log = tmp.path().join("stderr.log");
    let mut child = command
        .env("SLUICE_MQTT__LISTEN", format!("0.0.0.0:{mqtt}"))
        .env("SLUICE_HTTP__LISTEN", format!("0.0.0.0:{http}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let open = listening(&mut child, &data, &log);
    assert_eq!(open["admin"], format!("0.0.0.0:{admin}"));
    assert_eq!(open["mqtt"], format!("0.0.0.0:{mqtt}"));
    assert_eq!(open["http"], format!("0.0.0.0:{http}"));

    // A fresh volume: the root token was generated there, private to the
    // image's user.
    let token_file = data.join("admin.token");
    let meta = std::fs::metadata(&token_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    if as_nonroot {
        assert_eq!(meta.uid(), uid);
    }
    let root = std::fs::read_to_string(&token_file).unwrap();
    let admin_addr = on_loopback(&open["admin"]);
    let (st, _) = json_of(
        client()
            .get(format!("http://{admin_addr}/healthz"))
            .send()
            .unwrap(),
    );
    assert_eq!(st, 200);
    let (st, v) = json_of(
        client()
            .get(format!("http://{admin_addr}/readyz"))
            .send()
            .unwrap(),
    );
    assert_eq!(
        (st, &v["status"]),
        (200, &serde_json::json!("ready")),
        "{v}"
    );
    round_trip(&admin_addr, &on_loopback(&open["http"]), root.trim());
    // `docker exec <container> sluice token list --app farm --data-dir
    // /data`: the CLI finds the admin address and token in the volume.
    let out = Command::new(bin())
        .args(["token", "list", "--app", "farm", "--data-dir"])
        .arg(&data)
        .env_remove("SLUICE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `docker stop` sends SIGTERM: a clean drain.
    assert_eq!(terminate(child), Some(0));
    assert!(data.join("db").is_dir());
}

/// The unit's `[Service]` settings; repeated keys keep every value.
fn unit_settings(text: &str) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[') {
            section = s.trim_end_matches(']').to_string();
            continue;
        }
        if section == "Service" {
            let (k, v) = line.split_once('=').unwrap();
            out.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    out
}

#[test]
fn systemd_unit_is_sandboxed_and_its_commands_work() {
    let text = std::fs::read_to_string(repo("deploy/sluice.service")).unwrap();
    let unit = unit_settings(&text);
    let one = |k: &str| -> &str {
        unit.get(k)
            .and_then(|v| v.last())
            .unwrap_or_else(|| panic!("{k} is not set"))
    };
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("StateDirectory", "sluice"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    // Stopping waits longer than the drain the broker is allowed.
    let defaults = sluice::Config::default();
    let stop = humantime::parse_duration(one("TimeoutStopSec")).unwrap();
    assert!(stop > defaults.shutdown.grace, "{stop:?}");
    let files: u64 = one("LimitNOFILE").parse().unwrap();
    let connections = defaults.mqtt.max_connections
        + defaults.http.max_connections
        + defaults.admin.max_connections;
    assert!(
        files > connections as u64,
        "LimitNOFILE {files} < {connections}"
    );
    let env: Vec<(&str, &str)> = unit["Environment"]
        .iter()
        .map(|e| e.split_once('=').unwrap())
        .collect();
    assert!(env.contains(&("SLUICE_STORAGE__DATA_DIR", "/var/lib/sluice")));
    let exec: Vec<&str> = one("ExecStart").split(' ').collect();
    assert_eq!(
        exec[..4],
        [
            "/usr/local/bin/sluice",
            "serve",
            "--config",
            "/etc/sluice/sluice.toml"
        ]
    );

    // systemd's own check, on a copy whose ExecStart names this build.
    let tmp = tempfile::tempdir().unwrap();
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok()
    {
        let copy = tmp.path().join("sluice.service");
        std::fs::write(&copy, text.replace("/usr/local/bin/sluice", bin())).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(!err.contains("sluice.service"), "{err}");
        // systemd's exposure score (0 to 100; it prints a tenth): at most
        // 20 is in its "OK" band.
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=20"])
            .arg(&copy)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        let exposure = report
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_default();
        eprintln!("{}", exposure.trim());
        assert!(out.status.success(), "{report}");
    } else {
        eprintln!("systemd-analyze is not installed: unit not verified by systemd");
    }

    // ExecStart as written, with the installed config (config/sluice.toml)
    // and the unit's environment, the state directory at a temp dir and
    // the ports moved to free ones. ExecReload's signal reloads; stop
    // drains.
    let data = tmp.path().join("state");
    let log = tmp.path().join("stderr.log");
    let mut cmd = Command::new(bin());
    cmd.args(&exec[1..3])
        .arg(repo("config/sluice.toml"))
        .args(&exec[4..]);
    for (k, v) in &env {
        cmd.env(k, v.replace("/var/lib/sluice", data.to_str().unwrap()));
    }
    let (mqtt, http, admin) = three_free_ports();
    let mut child = cmd
        .env_remove("RUST_LOG")
        .env_remove("SLUICE_ADMIN_TOKEN")
        .env("SLUICE_MQTT__LISTEN", format!("127.0.0.1:{mqtt}"))
        .env("SLUICE_HTTP__LISTEN", format!("127.0.0.1:{http}"))
        .env("SLUICE_ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let open = listening(&mut child, &data, &log);
    let root = std::fs::read_to_string(data.join("admin.token")).unwrap();
    round_trip(&open["admin"], &open["http"], root.trim());
    unsafe_kill(child.id(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("log level set")
    {
        assert!(Instant::now() < deadline, "reload not logged");
        assert!(
            child.try_wait().unwrap().is_none(),
            "SIGHUP ended the process"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    assert_eq!(terminate(child), Some(0));
    assert!(started.elapsed() < stop);
}
