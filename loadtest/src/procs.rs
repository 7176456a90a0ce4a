//! `loadtest mqtt --procs N`: one run split over N child processes.
//!
//! One client process cannot always keep its own schedule: at tens of
//! thousands of paced messages per second on a small machine its send lag
//! p99 reached several milliseconds, more than the server's latency it was
//! meant to measure. With `--procs N` the process (the parent) resolves
//! the credentials once, then runs its own binary N times with the same
//! arguments plus `--share i/N`, and child i runs the connections c with
//! c mod N = i. Connections keep their global numbers, so client ids,
//! message bodies (which `--verify` recomputes), devices, tokens and every
//! message's scheduled time are exactly those of a single-process run: the
//! children follow one common schedule, each with its share of the rate.
//!
//! Parent and child talk in JSON lines over the child's stdin and stdout
//! (its stderr stays the parent's, so its errors are seen):
//!
//! 1. parent → child: [`ToChild::Plan`], the run id and the credentials;
//! 2. child → parent: [`ToParent::Ready`] once its connections are open;
//! 3. parent → every child: [`ToChild::Start`], the common start time on
//!    the monotonic clock, which every process of the machine reads alike;
//! 4. child → parent: [`ToParent::Done`] with its counters, histograms (HDR
//!    V2, see `stats`), connection outcomes and CPU time, which the parent
//!    merges into one report.
//!
//! [`ToChild::Stop`] (the parent's Ctrl-C) ends the children's schedules
//! early; a child whose parent is gone (stdin closed) stops as well.

use std::io::{BufRead, Write};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use crate::fleet::Fleet;
use crate::run::ConnOutcome;
use crate::stats::StatsWire;

/// Which connections one process of a `--procs` run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub index: u32,
    pub count: u32,
}

impl Share {
    /// Whether connection `conn` is this share's. Taking every count-th
    /// connection, rather than a block, interleaves the processes' sends
    /// in time, so each of them sends evenly instead of in bursts.
    pub fn owns(&self, conn: u32) -> bool {
        conn % self.count == self.index
    }
}

impl std::fmt::Display for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Parses `I/N` (`0 <= I < N`).
pub fn parse_share(s: &str) -> Result<Share, String> {
    let bad = || format!("expected I/N with 0 <= I < N, found {s:?}");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let index: u32 = i.trim().parse().map_err(|_| bad())?;
    let count: u32 = n.trim().parse().map_err(|_| bad())?;
    if index >= count {
        return Err(bad());
    }
    Ok(Share { index, count })
}

/// A [`Fleet`] as it crosses the pipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetWire {
    pub devices: Vec<String>,
    pub device_tokens: Vec<Option<String>>,
    pub conn_tokens: Vec<Option<String>>,
    pub per_conn: u32,
    pub source: String,
}

impl From<&Fleet> for FleetWire {
    fn from(f: &Fleet) -> FleetWire {
        let text =
            |v: &[Option<Arc<str>>]| v.iter().map(|t| t.as_deref().map(str::to_string)).collect();
        FleetWire {
            devices: f.devices.iter().map(|d| d.to_string()).collect(),
            device_tokens: text(&f.device_tokens),
            conn_tokens: text(&f.conn_tokens),
            per_conn: f.per_conn,
            source: f.source.clone(),
        }
    }
}

impl From<FleetWire> for Fleet {
    fn from(w: FleetWire) -> Fleet {
        let shared = |v: Vec<Option<String>>| v.into_iter().map(|t| t.map(Arc::from)).collect();
        Fleet {
            devices: w.devices.into_iter().map(Arc::from).collect(),
            device_tokens: shared(w.device_tokens),
            conn_tokens: shared(w.conn_tokens),
            per_conn: w.per_conn,
            source: w.source,
        }
    }
}

