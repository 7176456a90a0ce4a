//! Names on NATS: buckets, the ingest stream and its subjects, all derived
//! from `cluster.prefix` so two Sluice clusters can share one NATS.
//!
//! Application and device ids may contain `.`, which separates subject
//! tokens in NATS. In a subject every `.` of an id is written `%2E` (`%` is
//! not allowed in ids, so the mapping is reversible and two ids never share
//! a subject).

use async_nats::Subject;

/// Longest prefix: bucket and stream names stay well under NATS limits.
const MAX_PREFIX: usize = 32;

/// A prefix is 1-32 of `a-z 0-9 _ -`: valid in bucket, stream, consumer and
/// subject names alike, and lower case so that the upper-cased stream name
/// of two different prefixes never collides.
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Every name one Sluice cluster uses on NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// `prefix` must satisfy [`valid_prefix`] (config validation checks it).
    pub fn new(prefix: &str) -> Names {
        debug_assert!(valid_prefix(prefix));
        Names {
            prefix: prefix.to_string(),
        }
    }

    /// KV bucket of token records, keyed by token id.
    pub fn tokens_bucket(&self) -> String {
        format!("{}_tokens", self.prefix)
    }

    /// KV bucket of brokers and their applied token revision.
    pub fn nodes_bucket(&self) -> String {
        format!("{}_nodes", self.prefix)
    }

    /// Core-NATS subject on which brokers announce a newly applied token
    /// revision (the fast path of the revocation barrier).
    pub fn applied_subject(&self) -> String {
        format!("{}.nodes.applied", self.prefix)
    }

    /// The ingest stream.
    pub fn state_stream(&self) -> String {
        format!("{}_STATE", self.prefix.to_ascii_uppercase())
    }

    /// Subjects of accepted states: `<prefix>.state.<app>.<device>`.
    pub fn state_subjects(&self) -> String {
        format!("{}.state.>", self.prefix)
    }

    /// Subjects of publish fences (see `publish.rs`); in the same stream so
    /// they share its deduplication window, never delivered to readers of
    /// states.
    pub fn fence_subjects(&self) -> String {
        format!("{}.fence.>", self.prefix)
    }

    /// Subjects of control messages (removals, retention overrides; see
    /// `control.rs`): in the stream so every broker applies them in order
    /// with the states, outside `<prefix>.state.>` so downstream readers
    /// of states never see them.
    pub fn control_subjects(&self) -> String {
        format!("{}.ctl.>", self.prefix)
    }

    /// The subject of one application's control messages:
    /// `<prefix>.ctl.<app>`.
    pub fn control_subject(&self, app: &str) -> Subject {
        let mut s = format!("{}.ctl.", self.prefix);
        push_escaped(&mut s, app);
        Subject::from(s)
    }

    /// Whether `subject` is a control subject.
    pub fn is_control(&self, subject: &str) -> bool {
        subject
            .strip_prefix(self.prefix.as_str())
            .is_some_and(|rest| rest.starts_with(".ctl."))
    }

    pub fn fence_subject(&self, node: &str) -> Subject {
        Subject::from(format!("{}.fence.{node}", self.prefix))
    }

    /// The subject of one device's states.
    pub fn state_subject(&self, app: &str, device: &str) -> Subject {
        let mut s = String::with_capacity(self.prefix.len() + 8 + app.len() + device.len() + 8);
        s.push_str(&self.prefix);
        s.push_str(".state.");
        push_escaped(&mut s, app);
        s.push('.');
        push_escaped(&mut s, device);
        Subject::from(s)
    }

    /// Every device of one application: `<prefix>.state.<app>.>`.
    pub fn app_filter(&self, app: &str) -> String {
        let mut s = format!("{}.state.", self.prefix);
        push_escaped(&mut s, app);
        s.push_str(".>");
        s
    }

    /// `(app, device)` of a state subject, ids unescaped; `None` for any
    /// other subject.
    pub fn parse_state_subject(&self, subject: &str) -> Option<(String, String)> {
        let (app, device) = self.state_tokens(subject)?;
        Some((unescape(app), unescape(device)))
    }

    /// The two id tokens of a state subject, still escaped (`.` written
    /// `%2E`); see [`unescape_into`]. Borrows, for readers that must not
    /// allocate per message.
    pub fn state_tokens<'s>(&self, subject: &'s str) -> Option<(&'s str, &'s str)> {
        let rest = subject.strip_prefix(self.prefix.as_str())?;
        let rest = rest.strip_prefix(".state.")?;
        let (app, device) = rest.split_once('.')?;
        if app.is_empty() || device.is_empty() || device.contains('.') {
            return None;
        }
        Some((app, device))
    }
}

