//! Devices and their credentials: provisioned through Sluice's admin API
//! (with the broker crate's own client, `sluice::client`) as a user would,
//! read from a tokens file, one shared token, or none.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use sluice::client::AdminClient;

/// Who holds a token when loadtest provisions them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUnit {
    /// MQTT authenticates once per connection: one token scoped to the
    /// connection's devices (one device per connection: one per device).
    PerConnection,
    /// HTTP sends a token with every request: one token per device.
    PerDevice,
}

/// The devices of a run and the credential each connection / device uses.
#[derive(Debug)]
pub struct Fleet {
    /// Device id of device slot `conn * per_conn + d`.
    pub devices: Vec<Arc<str>>,
    /// Token per device slot (HTTP bearer), if any.
    pub device_tokens: Vec<Option<Arc<str>>>,
    /// Token per connection (MQTT password), if any.
    pub conn_tokens: Vec<Option<Arc<str>>>,
    pub per_conn: u32,
    /// How the credentials were obtained, for the summary.
    pub source: String,
}

impl Fleet {
    pub fn device_of(&self, conn: u32, d: u32) -> &Arc<str> {
        &self.devices[(conn * self.per_conn + d) as usize]
    }

    /// Every distinct device id, in first-use order.
    pub fn distinct_devices(&self) -> Vec<Arc<str>> {
        let mut seen = std::collections::HashSet::new();
        self.devices
            .iter()
            .filter(|d| seen.insert(d.to_string()))
            .cloned()
            .collect()
    }
}

pub struct FleetSpec<'a> {
    pub app: &'a str,
    pub run: &'a str,
    pub connections: u32,
    pub per_conn: u32,
    pub device_prefix: &'a str,
    pub token: Option<&'a str>,
    pub tokens_file: Option<&'a Path>,
    pub no_provision: bool,
    pub admin: Option<&'a AdminClient>,
    pub unit: TokenUnit,
    pub concurrency: usize,
}

pub async fn build(spec: FleetSpec<'_>) -> Result<Fleet> {
    let conns = spec.connections as usize;
    let slots = conns * spec.per_conn as usize;
    let mut fleet = Fleet {
        devices: Vec::with_capacity(slots),
        device_tokens: vec![None; slots],
        conn_tokens: vec![None; conns],
        per_conn: spec.per_conn,
        source: String::new(),
    };
    if let Some(path) = spec.tokens_file {
        let pairs = read_tokens_file(path)?;
        for k in 0..slots {
            let (dev, tok) = &pairs[k % pairs.len()];
            fleet.devices.push(dev.clone());
            fleet.device_tokens[k] = Some(tok.clone());
        }
        for c in 0..conns {
            fleet.conn_tokens[c] = fleet.device_tokens[c * spec.per_conn as usize].clone();
        }
        fleet.source = format!("{} device tokens from {}", pairs.len(), path.display());
        return Ok(fleet);
    }
    for k in 0..slots {
        fleet
            .devices
            .push(format!("{}{}", spec.device_prefix, k).into());
    }
    if let Some(tok) = spec.token {
        let tok: Arc<str> = tok.into();
        fleet.device_tokens.fill(Some(tok.clone()));
        fleet.conn_tokens.fill(Some(tok));
        fleet.source = "one shared token (--token)".into();
        return Ok(fleet);
    }
    if spec.no_provision {
        fleet.source = "no credentials (--no-provision)".into();
        return Ok(fleet);
    }
    let Some(admin) = spec.admin else {
        bail!(
            "no credentials: give --admin URL (with SLUICE_ADMIN_TOKEN or --admin-token) to \
             provision device tokens, or --token, --tokens-file, or --no-provision"
        );
    };
    let started = Instant::now();
    let per_conn = spec.per_conn as usize;
    let units = match spec.unit {
        TokenUnit::PerConnection => conns,
        TokenUnit::PerDevice => slots,
    };
    let groups: Arc<Vec<Vec<String>>> = Arc::new(
        (0..units)
            .map(|u| match spec.unit {
                TokenUnit::PerConnection => fleet.devices[u * per_conn..(u + 1) * per_conn]
                    .iter()
                    .map(|d| d.to_string())
                    .collect(),
                TokenUnit::PerDevice => vec![fleet.devices[u].to_string()],
            })
            .collect(),
    );
    let admin = Arc::new(admin.clone());
    let app: Arc<str> = spec.app.into();
    let run: Arc<str> = spec.run.into();
    let tokens = parallel(spec.concurrency, units, {
        let groups = groups.clone();
        move |u| {
            let (admin, app, run, groups) =
                (admin.clone(), app.clone(), run.clone(), groups.clone());
            async move {
                let name = format!("loadtest-{run}-{}", groups[u][0]);
                device_token(&admin, &app, &name, &groups[u]).await
            }
        }
    })
    .await
    .context("provisioning device tokens through the admin API")?;
    for (u, tok) in tokens.into_iter().enumerate() {
        let tok: Arc<str> = tok.into();
        match spec.unit {
            TokenUnit::PerConnection => {
                fleet.conn_tokens[u] = Some(tok.clone());
                for d in 0..per_conn {
                    fleet.device_tokens[u * per_conn + d] = Some(tok.clone());
                }
            }
            TokenUnit::PerDevice => {
                fleet.device_tokens[u] = Some(tok);
            }
        }
    }
    if spec.unit == TokenUnit::PerDevice {
        for c in 0..conns {
            fleet.conn_tokens[c] = fleet.device_tokens[c * per_conn].clone();
        }
    }
    fleet.source = format!(
        "provisioned {units} device-scoped tokens in app {} in {:.2} s",
        spec.app,
        started.elapsed().as_secs_f64()
    );
    Ok(fleet)
}

