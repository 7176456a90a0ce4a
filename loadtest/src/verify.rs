//! `--verify`: reads every device's history back through the admin API
//! (oldest first, following `next`) and checks that each acknowledged
//! message is stored exactly once and byte for byte as sent.
//!
//! Every message's `data` is unique and reproducible (run id, connection,
//! sequence number; see `payload`), so each stored item names the message
//! it claims to be, and its raw JSON text (`RawValue`, not re-serialized)
//! is compared with the exact bytes that message had. Items of other runs
//! are counted and ignored; stored messages that were never acknowledged
//! (QoS 0, or an ack lost with its connection) are allowed and counted.
//!
//! In cluster mode any broker can verify: it is first asked for the
//! ingest stream's newest state (`GET /cluster/ingest`), taken after every
//! acknowledgement arrived, and every page is then read with that as
//! `minSeq`, so the broker answers once its read model holds everything
//! acknowledged anywhere (retried while it answers 503 not_caught_up, up
//! to `--verify-timeout`).

use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sluice::client::{AdminClient, ClientError};

use crate::fleet::{parallel, Fleet};
use crate::payload::{Payload, Probe};
use crate::run::ConnOutcome;
use crate::stats::Bits;

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub devices: u64,
    /// Messages acknowledged during the run.
    pub acked: u64,
    /// Acknowledged messages found stored, byte-equal.
    pub found: u64,
    /// Acknowledged messages not found (or only found altered).
    pub missing: u64,
    /// Extra stored copies of a message of this run.
    pub duplicates: u64,
    /// Stored items of this run whose bytes or device differ from what was sent.
    pub mismatched: u64,
    /// Stored messages of this run that were not acknowledged (allowed).
    pub unacked_stored: u64,
    /// Items from other runs or other writers (ignored).
    pub other_items: u64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.mismatched == 0
    }

    pub fn line(&self) -> String {
        format!(
            "acked {}, found {}, missing {}, duplicates {}, mismatched {} \
             (also stored unacked {}, other items {}, {} devices): {}",
            self.acked,
            self.found,
            self.missing,
            self.duplicates,
            self.mismatched,
            self.unacked_stored,
            self.other_items,
            self.devices,
            if self.ok() { "OK" } else { "FAILED" }
        )
    }
}

#[derive(Deserialize)]
struct Page<'a> {
    #[serde(borrow)]
    items: Vec<Item<'a>>,
    next: Option<String>,
}

#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow)]
    data: &'a RawValue,
}

/// What one device's history holds.
#[derive(Debug, Default)]
struct DeviceScan {
    /// (connection, sequence) of byte-equal items of this run.
    good: Vec<(u32, u64)>,
    mismatched: u64,
    other: u64,
}

/// Checks one page; returns its `next` cursor.
fn scan_page(
    text: &str,
    device: &str,
    run: &str,
    payload: &Payload,
    fleet: &Fleet,
    out: &mut DeviceScan,
) -> Result<Option<String>> {
    let page: Page = serde_json::from_str(text).context("unexpected history page")?;
    for item in &page.items {
        let raw = item.data.get();
        let probe: Probe = match serde_json::from_str(raw) {
            Ok(p) => p,
            Err(_) => {
                out.other += 1;
                continue;
            }
        };
        if probe.r != run {
            out.other += 1;
            continue;
        }
        let conn_ok = (probe.c as usize) < fleet.conn_tokens.len();
        let right_device = conn_ok
            && &**fleet.device_of(probe.c, (probe.s % u64::from(fleet.per_conn)) as u32) == device;
        if right_device && raw.as_bytes() == payload.data(probe.c, probe.s).as_slice() {
            out.good.push((probe.c, probe.s));
        } else {
            out.mismatched += 1;
        }
    }
    Ok(page.next)
}

pub async fn run(
    admin: &AdminClient,
    timeout: std::time::Duration,
    app: &str,
    fleet: &Arc<Fleet>,
    payload: &Payload,
    outcomes: &[ConnOutcome],
    concurrency: usize,
) -> Result<VerifyReport> {
    let devices = fleet.distinct_devices();
    let deadline = tokio::time::Instant::now() + timeout;
    let min_seq = ingest_status(admin, deadline)
        .await
        .context("asking the broker for the ingest stream's newest state")?
        .map(|v| {
            v["streamLast"]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("no streamLast in {v}"))
        })
        .transpose()?;
    let scans = {
        let (admin, app, fleet, payload) = (
            Arc::new(admin.clone()),
            Arc::<str>::from(app),
            fleet.clone(),
            Arc::new(payload.clone()),
        );
        let devices = Arc::new(devices.clone());
        parallel(concurrency, devices.len(), move |k| {
            let (admin, app, fleet, payload, devices) = (
                admin.clone(),
                app.clone(),
                fleet.clone(),
                payload.clone(),
                devices.clone(),
            );
            async move {
                let device = &devices[k];
                let mut scan = DeviceScan::default();
                let mut cursor: Option<String> = None;
                loop {
                    let text =
                        page(&admin, &app, device, cursor.as_deref(), min_seq, deadline).await?;
                    cursor = scan_page(&text, device, payload.run(), &payload, &fleet, &mut scan)
                        .with_context(|| format!("device {device}"))?;
                    if cursor.is_none() {
                        return Ok(scan);
                    }
                }
            }
        })
        .await
        .context("reading the data back through the admin API")?
    };
    Ok(tally(
        devices.len(),
        fleet.conn_tokens.len(),
        outcomes,
        scans,
    ))
}

