//! A broker's node id: from `cluster.node_id`, or generated on first start
//! and kept in `<data-dir>/node.id` so a restarted broker is the same node
//! (its durable follower and its registry entry carry the id).

use std::io::Write;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};

pub const FILE_NAME: &str = "node.id";

#[derive(Debug, thiserror::Error)]
pub enum NodeIdError {
    #[error("{0} does not hold a node id (1-64 of A-Z a-z 0-9 _ -)")]
    BadFile(PathBuf),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("system random failed")]
    Random,
}

/// 1-64 of `A-Z a-z 0-9 _ -`: usable as a consumer name, a KV key, a
/// subject token and a NATS client name.
pub fn valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The configured id if any (`configured` is already validated), else the
/// one in `<data_dir>/node.id`, else a new random one written there.
pub fn load_or_generate(data_dir: &Path, configured: &str) -> Result<String, NodeIdError> {
    if !configured.is_empty() {
        return Ok(configured.to_string());
    }
    let path = data_dir.join(FILE_NAME);
    let io = |source| NodeIdError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim();
            if valid(id) {
                Ok(id.to_string())
            } else {
                Err(NodeIdError::BadFile(path))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 8];
            SystemRandom::new()
                .fill(&mut raw)
                .map_err(|_| NodeIdError::Random)?;
            let mut id = String::with_capacity(18);
            id.push_str("n-");
            for b in raw {
                id.push_str(&format!("{b:02x}"));
            }
            std::fs::create_dir_all(data_dir).map_err(io)?;
            // create_new: two brokers started on one data dir at once must
            // not end up with different ids.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io)?;
            f.write_all(id.as_bytes()).map_err(io)?;
            f.write_all(b"\n").map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(id)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_generate(dir.path(), "").unwrap();
        assert!(valid(&a), "{a}");
        assert_eq!(load_or_generate(dir.path(), "").unwrap(), a);
        assert_eq!(load_or_generate(dir.path(), "edge-7").unwrap(), "edge-7");
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_generate(other.path(), "").unwrap(), a);
    }

    #[test]
    fn a_damaged_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), "bad id!\n").unwrap();
        assert!(matches!(
            load_or_generate(dir.path(), ""),
            Err(NodeIdError::BadFile(_))
        ));
    }

    #[test]
    fn validity() {
        assert!(valid("n-0123abcd"));
        assert!(valid("Broker_1"));
        assert!(!valid(""));
        assert!(!valid("a.b"));
        assert!(!valid("a b"));
        assert!(!valid(&"x".repeat(65)));
    }
}
