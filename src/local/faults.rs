//! Injected faults for the local Lambda model and the outbox, and the deterministic dice they
//! are decided with.

use std::time::Duration;

use serde::Serialize;

/// Probabilities (0..=1) of each fault.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Faults {
    /// A hop event is delivered twice.
    pub duplicate_hop: f64,
    /// A hop event is accepted and then lost.
    pub drop_hop: f64,
    /// A hop's sandbox dies at a random moment of its run (mid-page, typically).
    pub crash_hop: f64,
    /// A hop event waits up to `max_delay` in the queue before delivery.
    pub delay_hop: f64,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// A send fails before the message is accepted.
    pub mail_transient: f64,
    /// A send is refused as over the rate.
    pub mail_throttle: f64,
    /// A send is accepted but the caller sees a timeout.
    pub mail_ambiguous: f64,
}

impl Faults {
    /// `--chaos`: the documented default rates.
    pub fn chaos() -> Self {
        Faults {
            duplicate_hop: 0.02,
            drop_hop: 0.01,
            crash_hop: 0.01,
            delay_hop: 0.05,
            max_delay: Duration::from_millis(300),
            mail_transient: 0.02,
            mail_throttle: 0.01,
            mail_ambiguous: 0.002,
        }
    }
}

/// A uniform number in `[0, 1)` fixed by the seed and the parts (FNV-1a, then SplitMix64).
pub fn dice(seed: u64, parts: &[&[u8]]) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for part in parts {
        for b in part.iter().chain(&[0xff]) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::dice;

    #[test]
    fn dice_are_deterministic_and_roughly_uniform() {
        assert_eq!(dice(7, &[b"a", b"1"]), dice(7, &[b"a", b"1"]));
        assert_ne!(dice(7, &[b"a", b"1"]), dice(8, &[b"a", b"1"]));
        let n: u64 = 20_000;
        let below: usize = (0..n).filter(|i| dice(1, &[&i.to_le_bytes()]) < 0.1).count();
        assert!((1_700..2_300).contains(&below), "{below}");
    }
}
