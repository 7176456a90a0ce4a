//! Starts the real `sluice` binary on port 0 with a temp data dir and runs
//! the real `loadtest` binary against it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ADMIN: &str = "loadtest-admin-token-0123456789abcdefghij";

/// `sluice` sits next to the test executable's directory:
/// `target/debug/deps/e2e-HASH` → `target/debug/sluice`.
pub fn sluice_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = dir.join(format!("sluice{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "the sluice binary is missing at {}: run `cargo build -p sluice` first \
         (`cargo test --workspace` builds it), or set SLUICE_BIN",
        bin.display()
    );
    bin
}

/// Mints a `device.sendState` token for every device of `app` through the
/// admin API (`admin` is the `http://` base URL); returns the secret. The
/// root token itself is refused on the device listeners.
pub fn mint_device_token(admin: &str, app: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let v: Value = reqwest::Client::new()
            .post(format!("{admin}/applications/{app}/tokens"))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({"name": "shared", "scope": ["device.sendState"]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["token"].as_str().expect("minted token").to_string()
    })
}

pub fn loadtest_bin() -> &'static str {
    env!("CARGO_BIN_EXE_loadtest")
}

pub struct Server {
    child: Option<Child>,
    pub mqtt: String,
    pub http: String,
    pub admin: String,
    pub dir: tempfile::TempDir,
}

impl Server {
    pub fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let mut child = Command::new(sluice_bin())
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--mqtt-listen", "127.0.0.1:0"])
            .env("SLUICE_ADMIN_TOKEN", ADMIN)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn sluice");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut mqtt, mut http, mut admin) = (None, None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        while mqtt.is_none() || http.is_none() || admin.is_none() {
            assert!(Instant::now() < deadline, "sluice did not start");
            let Some(Ok(line)) = lines.next() else {
                panic!(
                    "sluice exited before listening: {}",
                    std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default()
                );
            };
            let parts: Vec<&str> = line.split(' ').collect();
            if let ["listening", kind, addr] = parts[..] {
                let addr = Some(addr.to_string());
                match kind {
                    "mqtt" => mqtt = addr,
                    "http" => http = addr,
                    "admin" => admin = addr,
                    _ => {}
                }
            }
        }
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child: Some(child),
            mqtt: mqtt.unwrap(),
            http: format!("http://{}", http.unwrap()),
            admin: format!("http://{}", admin.unwrap()),
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub json: Value,
}

/// Runs loadtest with `args` plus `--json`, with the admin token in the
/// environment; panics if it takes longer than `limit`.
pub fn loadtest(args: &[&str], limit: Duration) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let child = Command::new(loadtest_bin())
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("SLUICE_ADMIN_TOKEN", ADMIN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn loadtest");
    let out = wait_with_limit(child, limit);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = match std::fs::read_to_string(&json) {
        Ok(t) => serde_json::from_str(&t).expect("valid JSON summary"),
        Err(_) => Value::Null,
    };
    Run {
        status: out.status,
        stdout,
        stderr,
        json,
    }
}

pub fn wait_with_limit(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for loadtest"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("loadtest did not finish within {limit:?}");
        }
    }
}

impl Run {
    pub fn show(&self) -> String {
        format!(
            "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    pub fn u(&self, pointer: &str) -> u64 {
        self.json
            .pointer(pointer)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no {pointer} in the JSON summary\n{}", self.show()))
    }
}
