//! Identity of a data listing, so that a resumed run can tell when the data it reads changed.

use serde::{Deserialize, Serialize};

/// Identifies a listing (a pre-training clip list, a fine-tuning split).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusFingerprint {
    /// Number of entries listed.
    pub clips: usize,
    /// FNV-1a hash of the listing, hex.
    pub hash: String,
}

impl CorpusFingerprint {
    /// Fingerprint of a list of keys (order matters).
    pub fn of(keys: &[String]) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for k in keys {
            for b in k.bytes().chain(std::iter::once(b'\n')) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        Self {
            clips: keys.len(),
            hash: format!("{h:016x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_content_change_the_fingerprint() {
        let a = CorpusFingerprint::of(&["a".into(), "b".into()]);
        let b = CorpusFingerprint::of(&["b".into(), "a".into()]);
        assert_eq!(a.clips, 2);
        assert_ne!(a, b);
        assert_eq!(a, CorpusFingerprint::of(&["a".into(), "b".into()]));
    }
}
