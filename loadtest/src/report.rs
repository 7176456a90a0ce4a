//! The summary: built once from the stats, printed as text, written as JSON
//! (the same fields), and turned into the exit status.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::cli::CommonArgs;
use crate::ramp::RampReport;
use crate::schedule::Step;
use crate::stats::Stats;
use crate::verify::VerifyReport;

#[derive(Debug, Clone, Serialize)]
pub struct Connections {
    pub requested: u64,
    pub connected: u64,
    pub failed: u64,
    pub connect_seconds: f64,
    pub connects_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Messages {
    /// Messages the run was to send (`None` when bounded by time only).
    pub planned: Option<u64>,
    pub sent: u64,
    /// MQTT PUBACK with a success reason / HTTP 200. 0 for QoS 0.
    pub acked: u64,
    pub failed: u64,
    /// Sent and neither acked nor failed (QoS 0 messages).
    pub unacked: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub sent_per_sec: f64,
    pub acked_per_sec: f64,
    /// `--rate` (0 = unpaced).
    pub target_rate: f64,
}

/// Latency from the scheduled send time to the acknowledgement.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Latency> {
        if h.is_empty() {
            return None;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Some(Latency {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Errors {
    pub total: u64,
    pub by_kind: BTreeMap<String, u64>,
}

/// CPU used by this process during the timed phase.
#[derive(Debug, Clone, Serialize)]
pub struct ClientCpu {
    pub user_seconds: f64,
    pub system_seconds: f64,
    /// CPU seconds per wall second.
    pub cores: f64,
    pub us_per_message: f64,
}

/// User and system CPU seconds of this process so far (Linux).
pub fn cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 of the whole line, in clock ticks (100 Hz on Linux).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime / 100.0, stime / 100.0))
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run: String,
    pub protocol: String,
    pub target: String,
    pub mode: String,
    pub template: String,
    pub credentials: String,
    pub app: String,
    pub devices: u64,
    pub payload_bytes: usize,
    pub connections: Connections,
    pub messages: Messages,
    pub duration_seconds: f64,
    pub throughput: Throughput,
    pub latency: Option<Latency>,
    /// Paced runs: how late the client sent messages after their scheduled
    /// time (timer resolution ~1 ms, or a full window). Part of `latency`.
    pub send_lag: Option<Latency>,
    pub errors: Errors,
    pub client_cpu: Option<ClientCpu>,
    pub stopped_early: bool,
    pub verify: Option<VerifyReport>,
    pub verify_error: Option<String>,
    pub ramp: Option<RampReport>,
    pub plot: Option<String>,
    /// `--consumers`: what the live-stream consumers received.
    pub consumers: Option<crate::fanout::ConsumersReport>,
    /// Whether the run passed: see `problems` when not.
    pub ok: bool,
    pub problems: Vec<String>,
}

impl Summary {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        run: &str,
        protocol: &str,
        target: &str,
        mode: &str,
        c: &CommonArgs,
        stats: &Stats,
        connected: u64,
        connect_secs: f64,
        elapsed: f64,
        planned: Option<u64>,
    ) -> Summary {
        let sent = stats.total_sent();
        let acked = stats.total_acked();
        let failed = stats.total_failed();
        let per_sec = |n: u64| {
            if elapsed > 0.0 {
                n as f64 / elapsed
            } else {
                0.0
            }
        };
        let requested = u64::from(c.connections);
        Summary {
            run: run.into(),
            protocol: protocol.into(),
            target: target.into(),
            mode: mode.into(),
            template: String::new(),
            credentials: String::new(),
            app: c.app.clone(),
            devices: requested * u64::from(c.devices_per_connection),
            payload_bytes: c.payload_size,
            connections: Connections {
                requested,
                connected,
                failed: stats.connect_failed.load(Ordering::Relaxed),
                connect_seconds: connect_secs,
                connects_per_sec: if connect_secs > 0.0 {
                    connected as f64 / connect_secs
                } else {
                    0.0
                },
            },
            messages: Messages {
                planned,
                sent,
                acked,
                failed,
                unacked: sent.saturating_sub(acked + failed),
            },
            duration_seconds: elapsed,
            throughput: Throughput {
                sent_per_sec: per_sec(sent),
                acked_per_sec: per_sec(acked),
                target_rate: c.rate,
            },
            latency: Latency::from_histogram(&stats.histogram()),
            send_lag: Latency::from_histogram(&stats.lag_histogram()),
            errors: Errors {
                total: stats.errors_total(),
                by_kind: stats.errors(),
            },
            client_cpu: None,
            stopped_early: false,
            verify: None,
            verify_error: None,
            ramp: None,
            plot: None,
            consumers: None,
            ok: true,
            problems: Vec::new(),
        }
    }

