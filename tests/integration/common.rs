//! Starts the real `sluice` binary on port 0 with a temp data dir and talks
//! to it over loopback with real clients.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ADMIN: &str = "test-admin-token-0123456789abcdefghijkl";

pub struct Server {
    pub child: Option<Child>,
    pub dir: PathBuf,
    /// Device HTTP (or HTTPS) address; empty when that listener is off.
    pub http: String,
    pub admin: String,
    /// Plain MQTT address; empty when that listener is off.
    pub mqtt: String,
    /// MQTT over TLS, when the server was started with a certificate.
    pub mqtts: Option<String>,
    _tmp: Option<tempfile::TempDir>,
    pub stderr_path: PathBuf,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

impl Server {
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    pub fn start_with(env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut s = Self::start_in(&dir, env);
        s._tmp = Some(tmp);
        s
    }

    /// Starts on an existing data dir (for restart tests); the caller keeps
    /// the directory alive.
    pub fn start_in(dir: &Path, env: &[(&str, &str)]) -> Server {
        Self::start_args(dir, &[], env)
    }

    /// As `start_in`, with extra arguments to `sluice serve` (e.g.
    /// `--config FILE`).
    pub fn start_args(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let stderr_path = dir.join(format!(
            "stderr-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--mqtt-listen", "127.0.0.1:0"])
            .args(["--mqtts-listen", "127.0.0.1:0"])
            .args(args)
            .env("SLUICE_ADMIN_TOKEN", ADMIN)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn sluice");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let deadline = Instant::now() + Duration::from_secs(60);
        // The server writes <dir>/listening (atomically) before it prints
        // the same lines, so after the first printed line the file says
        // everything that is open, whichever listeners are off.
        loop {
            assert!(Instant::now() < deadline, "server did not start");
            match lines.next() {
                Some(Ok(l)) if l.starts_with("listening ") => break,
                Some(Ok(_)) => {}
                _ => panic!(
                    "server exited before listening: {}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                ),
            }
        }
        let listening = std::fs::read_to_string(dir.join("listening")).unwrap();
        let open = |kinds: &[&str]| {
            listening.lines().find_map(|l| {
                let parts: Vec<&str> = l.split(' ').collect();
                (parts.len() == 3 && parts[0] == "listening" && kinds.contains(&parts[1]))
                    .then(|| parts[2].to_string())
            })
        };
        let (http, admin, mqtt, mqtts) = (
            open(&["http", "https"]),
            open(&["admin"]),
            open(&["mqtt"]),
            open(&["mqtts"]),
        );
        Server {
            child: Some(child),
            dir: dir.to_path_buf(),
            http: http.unwrap_or_default(),
            admin: admin.expect("listening admin"),
            mqtt: mqtt.unwrap_or_default(),
            mqtts,
            _tmp: None,
            stderr_path,
        }
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        unsafe_kill(self.child.as_ref()?.id(), "TERM");
        self.wait_exit()
    }

    /// Waits for the process to exit (after a signal sent elsewhere).
    pub fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            assert!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's log so far, for assertion messages.
    #[allow(dead_code)]
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `k` distinct free loopback ports. All listeners are held until every
/// port is chosen: binding and dropping one at a time can hand out the
/// same port twice, and a server given one port twice fails to start (or a
/// test expecting one of them refused finds the other listener there).
pub fn free_ports(k: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..k)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Three distinct free ports, for a broker's three listeners.
pub fn three_free_ports() -> (u16, u16, u16) {
    let p = free_ports(3);
    (p[0], p[1], p[2])
}

pub fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Response status and parsed JSON body (Null when empty).
pub fn json_of(r: reqwest::blocking::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    (status, v)
}

/// The Prometheus text of the admin listener's `/metrics`.
pub fn metrics_text(s: &Server) -> String {
    client()
        .get(s.admin_url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap()
}

/// The value of the sample `name` (with its labels, if any, as written,
/// e.g. `sluice_x_total{a="b"}`) on the admin listener's `/metrics`;
/// `None` if there is no such sample. Matches whole sample lines only, so
/// a `# HELP` text or a longer name never passes for the sample.
pub fn metric(s: &Server, name: &str) -> Option<f64> {
    metrics_text(s).lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}

pub fn post_state(s: &Server, token: &str, app: &str, device: &str, body: &str) -> (u16, Value) {
    json_of(
        client()
            .post(s.http_url(&format!("/applications/{app}/devices/{device}/state")))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap(),
    )
}

pub fn create_token(s: &Server, caller: &str, app: &str, body: Value) -> (u16, Value) {
    json_of(
        client()
            .post(s.admin_url(&format!("/applications/{app}/tokens")))
            .bearer_auth(caller)
            .json(&body)
            .send()
            .unwrap(),
    )
}

/// Creates a token and returns (id, secret), panicking unless 201.
pub fn mint(s: &Server, caller: &str, app: &str, body: Value) -> (String, String) {
    let (st, v) = create_token(s, caller, app, body);
    assert_eq!(st, 201, "{v}");
    (
        v["id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

pub fn get_admin(s: &Server, token: &str, path: &str) -> (u16, Value) {
    json_of(
        client()
            .get(s.admin_url(path))
            .bearer_auth(token)
            .send()
            .unwrap(),
    )
}

pub fn patch_token(s: &Server, token: &str, app: &str, id: &str, body: Value) -> (u16, Value) {
    json_of(
        client()
            .patch(s.admin_url(&format!("/applications/{app}/tokens/{id}")))
            .bearer_auth(token)
            .json(&body)
            .send()
            .unwrap(),
    )
}

pub fn delete_token(s: &Server, token: &str, app: &str, id: &str) -> u16 {
    client()
        .delete(s.admin_url(&format!("/applications/{app}/tokens/{id}")))
        .bearer_auth(token)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

/// Every page of a device's history, oldest first, following `next`, as
/// the raw response texts.
fn history_pages(s: &Server, token: &str, app: &str, device: &str) -> Vec<String> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/applications/{app}/devices/{device}/state?order=asc&limit=10000");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let r = client()
            .get(s.admin_url(&path))
            .bearer_auth(token)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let text = r.text().unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        cursor = v["next"].as_str().map(String::from);
        pages.push(text);
        if cursor.is_none() {
            return pages;
        }
    }
}

/// All history items of a device, oldest first.
pub fn history_all(s: &Server, token: &str, app: &str, device: &str) -> Vec<Value> {
    history_pages(s, token, app, device)
        .iter()
        .flat_map(|text| {
            let v: Value = serde_json::from_str(text).unwrap();
            v["items"].as_array().unwrap().clone()
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct RawPage {
    items: Vec<RawItem>,
}

#[derive(serde::Deserialize)]
struct RawItem {
    data: Box<serde_json::value::RawValue>,
}

/// The exact `data` text of every history item, oldest first.
pub fn history_raw_data(s: &Server, token: &str, app: &str, device: &str) -> Vec<String> {
    history_pages(s, token, app, device)
        .iter()
        .flat_map(|text| {
            let page: RawPage = serde_json::from_str(text).unwrap();
            page.items.into_iter().map(|i| i.data.get().to_string())
        })
        .collect()
}
