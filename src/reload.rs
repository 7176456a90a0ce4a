//! What a running broker takes from a re-read configuration (SIGHUP): the
//! TLS certificate and key, re-read from their files. The log level is
//! applied by the binary, which owns the subscriber. Every other change
//! takes effect at the next restart, and the log names the keys.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::tls::Acceptors;

/// Applies each configuration sent on `reloads` until `stop`.
pub async fn watch(
    started: Config,
    mut reloads: watch::Receiver<Config>,
    tls: Option<Acceptors>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = reloads.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let new = reloads.borrow_and_update().clone();
        apply(&started, new, tls.as_ref()).await;
    }
}

async fn apply(started: &Config, new: Config, tls: Option<&Acceptors>) {
    match (tls, new.tls.enabled()) {
        (Some(acceptors), true) => {
            let certificate = acceptors.certificate.clone();
            let (cert, key) = (new.tls.cert.clone(), new.tls.key.clone());
            let done = tokio::task::spawn_blocking(move || certificate.reload(&cert, &key)).await;
            match done {
                Ok(Ok(())) => tracing::info!(
                    cert = %new.tls.cert.display(),
                    key = %new.tls.key.display(),
                    "SIGHUP: TLS certificate reloaded; new connections use it"
                ),
                Ok(Err(e)) => tracing::error!(
                    error = %e,
                    "SIGHUP: TLS certificate not reloaded; keeping the current one"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "SIGHUP: TLS certificate not reloaded; keeping the current one"
                ),
            }
        }
        (None, false) => {}
        _ => tracing::warn!("SIGHUP: turning TLS on or off takes effect at the next restart"),
    }
    let pending = needs_restart(started, &new);
    if !pending.is_empty() {
        tracing::warn!(
            keys = %pending.join(", "),
            "SIGHUP: these changes take effect at the next restart"
        );
    }
}

/// Keys whose new value differs from the one the broker started with,
/// other than those a reload applies.
fn needs_restart(started: &Config, new: &Config) -> Vec<String> {
    const RELOADED: [&str; 3] = ["log.level", "tls.cert", "tls.key"];
    let (Ok(a), Ok(b)) = (serde_json::to_value(started), serde_json::to_value(new)) else {
        return Vec::new();
    };
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    for (section, old) in a {
        let (Some(old), Some(now)) = (old.as_object(), b.get(section).and_then(|v| v.as_object()))
        else {
            continue;
        };
        for (key, value) in old {
            let path = format!("{section}.{key}");
            if now.get(key) != Some(value) && !RELOADED.contains(&path.as_str()) {
                keys.push(path);
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_a_reload_cannot_apply_are_named() {
        let started = Config::default();
        let mut new = started.clone();
        new.log.level = "debug".into();
        new.tls.cert = "/etc/sluice/cert.pem".into();
        new.tls.key = "/etc/sluice/key.pem".into();
        assert!(needs_restart(&started, &new).is_empty());
        new.batch.max_messages += 1;
        new.http.enabled = false;
        assert_eq!(
            needs_restart(&started, &new),
            vec!["batch.max_messages", "http.enabled"]
        );
    }
}
