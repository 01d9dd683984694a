//! Collapse diagnostics of self-distillation, the ones DINO users watch (Caron et al. 2021,
//! §5.3 "avoiding collapse": entropy and KL between teacher and student): the mean entropy of
//! the centred, sharpened teacher distribution `q = softmax((t − c) / τt)`, the entropy of its
//! batch mean `q̄`, and the student–teacher KL. The raw loss alone cannot tell learning from
//! collapse: it rises in healthy runs (the centre raises the teacher's entropy) and sits at
//! ln K in a uniform collapse.
//!
//! Two kinds of collapse, each detected when its condition holds for a sustained window of
//! steps ([`CollapseMonitor`]):
//! - uniform: the teacher's distribution is flat (mean entropy ≥ 98 % of ln K); the centring
//!   wins over the sharpening.
//! - dominant prototype: one prototype takes nearly all the batch's mass (entropy of the batch
//!   mean below a tenth of ln(min(K, clips in the global batch))); the sharpening wins.

use tch::{Kind, Tensor};

/// Mean teacher entropy at or above this fraction of ln K counts as a uniform collapse.
pub const UNIFORM_FRACTION: f64 = 0.98;

/// Batch-mean entropy below this fraction of ln(min(K, clips)) counts as one dominant
/// prototype.
pub const DOMINANT_FRACTION: f64 = 0.1;

/// The diagnostics of one step (nats), over the global batch.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Diagnostics {
    /// Mean over the teacher's rows (global views × batch) of `H(q)`.
    pub teacher_entropy: f64,
    /// `H(q̄)`, `q̄` the mean of `q` over the rows.
    pub batch_entropy: f64,
    /// Student–teacher KL, mean over the objective's pairs: `loss − teacher_entropy` (every
    /// teacher row enters the loss equally often, so the cross-entropy minus the teacher's
    /// entropy is exactly the mean KL of the pairs).
    pub kl: f64,
}

/// Per-rank sums behind [`Diagnostics`]: `[Σ_rows q (K) | Σ_rows H(q) | rows | loss]`, a
/// (K + 3) float32 vector that ranks all-reduce. `teacher_out` is (rows, K), `center` (1, K).
pub fn partial_sums(teacher_out: &Tensor, center: &Tensor, teacher_temp: f64, loss: f64) -> Tensor {
    tch::no_grad(|| {
        let logits = (teacher_out.detach().to_kind(Kind::Float) - center) / teacher_temp;
        let log_q = logits.log_softmax(-1, Kind::Float);
        let q = log_q.exp();
        let rows = q.size()[0];
        let h = -(&q * &log_q).sum(Kind::Float);
        let device = q.device();
        Tensor::cat(
            &[
                q.sum_dim_intlist(0, false, Kind::Float),
                h.reshape([1]),
                Tensor::from_slice(&[rows as f32, loss as f32]).to_device(device),
            ],
            0,
        )
    })
}

/// The diagnostics from all-reduced [`partial_sums`] of `world` ranks.
pub fn from_sums(sums: &Tensor, world: usize) -> Diagnostics {
    let sums = sums.to_device(tch::Device::Cpu).to_kind(Kind::Double);
    let n = sums.size()[0];
    let k = n - 3;
    let rows = sums.double_value(&[k + 1]).max(1.0);
    let q_bar = sums.narrow(0, 0, k) / rows;
    let batch_entropy = -(&q_bar * q_bar.clamp_min(1e-300).log())
        .sum(Kind::Double)
        .double_value(&[]);
    let teacher_entropy = sums.double_value(&[k]) / rows;
    let loss = sums.double_value(&[k + 2]) / world.max(1) as f64;
    Diagnostics {
        teacher_entropy,
        batch_entropy,
        kl: loss - teacher_entropy,
    }
}

/// A kind of collapse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Collapse {
    /// The teacher's distribution is flat (entropy ≈ ln K).
    Uniform,
    /// One prototype takes nearly all the batch's mass (batch-mean entropy ≈ 0).
    DominantPrototype,
}

