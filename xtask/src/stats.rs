//! The order statistics both benches report: percentiles of sorted samples, and the median of
//! repeated runs.

/// The `q`th percentile of `sorted` (ascending), by nearest rank; 0 when there are no samples.
pub fn percentile(sorted: &[f64], q: usize) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => sorted[(n * q / 100).min(n - 1)],
    }
}

/// The median of `samples` (the upper one of an even count), or `None` when there are none.
pub fn median(mut samples: Vec<f64>) -> Option<f64> {
    samples.sort_by(f64::total_cmp);
    (!samples.is_empty()).then(|| percentile(&samples, 50))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let sorted: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 50), 51.0);
        assert_eq!(percentile(&sorted, 99), 100.0);
        assert_eq!(percentile(&sorted, 100), 100.0);
        assert_eq!(percentile(&[], 50), 0.0);
    }

    #[test]
    fn the_median_of_runs_in_any_order() {
        assert_eq!(median(vec![9.0, 1.0, 5.0]), Some(5.0));
        assert_eq!(median(vec![2.0]), Some(2.0));
        assert_eq!(median(vec![]), None);
    }
}
