//! Command-line options (clap derive). Every option is documented here; this
//! text is what `loadtest --help` and `loadtest mqtt --help` print.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::procs::{parse_share, Share};

#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Load generator for Sluice or any MQTT / HTTP broker",
    long_about = "Load generator for Sluice or any MQTT / HTTP broker.\n\n\
        Opens --connections connections, then sends state messages on a common \
        clock: with --rate R, message i of every connection has an intended send \
        time, and latency is measured from that time to the acknowledgement (MQTT \
        PUBACK / HTTP 200), so a slow server is not hidden by a client that waits \
        for it (no coordinated omission). Prints a summary (throughput, connect \
        rate, latency percentiles from an HDR histogram, errors by kind) and exits \
        non-zero when errors exceed --max-errors or --verify finds a loss.\n\n\
        Examples:\n  \
        SLUICE_ADMIN_TOKEN=... loadtest mqtt 127.0.0.1:1883 --admin http://127.0.0.1:9090 -c 100 -r 50000 -d 30s --verify\n  \
        loadtest http http://127.0.0.1:8080 --token sl_... -c 50 -n 100000 --json out.json\n  \
        loadtest mqtt 127.0.0.1:1883 --no-provision --topic 'bench/{device}' --mqtt-version 3.1.1 -c 10 -n 10000"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Publish state over MQTT 3.1.1 or 5, QoS 0 or 1.
    Mqtt(MqttArgs),
    /// POST state over HTTP/1.1 keep-alive connections (one request in
    /// flight per connection), or over HTTP/2 (--h2, several streams per
    /// connection).
    Http(HttpArgs),
    /// Measure the JetStream engine's ceiling for cluster mode: publish
    /// straight to a replicated stream (atomic batches, pipelined
    /// publishes) and print acknowledged msg/s. No Sluice involved.
    StreamProbe(StreamProbeArgs),
    /// Read an application's live stream (SSE) from a position and measure
    /// how fast what was committed meanwhile comes back: states/s.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Base URL of the listener serving the stream (device HTTP or admin),
    /// e.g. http://127.0.0.1:8080.
    #[arg(value_name = "URL")]
    pub url: String,

    /// Application whose stream is read.
    #[arg(long, default_value = "loadtest")]
    pub app: String,

    /// Where the stream starts: `earliest`, `now` or a position.
    #[arg(long, default_value = "earliest")]
    pub from: String,

    /// Stop after this many states.
    #[arg(short = 'n', long, default_value_t = 1_000_000)]
    pub count: u64,

    /// Stop after this long in any case.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub max_time: Duration,

    /// A token with device.getState for the application.
    #[arg(long)]
    pub token: Option<String>,

    /// Admin API base URL, to create a reading token when --token is not
    /// given.
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,

    /// Token for the admin API.
    #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Give up opening the stream after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// How `--consumers` read the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConsumerVia {
    /// Server-Sent Events (`GET /applications/{app}/stream`).
    Sse,
    /// An MQTT 3.1.1 subscription at QoS 1 (rumqttc).
    Mqtt,
}

#[derive(Debug, Args)]
pub struct StreamProbeArgs {
    /// A NATS server of the cluster (the client learns the others).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,

    /// Stream to create (if missing) and purge before every run.
    #[arg(long, default_value = "PROBE")]
    pub stream: String,

    /// Replicas of the stream when it is created.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,

    /// Modes to run, in this order within each round (repeat the flag):
    /// `atomic:N` (atomic batches of N messages, at most 1000),
    /// `atomic:N:first` (a Nats-Msg-Id on each batch's first message, as
    /// Sluice's publisher does), `atomic:N:every` (on every message),
    /// `pipelined` (plain publishes).
    #[arg(long = "mode", default_values_t = ["atomic:1000".to_string(), "atomic:500".to_string(), "pipelined".to_string()])]
    pub modes: Vec<String>,

    /// Atomic batches open at once (NATS allows 50 per stream).
    #[arg(long, default_value_t = 4)]
    pub inflight: usize,

    /// Acknowledgements outstanding in pipelined mode.
    #[arg(long, default_value_t = 256)]
    pub pipeline: usize,

    /// Size of every message's payload.
    #[arg(long, default_value_t = 150)]
    pub message_bytes: usize,

    /// Length of one run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Rounds; each runs every mode once, alternating.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MqttVersion {
    /// MQTT 3.1.1 (protocol level 4).
    #[value(name = "3.1.1", alias = "3", alias = "4", alias = "311")]
    V311,
    /// MQTT 5.
    #[value(name = "5")]
    V5,
}