/// `GET /cluster/ingest`, asked again until `deadline` while the broker
/// answers 503 (NATS not reachable yet, e.g. just after a restart).
async fn ingest_status(
    admin: &AdminClient,
    deadline: tokio::time::Instant,
) -> Result<Option<serde_json::Value>, ClientError> {
    loop {
        match admin.ingest_status().await {
            Err(ClientError::Api { status: 503, .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

/// A history page; while a cluster broker's read model has not reached
/// `min_seq` (503 not_caught_up), or it cannot serve yet (503 unavailable:
/// its view of the cluster's tokens is stale after a NATS restart), asked
/// again until `deadline`.
async fn page(
    admin: &AdminClient,
    app: &str,
    device: &str,
    cursor: Option<&str>,
    min_seq: Option<u64>,
    deadline: tokio::time::Instant,
) -> Result<String> {
    loop {
        match admin.state_page(app, device, cursor, min_seq).await {
            Err(ClientError::Api { status: 503, .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            other => return Ok(other?),
        }
    }
}

fn tally(
    devices: usize,
    conns: usize,
    outcomes: &[ConnOutcome],
    scans: Vec<DeviceScan>,
) -> VerifyReport {
    let mut r = VerifyReport {
        devices: devices as u64,
        ..VerifyReport::default()
    };
    let mut sent: Vec<u64> = vec![0; conns];
    let mut acked: Vec<Option<&Bits>> = vec![None; conns];
    for o in outcomes {
        if let Some(slot) = sent.get_mut(o.conn as usize) {
            *slot = o.seqs;
            acked[o.conn as usize] = Some(&o.acked);
        }
    }
    let mut seen: Vec<Bits> = sent.iter().map(|&n| Bits::with_len(n)).collect();
    for scan in scans {
        r.mismatched += scan.mismatched;
        r.other_items += scan.other;
        for (c, s) in scan.good {
            let c = c as usize;
            if s >= sent[c] {
                // Claims to be a message this run never made.
                r.mismatched += 1;
            } else if seen[c].get(s) {
                r.duplicates += 1;
            } else {
                seen[c].set(s);
            }
        }
    }
    for (c, seen) in seen.iter().enumerate() {
        let Some(bits) = acked[c] else { continue };
        let mut found = 0;
        for s in bits.iter() {
            r.acked += 1;
            if seen.get(s) {
                found += 1;
            } else {
                r.missing += 1;
            }
        }
        r.found += found;
        r.unacked_stored += seen.count() - found;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Fleet {
        Fleet {
            devices: vec!["d0".into(), "d1".into()],
            device_tokens: vec![None, None],
            conn_tokens: vec![None, None],
            per_conn: 1,
            source: String::new(),
        }
    }

    fn page(items: &[String], next: Option<&str>) -> String {
        let items: Vec<String> = items
            .iter()
            .map(|d| format!(r#"{{"time":1,"data":{d}}}"#))
            .collect();
        format!(
            r#"{{"items":[{}],"next":{}}}"#,
            items.join(","),
            next.map(|n| format!("\"{n}\"")).unwrap_or("null".into())
        )
    }

    fn data(p: &Payload, c: u32, s: u64) -> String {
        String::from_utf8(p.data(c, s)).unwrap()
    }

    #[test]
    fn counts_found_missing_duplicates_and_mismatches() {
        let p = Payload::new("run1", 80);
        let f = fleet();
        let other = Payload::new("run0", 80);
        // Connection 0 → d0 sent 0..4, acked 0,1,2 (3 lost its ack but is stored);
        // connection 1 → d1 sent 0..2, acked both, 1 is missing.
        let mut a0 = Bits::default();
        [0, 1, 2].into_iter().for_each(|s| a0.set(s));
        let mut a1 = Bits::default();
        [0, 1].into_iter().for_each(|s| a1.set(s));
        let outcomes = [
            ConnOutcome {
                conn: 0,
                seqs: 4,
                acked: a0,
            },
            ConnOutcome {
                conn: 1,
                seqs: 2,
                acked: a1,
            },
        ];
        let mut s0 = DeviceScan::default();
        let page1 = page(
            &[data(&p, 0, 0), data(&p, 0, 1), data(&other, 0, 2)],
            Some("c"),
        );
        let next = scan_page(&page1, "d0", "run1", &p, &f, &mut s0).unwrap();
        assert_eq!(next.as_deref(), Some("c"));
        // 2 and 3 stored, 1 stored twice, a tampered copy of 2, and d1's message.
        let tampered = data(&p, 0, 2).replace("\"p\":\"x", "\"p\":\"y");
        let page2 = page(
            &[
                data(&p, 0, 2),
                data(&p, 0, 3),
                data(&p, 0, 1),
                tampered,
                data(&p, 1, 0),
            ],
            None,
        );
        assert_eq!(
            scan_page(&page2, "d0", "run1", &p, &f, &mut s0).unwrap(),
            None
        );
        let mut s1 = DeviceScan::default();
        scan_page(
            &page(&[data(&p, 1, 0), r#"{"t":1}"#.into()], None),
            "d1",
            "run1",
            &p,
            &f,
            &mut s1,
        )
        .unwrap();
        let r = tally(2, 2, &outcomes, vec![s0, s1]);
        assert_eq!(
            r,
            VerifyReport {
                devices: 2,
                acked: 5,
                found: 4,
                missing: 1,
                duplicates: 1,
                mismatched: 2,
                unacked_stored: 1,
                other_items: 2,
            }
        );
        assert!(!r.ok());
    }

    #[test]
    fn whitespace_differences_are_mismatches() {
        // The server must store the exact text: a re-serialized copy differs.
        let p = Payload::new("r", 60);
        let f = fleet();
        let spaced = data(&p, 0, 0).replace(',', ", ");
        let mut s = DeviceScan::default();
        scan_page(&page(&[spaced], None), "d0", "r", &p, &f, &mut s).unwrap();
        assert_eq!((s.good.len(), s.mismatched), (0, 1));
    }
}
