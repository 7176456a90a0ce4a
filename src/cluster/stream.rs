//! The ingest stream: created at start, or checked when it exists.
//!
//! Settings that would break a promise are refused, not used: fewer
//! replicas than asked (acknowledged data could die with one node), memory
//! storage, no atomic publish (a batch could be stored in part), a
//! retention that deletes what a broker has not read yet, a deduplication
//! window shorter than asked (a resent batch could be stored twice), or an
//! age limit shorter than asked.
//!
//! One change is made to an existing stream rather than refused: a stream
//! created before control messages existed (removals, retention overrides,
//! `<prefix>.ctl.>`) gets that subject added. Capturing one more subject
//! changes nothing about the states already stored or how they are read,
//! and refusing would make every upgrade an operator's manual edit.

use std::time::Duration;

use async_nats::jetstream::stream::{
    Config, DiscardPolicy, LastRawMessageErrorKind, RetentionPolicy, StorageType,
};
use tokio::time::Instant;

use super::connect::{retry_until, Nats};
use super::names::Names;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream {stream} {problem}")]
    Unsafe { stream: String, problem: String },
    #[error("cannot create or read stream {stream}: {detail}")]
    Unavailable { stream: String, detail: String },
}

/// What the ingest stream must be.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub names: Names,
    pub replicas: usize,
    pub duplicate_window: Duration,
    /// 0: unlimited.
    pub max_age: Duration,
}

impl StreamSpec {
    fn config(&self) -> Config {
        Config {
            name: self.names.state_stream(),
            description: Some("Sluice: accepted device states".into()),
            subjects: vec![
                self.names.state_subjects(),
                self.names.fence_subjects(),
                self.names.control_subjects(),
            ],
            storage: StorageType::File,
            num_replicas: self.replicas,
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            max_age: self.max_age,
            duplicate_window: self.duplicate_window,
            allow_atomic_publish: true,
            allow_direct: true,
            ..Default::default()
        }
    }
}

/// Creates the stream or checks the existing one; the settings in force.
/// Transient failures (leader elections after a NATS restart) are retried
/// until `deadline`.
pub async fn ensure(
    nats: &Nats,
    spec: &StreamSpec,
    deadline: Instant,
) -> Result<Config, StreamError> {
    let name = spec.names.state_stream();
    let unavailable = |detail: String| StreamError::Unavailable {
        stream: name.clone(),
        detail,
    };
    let existing = retry_until(
        deadline,
        || async {
            match nats.js.get_stream(&name).await {
                Ok(s) => Ok(Some(s.cached_info().config.clone())),
                Err(e) if super::stream_not_found(&e) => Ok(None),
                Err(e) => Err(e.to_string()),
            }
        },
        |_| true,
    )
    .await
    .map_err(unavailable)?;
    let config = match existing {
        Some(c) if !c.subjects.contains(&spec.names.control_subjects()) => {
            let mut wanted = c.clone();
            wanted.subjects.push(spec.names.control_subjects());
            // A stream refused anyway is left as it is.
            check(spec, &wanted).map_err(|problem| StreamError::Unsafe {
                stream: name.clone(),
                problem,
            })?;
            let updated = retry_until(
                deadline,
                || async { nats.js.update_stream(&wanted).await },
                |_| true,
            )
            .await
            .map_err(|e| {
                unavailable(format!(
                    "cannot add subjects {} to it: {e}",
                    spec.names.control_subjects()
                ))
            })?;
            tracing::info!(stream = %name, "ingest stream now also captures control messages");
            updated.config
        }
        Some(c) => c,
        None => retry_until(
            deadline,
            || async { nats.js.create_stream(spec.config()).await },
            |_| true,
        )
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .cached_info()
        .config
        .clone(),
    };
    check(spec, &config).map_err(|problem| StreamError::Unsafe {
        stream: name.clone(),
        problem,
    })?;
    Ok(config)
}

/// The stream sequence of the newest state in the stream (0 when there is
/// none): what a broker's read model has to reach to hold everything
/// acknowledged so far. Fences are not states, so this is not simply the
/// stream's last sequence.
pub async fn last_state_seq(nats: &Nats, names: &Names) -> Result<u64, StreamError> {
    newest_of(nats, names, &[names.state_subjects()]).await
}

/// The stream sequence of the newest message a read model applies (a
/// state or a control message; 0 when there is none): a read model that
/// reached it holds every state acknowledged and every removal or
/// retention override answered so far.
pub async fn last_applicable_seq(nats: &Nats, names: &Names) -> Result<u64, StreamError> {
    newest_of(
        nats,
        names,
        &[names.state_subjects(), names.control_subjects()],
    )
    .await
}