impl std::fmt::Display for MqttVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MqttVersion::V311 => "3.1.1",
            MqttVersion::V5 => "5",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MqttClientImpl {
    /// The built-in minimal client (lowest client CPU; the default).
    Native,
    /// rumqttc's AsyncClient/EventLoop, one per connection (MQTT 3.1.1 only;
    /// to cross-check the native client; costs more client CPU and adds
    /// about a millisecond of its own latency).
    Rumqttc,
}

#[derive(Debug, Args)]
pub struct MqttArgs {
    /// Broker address: HOST:PORT (an optional mqtt:// or tcp:// prefix is
    /// ignored). Several (comma-separated or repeated) spread the
    /// connections over them round-robin: connection i goes to address
    /// i mod N, e.g. the brokers of a cluster.
    #[arg(value_name = "ADDR", value_delimiter = ',', num_args = 1.., required = true)]
    pub addrs: Vec<String>,

    /// QoS of every publish: 1 waits for PUBACK and measures latency; 0 is
    /// fire-and-forget (only sends are counted, no latency).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1), help_heading = "MQTT")]
    pub qos: u8,

    /// MQTT protocol version.
    #[arg(
        long = "mqtt-version",
        value_enum,
        default_value = "5",
        help_heading = "MQTT"
    )]
    pub version: MqttVersion,

    /// QoS 1 publishes awaiting PUBACK per connection (the in-flight window).
    /// MQTT 5 also caps it at the broker's Receive Maximum.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..), help_heading = "MQTT")]
    pub inflight: u16,

    /// Topic template; `{app}` and `{device}` are replaced. For other brokers
    /// use a plain template, e.g. 'bench/{device}'.
    #[arg(
        long,
        default_value = "applications/{app}/devices/{device}/state",
        help_heading = "MQTT"
    )]
    pub topic: String,

    /// MQTT user name (Sluice ignores it; the token is the password).
    #[arg(long, default_value = "loadtest", help_heading = "MQTT")]
    pub username: String,

    /// Client id prefix; the connection number is appended
    /// [default: loadtest-RUNID-].
    #[arg(long, help_heading = "MQTT")]
    pub client_id_prefix: Option<String>,

    /// Keep-alive sent in CONNECT; a PINGREQ goes out when a connection has
    /// written nothing for this long. 0 disables.
    #[arg(long, default_value = "30s", value_parser = parse_duration, help_heading = "MQTT")]
    pub keep_alive: Duration,

    /// Leave Nagle's algorithm on (no TCP_NODELAY), as many device stacks
    /// do: fewer, larger TCP segments, but a publish may wait for the previous
    /// segment's ACK, which adds latency. Default: TCP_NODELAY.
    #[arg(long, help_heading = "MQTT")]
    pub nagle: bool,

    /// MQTT client implementation.
    #[arg(
        long = "mqtt-client",
        value_enum,
        default_value = "native",
        help_heading = "MQTT"
    )]
    pub client: MqttClientImpl,

    /// Client processes: credentials are resolved once, then N child
    /// processes of this program run the connections (connection c in
    /// child c mod N) on the one common schedule, each with its share of
    /// the rate, and the report merges their counts and histograms. For
    /// paced runs whose send lag one process cannot keep low. Not with
    /// --ramp.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Load")]
    pub procs: u32,

    /// Pin each client process to one CPU: child i of --procs to the i-th
    /// CPU of this list (cycling), a single process to the first. Leave
    /// the broker's CPUs out of it.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "CPU,...",
        help_heading = "Load"
    )]
    pub pin_cpus: Vec<usize>,

    /// Set by --procs for its children: which share of the connections
    /// this process runs (I/N).
    #[arg(long, hide = true, value_parser = parse_share)]
    pub share: Option<Share>,

    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Base URL of the device HTTP listener, e.g. http://127.0.0.1:8080
    /// (http only; a bare HOST:PORT is accepted). Several (comma-separated
    /// or repeated) spread the connections over them round-robin.
    #[arg(value_name = "URL", value_delimiter = ',', num_args = 1.., required = true)]
    pub urls: Vec<String>,

    /// Request path template; `{app}` and `{device}` are replaced.
    #[arg(
        long,
        default_value = "/applications/{app}/devices/{device}/state",
        help_heading = "HTTP"
    )]
    pub path: String,

    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1.
    #[arg(long, help_heading = "HTTP")]
    pub h2: bool,

    /// With --h2: senders per connection, each with one request in flight,
    /// so every connection carries this many concurrent streams. Devices,
    /// tokens and the rate are per sender: --connections × --streams
    /// senders in all.
    #[arg(long, default_value_t = 1, requires = "h2", value_parser = clap::value_parser!(u32).range(1..), help_heading = "HTTP")]
    pub streams: u32,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// Options shared by `mqtt` and `http`.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Concurrent connections.
    #[arg(short = 'c', long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Load")]
    pub connections: u32,

    /// Total messages over all connections (split evenly). Without --messages
    /// and --duration: 10000.
    #[arg(short = 'n', long, help_heading = "Load")]
    pub messages: Option<u64>,

    /// Stop scheduling new messages after this long (e.g. 30s, 2m); with
    /// --messages too, whichever comes first.
    #[arg(short = 'd', long, value_parser = parse_duration, help_heading = "Load")]
    pub duration: Option<Duration>,

    /// Target rate in messages/s over all connections. 0 = as fast as the
    /// in-flight windows allow. Otherwise each message has a scheduled send
    /// time and latency is measured from it, even when the client is behind.
    #[arg(short = 'r', long, default_value_t = 0.0, help_heading = "Load")]
    pub rate: f64,

    /// Size in bytes of every message body (one JSON state message, padded
    /// with a "p" attribute); raised to the unpadded size if smaller.
    #[arg(short = 's', long, default_value_t = 128, help_heading = "Load")]
    pub payload_size: usize,

    /// Devices per connection; a connection's messages go round-robin over
    /// its devices. Device ids are --device-prefix + number.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Load")]
    pub devices_per_connection: u32,

    /// Connections being opened at once during the connect phase.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Load")]
    pub connect_concurrency: u32,

    /// Give up after this long on a connect (incl. CONNACK), an HTTP response,
    /// or a connection that has messages in flight and gets no acknowledgement;
    /// its unacknowledged messages count as errors.
    #[arg(long, default_value = "10s", value_parser = parse_duration, help_heading = "Load")]
    pub timeout: Duration,

    /// Client worker threads (tokio) [default: one per CPU].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Load")]
    pub threads: Option<u32>,

    /// Application id: used in topic/path templates, for provisioning and --verify.
    #[arg(long, default_value = "loadtest", help_heading = "Load")]
    pub app: String,

    /// Device ids are this prefix + a number from 0 (unless --tokens-file names them).
    #[arg(long, default_value = "lt-", help_heading = "Load")]
    pub device_prefix: String,

    /// Admin API base URL (e.g. http://127.0.0.1:9090). With it, loadtest
    /// creates device-scoped tokens (scope device.sendState) through the API,
    /// unless --token, --tokens-file or --no-provision; --verify needs it.
    #[arg(long, value_name = "URL", help_heading = "Credentials")]
    pub admin: Option<String>,

    /// Token for the admin API.
    #[arg(
        long,
        env = "SLUICE_ADMIN_TOKEN",
        hide_env_values = true,
        help_heading = "Credentials"
    )]
    pub admin_token: Option<String>,

    /// One token for every connection (MQTT password / HTTP bearer token).
    #[arg(long, conflicts_with = "tokens_file", help_heading = "Credentials")]
    pub token: Option<String>,

    /// File of `DEVICE TOKEN` lines (blank lines and # comments skipped).
    /// Devices are taken from it in order, cycling if there are fewer lines
    /// than connections × devices per connection. An MQTT connection uses the
    /// token of its first device.
    #[arg(long, value_name = "FILE", help_heading = "Credentials")]
    pub tokens_file: Option<PathBuf>,

    /// Create no tokens (for brokers without Sluice's admin API, e.g.
    /// Mosquitto). Without --token the MQTT CONNECT has no credentials and
    /// HTTP requests no Authorization header.
    #[arg(long, help_heading = "Credentials")]
    pub no_provision: bool,

    /// Concurrent admin API requests while provisioning and verifying.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Credentials")]
    pub admin_concurrency: u32,

    /// Process id of the broker under test (on this machine): its CPU time
    /// (user + system, all threads, from /proc/PID/stat) over the timed
    /// phase is reported, as cores and as µs per acknowledged message
    /// (per sent message when nothing is acknowledged, e.g. QoS 0).
    #[arg(long, value_name = "PID", help_heading = "Output")]
    pub broker_pid: Option<u32>,

    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    pub json: Option<PathBuf>,

    /// Exit non-zero when more errors than this occurred.
    #[arg(long, default_value_t = 0, help_heading = "Output")]
    pub max_errors: u64,

    /// After the run, read every device's history back through the admin API
    /// and check that each acknowledged message is stored exactly once,
    /// byte-equal. Exits non-zero on any loss, duplicate or mismatch.
    #[arg(long, help_heading = "Output")]
    pub verify: bool,

    /// Read back (--verify) through this broker's admin API instead of
    /// --admin: in cluster mode any broker, which first learns the ingest
    /// stream's newest state (`GET /cluster/ingest`) and then reads with
    /// `minSeq` until its read model holds everything acknowledged
    /// anywhere. The same admin token is used.
    #[arg(long, value_name = "URL", help_heading = "Output")]
    pub verify_via: Option<String>,

    /// How long --verify waits for a cluster broker's read model to catch
    /// up before it gives up.
    #[arg(long, default_value = "120s", value_parser = parse_duration, help_heading = "Output")]
    pub verify_timeout: Duration,

    /// Never show the live progress line (it is hidden anyway when stdout or
    /// stderr is not a terminal).
    #[arg(long, help_heading = "Output")]
    pub no_progress: bool,

    #[command(flatten)]
    pub ramp: RampArgs,

    #[command(flatten)]
    pub consumers: ConsumerArgs,
}

