//! `loadtest stream-probe`: the ceiling of the engine under Sluice's
//! cluster mode, measured without Sluice. It publishes fixed-size messages
//! straight to a replicated JetStream stream (file storage, atomic publish
//! allowed) and prints acknowledged messages per second for each mode:
//!
//! - `atomic:N`: atomic batches (ADR-50) of N messages with `--inflight`
//!   batches open at once; `atomic:N:first` puts a `Nats-Msg-Id` on each
//!   batch's first message, as Sluice's publisher does, `atomic:N:every`
//!   on every message;
//! - `pipelined`: plain JetStream publishes with `--pipeline` acks
//!   outstanding.
//!
//! The stream is created if missing and purged before every run, so runs
//! start equal. Start NATS with `sync_interval: always` to measure what
//! Sluice relies on (`scripts/stream-probe.sh` does it all).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::header::{
    NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE, NATS_MESSAGE_ID,
};
use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, Request};
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;

use crate::cli::StreamProbeArgs;

const SUBJECT_PREFIX: &str = "probe.state";

/// One measured run.
struct Run {
    label: String,
    messages: u64,
    elapsed: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }
}

pub fn main(args: StreamProbeArgs) -> Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(probe(args))?;
    Ok(std::process::ExitCode::SUCCESS)
}

async fn probe(args: StreamProbeArgs) -> Result<()> {
    let client = async_nats::ConnectOptions::new()
        .name("loadtest-stream-probe")
        .connect(args.nats.as_str())
        .await
        .with_context(|| format!("connecting to {}", args.nats))?;
    let mut js = jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(10));
    let stream_name = args.stream.clone();
    let config = stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("{SUBJECT_PREFIX}.>")],
        storage: stream::StorageType::File,
        num_replicas: args.replicas,
        allow_atomic_publish: true,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let mut created = None;
    for _ in 0..30 {
        match js.get_or_create_stream(config.clone()).await {
            Ok(s) => {
                created = Some(s);
                break;
            }
            // Leaders are still being elected after a (re)start.
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
    let stream = created.context("creating the probe stream")?;
    println!(
        "stream-probe {} (stream {stream_name}, R{}, {}-byte messages, {} per run, {} round(s))",
        args.nats,
        stream.cached_info().config.num_replicas,
        args.message_bytes,
        humantime::format_duration(args.duration),
        args.rounds
    );
    let payload = Bytes::from(vec![b'x'; args.message_bytes]);
    let modes = args
        .modes
        .iter()
        .map(|m| parse_mode(m, args.inflight, args.pipeline))
        .collect::<Result<Vec<_>>>()?;
    let mut runs: Vec<Run> = Vec::new();
    for round in 0..args.rounds {
        // Modes alternate within a round, so drift on a shared machine
        // affects all of them alike.
        for (m, (label, mode)) in modes.iter().enumerate() {
            js.get_stream(&stream_name)
                .await?
                .purge()
                .await
                .context("purging the probe stream")?;
            // Ids unique per round and mode: the deduplication window
            // outlives a purge.
            let tag = format!("r{round}m{m}");
            let run = measure(&client, &js, mode, &payload, args.duration, &tag).await?;
            println!(
                "  round {}  {label}: {:.0} msg/s ({} messages in {:.2} s)",
                round + 1,
                run.messages as f64 / run.elapsed.as_secs_f64(),
                run.messages,
                run.elapsed.as_secs_f64()
            );
            runs.push(Run {
                label: label.clone(),
                ..run
            });
        }
    }
    println!("summary (median, min-max over rounds):");
    for (label, _) in &modes {
        let mut rates: Vec<f64> = runs
            .iter()
            .filter(|r| &r.label == label)
            .map(Run::rate)
            .collect();
        rates.sort_by(|a, b| a.total_cmp(b));
        println!(
            "  {label}: {:.0} msg/s ({:.0}-{:.0})",
            rates[rates.len() / 2],
            rates[0],
            rates[rates.len() - 1]
        );
    }
    Ok(())
}

/// Which messages of an atomic batch carry a `Nats-Msg-Id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dedupe {
    None,
    First,
    Every,
}

