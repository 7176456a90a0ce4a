//! SUBSCRIBE and UNSUBSCRIBE: which topic filters a token may hold, the
//! session's subscriptions and its feed, and storing them for a
//! persistent session.
//!
//! The one filter served is a state topic of the token's application,
//! `applications/{app}/devices/{device}/state`, with `+` for the device,
//! alone or shared (`$share/{group}/…`, see `streams::group`).
//! A token needs `device.getState`; with `+` it receives the devices it
//! may read. Anything else is refused per filter: another application, a
//! device it may not read or a token without the scope → 0x87; `#` or `+`
//! elsewhere → 0xA2; any other filter → 0x8F; over
//! `streams.max_subscriptions_per_connection` or a session limit → 0x97
//! (3.1.1: 0x80 for all).

use std::num::NonZeroU16;

use bytestring::ByteString;

use super::deliver::{Sub, Subscriber};
use super::proto::{SubAck, UnsubAck};
use super::session::Session;
use crate::auth::Scope;
use crate::ids::is_valid_id;
use crate::streams::cursor::{end_of, ReadBounds, Start};
use crate::streams::feed::{self, FeedSpec, Interest};
use crate::streams::group::MemberSpec;
use crate::streams::sessions::{Record, SessionError};
use crate::timefmt::now_ms;

/// The most states a feed reads from storage at once while behind (the
/// byte bound is `streams.consumer_buffer_bytes`).
pub(super) const REPLAY_PAGE_STATES: usize = 4096;

/// A topic filter this server serves: the application and the device
/// (`None` for `+`), and the group of a shared subscription.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Parsed<'a> {
    pub share: Option<&'a str>,
    /// The filter without its `$share/{group}/`.
    pub topic: &'a str,
    pub app: &'a str,
    pub device: Option<&'a str>,
}

/// Parses a topic filter, or says how to refuse it.
pub(super) fn parse_filter(filter: &str) -> Result<Parsed<'_>, SubAck> {
    let (share, filter) = match filter.strip_prefix("$share/") {
        None => (None, filter),
        Some(rest) => {
            let (group, topic) = rest.split_once('/').ok_or(SubAck::FilterInvalid)?;
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(SubAck::FilterInvalid);
            }
            (Some(group), topic)
        }
    };
    let levels: smallvec::SmallVec<[&str; 6]> = filter.split('/').collect();
    // Wildcards must fill a whole level ([MQTT-4.7.1-2/3]); `#` only last.
    for (i, l) in levels.iter().enumerate() {
        if (l.contains('+') && *l != "+")
            || (l.contains('#') && (*l != "#" || i + 1 != levels.len()))
        {
            return Err(SubAck::FilterInvalid);
        }
    }
    let wild = |l: &str| l == "+" || l == "#";
    match levels.as_slice() {
        ["applications", app, "devices", device, "state"]
            if !wild(app) && is_valid_id(app) && (*device == "+" || is_valid_id(device)) =>
        {
            Ok(Parsed {
                share,
                topic: filter,
                app,
                device: (*device != "+").then_some(*device),
            })
        }
        _ if levels.iter().any(|l| wild(l)) => Err(SubAck::WildcardUnsupported),
        _ => Err(SubAck::FilterInvalid),
    }
}