/// What a child needs from its parent before it connects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChildPlan {
    /// The run id: client ids and message bodies are built from it.
    pub run: String,
    pub fleet: FleetWire,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToChild {
    Plan(Box<ChildPlan>),
    /// Start the timed phase at this CLOCK_MONOTONIC time (ns).
    Start {
        at_ns: u64,
    },
    Stop,
}

/// A child's whole contribution to the report.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChildReport {
    pub stats: StatsWire,
    pub outcomes: Vec<ConnOutcome>,
    /// User and system CPU seconds the child used in its timed phase.
    pub cpu: Option<(f64, f64)>,
    /// When its last connection finished (CLOCK_MONOTONIC, ns).
    pub end_ns: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ToParent {
    Ready { connect_secs: f64 },
    Done(Box<ChildReport>),
}

fn clock_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// `t` as CLOCK_MONOTONIC nanoseconds. On Linux `Instant` is that clock
/// but does not expose its value, so the offset comes from two readings
/// taken back to back (they differ by well under a microsecond).
pub fn mono_ns(t: Instant) -> u64 {
    let (now, ns) = (Instant::now(), clock_ns());
    if t >= now {
        ns.saturating_add(u64::try_from((t - now).as_nanos()).unwrap_or(u64::MAX))
    } else {
        ns.saturating_sub(u64::try_from((now - t).as_nanos()).unwrap_or(u64::MAX))
    }
}

/// The `Instant` of CLOCK_MONOTONIC time `ns` (the inverse of
/// [`mono_ns`]).
pub fn instant_at(ns: u64) -> Instant {
    let (now, now_ns) = (Instant::now(), clock_ns());
    if ns >= now_ns {
        now + Duration::from_nanos(ns - now_ns)
    } else {
        now.checked_sub(Duration::from_nanos(now_ns - ns))
            .unwrap_or(now)
    }
}

/// Pins the calling thread to `cpu`. Called before the runtime starts,
/// while the process has no other thread, so every thread it starts later
/// inherits the mask (and tokio, which sizes its pool by the CPUs the
/// process may use, starts one worker).
pub fn pin_to(cpu: usize) -> Result<()> {
    if cpu >= rustix::thread::CpuSet::MAX_CPU {
        bail!("--pin-cpus: no CPU {cpu}");
    }
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set)
        .with_context(|| format!("pinning to CPU {cpu} (--pin-cpus)"))
}

fn line<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    let mut v = serde_json::to_vec(msg)?;
    v.push(b'\n');
    Ok(v)
}

/// A child's end of the conversation.
pub struct ParentLink {
    rx: mpsc::UnboundedReceiver<Result<ToChild, String>>,
}

