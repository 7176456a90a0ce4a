//! The root admin token: from `SLUICE_ADMIN_TOKEN`, or generated on first
//! start into `<data-dir>/admin.token` (mode 0600). Only its hash is kept in
//! memory; its path, never the secret, is logged.

use std::io::Write;
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;

use crate::secret::{plausible_credential, TokenHash, TokenSecret};

pub const FILE_NAME: &str = "admin.token";

/// Shortest root token accepted. The root token can do everything in every
/// application, so it must not be guessable; generated ones have 46.
pub const MIN_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error("SLUICE_ADMIN_TOKEN must be {MIN_LEN}-512 visible ASCII characters")]
    BadEnv,
    #[error("{0} does not hold a usable token ({MIN_LEN}-512 visible ASCII characters)")]
    BadFile(PathBuf),
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("system random failed")]
    Random,
}

/// Where the root token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Env,
    File(PathBuf),
    Generated(PathBuf),
}

/// Resolves the root admin token and returns its hash.
pub fn bootstrap(
    data_dir: &Path,
    from_env: Option<&str>,
) -> Result<(TokenHash, Source), AdminTokenError> {
    if let Some(t) = from_env.filter(|t| !t.is_empty()) {
        if !acceptable(t) {
            return Err(AdminTokenError::BadEnv);
        }
        return Ok((TokenHash::of(t.as_bytes()), Source::Env));
    }
    let path = data_dir.join(FILE_NAME);
    let io = |source| AdminTokenError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let t = s.trim();
            if !acceptable(t) {
                return Err(AdminTokenError::BadFile(path));
            }
            Ok((TokenHash::of(t.as_bytes()), Source::File(path)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret =
                TokenSecret::generate(&SystemRandom::new()).map_err(|_| AdminTokenError::Random)?;
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&path).map_err(io)?;
            f.write_all(secret.expose().as_bytes()).map_err(io)?;
            f.write_all(b"\n").map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok((secret.hash(), Source::Generated(path)))
        }
        Err(e) => Err(io(e)),
    }
}

/// Whether `t` may be the root token: long enough not to be guessed, and a
/// credential the listeners can parse.
pub fn acceptable(t: &str) -> bool {
    t.len() >= MIN_LEN && plausible_credential(t.as_bytes())
}

/// Reads the admin token the way the CLI does: env first, then the file.
pub fn read_for_client(data_dir: &Path, from_env: Option<&str>) -> Option<String> {
    if let Some(t) = from_env.filter(|t| !t.is_empty()) {
        return Some(t.to_string());
    }
    std::fs::read_to_string(data_dir.join(FILE_NAME))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let (h1, s1) = bootstrap(dir.path(), None).unwrap();
        assert!(matches!(s1, Source::Generated(_)));
        let (h2, s2) = bootstrap(dir.path(), None).unwrap();
        assert!(matches!(s2, Source::File(_)));
        assert_eq!(h1, h2);
        let text = read_for_client(dir.path(), None).unwrap();
        assert_eq!(TokenHash::of(text.as_bytes()), h1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(FILE_NAME))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let long = "from-env-token-0123456789abcdefghij";
        let (h3, s3) = bootstrap(dir.path(), Some(long)).unwrap();
        assert_eq!(s3, Source::Env);
        assert_eq!(h3, TokenHash::of(long.as_bytes()));
        assert!(bootstrap(dir.path(), Some("has space 0123456789abcdefghijklmn")).is_err());
        assert!(matches!(
            bootstrap(dir.path(), Some("short-but-visible")),
            Err(AdminTokenError::BadEnv)
        ));
    }
}
