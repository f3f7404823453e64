//! Reading the master's `/metrics` text: sample values and quantiles of histograms.

use std::collections::BTreeMap;

/// One scrape: every sample by its series name with labels, as written (`name{a="b"}`).
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            // The value follows the last space outside the labels.
            let split_at = match line.rfind('}') {
                Some(close) => line[close..].find(' ').map(|i| close + i),
                None => line.find(' '),
            };
            let Some(at) = split_at else { continue };
            let (series, rest) = line.split_at(at);
            let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
            samples.insert(series.to_string(), value);
        }
        Scrape { samples }
    }

    /// The value of a series, e.g. `get("capstan_tasks{state=\"RUNNING\"}")`.
    pub fn get(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    /// `capstan_tasks{state="STATE"}`, 0 when absent.
    pub fn tasks_in(&self, state: &str) -> u64 {
        self.get(&format!("capstan_tasks{{state=\"{state}\"}}")).unwrap_or(0.0) as u64
    }

    /// The cumulative buckets of histogram `name`, as (upper bound, count), ascending; `+Inf` last.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut out: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter_map(|(series, value)| {
                let le = series.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((le, *value))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }

    /// (`_sum`, `_count`) of histogram `name`.
    pub fn sum_count(&self, name: &str) -> (f64, u64) {
        (self.get(&format!("{name}_sum")).unwrap_or(0.0), self.get(&format!("{name}_count")).unwrap_or(0.0) as u64)
    }

    /// Quantile `q` (0..=1) of histogram `name`, interpolated linearly inside its bucket (as
    /// Prometheus' `histogram_quantile` does); `None` without observations.
    pub fn quantile(&self, name: &str, q: f64) -> Option<f64> {
        quantile(&self.buckets(name), q)
    }
}

/// Quantile of cumulative buckets (upper bound, count), ascending with `+Inf` last. In the `+Inf`
/// bucket it answers the highest finite bound (the histogram knows no more).
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for &(upper, count) in buckets {
        if count >= rank && count > below {
            if upper.is_infinite() {
                return Some(lower);
            }
            return Some(lower + (upper - lower) * (rank - below) / (count - below));
        }
        if upper.is_finite() {
            lower = upper;
        }
        below = count;
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP capstan_tasks Tasks by state.
# TYPE capstan_tasks gauge
capstan_tasks{state="RUNNING"} 70
capstan_tasks{state="PENDING"} 30
capstan_placements_total 100
capstan_placement_latency_seconds_sum 12.5
capstan_placement_latency_seconds_count 100
capstan_placement_latency_seconds_bucket{le="0.1"} 10
capstan_placement_latency_seconds_bucket{le="0.2"} 50
capstan_placement_latency_seconds_bucket{le="0.4"} 90
capstan_placement_latency_seconds_bucket{le="+Inf"} 100
# EOF
"#;

    #[test]
    fn parses_samples_and_quantiles() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.tasks_in("RUNNING"), 70);
        assert_eq!(s.tasks_in("KILLED"), 0);
        assert_eq!(s.get("capstan_placements_total"), Some(100.0));
        assert_eq!(s.sum_count("capstan_placement_latency_seconds"), (12.5, 100));
        let q = |q| s.quantile("capstan_placement_latency_seconds", q).unwrap();
        assert!((q(0.05) - 0.05).abs() < 1e-9);
        assert!((q(0.5) - 0.2).abs() < 1e-9);
        assert!((q(0.7) - 0.3).abs() < 1e-9);
        // In +Inf: the highest finite bound.
        assert!((q(0.99) - 0.4).abs() < 1e-9);
        assert_eq!(Scrape::parse("").quantile("x", 0.5), None);
    }
}
