//! Backup and restore. A backup is a directory holding `db/`, a RocksDB
//! checkpoint of the whole store (history, composite state and tokens live
//! in one database) taken while ingest runs, and `backup.json`, written
//! last, which marks it complete. The root admin token (`admin.token` or
//! `SLUICE_ADMIN_TOKEN`) is not part of a backup: it belongs to the
//! machine's secrets, not to the data.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::auth::Registry;
use crate::config::SyncMode;
use crate::store::{Store, StoreError};
use crate::timefmt;
use crate::tokens::{TokenError, TokenService};

/// The file that marks a backup complete and describes it.
pub const MANIFEST: &str = "backup.json";
/// The checkpoint inside a backup, and the store inside a data directory.
const DB: &str = "db";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0} is not an absolute path")]
    NotAbsolute(PathBuf),
    #[error("{0} exists and is not an empty directory")]
    NotEmpty(PathBuf),
    #[error("{0} is inside the live store's directory")]
    InsideStore(PathBuf),
    #[error("another backup is running")]
    Busy,
    #[error("{path} is not a complete Sluice backup: {reason}")]
    NotABackup { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the restored tokens do not load: {0}")]
    Tokens(#[from] TokenError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `backup.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format: u32,
    /// When the checkpoint was started: everything acknowledged before
    /// this moment is in the backup.
    pub created: String,
    pub sluice_version: String,
    /// Files and bytes of the checkpoint.
    pub files: u64,
    pub bytes: u64,
}

/// Takes backups of the running store, one at a time.
pub struct Backups {
    store: Store,
    /// The live store's directory, resolved: a backup must not land in it.
    store_dir: PathBuf,
    /// Set while a backup runs; a second request is refused rather than
    /// queued, since two checkpoints at once only double the I/O.
    running: AtomicBool,
}

/// Clears `Backups::running` when the backup ends, however it ends.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Backups {
    /// `store_dir` is where `store` lives.
    pub fn new(store: Store, store_dir: &Path) -> Arc<Backups> {
        Arc::new(Backups {
            store,
            store_dir: resolved(store_dir),
            running: AtomicBool::new(false),
        })
    }

    /// Writes a backup into `to` (absolute; created if missing, else it
    /// must be an empty directory). Blocking: the checkpoint flushes
    /// memtables and links or copies files.
    pub fn take(&self, to: &Path) -> Result<Manifest, BackupError> {
        if !to.is_absolute() {
            return Err(BackupError::NotAbsolute(to.to_path_buf()));
        }
        if resolved(to).starts_with(&self.store_dir) {
            return Err(BackupError::InsideStore(to.to_path_buf()));
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return Err(BackupError::Busy);
        }
        let _running = Running(&self.running);
        let created_dir = prepare_empty(to)?;
        let created = timefmt::format_rfc3339(timefmt::now_ms());
        let result = self
            .store
            .checkpoint(&to.join(DB))
            .map_err(BackupError::from)
            .and_then(|()| {
                let (files, bytes) = tree_size(&to.join(DB))?;
                let manifest = Manifest {
                    format: FORMAT,
                    created,
                    sluice_version: env!("CARGO_PKG_VERSION").to_string(),
                    files,
                    bytes,
                };
                write_synced(&to.join(MANIFEST), &manifest)?;
                sync_dir(to)?;
                Ok(manifest)
            });
        if result.is_err() {
            // RocksDB builds the checkpoint in `db.tmp` and renames it.
            for leftover in [DB, "db.tmp"] {
                let _ = std::fs::remove_dir_all(to.join(leftover));
            }
            if created_dir {
                let _ = std::fs::remove_dir(to);
            }
        }
        result
    }
}

/// What a restore found in the restored store.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Restored {
    pub data_dir: PathBuf,
    pub backup: Manifest,
    /// Application tokens loaded from the restored store.
    pub tokens: usize,
    /// The next state sequence number, which the restored broker continues.
    pub next_seq: u64,
}

/// Copies the backup `from` into a new data directory `data_dir`
/// (created if missing, else it must be empty: nothing is overwritten),
/// then opens the restored store and loads its tokens the way `serve`
/// does. On failure, whatever was created is removed again.
pub fn restore(from: &Path, data_dir: &Path) -> Result<Restored, BackupError> {
    let manifest = read_manifest(from)?;
    let created_dir = prepare_empty(data_dir)?;
    let partial = data_dir.join("db.partial");
    let db = data_dir.join(DB);
    let result = copy_tree(&from.join(DB), &partial)
        .and_then(|()| std::fs::rename(&partial, &db).map_err(io(&db)))
        .and_then(|()| sync_dir(data_dir))
        .and_then(|()| {
            let store = Store::open(&db, SyncMode::Always)?;
            let next_seq = store.load_seq()?;
            let registry = Arc::new(Registry::new());
            // Restore checks the tokens load; limits are for new mints only.
            let unbounded = crate::tokens::TokenLimits {
                max_devices: usize::MAX,
                max_per_application: usize::MAX,
                max_chain_depth: usize::MAX,
            };
            TokenService::load(store, registry.clone(), unbounded)?;
            Ok(Restored {
                data_dir: data_dir.to_path_buf(),
                backup: manifest,
                tokens: registry.len(),
                next_seq,
            })
        });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
        let _ = std::fs::remove_dir_all(&db);
        if created_dir {
            let _ = std::fs::remove_dir(data_dir);
        }
    }
    result
}

