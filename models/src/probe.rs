//! The seeded probe batch: a deterministic input on which the trainer records the model's
//! outputs when it saves, and the exporter checks the written graph.

/// `batch × channels × size × size` values in [-2, 2), row-major `[b, c, h, w]`, the same on
/// every machine for a given seed (SplitMix64).
pub fn probe_batch(seed: u64, batch: usize, channels: usize, size: usize) -> Vec<f32> {
    let n = batch * channels * size * size;
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // 24 random bits give an exactly representable f32 in [0, 1).
            let u = (z >> 40) as f32 / (1u64 << 24) as f32;
            4.0 * u - 2.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_deterministic_and_in_range() {
        let a = probe_batch(7, 2, 3, 4);
        assert_eq!(a.len(), 96);
        assert_eq!(a, probe_batch(7, 2, 3, 4));
        assert_ne!(a, probe_batch(8, 2, 3, 4));
        assert!(a.iter().all(|v| (-2.0..2.0).contains(v)));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.5, "mean {mean}");
    }
}
