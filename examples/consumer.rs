//! A downstream consumer of one application's device states in cluster
//! mode: it reads the ingest stream straight from NATS with a durable pull
//! consumer, prints each state as one JSON line, and acknowledges it once
//! printed. Stopped and started again (same `--durable`), it goes on after
//! the last state it acknowledged: nothing is skipped; a state whose ack
//! was lost in a crash is delivered again (at least once).
//!
//!     cargo run --example consumer -- --nats nats://127.0.0.1:4222 --app farm --durable farm-export
//!
//! Output, one line per state, in stream order:
//!
//!     {"seq":42,"app":"farm","device":"pump-1","receivedMs":1796138665435,"tokenId":"…","state":{"data":{"flow":1.5}}}
//!
//! Only `async-nats` is needed; nothing here uses Sluice's own code. The
//! subject, payload and header scheme is the contract in the README
//! ("Cluster mode: the ingest stream").

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use clap::Parser;
use futures_util::StreamExt;

#[derive(Parser)]
#[command(about = "Print one application's states from Sluice's ingest stream, resumably")]
struct Args {
    /// A NATS server of the cluster.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Sluice's `cluster.prefix`.
    #[arg(long, default_value = "sluice")]
    prefix: String,
    /// The application whose states to read.
    #[arg(long)]
    app: String,
    /// Name of the durable consumer: the position is kept under it.
    #[arg(long)]
    durable: String,
    /// Stop after this many states (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    max: u64,
}

/// A subject token for an id: `.` separates subject tokens, so Sluice
/// writes every `.` of an id as `%2E` (`%` never occurs in ids).
fn escape(id: &str) -> String {
    id.replace('.', "%2E")
}

fn unescape(token: &str) -> String {
    token.replace("%2E", ".")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = async_nats::connect(&args.nats)
        .await
        .with_context(|| format!("connecting to {}", args.nats))?;
    let js = async_nats::jetstream::new(client);
    let stream_name = format!("{}_STATE", args.prefix.to_ascii_uppercase());
    let stream = js
        .get_stream(&stream_name)
        .await
        .with_context(|| format!("stream {stream_name}"))?;
    let filter = format!("{}.state.{}.>", args.prefix, escape(&args.app));
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &args.durable,
            pull::Config {
                durable_name: Some(args.durable.clone()),
                filter_subject: filter,
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::Explicit,
                // Unacknowledged for this long (the consumer died holding
                // it): delivered again.
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .context("creating the durable consumer")?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(100)
        .messages()
        .await
        .context("pulling messages")?;
    let mut done = 0u64;
    let mut out = std::io::stdout().lock();
    while let Some(m) = messages.next().await {
        let m = m.context("receiving")?;
        let info = m.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let seq = info.stream_sequence;
        // <prefix>.state.<app>.<device>
        let mut tokens = m.subject.rsplitn(3, '.');
        let device = unescape(tokens.next().unwrap_or_default());
        let app = unescape(tokens.next().unwrap_or_default());
        let header = |name: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        let received: Option<i64> = header("Sluice-Received-Ms").and_then(|v| v.parse().ok());
        let token = header("Sluice-Token-Id");
        // The payload is the device's own JSON, byte for byte.
        let state: &serde_json::value::RawValue =
            serde_json::from_slice(&m.payload).context("a state that is not JSON")?;
        let line = serde_json::json!({
            "seq": seq,
            "app": app,
            "device": device,
            "receivedMs": received,
            "tokenId": token,
            "state": state,
        });
        writeln!(out, "{line}")?;
        out.flush()?;
        // Acknowledged only once processed, and confirmed by the server, so
        // a restart resumes right after it.
        m.double_ack()
            .await
            .map_err(|e| anyhow::anyhow!("acknowledging {seq}: {e}"))?;
        done += 1;
        if args.max > 0 && done >= args.max {
            break;
        }
    }
    Ok(())
}