impl Collapse {
    /// Its name in metrics and reports (`uniform`, `dominant_prototype`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Uniform => "uniform",
            Self::DominantPrototype => "dominant_prototype",
        }
    }

    /// The kind named `name` ([`Collapse::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Uniform, Self::DominantPrototype]
            .into_iter()
            .find(|c| c.name() == name)
    }

    /// One sentence for `endofm status`: the kind and what usually helps.
    pub fn sentence(self) -> String {
        let what = match self {
            Self::Uniform => {
                "uniform collapse (the teacher's distribution is flat, entropy ≈ ln K)"
            }
            Self::DominantPrototype => {
                "dominant-prototype collapse (one prototype takes nearly all the batch's mass)"
            }
        };
        format!("{what}: {}", self.advice())
    }

    /// What usually helps (DINO's ablations and its authors' advice).
    pub fn advice(self) -> &'static str {
        match self {
            Self::Uniform => {
                "the centring outweighs the sharpening: lower teacher_temp / warmup_teacher_temp (0.04 is the reference's), raise center_momentum, or lower lr"
            }
            Self::DominantPrototype => {
                "the sharpening outweighs the centring: raise teacher_temp slightly or lower center_momentum, lower lr or lengthen warmup_epochs, keep freeze_last_layer ≥ 1, and check the views differ (augmentations)"
            }
        }
    }
}

/// A collapse that just reached its window.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CollapseWarning {
    /// Which kind.
    pub kind: Collapse,
    /// Steps the condition has held.
    pub steps: usize,
    /// One line for logs and `endofm status`.
    pub message: String,
}

/// Watches [`Diagnostics`] step by step and reports a collapse once its condition has held for
/// `window` consecutive steps (again only after it cleared).
#[derive(Debug, Clone)]
pub struct CollapseMonitor {
    window: usize,
    ln_k: f64,
    dominant_below: f64,
    uniform_run: usize,
    dominant_run: usize,
}

impl CollapseMonitor {
    /// For `out_dim` = K prototypes, `clips` clips in the global batch, and a window of
    /// `window` steps (at least 1).
    pub fn new(out_dim: usize, clips: usize, window: usize) -> Self {
        let ln_k = (out_dim.max(1) as f64).ln();
        let spread = (out_dim.min(clips).max(1) as f64).ln();
        Self {
            window: window.max(1),
            ln_k,
            dominant_below: DOMINANT_FRACTION * spread,
            uniform_run: 0,
            dominant_run: 0,
        }
    }

    /// The window for a run of `total_steps`: a twentieth of it, between 3 and 100 steps.
    pub fn default_window(total_steps: usize) -> usize {
        (total_steps / 20).clamp(3, 100)
    }

    /// ln K.
    pub fn ln_k(&self) -> f64 {
        self.ln_k
    }

    /// The kind whose condition holds at `d`, if any.
    pub fn classify(&self, d: &Diagnostics) -> Option<Collapse> {
        if !d.teacher_entropy.is_finite() || !d.batch_entropy.is_finite() {
            return None;
        }
        if d.teacher_entropy >= UNIFORM_FRACTION * self.ln_k {
            Some(Collapse::Uniform)
        } else if d.batch_entropy < self.dominant_below {
            Some(Collapse::DominantPrototype)
        } else {
            None
        }
    }

    /// The collapse currently sustained for the window, if any.
    pub fn active(&self) -> Option<Collapse> {
        if self.uniform_run >= self.window {
            Some(Collapse::Uniform)
        } else if self.dominant_run >= self.window {
            Some(Collapse::DominantPrototype)
        } else {
            None
        }
    }

