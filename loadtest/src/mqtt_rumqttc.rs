//! The same load through rumqttc's `AsyncClient` + `EventLoop` (MQTT 3.1.1),
//! selected with `--mqtt-client rumqttc`. It exists to cross-check the native
//! client against a widely used one and to measure what a full client costs;
//! the native client is the default because it needs less client CPU.
//!
//! A producer task paces `publish` calls; the event loop reports each
//! outgoing PUBLISH with its packet id (in request order), which is matched
//! to the scheduled time queued by the producer, and each PUBACK by id.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};

use crate::mqtt::{connect_error_kind, MqttConfig};
use crate::run::{ConnOutcome, Shared};
use crate::schedule::ConnSchedule;
use crate::stats::Bits;

pub struct Connected {
    client: AsyncClient,
    eventloop: EventLoop,
}

fn error_kind(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Io(io) => connect_error_kind(io).to_string(),
        ConnectionError::NetworkTimeout => "connect_timeout".into(),
        ConnectionError::ConnectionRefused(code) => format!("connack_{code:?}"),
        _ => "connect_failed".into(),
    }
}

pub async fn connect(
    cfg: &MqttConfig,
    conn: u32,
    password: Option<&str>,
) -> Result<Connected, String> {
    if cfg.v5 {
        return Err("rumqttc_client_supports_only_mqtt_3.1.1".into());
    }
    let (host, port) = cfg
        .addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| "bad_address".to_string())?;
    let mut opts = MqttOptions::new(format!("{}{}", cfg.client_id_prefix, conn), host, port);
    let ka = if cfg.keep_alive.is_zero() {
        Duration::ZERO
    } else {
        cfg.keep_alive.max(Duration::from_secs(1))
    };
    opts.set_keep_alive(ka)
        .set_clean_session(true)
        .set_inflight(cfg.window)
        .set_max_packet_size(1 << 20, 1 << 20);
    if let Some(p) = password {
        opts.set_credentials(cfg.username.as_str(), p);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, usize::from(cfg.window));
    let mut net = eventloop.network_options();
    net.set_connection_timeout(cfg.timeout.as_secs().max(1));
    net.set_tcp_nodelay(cfg.nodelay);
    eventloop.set_network_options(net);
    let wait = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(error_kind(&e)),
            }
        }
    };
    match tokio::time::timeout(cfg.timeout, wait).await {
        Err(_) => Err("connack_timeout".into()),
        Ok(Err(kind)) => Err(kind),
        Ok(Ok(())) => Ok(Connected { client, eventloop }),
    }
}

#[derive(Clone, Copy)]
struct Sent {
    intended: Instant,
    seq: u64,
    step: usize,
}

pub async fn run_conn(
    sh: &Arc<Shared>,
    cfg: &MqttConfig,
    conn: u32,
    connected: Connected,
    mut sched: ConnSchedule,
    topics: &[Vec<u8>],
) -> ConnOutcome {
    let Connected {
        client,
        mut eventloop,
    } = connected;
    let qos = if cfg.qos == 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    // Scheduled times of requests not yet seen leaving, in request order.
    let queued: Arc<Mutex<VecDeque<Sent>>> = Arc::default();
    let topics: Vec<String> = topics
        .iter()
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .collect();
    let used = Arc::new(AtomicU64::new(0));
    let producer = {
        let (sh, queued, client, used) = (sh.clone(), queued.clone(), client.clone(), used.clone());
        tokio::spawn(async move {
            let mut body = Vec::with_capacity(sh.payload_size + 64);
            let mut seq = 0u64;
            loop {
                let Some((intended, step, lag)) = sched.next_due().await else {
                    break;
                };
                if let Some(lag) = lag {
                    sh.stats.lagged(conn as usize, &[lag]);
                }
                sh.payload.write(&mut body, conn, seq);
                queued.lock().unwrap().push_back(Sent {
                    intended,
                    seq,
                    step,
                });
                let topic = topics[(seq % topics.len() as u64) as usize].clone();
                if client
                    .publish(topic, qos, false, body.clone())
                    .await
                    .is_err()
                {
                    queued.lock().unwrap().pop_back();
                    break;
                }
                sh.stats.sent(step, 1);
                seq += 1;
                used.store(seq, Ordering::Relaxed);
            }
        })
    };

    let mut inflight: HashMap<u16, Sent> = HashMap::new();
    let mut acked = Bits::default();
    let mut last_ack = Instant::now();
    let shard = conn as usize;
    let tick = Duration::from_millis(50);
    let failure: Option<String> = loop {
        let idle = inflight.is_empty() && queued.lock().unwrap().is_empty();
        if producer.is_finished() && idle {
            break None;
        }
        if !inflight.is_empty() && last_ack.elapsed() >= sh.timeout {
            break Some("ack_timeout".into());
        }
        let ev = match tokio::time::timeout(tick, eventloop.poll()).await {
            Err(_) => continue,
            Ok(Err(_)) => break Some("disconnected".into()),
            Ok(Ok(ev)) => ev,
        };
        match ev {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let Some(s) = queued.lock().unwrap().pop_front() else {
                    break Some("protocol_unexpected_publish".into());
                };
                if qos == QoS::AtLeastOnce {
                    if inflight.is_empty() {
                        last_ack = Instant::now();
                    }
                    inflight.insert(pkid, s);
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let Some(s) = inflight.remove(&ack.pkid) else {
                    break Some("protocol_unexpected_puback".into());
                };
                let now = Instant::now();
                last_ack = now;
                let lat = now.saturating_duration_since(s.intended).as_micros() as u64;
                sh.stats.acked(s.step, shard, &[lat]);
                acked.set(s.seq);
            }
            Event::Incoming(Packet::Disconnect) => break Some("server_disconnect".into()),
            _ => {}
        }
    };
    let _ = client.try_disconnect();
    if let Some(kind) = &failure {
        let lost_kind = if kind == "ack_timeout" {
            "ack_timeout"
        } else {
            sh.stats.error(kind, 1);
            "lost_in_flight"
        };
        for s in inflight.values() {
            sh.stats.failed(s.step, lost_kind, 1);
        }
        // Handed to the client but never written.
        for s in queued.lock().unwrap().drain(..) {
            sh.stats.failed(s.step, "lost_unwritten", 1);
        }
        producer.abort();
    } else {
        // Flush the DISCONNECT.
        let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    }
    let _ = producer.await;
    ConnOutcome {
        conn,
        seqs: used.load(Ordering::Relaxed),
        acked,
    }
}