/// The highest stream sequence of a message on any of `subjects` (each a
/// filter), 0 when there is none.
async fn newest_of(nats: &Nats, names: &Names, subjects: &[String]) -> Result<u64, StreamError> {
    let name = names.state_stream();
    let unavailable = |detail: String| StreamError::Unavailable {
        stream: name.clone(),
        detail,
    };
    let stream = nats
        .js
        .get_stream_no_info(&name)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut last = 0;
    for filter in subjects {
        match stream.get_last_raw_message_by_subject(filter).await {
            Ok(m) => last = last.max(m.sequence),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(unavailable(e.to_string())),
        }
    }
    Ok(last)
}

/// The stream's last sequence (states and fences; 0 when empty).
pub async fn last_seq(nats: &Nats, names: &Names) -> Result<u64, StreamError> {
    let name = names.state_stream();
    nats.js
        .get_stream(&name)
        .await
        .map(|s| s.cached_info().state.last_sequence)
        .map_err(|e| StreamError::Unavailable {
            stream: name.clone(),
            detail: e.to_string(),
        })
}

/// The first setting of `found` that breaks a guarantee, in words.
pub fn check(spec: &StreamSpec, found: &Config) -> Result<(), String> {
    for subject in [
        spec.names.state_subjects(),
        spec.names.fence_subjects(),
        spec.names.control_subjects(),
    ] {
        if !found.subjects.contains(&subject) {
            return Err(format!("does not capture subjects {subject}"));
        }
    }
    if found.num_replicas < spec.replicas {
        return Err(format!(
            "has {} replicas, {} were asked for",
            found.num_replicas, spec.replicas
        ));
    }
    if found.storage != StorageType::File {
        return Err("does not use file storage".into());
    }
    if !found.allow_atomic_publish {
        return Err("does not allow atomic batch publish (allow_atomic)".into());
    }
    if found.retention != RetentionPolicy::Limits {
        return Err("has a retention other than limits: it would delete unread states".into());
    }
    if found.mirror.is_some() {
        return Err("is a mirror".into());
    }
    if found.duplicate_window < spec.duplicate_window {
        return Err(format!(
            "has a duplicate window of {:?}, shorter than the {:?} asked for",
            found.duplicate_window, spec.duplicate_window
        ));
    }
    let keeps = |age: Duration| if age.is_zero() { Duration::MAX } else { age };
    if keeps(found.max_age) < keeps(spec.max_age) {
        return Err(format!(
            "keeps states for {:?}, less than the {:?} asked for",
            found.max_age, spec.max_age
        ));
    }
    if found.max_bytes > 0 || found.max_messages > 0 {
        return Err("has a size or message-count limit: it would drop unread states".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> StreamSpec {
        StreamSpec {
            names: Names::new("sluice"),
            replicas: 3,
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
        }
    }

    #[test]
    fn the_created_config_passes_its_own_check() {
        let s = spec();
        let c = s.config();
        assert_eq!(check(&s, &c), Ok(()));
        assert_eq!(c.name, "SLUICE_STATE");
        assert!(c.allow_atomic_publish);
    }

    #[test]
    fn each_unsafe_setting_is_named() {
        let s = spec();
        type Breaks = Box<dyn Fn(&mut Config)>;
        let cases: Vec<(&str, Breaks)> = vec![
            ("replicas", Box::new(|c| c.num_replicas = 1)),
            (
                "file storage",
                Box::new(|c| c.storage = StorageType::Memory),
            ),
            ("atomic", Box::new(|c| c.allow_atomic_publish = false)),
            (
                "retention",
                Box::new(|c| c.retention = RetentionPolicy::WorkQueue),
            ),
            (
                "duplicate window",
                Box::new(|c| c.duplicate_window = Duration::from_secs(10)),
            ),
            (
                "keeps states",
                Box::new(|c| c.max_age = Duration::from_secs(3600)),
            ),
            ("subjects", Box::new(|c| c.subjects.truncate(1))),
            ("ctl", Box::new(|c| c.subjects.truncate(2))),
            ("size", Box::new(|c| c.max_bytes = 1 << 30)),
        ];
        for (word, breaks) in cases {
            let mut c = s.config();
            breaks(&mut c);
            let e = check(&s, &c).unwrap_err();
            assert!(e.contains(word), "{word}: {e}");
        }
        // More than asked is fine.
        let mut c = s.config();
        c.num_replicas = 5;
        c.duplicate_window = Duration::from_secs(600);
        assert_eq!(check(&s, &c), Ok(()));
    }
}
