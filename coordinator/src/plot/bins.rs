//! Downsampling a long run to at most one summary per pixel column, so that drawing costs the
//! same for 600 steps as for 60,000 and a column shows what happened under it, not just its
//! last point.

use std::ops::Range;

/// One column's summary of one series: where its finite values sit on the step axis, their
/// mean and their range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Bin {
    pub step: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// How many finite values the column averaged.
    pub count: usize,
}

/// Maps steps onto `count` pixel columns spread evenly over `range`, the chart's x range, so
/// a column is exactly the steps one pixel of the chart covers.
#[derive(Debug, Clone)]
pub(super) struct Columns {
    start: f64,
    width: f64,
    count: usize,
}

impl Columns {
    pub fn new(range: &Range<f64>, count: usize) -> Columns {
        Columns {
            start: range.start,
            width: (range.end - range.start).max(f64::MIN_POSITIVE),
            count: count.max(1),
        }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn index(&self, step: u64) -> usize {
        let at = ((step as f64 - self.start) / self.width * self.count as f64).floor();
        // Steps outside the range (none, when the range came from the same data) land on the
        // nearest edge instead of being dropped.
        (at.max(0.0) as usize).min(self.count - 1)
    }
}

#[derive(Debug, Clone, Copy)]
struct Accumulator {
    records: usize,
    finite: usize,
    step_sum: f64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for Accumulator {
    fn default() -> Self {
        Accumulator {
            records: 0,
            finite: 0,
            step_sum: 0.0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

/// Bins one series into runs of consecutive columns. Non-finite values are left out; a column
/// whose records were all non-finite ends a run, so a NaN stretch shows as a gap instead of a
/// line bridging it. A column with no records at all (steps not logged) does not break a run.
pub(super) fn bin_series(points: impl Iterator<Item = (u64, f64)>, columns: &Columns) -> Vec<Vec<Bin>> {
    let mut accumulators = vec![Accumulator::default(); columns.count()];
    for (step, value) in points {
        let acc = &mut accumulators[columns.index(step)];
        acc.records += 1;
        if value.is_finite() {
            acc.finite += 1;
            acc.step_sum += step as f64;
            acc.sum += value;
            acc.min = acc.min.min(value);
            acc.max = acc.max.max(value);
        }
    }
    let mut runs = Vec::new();
    let mut run: Vec<Bin> = Vec::new();
    for acc in accumulators.iter().filter(|acc| acc.records > 0) {
        if acc.finite == 0 {
            if !run.is_empty() {
                runs.push(std::mem::take(&mut run));
            }
            continue;
        }
        let n = acc.finite as f64;
        run.push(Bin {
            step: acc.step_sum / n,
            mean: acc.sum / n,
            min: acc.min,
            max: acc.max,
            count: acc.finite,
        });
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

/// For each column, the share of its records for which `skipped` holds; `None` where the
/// column has no records.
pub(super) fn skip_shares<T>(
    records: &[T],
    step: impl Fn(&T) -> u64,
    skipped: impl Fn(&T) -> bool,
    columns: &Columns,
) -> Vec<Option<f64>> {
    let mut counts = vec![(0usize, 0usize); columns.count()];
    for record in records {
        let slot = &mut counts[columns.index(step(record))];
        slot.0 += 1;
        slot.1 += usize::from(skipped(record));
    }
    counts
        .into_iter()
        .map(|(all, skipped)| (all > 0).then(|| skipped as f64 / all as f64))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_value_per_column_is_kept_as_is() {
        let columns = Columns::new(&(0.0..10.0), 10);
        let runs = bin_series((0..10).map(|s| (s, s as f64 * 2.0)), &columns);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].len(), 10);
        for (i, bin) in runs[0].iter().enumerate() {
            assert_eq!(bin.step, i as f64);
            assert_eq!(
                (bin.mean, bin.min, bin.max, bin.count),
                (i as f64 * 2.0, i as f64 * 2.0, i as f64 * 2.0, 1)
            );
        }
    }

    #[test]
    fn many_values_per_column_give_mean_min_and_max() {
        // 1,000 steps over 10 columns: 100 per column, the values 0..99 in each.
        let columns = Columns::new(&(0.0..1000.0), 10);
        let runs = bin_series((0..1000).map(|s| (s, (s % 100) as f64)), &columns);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].len(), 10);
        for (i, bin) in runs[0].iter().enumerate() {
            assert_eq!(bin.count, 100);
            assert_eq!((bin.min, bin.max), (0.0, 99.0));
            assert!((bin.mean - 49.5).abs() < 1e-12);
            assert!((bin.step - (i as f64 * 100.0 + 49.5)).abs() < 1e-9);
        }
    }

    #[test]
    fn a_non_finite_column_splits_the_line_and_a_missing_one_does_not() {
        let columns = Columns::new(&(0.0..6.0), 6);
        // Step 2 is NaN (a gap); step 4 was never logged (bridged).
        let points = [
            (0, 1.0),
            (1, 1.0),
            (2, f64::NAN),
            (3, 1.0),
            (5, f64::INFINITY),
            (5, 3.0),
        ];
        let runs = bin_series(points.into_iter(), &columns);
        let steps: Vec<Vec<f64>> = runs.iter().map(|run| run.iter().map(|b| b.step).collect()).collect();
        assert_eq!(steps, vec![vec![0.0, 1.0], vec![3.0, 5.0]]);
        assert_eq!(runs[1][1].mean, 3.0, "the infinity beside 3.0 is left out of the mean");
    }

    #[test]
    fn only_non_finite_values_give_no_runs() {
        let columns = Columns::new(&(0.0..3.0), 3);
        let runs = bin_series([(0, f64::NAN), (1, f64::NEG_INFINITY)].into_iter(), &columns);
        assert!(runs.is_empty());
    }

    #[test]
    fn the_last_step_falls_in_the_last_column() {
        let columns = Columns::new(&(100.0..200.0), 4);
        assert_eq!(columns.index(100), 0);
        assert_eq!(columns.index(149), 1);
        assert_eq!(columns.index(200), 3);
        assert_eq!(columns.index(0), 0);
    }

    #[test]
    fn skip_shares_count_per_column() {
        let columns = Columns::new(&(0.0..4.0), 2);
        let records = [(0u64, true), (1, false), (2, false), (3, false)];
        let shares = skip_shares(&records, |r| r.0, |r| r.1, &columns);
        assert_eq!(shares, vec![Some(0.5), Some(0.0)]);
        let empty = skip_shares(&records[..0], |r| r.0, |r| r.1, &columns);
        assert_eq!(empty, vec![None, None]);
    }
}