fn parse_mode(spec: &str, inflight: usize, pipeline: usize) -> Result<(String, Mode)> {
    let parts: Vec<&str> = spec.split(':').collect();
    match parts.as_slice() {
        ["pipelined"] => Ok((
            format!("pipelined publishes, {pipeline} acks outstanding"),
            Mode::Pipelined { window: pipeline },
        )),
        ["atomic", n, rest @ ..] if rest.len() <= 1 => {
            let batch: usize = n.parse().context("atomic:N needs a number")?;
            if batch == 0 || batch > 1000 {
                bail!("an atomic batch holds 1..=1000 messages (the server's limit)");
            }
            let dedupe = match rest {
                [] => Dedupe::None,
                ["first"] => Dedupe::First,
                ["every"] => Dedupe::Every,
                _ => bail!("atomic:N:first or atomic:N:every"),
            };
            let ids = match dedupe {
                Dedupe::None => "",
                Dedupe::First => ", msg id on the first",
                Dedupe::Every => ", msg id on every message",
            };
            Ok((
                format!("atomic batches of {batch}, {inflight} in flight{ids}"),
                Mode::Atomic {
                    batch,
                    inflight,
                    dedupe,
                },
            ))
        }
        _ => bail!("unknown mode {spec:?} (atomic:N[:first|:every], pipelined)"),
    }
}

enum Mode {
    Atomic {
        batch: usize,
        inflight: usize,
        dedupe: Dedupe,
    },
    Pipelined {
        window: usize,
    },
}

async fn measure(
    client: &async_nats::Client,
    js: &jetstream::Context,
    mode: &Mode,
    payload: &Bytes,
    duration: Duration,
    tag: &str,
) -> Result<Run> {
    let start = Instant::now();
    let end = start + duration;
    let messages = match mode {
        Mode::Atomic {
            batch,
            inflight,
            dedupe,
        } => {
            let mut tasks = Vec::new();
            for worker in 0..*inflight {
                let (client, payload, batch, dedupe) =
                    (client.clone(), payload.clone(), *batch, *dedupe);
                let tag = tag.to_string();
                tasks.push(tokio::spawn(async move {
                    let mut sent = 0u64;
                    let mut n = 0u64;
                    while Instant::now() < end {
                        let id = format!("{tag}w{worker}b{n}");
                        n += 1;
                        sent += atomic_batch(&client, &id, batch, dedupe, &payload).await? as u64;
                    }
                    anyhow::Ok(sent)
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await??;
            }
            total
        }
        Mode::Pipelined { window } => {
            let mut outstanding = FuturesUnordered::new();
            let mut acked = 0u64;
            let mut i = 0u64;
            while Instant::now() < end {
                while outstanding.len() < *window {
                    let subject = format!("{SUBJECT_PREFIX}.d{}", i % 100);
                    i += 1;
                    outstanding.push(std::future::IntoFuture::into_future(
                        js.publish(subject, payload.clone()).await?,
                    ));
                }
                if let Some(ack) = outstanding.next().await {
                    ack.context("publish ack")?;
                    acked += 1;
                }
            }
            while let Some(ack) = outstanding.next().await {
                ack.context("publish ack")?;
                acked += 1;
            }
            acked
        }
    };
    Ok(Run {
        label: String::new(),
        messages,
        elapsed: start.elapsed(),
    })
}

/// One atomic batch (ADR-50): the first message as a request (the server
/// confirms the batch started), the middle ones published, the commit as a
/// request answered with the pub ack. Returns the messages stored.
async fn atomic_batch(
    client: &async_nats::Client,
    id: &str,
    batch: usize,
    dedupe: Dedupe,
    payload: &Bytes,
) -> Result<usize> {
    for i in 0..batch {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_BATCH_ID, id);
        headers.insert(NATS_BATCH_SEQUENCE, (i + 1).to_string().as_str());
        if dedupe == Dedupe::Every || (dedupe == Dedupe::First && i == 0) {
            headers.insert(NATS_MESSAGE_ID, format!("{id}.{i}").as_str());
        }
        let last = i + 1 == batch;
        if last {
            headers.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
        }
        let subject = format!("{SUBJECT_PREFIX}.d{}", i % 100);
        if i == 0 || last {
            let reply = client
                .send_request(
                    subject,
                    Request::new()
                        .headers(headers)
                        .payload(payload.clone())
                        .timeout(Some(Duration::from_secs(10))),
                )
                .await
                .context("batch request")?;
            if !reply.payload.is_empty() {
                let text = String::from_utf8_lossy(&reply.payload);
                if text.contains("\"error\"") {
                    bail!("the stream refused a batch: {text}");
                }
            }
        } else {
            client
                .publish_with_headers(subject, headers, payload.clone())
                .await
                .context("batch publish")?;
        }
    }
    Ok(batch)
}