/// Appends the id a subject token stands for (`%2E` back to `.`).
pub fn unescape_into(token: &str, out: &mut impl Extend<u8>) {
    for (i, part) in token.split("%2E").enumerate() {
        if i > 0 {
            out.extend([b'.']);
        }
        out.extend(part.bytes());
    }
}

fn push_escaped(out: &mut String, id: &str) {
    for part in id.split('.').enumerate() {
        if part.0 > 0 {
            out.push_str("%2E");
        }
        out.push_str(part.1);
    }
}

fn unescape(token: &str) -> String {
    token.replace("%2E", ".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(valid_prefix("sluice"));
        assert!(valid_prefix("a-b_9"));
        assert!(!valid_prefix(""));
        assert!(!valid_prefix("Sluice"));
        assert!(!valid_prefix("a.b"));
        assert!(!valid_prefix("a>"));
        assert!(!valid_prefix(&"a".repeat(33)));
    }

    #[test]
    fn names_follow_the_prefix() {
        let n = Names::new("blue");
        assert_eq!(n.tokens_bucket(), "blue_tokens");
        assert_eq!(n.nodes_bucket(), "blue_nodes");
        assert_eq!(n.state_stream(), "BLUE_STATE");
        assert_eq!(n.state_subjects(), "blue.state.>");
        assert_eq!(n.fence_subjects(), "blue.fence.>");
        assert_eq!(n.fence_subject("n1").as_str(), "blue.fence.n1");
        assert_eq!(n.control_subjects(), "blue.ctl.>");
        assert_eq!(n.control_subject("a.b").as_str(), "blue.ctl.a%2Eb");
        assert!(n.is_control("blue.ctl.a"));
        assert!(!n.is_control("blue.state.a.b"));
        assert!(!n.is_control("bluex.ctl.a"));
    }

    #[test]
    fn ids_with_dots_stay_one_token_and_round_trip() {
        let n = Names::new("sluice");
        let s = n.state_subject("farm.eu", "pump.1.a");
        assert_eq!(s.as_str(), "sluice.state.farm%2Eeu.pump%2E1%2Ea");
        assert_eq!(
            n.parse_state_subject(&s),
            Some(("farm.eu".to_string(), "pump.1.a".to_string()))
        );
        assert_eq!(n.app_filter("farm.eu"), "sluice.state.farm%2Eeu.>");
        // An application whose id starts with another's shares no filter
        // with it.
        assert_eq!(n.app_filter("a"), "sluice.state.a.>");
        assert_eq!(n.state_subject("a.b", "d").as_str(), "sluice.state.a%2Eb.d");
        // Different ids never share a subject.
        assert_ne!(
            n.state_subject("a.b", "c").as_str(),
            n.state_subject("a", "b.c").as_str()
        );
        let (app, device) = n.state_tokens(&s).unwrap();
        let mut out = Vec::new();
        unescape_into(app, &mut out);
        out.push(b'/');
        unescape_into(device, &mut out);
        assert_eq!(out, b"farm.eu/pump.1.a");
        assert_eq!(n.parse_state_subject("sluice.fence.n1"), None);
        assert_eq!(n.parse_state_subject("other.state.a.b"), None);
        assert_eq!(n.parse_state_subject("sluice.state.a.b.c"), None);
    }
}