    /// Sets `client_cpu` from CPU seconds used during the timed phase.
    pub fn set_cpu(&mut self, user: f64, system: f64) {
        let msgs = self.messages.sent.max(1) as f64;
        self.client_cpu = Some(ClientCpu {
            user_seconds: user,
            system_seconds: system,
            cores: if self.duration_seconds > 0.0 {
                (user + system) / self.duration_seconds
            } else {
                0.0
            },
            us_per_message: (user + system) * 1e6 / msgs,
        });
    }

    /// Decides `ok` and `problems`.
    pub fn judge(&mut self, max_errors: u64) {
        let mut p = Vec::new();
        if self.connections.connected == 0 {
            p.push("no connection could be opened".to_string());
        }
        match &self.ramp {
            Some(r) => {
                if r.highest_passing_rate.is_none() {
                    p.push("no ramp step passed".into());
                }
                if self.connections.failed > max_errors {
                    p.push(format!(
                        "{} connections failed (--max-errors {max_errors})",
                        self.connections.failed
                    ));
                }
            }
            None => {
                if self.errors.total > max_errors {
                    p.push(format!(
                        "{} errors > --max-errors {max_errors}",
                        self.errors.total
                    ));
                }
            }
        }
        if let Some(v) = &self.verify {
            if !v.ok() {
                p.push("verification found lost, duplicated or altered messages".into());
            }
        }
        if let Some(e) = &self.verify_error {
            p.push(format!("verification could not run: {e}"));
        }
        if let Some(c) = &self.consumers {
            if !c.ok() {
                p.push("live-stream consumers missed, repeated or failed".into());
            }
        }
        self.ok = p.is_empty();
        self.problems = p;
    }

    pub fn exit_code(&self) -> ExitCode {
        if self.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "loadtest {} {} ({}, run {})",
            self.protocol, self.target, self.mode, self.run
        );
        let _ = writeln!(
            s,
            "  load         {} connections × {} device(s), {}-byte messages, {}",
            self.connections.requested,
            self.devices / self.connections.requested.max(1),
            self.payload_bytes,
            if self.throughput.target_rate > 0.0 {
                format!("target {} msg/s", fmt_rate(self.throughput.target_rate))
            } else if self.ramp.is_some() {
                "ramp".to_string()
            } else {
                "unpaced".to_string()
            }
        );
        let c = &self.connections;
        let _ = writeln!(
            s,
            "  connections  {} connected, {} failed, in {:.3} s ({} conn/s)",
            c.connected,
            c.failed,
            c.connect_seconds,
            fmt_rate(c.connects_per_sec)
        );
        let m = &self.messages;
        let _ = writeln!(
            s,
            "  messages     sent {}, acked {}, failed {}, unacked {}{}",
            m.sent,
            m.acked,
            m.failed,
            m.unacked,
            m.planned
                .map(|p| format!(" (planned {p})"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "  duration     {:.3} s{}",
            self.duration_seconds,
            if self.stopped_early {
                " (stopped early)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            s,
            "  throughput   {} msg/s acked, {} msg/s sent",
            fmt_rate(self.throughput.acked_per_sec),
            fmt_rate(self.throughput.sent_per_sec)
        );
        match &self.latency {
            Some(l) => {
                let _ = writeln!(
                    s,
                    "  latency ms   p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {}, n={}, from scheduled send)",
                    fmt_ms(l.p50_ms),
                    fmt_ms(l.p90_ms),
                    fmt_ms(l.p99_ms),
                    fmt_ms(l.p999_ms),
                    fmt_ms(l.max_ms),
                    fmt_ms(l.mean_ms),
                    l.count
                );
            }
            None => {
                let _ = writeln!(s, "  latency      n/a (nothing acknowledged)");
            }
        }
        if let Some(l) = &self.send_lag {
            let _ = writeln!(
                s,
                "  send lag ms  p50 {}  p99 {}  max {}  (client: scheduled → sent; included above)",
                fmt_ms(l.p50_ms),
                fmt_ms(l.p99_ms),
                fmt_ms(l.max_ms)
            );
        }
        let kinds: Vec<String> = self
            .errors
            .by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            s,
            "  errors       {}{}",
            self.errors.total,
            if kinds.is_empty() {
                String::new()
            } else {
                format!(" ({})", kinds.join(", "))
            }
        );
        if let Some(cpu) = &self.client_cpu {
            let _ = writeln!(
                s,
                "  client cpu   {:.2} s user + {:.2} s sys ({:.2} cores, {:.1} µs/msg)",
                cpu.user_seconds, cpu.system_seconds, cpu.cores, cpu.us_per_message
            );
        }
        if let Some(r) = &self.ramp {
            s.push_str(&r.text());
            if let Some(p) = &self.plot {
                let _ = writeln!(s, "  plot         {p}");
            }
        }
        if let Some(c) = &self.consumers {
            s.push_str(&c.text());
        }
        if let Some(v) = &self.verify {
            let _ = writeln!(s, "  verify       {}", v.line());
        }
        if let Some(e) = &self.verify_error {
            let _ = writeln!(s, "  verify       could not run: {e}");
        }
        if self.ok {
            let _ = writeln!(s, "  result       OK");
        } else {
            let _ = writeln!(s, "  result       FAILED: {}", self.problems.join("; "));
        }
        s
    }
}

pub fn fmt_rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

pub fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.3}")
    }
}

