//! The few statistics the bench needs: percentiles of one run's latencies and the median
//! of per-run results (a median shrugs off the one run a noisy neighbour spoiled).

use std::time::Duration;

/// The `q`-quantile (0 < q ≤ 1) of `samples` by nearest rank; `None` when empty.
pub fn percentile(samples: &[Duration], q: f64) -> Option<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "q <= 1 keeps the rank within 0..=len; `as` saturates (NaN is 0) and the clamp below keeps it in range"
    )]
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len().max(1)) - 1).copied()
}

/// The median of `values` (the mean of the middle two for an even count); `None` when empty.
pub fn median(values: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut sorted: Vec<f64> = values.into_iter().collect();
    sorted.sort_unstable_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[mid]),
        _ => Some((sorted[mid - 1] + sorted[mid]) / 2.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(values: &[u64]) -> Vec<Duration> {
        values.iter().copied().map(Duration::from_micros).collect()
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples = micros(&(1..=100).rev().collect::<Vec<_>>());
        assert_eq!(percentile(&samples, 0.5), Some(Duration::from_micros(50)));
        assert_eq!(percentile(&samples, 0.99), Some(Duration::from_micros(99)));
        assert_eq!(percentile(&samples, 1.0), Some(Duration::from_micros(100)));
        assert_eq!(
            percentile(&micros(&[7]), 0.01),
            Some(Duration::from_micros(7))
        );
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median([]), None);
    }
}
