//! Medians, quantiles and ratios taken pair by pair.
//!
//! On a shared machine the disk's speed drifts by tens of percent within minutes (the same
//! BackupEngine backup took 1.9 s and 2.8 s a quarter of an hour apart here), so two
//! contenders are only compared within a pair of runs made one after the other, and the
//! ratios of the pairs are summarized, never the ratio of two medians.

use serde::Serialize;

/// The median (the mean of the middle two for an even count; 0 for none).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The value at quantile `q` (nearest rank).
pub fn quantile(values: &[u64], q: f64) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Ratios of pairs of runs: their median, min and max.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Ratio {
    /// The summary of `ratios` (NaN for none).
    pub fn of(ratios: &[f64]) -> Ratio {
        if ratios.is_empty() {
            return Ratio {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        Ratio {
            median: median(ratios),
            min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
            max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }

    /// `a[i] / b[i]` for each pair `i`.
    pub fn pairwise(a: &[f64], b: &[f64]) -> Ratio {
        let ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b.max(1e-9)).collect();
        Ratio::of(&ratios)
    }

    /// As the reports show it: `0.95x (0.90-1.02)`.
    pub fn shown(&self) -> String {
        format!("{:.2}x ({:.2}-{:.2})", self.median, self.min, self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_taken_pair_by_pair() {
        // The second pair ran on a disk twice as slow: both contenders slowed alike.
        let ratio = Ratio::pairwise(&[1.0, 2.0, 1.1], &[1.0, 2.5, 1.0]);
        assert_eq!(ratio.median, 1.0);
        assert_eq!(ratio.min, 0.8);
        assert!((ratio.max - 1.1).abs() < 1e-9);
        assert_eq!(ratio.shown(), "1.00x (0.80-1.10)");
        assert!(Ratio::of(&[]).median.is_nan());
    }

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(quantile(&[5, 1, 3, 2, 4], 0.5), 3);
        assert_eq!(quantile(&[5, 1, 3, 2, 4], 0.99), 5);
        assert_eq!(quantile(&[], 0.5), 0);
    }
}
