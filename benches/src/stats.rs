//! Order statistics over a handful of samples: min, median and p99.
//!
//! With 10 runs a "p99" is necessarily close to the maximum; it is still reported so the
//! tail is visible and so larger `--runs` counts give a real percentile. Percentiles use
//! linear interpolation between the two nearest ranks (the common "type 7" definition:
//! position `p * (n - 1)` in the sorted samples), so the median of an even count is the mean
//! of the middle two.

/// Min, median and p99 of one side's samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Smallest sample.
    pub min: f64,
    /// 50th percentile.
    pub median: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Number of samples.
    pub n: usize,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none. NaNs are ignored.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        sorted.sort_by(f64::total_cmp);
        let min = *sorted.first()?;
        Some(Summary {
            min,
            median: percentile(&sorted, 0.5)?,
            p99: percentile(&sorted, 0.99)?,
            n: sorted.len(),
        })
    }
}

/// The `p`-quantile (0.0 to 1.0) of already sorted samples, interpolating linearly between
/// the nearest ranks. `None` for an empty slice or `p` outside 0..=1.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=1.0).contains(&p) {
        return None;
    }
    let pos = p * (sorted.len() - 1) as f64;
    let lower = pos.floor();
    let frac = pos - lower;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "lower is a whole number in 0..=len-1"
    )]
    let i = lower as usize;
    let lo = sorted[i];
    let hi = sorted.get(i + 1).copied().unwrap_or(lo);
    Some(lo + (hi - lo) * frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&s, 0.0), Some(1.0));
        assert_eq!(percentile(&s, 1.0), Some(4.0));
        assert!(close(percentile(&s, 0.5).unwrap(), 2.5));
        // 0.99 * 3 = 2.97: 3 + 0.97 * (4 - 3)
        assert!(close(percentile(&s, 0.99).unwrap(), 3.97));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&s, 1.5), None);
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
    }

    #[test]
    fn summary_sorts_and_counts() {
        let s = Summary::of(&[30.0, 10.0, 20.0, f64::NAN]).unwrap();
        assert_eq!(s.n, 3);
        assert_eq!(s.min, 10.0);
        assert_eq!(s.median, 20.0);
        assert!(close(s.p99, 29.8));
        assert_eq!(Summary::of(&[]), None);
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        let s = Summary::of(&ten).unwrap();
        assert!(close(s.median, 5.5));
        assert!(close(s.p99, 9.91));
    }
}
