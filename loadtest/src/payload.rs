//! Message bodies: one JSON state message per send, unique per run,
//! connection and sequence number, padded to a fixed size, and
//! reproducible so `verify` can recompute the exact bytes it expects.
//!
//! `{"data":{"r":"RUN","c":CONN,"s":SEQ,"p":"xxxx"}}`

/// Builds message bodies of one run.
#[derive(Debug, Clone)]
pub struct Payload {
    run: String,
    size: usize,
}

/// Bytes before the `data` object: `{"data":`.
const PREFIX: &[u8] = b"{\"data\":";

impl Payload {
    /// `size` is the total body size wanted; bodies are never shorter than
    /// their unpadded form (see [`Payload::min_size`]).
    pub fn new(run: &str, size: usize) -> Payload {
        Payload {
            run: run.to_string(),
            size,
        }
    }

    pub fn run(&self) -> &str {
        &self.run
    }

    /// The size of the unpadded body with the longest numbers.
    pub fn min_size(&self) -> usize {
        self.unpadded_len(u32::MAX, u64::MAX)
    }

    fn unpadded_len(&self, conn: u32, seq: u64) -> usize {
        let mut a = itoa::Buffer::new();
        let mut b = itoa::Buffer::new();
        PREFIX.len()
            + br#"{"r":""#.len()
            + self.run.len()
            + br#"","c":"#.len()
            + a.format(conn).len()
            + br#","s":"#.len()
            + b.format(seq).len()
            + br#","p":""}"#.len()
            + 1
    }

    /// Writes the body of message `seq` of connection `conn` into `buf`
    /// (cleared first).
    pub fn write(&self, buf: &mut Vec<u8>, conn: u32, seq: u64) {
        buf.clear();
        let pad = self.size.saturating_sub(self.unpadded_len(conn, seq));
        buf.extend_from_slice(PREFIX);
        buf.extend_from_slice(br#"{"r":""#);
        buf.extend_from_slice(self.run.as_bytes());
        buf.extend_from_slice(br#"","c":"#);
        buf.extend_from_slice(itoa::Buffer::new().format(conn).as_bytes());
        buf.extend_from_slice(br#","s":"#);
        buf.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        buf.extend_from_slice(br#","p":""#);
        buf.resize(buf.len() + pad, b'x');
        buf.extend_from_slice(br#""}}"#);
    }

    /// The exact text of the `data` value of message (`conn`, `seq`).
    pub fn data(&self, conn: u32, seq: u64) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.size);
        self.write(&mut buf, conn, seq);
        buf.truncate(buf.len() - 1);
        buf.drain(..PREFIX.len());
        buf
    }
}

/// The identifying fields of a stored `data` object.
#[derive(Debug, serde::Deserialize)]
pub struct Probe<'a> {
    #[serde(borrow)]
    pub r: std::borrow::Cow<'a, str>,
    pub c: u32,
    pub s: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_requested_size_and_parse() {
        let p = Payload::new("ab12cd34", 128);
        let mut buf = Vec::new();
        for (c, s) in [(0, 0), (7, 9), (12345, 987_654_321), (u32::MAX, 10)] {
            p.write(&mut buf, c, s);
            assert_eq!(buf.len(), 128, "{}", String::from_utf8_lossy(&buf));
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            assert_eq!(v["data"]["c"], c);
            assert_eq!(v["data"]["s"], s);
            assert_eq!(v["data"]["r"], "ab12cd34");
            let data = p.data(c, s);
            assert_eq!(&buf[8..buf.len() - 1], &data[..]);
            let probe: Probe = serde_json::from_slice(&data).unwrap();
            assert_eq!((probe.c, probe.s), (c, s));
        }
    }

    #[test]
    fn small_sizes_are_raised_to_the_unpadded_size() {
        let p = Payload::new("r", 1);
        let mut buf = Vec::new();
        p.write(&mut buf, 3, 4);
        assert_eq!(buf, br#"{"data":{"r":"r","c":3,"s":4,"p":""}}"#);
        assert!(p.min_size() > buf.len());
    }

    #[test]
    fn bodies_are_unique() {
        let p = Payload::new("r", 64);
        let mut seen = std::collections::HashSet::new();
        let mut buf = Vec::new();
        for c in 0..20 {
            for s in 0..50 {
                p.write(&mut buf, c, s);
                assert!(seen.insert(buf.clone()));
            }
        }
    }
}
