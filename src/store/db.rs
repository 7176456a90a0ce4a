//! Opening the database: the column families, the options each is opened
//! with (compression, block cache, write buffers, merge operators, the
//! expiry filter), and their handles, resolved once at open so no write
//! looks a family up by name.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Options, DB,
};
use serde::{Deserialize, Serialize};

use super::devices::merge_stats;
use super::retention::{Expiry, ExpiryFilterFactory, Retention, TimedKeys};
use super::{merge_composite, StoreError};
use crate::config::{Config, SyncMode};

pub(super) const CF_STATE: &str = "state";
pub(super) const CF_COMPOSITE: &str = "composite";
pub(super) const CF_DEVICES: &str = "devices";
pub(super) const CF_TOKENS: &str = "tokens";
pub(super) const CF_META: &str = "meta";
pub(super) const CF_AUDIT: &str = "audit";
pub(super) const CF_LOG: &str = "log";
pub(super) const CF_SESSIONS: &str = "sessions";

/// How table files are compressed (`storage.compression`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    /// LZ4 at every level.
    Lz4,
    /// LZ4, and LZ4HC (smaller, slower to write) for the bottommost level,
    /// where most data lives and which is rewritten least often.
    Lz4hc,
}

impl Compression {
    fn apply(self, o: &mut Options) {
        match self {
            Compression::None => o.set_compression_type(DBCompressionType::None),
            Compression::Lz4 => o.set_compression_type(DBCompressionType::Lz4),
            Compression::Lz4hc => {
                o.set_compression_type(DBCompressionType::Lz4);
                o.set_bottommost_compression_type(DBCompressionType::Lz4hc);
            }
        }
    }
}

/// Everything the store is opened with, from `[storage]`.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub sync: SyncMode,
    pub retention: Retention,
    /// With any finite retention: the longest a table file goes without
    /// passing through the expiry filter (RocksDB periodic compaction).
    pub reclaim_interval: Duration,
    pub compression: Compression,
    /// One LRU block cache shared by every column family.
    pub block_cache_bytes: usize,
    /// Memtable size of each column family ingest writes (history,
    /// composite state, device statistics).
    pub write_buffer_bytes: usize,
    /// How long audit events are kept (`audit.retention`).
    pub audit_retention: Retention,
}

impl StoreOptions {
    pub fn new(config: &Config) -> StoreOptions {
        let c = &config.storage;
        StoreOptions {
            sync: c.sync,
            retention: c.retention,
            reclaim_interval: c.retention_reclaim_interval,
            compression: c.compression,
            block_cache_bytes: c.block_cache_bytes,
            write_buffer_bytes: c.write_buffer_bytes,
            audit_retention: config.audit.retention,
        }
    }
}

/// The column families, borrowed from the database that owns them.
pub(super) struct Families<'db> {
    pub state: &'db ColumnFamily,
    pub composite: &'db ColumnFamily,
    pub devices: &'db ColumnFamily,
    pub tokens: &'db ColumnFamily,
    pub meta: &'db ColumnFamily,
    pub audit: &'db ColumnFamily,
    pub log: &'db ColumnFamily,
    pub sessions: &'db ColumnFamily,
}

self_cell::self_cell!(
    /// The database together with its column-family handles. RocksDB's
    /// handles borrow the database, so the two live in one cell.
    pub(super) struct Db {
        owner: DB,
        #[covariant]
        dependent: Families,
    }
);

pub(super) fn open(
    dir: &Path,
    o: &StoreOptions,
    expiry: Arc<Expiry>,
    audit_expiry: Arc<Expiry>,
) -> Result<Db, StoreError> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(4);
    // Every batch also writes `meta`, whose memtable never fills, so
    // without a bound RocksDB would keep write-ahead log files until they
    // reach 4 x all write buffers (gigabytes); beyond this it flushes the
    // families that hold the oldest log instead.
    opts.set_max_total_wal_size(4 * o.write_buffer_bytes as u64);
    let cache = Cache::new_lru_cache(o.block_cache_bytes);
    let family = |ingest: bool| {
        let mut f = Options::default();
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        f.set_block_based_table_factory(&table);
        o.compression.apply(&mut f);
        if ingest {
            f.set_write_buffer_size(o.write_buffer_bytes);
        }
        f
    };
    let mut state = family(true);
    state.set_compaction_filter_factory(ExpiryFilterFactory {
        expiry: expiry.clone(),
        keys: TimedKeys::State,
    });
    // Off until `Store::open_with` knows whether anything can expire (the
    // overrides are in the store); RocksDB would otherwise default to 30
    // days as soon as a filter is set.
    state.set_periodic_compaction_seconds(0);
    // The log index expires with the history it points at.
    let mut log = family(false);
    log.set_compaction_filter_factory(ExpiryFilterFactory {
        expiry,
        keys: TimedKeys::Log,
    });
    log.set_periodic_compaction_seconds(0);
    let mut composite = family(true);
    composite.set_merge_operator_associative("sluice.composite.v1", merge_composite);
    let mut devices = family(true);
    devices.set_merge_operator_associative("sluice.devices.v1", merge_stats);
    // Audit events expire by `audit.retention` alone, through the same
    // filter over their own keys; they are few, so the files holding them
    // pass through it once per reclaim interval at little cost.
    let mut audit = family(false);
    audit.set_compaction_filter_factory(ExpiryFilterFactory {
        expiry: audit_expiry,
        keys: TimedKeys::Audit,
    });
    let audit_reclaim = match o.audit_retention {
        Retention::Unlimited => 0,
        Retention::Ms(_) => o.reclaim_interval.as_secs().max(1),
    };
    audit.set_periodic_compaction_seconds(audit_reclaim);
    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_STATE, state),
        ColumnFamilyDescriptor::new(CF_COMPOSITE, composite),
        ColumnFamilyDescriptor::new(CF_DEVICES, devices),
        ColumnFamilyDescriptor::new(CF_TOKENS, family(false)),
        ColumnFamilyDescriptor::new(CF_META, family(false)),
        ColumnFamilyDescriptor::new(CF_AUDIT, audit),
        ColumnFamilyDescriptor::new(CF_LOG, log),
        ColumnFamilyDescriptor::new(CF_SESSIONS, family(false)),
    ];
    let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
    Db::try_new(db, |db| {
        let cf = |name: &'static str| {
            db.cf_handle(name)
                .ok_or(StoreError::MissingColumnFamily(name))
        };
        Ok(Families {
            state: cf(CF_STATE)?,
            composite: cf(CF_COMPOSITE)?,
            devices: cf(CF_DEVICES)?,
            tokens: cf(CF_TOKENS)?,
            meta: cf(CF_META)?,
            audit: cf(CF_AUDIT)?,
            log: cf(CF_LOG)?,
            sessions: cf(CF_SESSIONS)?,
        })
    })
}