/// `--consumers`: read the application's live stream while the load runs.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Live-stream consumers")]
pub struct ConsumerArgs {
    /// Consumers reading the whole application's live stream during the
    /// run (opened before it starts). Reported: whether each received every
    /// acknowledged message once, and (with --rate) delivery latency from
    /// each message's scheduled send time.
    #[arg(long, default_value_t = 0)]
    pub consumers: u32,

    /// How the consumers read.
    #[arg(long, value_enum, default_value = "sse")]
    pub consumer_via: ConsumerVia,

    /// Where they read: the HTTP listener's URL for SSE (e.g.
    /// http://127.0.0.1:8080), the MQTT address for MQTT [default for MQTT
    /// consumers of an MQTT run: the run's address].
    #[arg(long, value_name = "URL")]
    pub consumer_url: Option<String>,

    /// Token with device.getState for the consumers [default: one created
    /// through --admin].
    #[arg(long)]
    pub consumer_token: Option<String>,
}

/// `--ramp`: step the rate up and find the highest rate whose p99 holds.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Ramp")]
pub struct RampArgs {
    /// Ramp mode: run steps of --ramp-step-duration each, at rates
    /// --ramp-start, --ramp-start + --ramp-step, ... up to --ramp-max msg/s,
    /// on the same connections. A step
    /// passes when its p99 (messages not acknowledged count as slower) is
    /// under --p99-max and it had no errors. Stops after the first failing
    /// step, reports the highest passing rate and plots every step.
    /// --rate, --messages and --duration are ignored.
    #[arg(long)]
    pub ramp: bool,

