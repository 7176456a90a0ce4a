//! The batching policy: a small pure rule, tested on its own.
//!
//! Batching is natural: a batch is whatever queued while the previous
//! commit ran, so a lone request is committed at once and a busy queue
//! yields big batches. The policy only caps a batch; it never waits.

/// Size of a batch or of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Size {
    pub messages: usize,
    pub bytes: usize,
}

impl std::ops::Add for Size {
    type Output = Size;

    fn add(self, other: Size) -> Size {
        Size {
            messages: self.messages + other.messages,
            bytes: self.bytes + other.bytes,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    pub max_messages: usize,
    pub max_bytes: usize,
}

impl BatchPolicy {
    /// Whether a request of size `item` may join a batch of size `batch`.
    /// An empty batch takes anything, so a request bigger than a cap is
    /// still committed (alone) and a request is never split.
    pub fn admits(&self, batch: Size, item: Size) -> bool {
        if batch.messages == 0 {
            return true;
        }
        let next = batch + item;
        next.messages <= self.max_messages && next.bytes <= self.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: BatchPolicy = BatchPolicy {
        max_messages: 10,
        max_bytes: 100,
    };

    fn s(messages: usize, bytes: usize) -> Size {
        Size { messages, bytes }
    }

    #[test]
    fn empty_batch_takes_anything() {
        assert!(P.admits(Size::default(), s(1000, 1 << 20)));
    }

    #[test]
    fn caps_messages_and_bytes() {
        assert!(P.admits(s(9, 10), s(1, 10)));
        assert!(!P.admits(s(9, 10), s(2, 10)));
        assert!(P.admits(s(1, 90), s(1, 10)));
        assert!(!P.admits(s(1, 90), s(1, 11)));
    }

    #[test]
    fn filling_a_batch_greedily_respects_caps() {
        let items = [s(3, 10), s(3, 10), s(3, 10), s(3, 10), s(1, 95)];
        let mut batches = vec![];
        let mut cur = Size::default();
        let mut n = 0;
        for it in items {
            if !P.admits(cur, it) {
                batches.push(n);
                cur = Size::default();
                n = 0;
            }
            cur = cur + it;
            n += 1;
        }
        batches.push(n);
        assert_eq!(batches, vec![3, 1, 1]);
    }
}
