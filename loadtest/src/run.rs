//! One run from options to exit status: credentials, connect phase, the
//! timed phase with progress, then verification, report and plot. With
//! `--procs` the connect and timed phases run in child processes (see
//! `procs`) and this process merges what they report.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper::header::HeaderValue;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use sluice::client::AdminClient;

use crate::cli::{Cli, Command, CommonArgs, MqttClientImpl, MqttVersion};
use crate::fleet::{self, Fleet, FleetSpec, TokenUnit};
use crate::http::{self, HttpConfig};
use crate::mqtt::{self, MqttConfig};
use crate::mqtt_rumqttc;
use crate::payload::Payload;
use crate::procs::{self, ChildPlan, ChildReport, Children, FleetWire, ParentLink};
use crate::ramp;
use crate::report::{self, Summary};
use crate::schedule::{self, ConnSchedule, Step};
use crate::stats::{Bits, Stats};
use crate::verify;

/// What every connection of a run shares.
#[derive(Debug)]
pub struct Shared {
    pub stats: Stats,
    pub payload: Payload,
    pub payload_size: usize,
    pub timeout: Duration,
    /// Set by Ctrl-C or the ramp controller: schedules end, connections drain.
    pub stop: Arc<AtomicBool>,
}

/// What one connection did, for verification.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ConnOutcome {
    pub conn: u32,
    /// Sequence numbers used: messages 0..seqs were sent or attempted.
    pub seqs: u64,
    /// Which of them were acknowledged.
    pub acked: Bits,
}

/// The protocol and one configuration per target address; connection i
/// uses configuration i mod N.
enum Driver {
    Mqtt(Vec<MqttConfig>, MqttClientImpl),
    Http(Vec<HttpConfig>),
}

/// The configuration of connection `conn`.
fn pick<T>(cfgs: &[T], conn: u32) -> &T {
    &cfgs[conn as usize % cfgs.len()]
}

enum Targets {
    Topics(Vec<Vec<u8>>),
    Http(Vec<http::Target>),
}

/// Everything `main` needs after the options are checked.
struct Plan {
    driver: Driver,
    protocol: &'static str,
    target: String,
    mode: String,
    /// Topic (MQTT) or path (HTTP) template.
    template: String,
    /// Client processes (`--procs`; always 1 for HTTP).
    procs: u32,
    common: CommonArgs,
}

pub fn main(cli: Cli) -> Result<ExitCode> {
    if let Command::Mqtt(m) = &cli.command {
        // The parent of a --procs run only waits for its children, so it
        // is left unpinned.
        if !m.pin_cpus.is_empty() && (m.share.is_some() || m.procs == 1) {
            let i = m.share.map_or(0, |s| s.index) as usize;
            procs::pin_to(m.pin_cpus[i % m.pin_cpus.len()])?;
        }
    }
    let threads = match cli.command {
        Command::Mqtt(ref m) => m.common.threads,
        Command::Http(ref h) => h.common.threads,
        Command::StreamProbe(args) => return crate::stream_probe::main(args),
        Command::Replay(_) => None,
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        rt.worker_threads(n as usize);
    }
    let rt = rt
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    if let Command::Replay(args) = cli.command {
        return rt.block_on(crate::fanout::replay(args));
    }
    rt.block_on(run(cli))
}

fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let x = nanos ^ (u64::from(std::process::id()) << 40);
    // A cheap mix so runs started close together still differ in every digit.
    let x = (x ^ (x >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    format!("{:08x}", (x ^ (x >> 29)) as u32)
}

fn plan(cli: Cli, run: &str) -> Result<Plan> {
    Ok(match cli.command {
        Command::Mqtt(m) => {
            if m.client == MqttClientImpl::Rumqttc && m.version == MqttVersion::V5 {
                bail!("--mqtt-client rumqttc supports --mqtt-version 3.1.1 only");
            }
            if m.procs > 1 && m.common.ramp.ramp {
                bail!("--procs does not go with --ramp: the ramp judges every step live, in one process");
            }
            if m.procs > m.common.connections {
                bail!(
                    "--procs {} is more than --connections {}: every process needs a connection",
                    m.procs,
                    m.common.connections
                );
            }
            let cfg = MqttConfig {
                addr: String::new(),
                v5: m.version == MqttVersion::V5,
                qos: m.qos,
                window: if m.qos == 1 { m.inflight } else { 1 },
                username: m.username.clone(),
                client_id_prefix: m
                    .client_id_prefix
                    .clone()
                    .unwrap_or_else(|| format!("loadtest-{run}-")),
                keep_alive: m.keep_alive,
                timeout: m.common.timeout,
                nodelay: !m.nagle,
            };
            let mode = format!(
                "MQTT {}, QoS {}{}, {} client{}",
                m.version,
                m.qos,
                if m.qos == 1 {
                    format!(", window {}", m.inflight)
                } else {
                    String::new()
                },
                match m.client {
                    MqttClientImpl::Native => "native",
                    MqttClientImpl::Rumqttc => "rumqttc",
                },
                if m.nagle { ", Nagle on" } else { "" }
            ) + &if m.procs > 1 {
                format!(
                    ", {} client processes{}",
                    m.procs,
                    if m.pin_cpus.is_empty() {
                        String::new()
                    } else {
                        let cpus: Vec<String> = m.pin_cpus.iter().map(|c| c.to_string()).collect();
                        format!(" pinned to CPUs {}", cpus.join(","))
                    }
                )
            } else {
                String::new()
            };
            let cfgs: Vec<MqttConfig> = m
                .addrs
                .iter()
                .map(|a| MqttConfig {
                    addr: mqtt::strip_scheme(a).to_string(),
                    ..cfg.clone()
                })
                .collect();
            Plan {
                target: cfgs
                    .iter()
                    .map(|c| c.addr.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                driver: Driver::Mqtt(cfgs, m.client),
                protocol: "mqtt",
                mode,
                template: m.topic,
                procs: m.procs,
                common: m.common,
            }
        }
        Command::Http(h) => {
            let streams = if h.h2 { h.streams } else { 1 };
            let mut cfgs = h
                .urls
                .iter()
                .map(|u| HttpConfig::from_url(u, h.common.timeout))
                .collect::<Result<Vec<_>>>()?;
            for cfg in &mut cfgs {
                cfg.h2 = h.h2;
                cfg.streams = streams;
            }
            let mode = if h.h2 {
                format!(
                    "HTTP/2 prior knowledge (h2c), {} stream{} per connection, 1 request in flight per stream",
                    streams,
                    if streams == 1 { "" } else { "s" }
                )
            } else {
                "HTTP/1.1 keep-alive, 1 request in flight per connection".into()
            };
            Plan {
                target: h.urls.join(","),
                driver: Driver::Http(cfgs),
                protocol: "http",
                mode,
                template: h.path,
                procs: 1,
                common: h.common,
            }
        }
        Command::StreamProbe(_) | Command::Replay(_) => bail!("this command runs no load plan"),
    })
}

fn fill(template: &str, app: &str, device: &str) -> String {
    template.replace("{app}", app).replace("{device}", device)
}

fn check_common(c: &CommonArgs) -> Result<()> {
    if !c.rate.is_finite() || c.rate < 0.0 {
        bail!("--rate must be 0 or a positive number");
    }
    if c.verify && c.admin.is_none() {
        bail!("--verify reads the data back through the admin API: give --admin URL");
    }
    if c.ramp.ramp {
        let r = &c.ramp;
        if !(r.ramp_start > 0.0 && r.ramp_step > 0.0 && r.ramp_max >= r.ramp_start) {
            bail!("--ramp needs --ramp-start > 0, --ramp-step > 0 and --ramp-max >= --ramp-start");
        }
        if r.ramp_step_duration.is_zero() {
            bail!("--ramp-step-duration must be positive");
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let share = match &cli.command {
        Command::Mqtt(m) => m.share,
        _ => None,
    };
    // A child of a --procs run takes the run id and the credentials from
    // its parent, so its connections are those of one common run.
    let is_child = share.is_some();
    let mut link = share.map(|_| ParentLink::open());
    let from_parent = match &mut link {
        Some(l) => Some(l.plan().await?),
        None => None,
    };
    let run = match &from_parent {
        Some(p) => p.run.clone(),
        None => run_id(),
    };
    let plan = plan(cli, &run)?;
    let c = plan.common.clone();
    check_common(&c)?;
    let children = (!is_child && plan.procs > 1).then_some(plan.procs);

    let needs_admin = !is_child
        && (c.verify
            || (c.token.is_none()
                && c.tokens_file.is_none()
                && !c.no_provision
                && c.admin.is_some()));
    let admin = match (&c.admin, &c.admin_token) {
        _ if is_child => None,
        (Some(url), Some(tok)) => Some(AdminClient::new(
            url,
            tok,
            c.timeout.max(Duration::from_secs(30)),
        )?),
        (Some(_), None) if needs_admin => {
            bail!("--admin needs the admin token: set SLUICE_ADMIN_TOKEN or --admin-token")
        }
        _ => None,
    };

    let payload = Payload::new(&run, c.payload_size);
    if c.payload_size < payload.min_size() && !is_child {
        eprintln!(
            "note: messages are at least their unpadded size (up to {} bytes), \
             more than --payload-size {}",
            payload.min_size(),
            c.payload_size
        );
    }
    let steps: Vec<Step> = if c.ramp.ramp {
        ramp::steps(&c.ramp)
    } else {
        vec![Step {
            rate: c.rate,
            start: Duration::ZERO,
            end: c.duration,
        }]
    };
    let total: Option<u64> = if c.ramp.ramp {
        None
    } else {
        match (c.messages, c.duration) {
            (None, None) => Some(10_000),
            (m, _) => m,
        }
    };

    if !is_child {
        eprintln!("loadtest run {run}: {} {}", plan.protocol, plan.target);
    }
    // Senders: one per connection, except HTTP/2's streams, each of which
    // is a sender with its own devices, schedule and outcome.
    let streams = match &plan.driver {
        Driver::Http(cfgs) => cfgs[0].streams.max(1),
        Driver::Mqtt(..) => 1,
    };
    let conns = c.connections;
    let Some(senders) = conns.checked_mul(streams) else {
        bail!("--connections × --streams is too large");
    };
    let unit = match plan.driver {
        Driver::Mqtt(..) => TokenUnit::PerConnection,
        Driver::Http(_) => TokenUnit::PerDevice,
    };
    let fleet = match from_parent {
        Some(p) => Fleet::from(p.fleet),
        None => {
            let fleet = fleet::build(FleetSpec {
                app: &c.app,
                run: &run,
                connections: senders,
                per_conn: c.devices_per_connection,
                device_prefix: &c.device_prefix,
                token: c.token.as_deref(),
                tokens_file: c.tokens_file.as_deref(),
                no_provision: c.no_provision,
                admin: admin.as_ref(),
                unit,
                concurrency: c.admin_concurrency as usize,
            })
            .await?;
            eprintln!("credentials: {}", fleet.source);
            fleet
        }
    };
    let targets = build_targets(&plan, &c, &fleet)?;
    // HTTP/2: the connection the senders of one connection index share,
    // opened by whichever of them gets there first.
    let shared_conns: Arc<Vec<tokio::sync::OnceCell<Result<http::H2Sender, String>>>> =
        Arc::new((0..conns).map(|_| tokio::sync::OnceCell::new()).collect());

    let stop = Arc::new(AtomicBool::new(false));
    let sh = Arc::new(Shared {
        stats: Stats::new(steps.len()),
        payload,
        payload_size: c.payload_size,
        timeout: c.timeout,
        stop: stop.clone(),
    });
    tokio::spawn({
        let stop = stop.clone();
        async move {
            if is_child {
                // The terminal's Ctrl-C reaches the parent and its children
                // alike; the parent decides (ToChild::Stop), so a child
                // only keeps the signal from ending it.
                while tokio::signal::ctrl_c().await.is_ok() {}
                return;
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nstopping: finishing what is in flight (Ctrl-C again to quit now)");
                stop.store(true, Ordering::Relaxed);
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        }
    });

    let bar = progress_bar(&c);
    let steps: Arc<[Step]> = steps.into();
    let driver = Arc::new(plan.driver);
    let targets = Arc::new(targets);
    let fleet = Arc::new(fleet);
    let connect_started = Instant::now();
    // Either this process runs connections (`local`: its tasks and their
    // start signal), or its children do (`kids`).
    let mut kids = None;
    let mut local = None;
    let connect_secs;
    let mut connected = 0;
    if let Some(n) = children {
        bar.set_message(format!("starting {n} client processes"));
        let plan = ChildPlan {
            run: run.clone(),
            fleet: FleetWire::from(&*fleet),
        };
        let mut k = Children::spawn(n, plan).await?;
        bar.set_message(format!("{n} client processes connecting"));
        connect_secs = k.ready().await?;
        kids = Some(k);
    } else {
        let (start_tx, start_rx) = tokio::sync::watch::channel(None::<Instant>);
        let sem = Arc::new(tokio::sync::Semaphore::new(c.connect_concurrency as usize));
        let (connected_tx, mut connected_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut set = tokio::task::JoinSet::new();
        let mine: Vec<u32> = (0..senders)
            .filter(|&conn| share.is_none_or(|s| s.owns(conn)))
            .collect();
        for &conn in &mine {
            let (sh, driver, targets, fleet, sem, steps, shared_conns) = (
                sh.clone(),
                driver.clone(),
                targets.clone(),
                fleet.clone(),
                sem.clone(),
                steps.clone(),
                shared_conns.clone(),
            );
            let mut start_rx = start_rx.clone();
            let connected_tx = connected_tx.clone();
            let quota = total.map(|t| schedule::quota(t, senders, conn));
            // The sender that counts its connection in the summary.
            let first_of_conn = conn % streams == 0;
            set.spawn(async move {
                let password = fleet.conn_tokens[conn as usize].as_deref();
                let permit = sem.acquire().await.expect("semaphore open");
                let connected = match &*driver {
                    Driver::Mqtt(cfgs, MqttClientImpl::Native) => {
                        mqtt::connect(pick(cfgs, conn), conn, password)
                            .await
                            .map(Conn::Mqtt)
                    }
                    Driver::Mqtt(cfgs, MqttClientImpl::Rumqttc) => {
                        mqtt_rumqttc::connect(pick(cfgs, conn), conn, password)
                            .await
                            .map(|c| Conn::Rumqttc(Box::new(c)))
                    }
                    Driver::Http(cfgs) if cfgs[0].h2 => {
                        let shared = conn / streams;
                        shared_conns[shared as usize]
                            .get_or_init(|| http::connect_h2(pick(cfgs, shared)))
                            .await
                            .clone()
                            .map(|s| Conn::Http(http::Connected::Http2(s)))
                    }
                    Driver::Http(cfgs) => http::connect(pick(cfgs, conn)).await.map(Conn::Http),
                };
                drop(permit);
                if first_of_conn {
                    match &connected {
                        Ok(_) => sh.stats.connected.fetch_add(1, Ordering::Relaxed),
                        Err(kind) => {
                            sh.stats.error(kind, 1);
                            sh.stats.connect_failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                let _ = connected_tx.send(());
                let connected = match connected {
                    Ok(x) => x,
                    Err(_) => {
                        return ConnOutcome {
                            conn,
                            ..ConnOutcome::default()
                        };
                    }
                };
                let start = match start_rx.wait_for(|s| s.is_some()).await {
                    Ok(s) => s.expect("checked"),
                    Err(_) => {
                        return ConnOutcome {
                            conn,
                            ..ConnOutcome::default()
                        }
                    }
                };
                tokio::time::sleep_until(start.into()).await;
                let sched = ConnSchedule::new(conn, senders, start, steps, quota, sh.stop.clone());
                let per = fleet.per_conn as usize;
                let range = conn as usize * per..(conn as usize + 1) * per;
                match (&*driver, connected, &*targets) {
                    (Driver::Mqtt(cfgs, _), Conn::Mqtt(x), Targets::Topics(t)) => {
                        mqtt::run_conn(&sh, pick(cfgs, conn), conn, x, sched, &t[range]).await
                    }
                    (Driver::Mqtt(cfgs, _), Conn::Rumqttc(x), Targets::Topics(t)) => {
                        mqtt_rumqttc::run_conn(&sh, pick(cfgs, conn), conn, *x, sched, &t[range])
                            .await
                    }
                    (Driver::Http(cfgs), Conn::Http(x), Targets::Http(t)) => {
                        http::run_conn(&sh, pick(cfgs, conn / streams), conn, x, sched, &t[range])
                            .await
                    }
                    _ => unreachable!("driver, connection and targets match"),
                }
            });
        }
        drop(start_rx);

        // Connect phase: every task reports once, connected or not.
        drop(connected_tx);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut reported = 0usize;
        while reported < mine.len() {
            tokio::select! {
                r = connected_rx.recv() => match r {
                    Some(()) => reported += 1,
                    None => break,
                },
                _ = tick.tick() => {
                    let failed = sh.stats.connect_failed.load(Ordering::Relaxed);
                    bar.set_message(format!("connecting {reported}/{} ({failed} failed)", mine.len()));
                }
            }
        }
        connect_secs = connect_started.elapsed().as_secs_f64();
        connected = sh.stats.connected.load(Ordering::Relaxed);
        local = Some((set, start_tx));
    }

    // Live-stream consumers, in place before the first message (in the
    // parent of a --procs run, which sees the whole run).
    let consumers = match c.consumers.consumers {
        0 => None,
        _ if is_child => None,
        n => Some(start_consumers(&driver, &c, &run, admin.as_ref(), n as usize).await?),
    };

    // Timed phase.
    let start = match &mut link {
        Some(l) => l.ready(connect_secs, &stop).await?,
        // Children need a moment to read the start time and wake their
        // connections; a late start would show as send lag.
        None if kids.is_some() => Instant::now() + Duration::from_millis(50),
        None => Instant::now() + Duration::from_millis(20),
    };
    if let Some(cons) = &consumers {
        if c.rate > 0.0 && !c.ramp.ramp {
            cons.set_clock(crate::fanout::Clock {
                start,
                conns,
                rate: c.rate,
            });
        }
    }
    let cpu_before = report::cpu_seconds();
    // The parent alone reads the broker's CPU, once for the whole run.
    let broker_pid = c.broker_pid.filter(|_| !is_child);
    let broker_before = broker_pid.and_then(report::pid_cpu_seconds);
    if let (Some(pid), None) = (broker_pid, broker_before) {
        eprintln!("loadtest: cannot read /proc/{pid}/stat: no broker CPU in this run");
    }
    if let Some(k) = &mut kids {
        k.start(start).await?;
    }
    if let Some((_, start_tx)) = &local {
        let _ = start_tx.send(Some(start));
    }
    if let Some(l) = link.take() {
        l.watch(stop.clone());
    }
    let controller = if c.ramp.ramp && connected > 0 {
        Some(tokio::spawn(ramp::control(
            sh.clone(),
            steps.clone(),
            start,
            senders,
            c.ramp.p99_max,
        )))
    } else {
        None
    };
    let mut outcomes: Vec<ConnOutcome> = Vec::with_capacity(senders as usize);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // Children's CPU seconds (user, system) and the last one's end.
    let mut children_cpu = (0.0, 0.0);
    let mut children_end: Option<Instant> = None;
    if let Some((mut set, _start_tx)) = local {
        let mut live = report::Live::new(start);
        loop {
            tokio::select! {
                r = set.join_next() => match r {
                    None => break,
                    Some(Ok(o)) => outcomes.push(o),
                    Some(Err(e)) => {
                        sh.stats.error("internal_task_failure", 1);
                        eprintln!("loadtest: a connection task failed: {e}");
                    }
                },
                _ = tick.tick() => {
                    bar.set_message(live.line(&sh.stats, &steps));
                }
            }
        }
    }
    if let Some(k) = &mut kids {
        let n = plan.procs;
        let mut stopping = false;
        let mut reported = 0;
        loop {
            tokio::select! {
                r = k.next_report() => match r? {
                    None => break,
                    Some(rep) => {
                        sh.stats.absorb(&rep.stats)?;
                        outcomes.extend(rep.outcomes);
                        if let Some((u, s)) = rep.cpu {
                            children_cpu.0 += u;
                            children_cpu.1 += s;
                        }
                        let end = procs::instant_at(rep.end_ns);
                        children_end = Some(children_end.map_or(end, |e| e.max(end)));
                        reported += 1;
                    }
                },
                _ = tick.tick() => {
                    if stop.load(Ordering::Relaxed) && !stopping {
                        stopping = true;
                        k.stop().await;
                    }
                    bar.set_message(format!("{n} client processes running, {reported} done"));
                }
            }
        }
        connected = sh.stats.connected.load(Ordering::Relaxed);
    }
    let end = children_end.unwrap_or_else(Instant::now);
    let cpu_after = report::cpu_seconds();
    let broker_after = broker_pid.and_then(report::pid_cpu_seconds);
    bar.finish_and_clear();
    if is_child {
        let cpu = match (cpu_before, cpu_after) {
            (Some((u0, s0)), Some((u1, s1))) => Some((u1 - u0, s1 - s0)),
            _ => None,
        };
        procs::report(ChildReport {
            stats: sh.stats.export()?,
            outcomes,
            cpu,
            end_ns: procs::mono_ns(end),
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let evaluated = match controller {
        Some(h) => h.await.unwrap_or(0),
        None => 0,
    };
    outcomes.sort_by_key(|o| o.conn);

    let elapsed = end.saturating_duration_since(start).as_secs_f64();
    let mut summary = Summary::new(
        &run,
        plan.protocol,
        &plan.target,
        &plan.mode,
        &c,
        &sh.stats,
        connected,
        connect_secs,
        elapsed,
        total,
    );
    summary.credentials = fleet.source.clone();
    summary.template = plan.template.clone();
    summary.stopped_early = stop.load(Ordering::Relaxed) && !c.ramp.ramp;
    summary.streams_per_connection = streams;
    summary.devices = u64::from(senders) * u64::from(c.devices_per_connection);
    if let (Some((u0, s0)), Some((u1, s1))) = (cpu_before, cpu_after) {
        summary.set_cpu(u1 - u0 + children_cpu.0, s1 - s0 + children_cpu.1);
    }
    if let (Some(pid), Some((u0, s0)), Some((u1, s1))) = (broker_pid, broker_before, broker_after) {
        summary.set_broker_cpu(pid, u1 - u0, s1 - s0);
    }

    if c.ramp.ramp {
        let results = ramp::results(&sh.stats, &steps, evaluated, senders, c.ramp.p99_max);
        let r = ramp::summarize(results, c.ramp.p99_max);
        match crate::plot::ramp_svg(&c.ramp.plot, &r) {
            Ok(()) => summary.plot = Some(c.ramp.plot.display().to_string()),
            Err(e) => eprintln!("loadtest: could not write the plot: {e:#}"),
        }
        summary.ramp = Some(r);
    }

    if let Some(cons) = consumers {
        summary.consumers = Some(cons.finish(&outcomes).await);
    }

    if c.verify {
        let admin = admin.as_ref().expect("checked: --verify has --admin");
        let via = match (&c.verify_via, &c.admin_token) {
            (Some(url), Some(tok)) => {
                AdminClient::new(url, tok, c.timeout.max(Duration::from_secs(30)))?
            }
            _ => admin.clone(),
        };
        let res = verify::run(
            &via,
            c.verify_timeout,
            &c.app,
            &fleet,
            &sh.payload,
            &outcomes,
            c.admin_concurrency as usize,
        )
        .await;
        match res {
            Ok(v) => summary.verify = Some(v),
            Err(e) => {
                summary.verify_error = Some(format!("{e:#}"));
            }
        }
    }

    summary.judge(c.max_errors);
    print!("{}", summary.text());
    if let Some(path) = &c.json {
        let json = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary.exit_code())
}

async fn start_consumers(
    driver: &Driver,
    c: &CommonArgs,
    run: &str,
    admin: Option<&AdminClient>,
    n: usize,
) -> Result<crate::fanout::Consumers> {
    let k = &c.consumers;
    let addr = match (&k.consumer_url, k.consumer_via, driver) {
        (Some(u), _, _) => u.clone(),
        // With several brokers, consumers subscribe on the first.
        (None, crate::cli::ConsumerVia::Mqtt, Driver::Mqtt(cfgs, _)) if !cfgs.is_empty() => {
            cfgs[0].addr.clone()
        }
        _ => bail!("--consumers needs --consumer-url (the HTTP listener for SSE)"),
    };
    let token = match (&k.consumer_token, admin) {
        (Some(t), _) => t.clone(),
        (None, Some(a)) => {
            crate::fleet::reader_token(a, &c.app, &format!("loadtest-{run}-consumers"))
                .await
                .context("creating the consumers' token")?
        }
        (None, None) => bail!("--consumers needs --consumer-token or --admin"),
    };
    let spec = crate::fanout::ConsumerSpec {
        via: k.consumer_via,
        addr,
        token,
        app: c.app.clone(),
        run: run.to_string(),
        conns: c.connections,
        timeout: c.timeout,
    };
    let cons = crate::fanout::Consumers::start(spec, n).await?;
    eprintln!("consumers: {n} reading the live stream");
    Ok(cons)
}

enum Conn {
    Mqtt(mqtt::Connected),
    Rumqttc(Box<mqtt_rumqttc::Connected>),
    Http(http::Connected),
}

fn build_targets(plan: &Plan, c: &CommonArgs, fleet: &Fleet) -> Result<Targets> {
    let template = plan.template.as_str();
    Ok(match &plan.driver {
        Driver::Mqtt(..) => Targets::Topics(
            fleet
                .devices
                .iter()
                .map(|d| fill(template, &c.app, d).into_bytes())
                .collect(),
        ),
        Driver::Http(cfgs) => {
            // Every broker of a cluster answers the same paths; HTTP/2's
            // authority is the first address's (Sluice does not route by it).
            let cfg = &cfgs[0];
            let mut v = Vec::with_capacity(fleet.devices.len());
            for (k, d) in fleet.devices.iter().enumerate() {
                let mut path = fill(template, &c.app, d);
                // HTTP/2 requests carry scheme and authority.
                if cfg.h2 {
                    path = format!("http://{}{path}", cfg.host.to_str().unwrap_or_default());
                }
                let path: hyper::Uri = path
                    .parse()
                    .with_context(|| format!("bad request path {path:?}"))?;
                let auth = match &fleet.device_tokens[k] {
                    Some(t) => Some(
                        HeaderValue::from_str(&format!("Bearer {t}"))
                            .context("token is not a valid header value")?,
                    ),
                    None => None,
                };
                v.push(http::Target { path, auth });
            }
            Targets::Http(v)
        }
    })
}

fn progress_bar(c: &CommonArgs) -> ProgressBar {
    let tty = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
    if !tty || c.no_progress {
        return ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    }
    let bar = ProgressBar::new_spinner();
    bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(4));
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}