impl ParentLink {
    /// Starts reading the parent's messages from stdin. A plain thread
    /// reads them: tokio's stdin would block in a read that the runtime's
    /// shutdown waits for, until the parent closed the pipe.
    pub fn open() -> ParentLink {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for l in std::io::stdin().lock().lines() {
                let msg = match l {
                    Ok(l) => serde_json::from_str(&l)
                        .map_err(|e| format!("a bad message from the parent: {e}")),
                    Err(e) => Err(format!("reading from the parent: {e}")),
                };
                let failed = msg.is_err();
                if tx.send(msg).is_err() || failed {
                    return;
                }
            }
            let _ = tx.send(Err("the parent closed the pipe".into()));
        });
        ParentLink { rx }
    }

    async fn recv(&mut self) -> Result<ToChild> {
        match self.rx.recv().await {
            Some(Ok(m)) => Ok(m),
            Some(Err(e)) => Err(anyhow!(e)),
            None => bail!("the parent closed the pipe"),
        }
    }

    /// Waits for the run id and credentials.
    pub async fn plan(&mut self) -> Result<ChildPlan> {
        match self.recv().await? {
            ToChild::Plan(p) => Ok(*p),
            other => bail!("expected the plan from the parent, got {other:?}"),
        }
    }

    /// Tells the parent this child's connections are open and waits for
    /// the common start time. A stop that comes first is kept in `stop`.
    pub async fn ready(&mut self, connect_secs: f64, stop: &AtomicBool) -> Result<Instant> {
        send(&ToParent::Ready { connect_secs })?;
        loop {
            match self.recv().await? {
                ToChild::Start { at_ns } => return Ok(instant_at(at_ns)),
                ToChild::Stop => stop.store(true, Ordering::Relaxed),
                ToChild::Plan(_) => bail!("a second plan from the parent"),
            }
        }
    }

    /// From now on sets `stop` when the parent says so or goes away.
    pub fn watch(mut self, stop: Arc<AtomicBool>) {
        tokio::spawn(async move {
            while let Ok(m) = self.recv().await {
                if matches!(m, ToChild::Stop) {
                    break;
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
}

/// Sends a child's report to its parent.
pub fn report(r: ChildReport) -> Result<()> {
    send(&ToParent::Done(Box::new(r)))
}

fn send(msg: &ToParent) -> Result<()> {
    let bytes = line(msg)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&bytes)
        .and_then(|()| out.flush())
        .context("writing to the parent")
}

enum Event {
    Msg(ToParent),
    Bad(String),
    Closed,
}

/// The parent's end: its children and their messages.
pub struct Children {
    procs: Vec<Child>,
    stdins: Vec<ChildStdin>,
    rx: mpsc::UnboundedReceiver<(usize, Event)>,
    done: Vec<bool>,
}

impl Children {
    /// Runs `count` children of this binary with this process's arguments
    /// plus `--share i/count`, and sends each the plan.
    pub async fn spawn(count: u32, plan: ChildPlan) -> Result<Children> {
        let exe = std::env::current_exe().context("finding this program to run it again")?;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let plan = line(&ToChild::Plan(Box::new(plan)))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut procs = Vec::with_capacity(count as usize);
        let mut stdins = Vec::with_capacity(count as usize);
        for i in 0..count {
            let mut child = tokio::process::Command::new(&exe)
                .args(&args)
                .arg("--share")
                .arg(Share { index: i, count }.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                // Should the parent fail, its children go with it.
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting child process {i} ({})", exe.display()))?;
            let stdin = child.stdin.take().expect("piped");
            let stdout = child.stdout.take().expect("piped");
            let tx = tx.clone();
            let k = i as usize;
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                loop {
                    let ev = match lines.next_line().await {
                        Ok(Some(l)) => match serde_json::from_str(&l) {
                            Ok(m) => Event::Msg(m),
                            Err(e) => Event::Bad(format!("a bad message: {e}")),
                        },
                        Ok(None) => Event::Closed,
                        Err(e) => Event::Bad(format!("reading its output: {e}")),
                    };
                    let last = !matches!(ev, Event::Msg(_));
                    if tx.send((k, ev)).is_err() || last {
                        return;
                    }
                }
            });
            procs.push(child);
            stdins.push(stdin);
        }
        let mut kids = Children {
            procs,
            stdins,
            rx,
            done: vec![false; count as usize],
        };
        for k in 0..kids.stdins.len() {
            kids.write(k, &plan).await?;
        }
        Ok(kids)
    }

    async fn write(&mut self, k: usize, bytes: &[u8]) -> Result<()> {
        let r = self.stdins[k].write_all(bytes).await;
        match r {
            Ok(()) => self.stdins[k].flush().await.map_err(Into::into),
            Err(e) => Err(self.failed(k, &format!("writing to it: {e}")).await),
        }
    }

    /// The error for child `k`, with how it ended.
    async fn failed(&mut self, k: usize, what: &str) -> anyhow::Error {
        let status = tokio::time::timeout(Duration::from_secs(5), self.procs[k].wait())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|s| format!(" ({s})"))
            .unwrap_or_default();
        anyhow!("child process {k}: {what}{status}")
    }

    async fn event(&mut self) -> Result<(usize, ToParent)> {
        loop {
            let Some((k, ev)) = self.rx.recv().await else {
                bail!("lost every child process");
            };
            match ev {
                Event::Msg(m) => return Ok((k, m)),
                Event::Closed if self.done[k] => continue,
                Event::Closed => return Err(self.failed(k, "exited before its report").await),
                Event::Bad(e) => return Err(self.failed(k, &e).await),
            }
        }
    }

    /// Waits until every child has its connections open; returns the
    /// longest connect phase (they ran at the same time).
    pub async fn ready(&mut self) -> Result<f64> {
        let mut ready = vec![false; self.procs.len()];
        let mut secs = 0.0f64;
        while ready.iter().any(|r| !r) {
            match self.event().await? {
                (k, ToParent::Ready { connect_secs }) if !ready[k] => {
                    ready[k] = true;
                    secs = secs.max(connect_secs);
                }
                (k, _) => return Err(self.failed(k, "spoke out of turn").await),
            }
        }
        Ok(secs)
    }

    /// Gives every child the common start time.
    pub async fn start(&mut self, at: Instant) -> Result<()> {
        let msg = line(&ToChild::Start { at_ns: mono_ns(at) })?;
        for k in 0..self.stdins.len() {
            self.write(k, &msg).await?;
        }
        Ok(())
    }

    /// Asks every child to end its schedule and drain.
    pub async fn stop(&mut self) {
        if let Ok(msg) = line(&ToChild::Stop) {
            for s in &mut self.stdins {
                let _ = s.write_all(&msg).await;
                let _ = s.flush().await;
            }
        }
    }

    /// The next child's report; `None` once every child has reported and
    /// exited. Cancel-safe (the state changes between awaits only).
    pub async fn next_report(&mut self) -> Result<Option<ChildReport>> {
        if self.done.iter().all(|d| *d) {
            for k in 0..self.procs.len() {
                let status = self.procs[k].wait().await?;
                if !status.success() {
                    bail!("child process {k} exited with {status} after its report");
                }
            }
            return Ok(None);
        }
        match self.event().await? {
            (k, ToParent::Done(r)) if !self.done[k] => {
                self.done[k] = true;
                Ok(Some(*r))
            }
            (k, _) => Err(self.failed(k, "spoke out of turn").await),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse_and_split_every_connection_once() {
        assert_eq!(parse_share("1/3"), Ok(Share { index: 1, count: 3 }));
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2"] {
            assert!(parse_share(bad).is_err(), "{bad}");
        }
        let shares: Vec<Share> = (0..3).map(|index| Share { index, count: 3 }).collect();
        for conn in 0..100 {
            assert_eq!(shares.iter().filter(|s| s.owns(conn)).count(), 1);
        }
        assert_eq!(shares[2].to_string(), "2/3");
    }

    #[test]
    fn monotonic_times_round_trip() {
        // The conversion is exact up to the time between two clock
        // readings; the bound only catches a wrong sign or unit.
        let now = Instant::now();
        for t in [now + Duration::from_secs(10), now] {
            let back = instant_at(mono_ns(t));
            let diff = if back > t { back - t } else { t - back };
            assert!(diff < Duration::from_secs(1), "{diff:?}");
        }
    }

    #[test]
    fn fleet_crosses_the_pipe_unchanged() {
        let f = Fleet {
            devices: vec!["a".into(), "b".into()],
            device_tokens: vec![Some("t".into()), None],
            conn_tokens: vec![Some("t".into())],
            per_conn: 2,
            source: "src".into(),
        };
        let w: FleetWire =
            serde_json::from_slice(&serde_json::to_vec(&FleetWire::from(&f)).unwrap()).unwrap();
        let g = Fleet::from(w);
        assert_eq!(g.devices, f.devices);
        assert_eq!(g.device_tokens, f.device_tokens);
        assert_eq!(g.conn_tokens, f.conn_tokens);
        assert_eq!((g.per_conn, g.source), (2, "src".to_string()));
    }
}
