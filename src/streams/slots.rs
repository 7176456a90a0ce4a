//! Open streams per token and per address (`streams.max_streams_per_token`,
//! `streams.max_streams_per_ip`), so one credential or one host cannot hold
//! an unbounded number of long-lived streams. Touched once when a stream
//! opens and once when it ends, never per state, so plain mutexes serve.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::ip_limit::{IpConnections, IpPermit};

pub struct StreamSlots {
    max_per_token: usize,
    /// Only tokens with an open stream have an entry: bounded by the open
    /// streams, themselves bounded by the listeners' connection limits.
    per_token: Mutex<HashMap<Box<str>, usize>>,
    per_ip: Arc<IpConnections>,
}

/// One open stream's place; dropping it frees the place.
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    token: Option<Box<str>>,
    _ip: Option<IpPermit>,
}

/// Why a stream may not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TooManyStreams {
    #[error("the token already holds streams.max_streams_per_token streams")]
    Token,
    #[error("the address already holds streams.max_streams_per_ip streams")]
    Address,
}

impl StreamSlots {
    /// A limit of 0 disables it.
    pub fn new(max_per_token: usize, max_per_ip: usize) -> Arc<StreamSlots> {
        Arc::new(StreamSlots {
            max_per_token,
            per_token: Mutex::new(HashMap::new()),
            per_ip: IpConnections::new(max_per_ip),
        })
    }

    /// A place for one more stream of `token` from `ip`.
    pub fn open(
        self: &Arc<Self>,
        token: &str,
        ip: Option<IpAddr>,
    ) -> Result<StreamSlot, TooManyStreams> {
        let ip = match ip {
            Some(ip) => Some(
                self.per_ip
                    .try_open(ip)
                    .map_err(|_| TooManyStreams::Address)?,
            ),
            None => None,
        };
        let token = match self.max_per_token {
            0 => None,
            max => {
                let mut open = self.per_token.lock().unwrap_or_else(|e| e.into_inner());
                let n = open.entry(token.into()).or_insert(0);
                if *n >= max {
                    return Err(TooManyStreams::Token);
                }
                *n += 1;
                Some(token.into())
            }
        };
        Ok(StreamSlot {
            slots: self.clone(),
            token,
            _ip: ip,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let Some(token) = &self.token else {
            return;
        };
        let mut open = self
            .slots
            .per_token
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(token) {
            *n -= 1;
            if *n == 0 {
                open.remove(token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_counted_per_token_and_address_and_freed() {
        let s = StreamSlots::new(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = s.open("t", Some(a)).unwrap();
        let _t2 = s.open("t", Some(b)).unwrap();
        assert_eq!(s.open("t", Some(b)).err(), Some(TooManyStreams::Token));
        let _u1 = s.open("u", Some(a)).unwrap();
        let u2 = s.open("u", Some(a)).unwrap();
        assert_eq!(s.open("v", Some(a)).err(), Some(TooManyStreams::Address));
        drop(t1);
        drop(u2);
        let _t3 = s.open("t", Some(a)).unwrap();
        assert!(s.per_token.lock().unwrap().len() == 2);
        let unlimited = StreamSlots::new(0, 0);
        let _many: Vec<_> = (0..100)
            .map(|_| unlimited.open("t", Some(a)).unwrap())
            .collect();
    }
}