impl Session<'_> {
    /// Whether the token may read what a filter names.
    fn may_read(&self, p: &Parsed<'_>) -> bool {
        *self.grant.app == *p.app
            && self.grant.scopes.allows(Scope::GetState)
            && p.device
                .is_none_or(|d| self.grant.permits(p.app, Some(d), Scope::GetState))
    }

    fn interest(subs: &[Sub]) -> Interest {
        let mut i = Interest::default();
        for s in subs.iter().filter(|s| s.share.is_none()) {
            i.add(s.device.as_deref(), s.qos);
        }
        i
    }

    /// Joins the groups of new shared subscriptions and leaves those of
    /// removed ones (a changed QoS rejoins).
    fn refresh_groups(&mut self) {
        let ctx = self.ctx;
        let grant = self.grant.clone();
        let persistent = self.keep.as_ref().is_some_and(|k| k.persistent);
        let Some(sub) = self.sub.as_mut() else {
            return;
        };
        let wanted: Vec<Sub> = sub
            .subs
            .iter()
            .filter(|s| s.share.is_some())
            .cloned()
            .collect();
        sub.groups.retain(|(_, filter, m)| {
            wanted
                .iter()
                .any(|s| s.filter == *filter && s.qos == m.qos())
        });
        for s in wanted {
            if sub.groups.iter().any(|(_, f, _)| *f == s.filter) {
                continue;
            }
            let Ok(p) = parse_filter(&s.filter) else {
                continue;
            };
            let source = sub.new_source();
            let m = ctx.groups.join(
                &grant.app,
                p.share.unwrap_or_default(),
                p.topic,
                p.device,
                MemberSpec {
                    grant: grant.clone(),
                    qos: s.qos,
                    tx: sub.tx.clone(),
                    source,
                    persistent,
                },
            );
            sub.groups.push((source, s.filter.clone(), m));
        }
    }

    /// Starts the feed of the session's subscriptions at `start`, or gives
    /// a running one the new interest.
    fn refresh_feed(&mut self, start: u64) {
        let Some(sub) = self.sub.as_mut() else {
            return;
        };
        let interest = Self::interest(&sub.subs);
        if interest.is_empty() {
            // Nothing wanted any more: the feed ends (and writes its
            // position).
            sub.own = None;
            return;
        }
        match &sub.own {
            Some(f) => f.set_interest(interest),
            None => {
                let ctx = self.ctx;
                let persist = self
                    .keep
                    .as_ref()
                    .filter(|k| k.persistent)
                    .map(|k| (k.owner.clone(), ctx.streams.session_flush));
                let spec = FeedSpec {
                    hub: ctx.hub.clone(),
                    store: ctx.store.clone(),
                    app: self.grant.app.as_ref().into(),
                    grant: self.grant.clone(),
                    start: Start::Next(start),
                    bounds: ReadBounds {
                        max_entries: REPLAY_PAGE_STATES,
                        max_bytes: ctx.streams.consumer_buffer_bytes,
                    },
                    persist,
                    source: 0,
                };
                sub.own = Some(feed::start(spec, interest, sub.tx.clone(), &ctx.feeds));
            }
        }
    }

    /// The position a new feed starts at: where a resumed session stopped,
    /// or the end of the log (a new subscription sees what comes next).
    async fn feed_start(&mut self) -> Result<u64, SessionError> {
        if let Some(at) = self.keep.as_mut().and_then(|k| k.resume_at.take()) {
            return Ok(at);
        }
        let (store, app) = (self.ctx.store.clone(), self.grant.app.clone());
        tokio::task::spawn_blocking(move || end_of(&store, &app))
            .await
            .map_err(|e| SessionError::Store(crate::store::StoreError::Thread(e.to_string())))?
            .map_err(SessionError::Store)
    }

    fn subscriber(&mut self) -> &mut Subscriber {
        let window = self.window();
        self.sub
            .get_or_insert_with(|| Box::new(Subscriber::new(window)))
    }

    /// The QoS 1 window toward this client.
    fn window(&self) -> usize {
        usize::from(self.ctx.streams.max_inflight.min(self.receive_max))
    }

    /// Restores the subscriptions of a resumed session and starts its feed
    /// where it stopped.
    pub(super) async fn resume(&mut self, subs: Vec<(String, u8)>) {
        let mut restored = Vec::new();
        for (filter, qos) in subs {
            if let Ok(p) = parse_filter(&filter) {
                if self.may_read(&p) {
                    let device = p.device.map(Into::into);
                    let share = p.share.map(Into::into);
                    restored.push(Sub {
                        filter: ByteString::from(filter),
                        share,
                        device,
                        qos: qos.min(1),
                    });
                }
            }
        }
        if restored.is_empty() {
            return;
        }
        self.subscriber().subs = restored;
        self.refresh_groups();
        if Self::interest(&self.subscriber().subs).is_empty() {
            return;
        }
        match self.feed_start().await {
            Ok(start) => self.refresh_feed(start),
            Err(e) => tracing::warn!(error = %e, "resumed session's feed not started"),
        }
    }

    /// Handles a SUBSCRIBE: checks each filter, stores the session if it
    /// is persistent (refusing what would exceed a session limit), starts
    /// or updates the feed, and writes the SUBACK.
    pub(super) async fn subscribe(
        &mut self,
        packet_id: NonZeroU16,
        filters: Vec<(ByteString, u8)>,
    ) {
        let max = self.ctx.streams.max_subscriptions_per_connection;
        let mut subs = self
            .sub
            .as_ref()
            .map(|s| s.subs.clone())
            .unwrap_or_default();
        let mut outcomes = Vec::with_capacity(filters.len());
        // Ingest-only tokens may not subscribe to anything.
        let may_subscribe = self.grant.scopes.allows(Scope::GetState);
        for (filter, qos) in filters {
            let qos = qos.min(1);
            let outcome = match parse_filter(&filter) {
                _ if !may_subscribe => SubAck::NotAuthorized,
                // An ingest-only broker has no log to deliver from.
                _ if !self.ctx.readable => SubAck::Failed,
                Err(why) => why,
                Ok(p) if !self.may_read(&p) => SubAck::NotAuthorized,
                Ok(p) => {
                    let device = p.device.map(Into::into);
                    let share = p.share.map(Into::into);
                    let held = subs.len();
                    match subs.iter_mut().find(|s| s.filter == filter) {
                        // The same filter again replaces its subscription.
                        Some(s) => {
                            s.qos = qos;
                            SubAck::Granted(qos)
                        }
                        None if held >= max => SubAck::Quota,
                        None => {
                            subs.push(Sub {
                                filter,
                                share,
                                device,
                                qos,
                            });
                            SubAck::Granted(qos)
                        }
                    }
                }
            };
            outcomes.push(outcome);
        }
        let granted = outcomes.iter().any(|o| matches!(o, SubAck::Granted(_)));
        let new_feed =
            self.sub.as_ref().is_none_or(|s| s.own.is_none()) && !Self::interest(&subs).is_empty();
        let mut start = 0;
        if granted && new_feed {
            match self.feed_start().await {
                Ok(s) => start = s,
                Err(e) => {
                    tracing::warn!(error = %e, "subscription refused: the log could not be read");
                    refuse_all(&mut outcomes, SubAck::Failed);
                }
            }
        }
        if outcomes.iter().any(|o| matches!(o, SubAck::Granted(_))) {
            if let Err(e) = self.store_session(&subs, start).await {
                let why = match e {
                    SessionError::Quota => SubAck::Quota,
                    _ => SubAck::Failed,
                };
                tracing::debug!(error = %e, "subscription refused: session not stored");
                refuse_all(&mut outcomes, why);
                // Nothing of this SUBSCRIBE applies.
                subs = self
                    .sub
                    .as_ref()
                    .map(|s| s.subs.clone())
                    .unwrap_or_default();
            }
        }
        if outcomes.iter().any(|o| matches!(o, SubAck::Granted(_))) {
            self.subscriber().subs = subs;
            self.refresh_feed(start);
            self.refresh_groups();
        }
        self.codec.suback(&mut self.out, packet_id, &outcomes);
    }

    /// Handles an UNSUBSCRIBE.
    pub(super) async fn unsubscribe(&mut self, packet_id: NonZeroU16, filters: Vec<ByteString>) {
        let mut outcomes = Vec::with_capacity(filters.len());
        let mut subs = self
            .sub
            .as_ref()
            .map(|s| s.subs.clone())
            .unwrap_or_default();
        for f in &filters {
            let before = subs.len();
            subs.retain(|s| s.filter != *f);
            outcomes.push(match subs.len() < before {
                true => UnsubAck::Done,
                false => UnsubAck::NoSubscription,
            });
        }
        if outcomes.contains(&UnsubAck::Done) {
            let stored = match subs.is_empty() {
                // A session with no subscriptions keeps nothing worth
                // storing.
                true => self.forget_session().await,
                false => self.store_session(&subs, 0).await,
            };
            if let Err(e) = stored {
                tracing::debug!(error = %e, "session change not stored");
            }
            if let Some(sub) = self.sub.as_mut() {
                sub.subs = subs;
            }
            self.refresh_feed(0);
            self.refresh_groups();
        }
        self.codec.unsuback(&mut self.out, packet_id, &outcomes);
    }

    /// Stores a persistent session's subscriptions (a new one starting at
    /// `start`); nothing for a session that is not kept.
    async fn store_session(&mut self, subs: &[Sub], start: u64) -> Result<(), SessionError> {
        let Some(keep) = self.keep.as_mut().filter(|k| k.persistent) else {
            return Ok(());
        };
        let record = Record {
            subs: subs.iter().map(|s| (s.filter.to_string(), s.qos)).collect(),
            expiry: keep.expiry,
            ended_at: None,
        };
        keep.owner.save(record, start).await?;
        keep.stored = true;
        Ok(())
    }

    async fn forget_session(&mut self) -> Result<(), SessionError> {
        let Some(keep) = self.keep.as_mut().filter(|k| k.stored) else {
            return Ok(());
        };
        keep.owner.delete().await?;
        keep.stored = false;
        Ok(())
    }

    /// When the connection ends: a persistent session with subscriptions
    /// is stored as ended (its expiry counts from now); any other stored
    /// session is deleted. Runs to its end whether or not the client is
    /// still there.
    pub(super) async fn end_session(&mut self) {
        let subs = self
            .sub
            .as_ref()
            .map(|s| s.subs.clone())
            .unwrap_or_default();
        let Some(keep) = self.keep.as_mut() else {
            return;
        };
        let r = match (keep.persistent, subs.is_empty()) {
            (true, false) => {
                let record = Record {
                    subs: subs.iter().map(|s| (s.filter.to_string(), s.qos)).collect(),
                    expiry: keep.expiry,
                    ended_at: Some(now_ms()),
                };
                keep.owner.save(record, 0).await
            }
            _ if keep.stored => keep.owner.delete().await,
            _ => Ok(()),
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, "session not stored at its end");
        }
    }
}