/// The live progress line.
pub struct Live {
    start: Instant,
    last: Instant,
    last_count: u64,
    rate: f64,
    p99: Option<f64>,
    last_p99: Option<Instant>,
}

impl Live {
    pub fn new(start: Instant) -> Live {
        Live {
            start,
            last: start,
            last_count: 0,
            rate: 0.0,
            p99: None,
            last_p99: None,
        }
    }

    pub fn line(&mut self, stats: &Stats, steps: &[Step]) -> String {
        let now = Instant::now();
        let sent = stats.total_sent();
        let acked = stats.total_acked();
        // QoS 0 acknowledges nothing: show the send rate then.
        let count = if acked > 0 { acked } else { sent };
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        if dt >= 0.2 {
            let r = count.saturating_sub(self.last_count) as f64 / dt;
            self.rate = if self.last_count == 0 {
                r
            } else {
                0.5 * self.rate + 0.5 * r
            };
            self.last = now;
            self.last_count = count;
        }
        if self
            .last_p99
            .is_none_or(|t| now.saturating_duration_since(t).as_millis() >= 1000)
        {
            let h = stats.histogram();
            self.p99 = (!h.is_empty()).then(|| h.value_at_quantile(0.99) as f64 / 1000.0);
            self.last_p99 = Some(now);
        }
        let mut s = String::new();
        if steps.len() > 1 {
            let t = now.saturating_duration_since(self.start);
            let k = steps
                .iter()
                .position(|st| st.end.is_none_or(|e| t < e))
                .unwrap_or(steps.len() - 1);
            let _ = write!(
                s,
                "step {}/{} @ {} msg/s  ",
                k + 1,
                steps.len(),
                fmt_rate(steps[k].rate)
            );
        }
        let _ = write!(
            s,
            "{} msg/s  sent {sent}  acked {acked}  errors {}  p99 {}",
            fmt_rate(self.rate),
            stats.errors_total(),
            self.p99
                .map(|p| format!("{} ms", fmt_ms(p)))
                .unwrap_or_else(|| "-".into())
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_readable_on_linux() {
        if cfg!(target_os = "linux") {
            let (u, s) = cpu_seconds().unwrap();
            assert!(u >= 0.0 && s >= 0.0);
        }
    }

    #[test]
    fn latency_in_ms() {
        let mut h = crate::stats::new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let l = Latency::from_histogram(&h).unwrap();
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 5.0).abs() < 0.01, "{l:?}");
        assert!((l.max_ms - 10.0).abs() < 0.01, "{l:?}");
        assert!(Latency::from_histogram(&crate::stats::new_histogram()).is_none());
    }
}