fn read_tokens_file(path: &Path) -> Result<Vec<(Arc<str>, Arc<str>)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(d), Some(t), None) => pairs.push((d.into(), t.into())),
            _ => bail!(
                "{}:{}: expected `DEVICE TOKEN`, found {line:?}",
                path.display(),
                n + 1
            ),
        }
    }
    if pairs.is_empty() {
        bail!("{}: no `DEVICE TOKEN` lines", path.display());
    }
    Ok(pairs)
}

/// Runs `f(0..count)` on `n` workers; the results in index order, or the
/// first error (the others stop taking work).
pub async fn parallel<T, F, Fut>(n: usize, count: usize, f: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let abort = Arc::new(AtomicBool::new(false));
    let results: Arc<Mutex<Vec<Option<T>>>> =
        Arc::new(Mutex::new((0..count).map(|_| None).collect()));
    let f = Arc::new(f);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n.clamp(1, count.max(1)) {
        let (next, abort, results, f) = (next.clone(), abort.clone(), results.clone(), f.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || abort.load(Ordering::Relaxed) {
                    return Ok(());
                }
                match f(i).await {
                    Ok(v) => results.lock().unwrap()[i] = Some(v),
                    Err(e) => {
                        abort.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
        });
    }
    let mut first_err = None;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(anyhow!("worker failed: {e}"));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    let results = std::mem::take(&mut *results.lock().unwrap());
    Ok(results
        .into_iter()
        .map(|r| r.expect("every index done"))
        .collect())
}

/// Creates a token of scope `device.sendState` for `devices`; returns its
/// secret.
async fn device_token(
    admin: &AdminClient,
    app: &str,
    name: &str,
    devices: &[String],
) -> Result<String> {
    let body = json!({"name": name, "scope": ["device.sendState"], "devices": devices});
    let created = admin.create_token(app, &body).await?;
    created
        .get("token")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no \"token\" in the admin API's answer {created}"))
}

/// Creates a token of scope `device.getState` for every device of `app`
/// (for stream consumers); returns its secret.
pub async fn reader_token(admin: &AdminClient, app: &str, name: &str) -> Result<String> {
    let body = json!({"name": name, "scope": ["device.getState"], "devices": ["*"]});
    let created = admin.create_token(app, &body).await?;
    created
        .get("token")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no \"token\" in the admin API's answer {created}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_file_cycles_and_shared_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# comment\n\ndev-a tok-a\ndev-b  tok-b\n").unwrap();
        let spec = |file: Option<&'static Path>| FleetSpec {
            app: "app",
            run: "r",
            connections: 3,
            per_conn: 1,
            device_prefix: "lt-",
            token: None,
            tokens_file: file,
            no_provision: false,
            admin: None,
            unit: TokenUnit::PerConnection,
            concurrency: 1,
        };
        let leaked: &'static Path = Box::leak(path.clone().into_boxed_path());
        let f = build(spec(Some(leaked))).await.unwrap();
        let devs: Vec<&str> = f.devices.iter().map(|d| &**d).collect();
        assert_eq!(devs, ["dev-a", "dev-b", "dev-a"]);
        assert_eq!(f.conn_tokens[1].as_deref(), Some("tok-b"));
        assert_eq!(f.distinct_devices().len(), 2);

        let mut s = spec(None);
        s.token = Some("shared");
        s.per_conn = 2;
        let f = build(s).await.unwrap();
        assert_eq!(&*f.devices[5], "lt-5");
        assert_eq!(&**f.device_of(2, 1), "lt-5");
        assert!(f
            .device_tokens
            .iter()
            .all(|t| t.as_deref() == Some("shared")));

        let err = build(spec(None)).await.unwrap_err().to_string();
        assert!(err.contains("--no-provision"), "{err}");

        std::fs::write(&path, "dev-a\n").unwrap();
        assert!(build(spec(Some(leaked))).await.is_err());
    }
}
