//! Per-iteration schedules of pre-training, as the reference computes them: a linear warm-up
//! followed by a cosine from `base` to `final` over the remaining iterations (learning rate,
//! weight decay, teacher EMA momentum), and the per-epoch teacher temperature.

/// A schedule with one value per training iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    values: Vec<f64>,
}

impl Schedule {
    /// `warmup_iters` linear steps from `warmup_start` to `base` (the last warm-up value stops
    /// one step short of `base`, like `linspace(start, base, warmup_iters)`), then a cosine from
    /// `base` to `final_value`: `final + ½(base − final)(1 + cos(π i / n))` for the n remaining
    /// iterations.
    pub fn cosine(
        base: f64,
        final_value: f64,
        total_iters: usize,
        warmup_iters: usize,
        warmup_start: f64,
    ) -> Self {
        let warmup_iters = warmup_iters.min(total_iters);
        let mut values = Vec::with_capacity(total_iters);
        match warmup_iters {
            0 => {}
            1 => values.push(warmup_start),
            n => values.extend(
                (0..n).map(|i| warmup_start + (base - warmup_start) * i as f64 / (n - 1) as f64),
            ),
        }
        let rest = total_iters - warmup_iters;
        values.extend((0..rest).map(|i| {
            let phase = std::f64::consts::PI * i as f64 / rest as f64;
            final_value + 0.5 * (base - final_value) * (1.0 + phase.cos())
        }));
        Self { values }
    }

    /// The value at iteration `it` (the last value past the end).
    pub fn at(&self, it: usize) -> f64 {
        match self.values.get(it) {
            Some(v) => *v,
            None => self.values.last().copied().unwrap_or(0.0),
        }
    }

    /// Number of iterations covered.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the schedule covers no iteration.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Teacher temperature of `epoch`: linear from `warmup` to `final_temp` over `warmup_epochs`
/// (`linspace`, inclusive), then constant.
pub fn teacher_temp(warmup: f64, final_temp: f64, warmup_epochs: usize, epoch: usize) -> f64 {
    match warmup_epochs {
        0 => final_temp,
        _ if epoch >= warmup_epochs => final_temp,
        1 => warmup,
        n => warmup + (final_temp - warmup) * epoch as f64 / (n - 1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::cosine(1.0, 0.0, 20, 10, 0.0);
        assert_eq!(s.len(), 20);
        assert_eq!(s.at(0), 0.0);
        assert!((s.at(9) - 1.0).abs() < 1e-12);
        assert!((s.at(10) - 1.0).abs() < 1e-12, "cosine starts at base");
        assert!((s.at(15) - 0.5).abs() < 1e-12);
        assert!(s.at(19) > 0.0 && s.at(19) < 0.03);
        assert_eq!(s.at(1000), s.at(19));
    }

    #[test]
    fn weight_decay_and_momentum_shapes() {
        let wd = Schedule::cosine(0.04, 0.4, 100, 0, 0.0);
        assert!((wd.at(0) - 0.04).abs() < 1e-12);
        assert!(wd.at(99) < 0.4 && wd.at(99) > 0.399);
        let m = Schedule::cosine(0.996, 1.0, 10, 0, 0.0);
        assert!((1..10).all(|i| m.at(i) >= m.at(i - 1)));
    }

    #[test]
    fn warmup_longer_than_the_run_is_all_warmup() {
        let s = Schedule::cosine(1.0, 0.0, 3, 10, 0.0);
        assert_eq!(s.len(), 3);
        assert!((s.at(2) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn teacher_temperature() {
        assert_eq!(teacher_temp(0.04, 0.07, 0, 0), 0.07);
        assert!((teacher_temp(0.04, 0.07, 4, 0) - 0.04).abs() < 1e-12);
        assert!((teacher_temp(0.04, 0.07, 4, 3) - 0.07).abs() < 1e-12);
        assert_eq!(teacher_temp(0.04, 0.07, 4, 9), 0.07);
    }
}