fn read_manifest(from: &Path) -> Result<Manifest, BackupError> {
    let not = |reason: String| BackupError::NotABackup {
        path: from.to_path_buf(),
        reason,
    };
    let text = std::fs::read(from.join(MANIFEST))
        .map_err(|e| not(format!("{MANIFEST}: {e} (an interrupted backup has none)")))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| not(format!("{MANIFEST}: {e}")))?;
    if m.format != FORMAT {
        return Err(not(format!(
            "{MANIFEST} has format {}, this build reads {FORMAT}",
            m.format
        )));
    }
    if !from.join(DB).is_dir() {
        return Err(not(format!("no {DB}/ directory")));
    }
    Ok(m)
}

/// `path` with symbolic links and `..` resolved one component at a time,
/// as the kernel would, also where it does not exist yet.
fn resolved(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
        if let Ok(real) = out.canonicalize() {
            out = real;
        }
    }
    out
}

/// Makes sure `dir` is an empty directory; returns whether it was created.
fn prepare_empty(dir: &Path) -> Result<bool, BackupError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(false),
            Some(_) => Err(BackupError::NotEmpty(dir.to_path_buf())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            Err(BackupError::NotEmpty(dir.to_path_buf()))
        }
        Err(e) => Err(io(dir)(e)),
    }
}

/// Files and bytes under `dir`.
fn tree_size(dir: &Path) -> Result<(u64, u64), BackupError> {
    let mut files = 0;
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let meta = entry.metadata().map_err(io(&path))?;
        if meta.is_dir() {
            let (f, b) = tree_size(&path)?;
            files += f;
            bytes += b;
        } else {
            files += 1;
            bytes += meta.len();
        }
    }
    Ok((files, bytes))
}

/// Copies `from` into the new directory `to`, fsyncing every file and
/// directory so a restore that returned survives a crash of the machine.
fn copy_tree(from: &Path, to: &Path) -> Result<(), BackupError> {
    std::fs::create_dir(to).map_err(io(to))?;
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(io(&src))?.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(io(&src))?;
            std::fs::File::open(&dst)
                .and_then(|f| f.sync_all())
                .map_err(io(&dst))?;
        }
    }
    sync_dir(to)
}

fn write_synced(path: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    use std::io::Write;
    let text = serde_json::to_vec_pretty(manifest).map_err(|e| io(path)(e.into()))?;
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(&text)
        .and_then(|()| f.sync_all())
        .map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_then_restore_round_trips_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("live");
        let store = Store::open(&live, SyncMode::None).unwrap();
        let d = crate::store::device_key("app", "dev");
        let mut b = store.batch(64);
        store
            .put_state(
                &mut b,
                &d,
                crate::store::Position { time_ms: 1, seq: 0 },
                b"{\"x\":1}",
            )
            .unwrap();
        store.commit(b, 1).unwrap();
        let backups = Backups::new(store, &live);

        assert!(matches!(
            backups.take(Path::new("relative")),
            Err(BackupError::NotAbsolute(_))
        ));
        assert!(matches!(
            backups.take(&tmp.path().join("x/../live/new")),
            Err(BackupError::InsideStore(_))
        ));
        assert!(!live.join("new").exists());
        let to = tmp.path().join("backup");
        let m = backups.take(&to).unwrap();
        assert!(m.files > 0 && m.bytes > 0, "{m:?}");
        assert!(matches!(backups.take(&to), Err(BackupError::NotEmpty(_))));

        let data = tmp.path().join("restored");
        let r = restore(&to, &data).unwrap();
        assert_eq!((r.next_seq, r.tokens), (1, 0));
        assert_eq!(r.backup, m);
        assert!(matches!(restore(&to, &data), Err(BackupError::NotEmpty(_))));
        let restored = Store::open(&data.join(DB), SyncMode::None).unwrap();
        let q = crate::store::HistoryQuery {
            start_ms: 0,
            end_ms: 10,
            limit: 10,
            order: crate::store::Order::Asc,
            cursor: None,
        };
        assert_eq!(
            restored.history(&d, &q, usize::MAX).unwrap().items[0].data,
            b"{\"x\":1}"
        );

        // A directory without the manifest (an interrupted backup) is
        // refused, and nothing is left behind in the target.
        let half = tmp.path().join("half");
        std::fs::create_dir_all(half.join(DB)).unwrap();
        let target = tmp.path().join("never");
        assert!(matches!(
            restore(&half, &target),
            Err(BackupError::NotABackup { .. })
        ));
        assert!(!target.exists());
    }
}