fn refuse_all(outcomes: &mut [SubAck], why: SubAck) {
    for o in outcomes.iter_mut() {
        if matches!(o, SubAck::Granted(_)) {
            *o = why;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert_eq!(
            parse_filter("applications/farm/devices/+/state"),
            Ok(Parsed {
                share: None,
                topic: "applications/farm/devices/+/state",
                app: "farm",
                device: None
            })
        );
        assert_eq!(
            parse_filter("$share/g1/applications/farm/devices/pump-1/state"),
            Ok(Parsed {
                share: Some("g1"),
                topic: "applications/farm/devices/pump-1/state",
                app: "farm",
                device: Some("pump-1")
            })
        );
        for (f, why) in [
            ("applications/farm/#", SubAck::WildcardUnsupported),
            (
                "applications/+/devices/d/state",
                SubAck::WildcardUnsupported,
            ),
            ("#", SubAck::WildcardUnsupported),
            ("applications/farm/devices/+/+", SubAck::WildcardUnsupported),
            ("applications/farm/devices/d+/state", SubAck::FilterInvalid),
            ("applications/farm/devices/#/state", SubAck::FilterInvalid),
            ("applications/farm/devices/d/state/x", SubAck::FilterInvalid),
            ("applications/farm/devices/a b/state", SubAck::FilterInvalid),
            ("other/topic", SubAck::FilterInvalid),
            ("", SubAck::FilterInvalid),
            ("$share/g", SubAck::FilterInvalid),
            (
                "$share//applications/farm/devices/+/state",
                SubAck::FilterInvalid,
            ),
            (
                "$share/g+/applications/farm/devices/+/state",
                SubAck::FilterInvalid,
            ),
            ("$SYS/broker", SubAck::FilterInvalid),
        ] {
            assert_eq!(parse_filter(f), Err(why), "{f}");
        }
    }
}