    /// Feeds one step; returns a warning when a condition has just held for the window.
    pub fn observe(&mut self, d: &Diagnostics) -> Option<CollapseWarning> {
        let now = self.classify(d);
        let bump = |run: &mut usize, on: bool| {
            *run = if on { *run + 1 } else { 0 };
            *run
        };
        let u = bump(&mut self.uniform_run, now == Some(Collapse::Uniform));
        let p = bump(
            &mut self.dominant_run,
            now == Some(Collapse::DominantPrototype),
        );
        let (kind, steps) = match (u == self.window, p == self.window) {
            (true, _) => (Collapse::Uniform, u),
            (_, true) => (Collapse::DominantPrototype, p),
            _ => return None,
        };
        let what = match kind {
            Collapse::Uniform => format!(
                "uniform collapse: the teacher's entropy has been {:.3} of ln K = {:.3} for {steps} steps",
                d.teacher_entropy, self.ln_k
            ),
            Collapse::DominantPrototype => format!(
                "dominant-prototype collapse: the batch-mean entropy has been below {:.3} (now {:.3}, ln K = {:.3}) for {steps} steps",
                self.dominant_below, d.batch_entropy, self.ln_k
            ),
        };
        Some(CollapseWarning {
            kind,
            steps,
            message: format!("{what}; {}", kind.advice()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn diag(t: &Tensor, c: &Tensor, temp: f64, loss: f64) -> Diagnostics {
        from_sums(&partial_sums(t, c, temp, loss), 1)
    }

    #[test]
    fn entropies_and_kl_match_their_definitions() {
        let t = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]).reshape([2, 4]);
        let c = Tensor::zeros([1, 4], (Kind::Float, Device::Cpu));
        let d = diag(&t, &c, 1.0, 2.0);
        // Each row: e/(e+3) on its own prototype.
        let e = std::f64::consts::E;
        let (a, b) = (e / (e + 3.0), 1.0 / (e + 3.0));
        let h_row = -(a * a.ln() + 3.0 * b * b.ln());
        assert!((d.teacher_entropy - h_row).abs() < 1e-6);
        let m = [(a + b) / 2.0, (a + b) / 2.0, b, b];
        let h_mean: f64 = -m.iter().map(|p| p * p.ln()).sum::<f64>();
        assert!((d.batch_entropy - h_mean).abs() < 1e-6);
        assert!((d.kl - (2.0 - h_row)).abs() < 1e-6);
        // A flat teacher: ln K both ways.
        let flat = diag(&(&t * 0.0), &c, 0.04, 0.0);
        assert!((flat.teacher_entropy - 4f64.ln()).abs() < 1e-6);
        assert!((flat.batch_entropy - 4f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn sums_over_ranks_are_the_global_batch() {
        let t = Tensor::randn([6, 16], (Kind::Float, Device::Cpu));
        let c = Tensor::randn([1, 16], (Kind::Float, Device::Cpu)) * 0.1;
        let whole = diag(&t, &c, 0.1, 3.0);
        let parts = partial_sums(&t.narrow(0, 0, 2), &c, 0.1, 3.0)
            + partial_sums(&t.narrow(0, 2, 4), &c, 0.1, 3.0);
        let split = from_sums(&parts, 2);
        assert!((whole.teacher_entropy - split.teacher_entropy).abs() < 1e-5);
        assert!((whole.batch_entropy - split.batch_entropy).abs() < 1e-5);
        assert!((whole.kl - split.kl).abs() < 1e-5);
    }

    #[test]
    fn monitor_needs_a_sustained_window_and_names_the_kind() {
        let ln_k = 64f64.ln();
        let mut m = CollapseMonitor::new(64, 8, 3);
        let healthy = Diagnostics {
            teacher_entropy: 0.5 * ln_k,
            batch_entropy: 0.9 * ln_k,
            kl: 1.0,
        };
        let flat = Diagnostics {
            teacher_entropy: 0.995 * ln_k,
            batch_entropy: ln_k,
            kl: 0.0,
        };
        let dominant = Diagnostics {
            teacher_entropy: 0.01,
            batch_entropy: 0.02,
            kl: 0.0,
        };
        assert_eq!(m.observe(&flat), None);
        assert_eq!(m.observe(&flat), None);
        assert_eq!(m.observe(&healthy), None, "a break restarts the window");
        assert_eq!(m.observe(&flat), None);
        assert_eq!(m.observe(&flat), None);
        let w = m.observe(&flat).expect("three flat steps");
        assert_eq!(w.kind, Collapse::Uniform);
        assert!(w.message.contains("uniform") && w.message.contains("teacher_temp"));
        assert_eq!(m.active(), Some(Collapse::Uniform));
        assert_eq!(m.observe(&flat), None, "warned once per episode");
        for _ in 0..2 {
            assert_eq!(m.observe(&dominant), None);
        }
        let w = m.observe(&dominant).expect("three dominant steps");
        assert_eq!(w.kind, Collapse::DominantPrototype);
        assert!(w.message.contains("dominant"), "{}", w.message);
        m.observe(&healthy);
        assert_eq!(m.active(), None);
        // One clip per step cannot show a dominant prototype.
        let mut one = CollapseMonitor::new(64, 1, 1);
        assert_eq!(one.observe(&dominant), None);
        assert_eq!(CollapseMonitor::default_window(10), 3);
        assert_eq!(CollapseMonitor::default_window(100_000), 100);
    }
}
