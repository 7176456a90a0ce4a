//! Data out: live, resumable streams of committed state.
//!
//! Every committed state has a position in its application's log (the
//! `log` index of `store`): standalone, the writer's sequence number;
//! in cluster mode, the stream sequence the materializer applies it with.
//! Both commit through `writer::Records`, which also tells the [`Hub`]
//! after each commit, so consumers work the same in both modes.
//!
//! - `hub`: live fan-out of each commit to the consumers of its
//!   application, bounded by bytes per application.
//! - `cursor`: one consumer's position, read from storage while behind and
//!   from the hub once caught up.
//! - `slots`: open streams per token and per address.
//! - `feed`: a subscriber's task picking its states off a cursor and
//!   keeping its position.
//! - `group`: shared subscriptions, one dispatcher per group spreading an
//!   application's states over its members.
//! - `sessions`: persistent subscriber sessions (subscriptions and a
//!   position, kept across disconnects and restarts).

pub mod cursor;
pub mod feed;
pub mod group;
pub mod hub;
pub mod sessions;
pub mod slots;

pub use cursor::{Batch, Cursor, Opened, ReadBounds, Start};
pub use hub::{Hub, Live};
pub use slots::{StreamSlot, StreamSlots, TooManyStreams};