    /// Rate of the first step, msg/s.
    #[arg(long, default_value_t = 1000.0)]
    pub ramp_start: f64,

    /// Rate increase per step, msg/s.
    #[arg(long, default_value_t = 1000.0)]
    pub ramp_step: f64,

    /// Length of each step.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub ramp_step_duration: Duration,

    /// Rate of the last step, msg/s.
    #[arg(long, default_value_t = 100_000.0)]
    pub ramp_max: f64,

    /// Latency bound a step's p99 must stay under (e.g. 50ms).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub p99_max: Duration,

    /// SVG plot of throughput and p99 per step.
    #[arg(long, default_value = "ramp.svg", value_name = "FILE")]
    pub plot: PathBuf,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (write e.g. 500ms, 10s, 2m)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_versions_and_durations() {
        let cli = Cli::parse_from([
            "loadtest",
            "mqtt",
            "127.0.0.1:1883",
            "--mqtt-version",
            "3.1.1",
            "-d",
            "1m",
            "--timeout",
            "500ms",
        ]);
        let Command::Mqtt(m) = cli.command else {
            panic!()
        };
        assert_eq!(m.addrs, ["127.0.0.1:1883"]);
        assert_eq!(m.version, MqttVersion::V311);
        assert_eq!(m.common.duration, Some(Duration::from_secs(60)));
        assert_eq!(m.common.timeout, Duration::from_millis(500));
        assert_eq!(m.qos, 1);
        assert_eq!(m.inflight, 100);
    }

    #[test]
    fn several_targets_comma_separated_or_repeated() {
        let cli = Cli::parse_from(["loadtest", "mqtt", "a:1,b:2", "c:3"]);
        let Command::Mqtt(m) = cli.command else {
            panic!()
        };
        assert_eq!(m.addrs, ["a:1", "b:2", "c:3"]);
        let cli = Cli::parse_from([
            "loadtest",
            "http",
            "http://a:1,http://b:2",
            "--verify-via",
            "http://b:9",
        ]);
        let Command::Http(h) = cli.command else {
            panic!()
        };
        assert_eq!(h.urls, ["http://a:1", "http://b:2"]);
        assert_eq!(h.common.verify_via.as_deref(), Some("http://b:9"));
    }
}
