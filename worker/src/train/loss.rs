//! The self-supervised objective of Endo-FM (§3 of the spec): cross-entropy between the centred,
//! sharpened teacher distribution of each global view and the student distribution of every
//! other view (2 × 10 − 2 = 18 pairs for 2 global + 8 local views), averaged with equal weights;
//! and the centre, an exponential moving average of the teacher's outputs.

use tch::{Kind, Tensor};

/// Temperatures and centre momentum of the objective (reference defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SslLossConfig {
    /// Student softmax temperature τs.
    pub student_temp: f64,
    /// Centre EMA momentum: `c ← m·c + (1 − m)·batch_mean`.
    pub center_momentum: f64,
    /// Number of leading views the teacher sees (global views).
    pub global_views: usize,
}

impl Default for SslLossConfig {
    fn default() -> Self {
        Self {
            student_temp: 0.1,
            center_momentum: 0.9,
            global_views: 2,
        }
    }
}

/// The objective and its centre (a (1, out_dim) buffer, part of every checkpoint).
#[derive(Debug)]
pub struct SslLoss {
    cfg: SslLossConfig,
    center: Tensor,
}

impl SslLoss {
    /// A zero centre of width `out_dim` on `device`.
    pub fn new(out_dim: i64, cfg: SslLossConfig, device: tch::Device) -> Self {
        Self {
            cfg,
            center: Tensor::zeros([1, out_dim], (Kind::Float, device)),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SslLossConfig {
        &self.cfg
    }

    /// The current centre.
    pub fn center(&self) -> &Tensor {
        &self.center
    }

    /// Replaces the centre (resuming from a checkpoint).
    pub fn set_center(&mut self, center: Tensor) {
        self.center = center;
    }

    /// The loss for view-major `student_out` ((views·B, K)) and `teacher_out` ((globals·B, K)),
    /// with the teacher temperature of the current epoch. Gradients flow into `student_out` only.
    pub fn loss(&self, student_out: &Tensor, teacher_out: &Tensor, teacher_temp: f64) -> Tensor {
        ssl_loss(
            student_out,
            teacher_out,
            &self.center,
            self.cfg.student_temp,
            teacher_temp,
            self.cfg.global_views,
        )
    }

    /// Sum of the teacher outputs over the local batch, (1, K): what ranks all-reduce before
    /// [`SslLoss::update_center`].
    pub fn batch_sum(teacher_out: &Tensor) -> Tensor {
        tch::no_grad(|| {
            teacher_out
                .detach()
                .to_kind(Kind::Float)
                .sum_dim_intlist(0, true, None::<Kind>)
        })
    }

    /// `c ← m·c + (1 − m)·summed / rows`, with `summed` the (all-reduced) [`SslLoss::batch_sum`]
    /// and `rows` the number of teacher rows it covers (globals × global batch).
    pub fn update_center(&mut self, summed: &Tensor, rows: i64) {
        let m = self.cfg.center_momentum;
        tch::no_grad(|| {
            let mean = summed / rows as f64;
            self.center = &self.center * m + mean * (1.0 - m);
        });
    }
}

/// The objective as a pure function (see [`SslLoss::loss`]).
pub fn ssl_loss(
    student_out: &Tensor,
    teacher_out: &Tensor,
    center: &Tensor,
    student_temp: f64,
    teacher_temp: f64,
    global_views: usize,
) -> Tensor {
    let g = global_views as i64;
    let (t_rows, k) = teacher_out.size2().expect("teacher output is (rows, K)");
    let (s_rows, _) = student_out.size2().expect("student output is (rows, K)");
    let b = t_rows / g;
    let v = s_rows / b;
    assert_eq!(
        b * g,
        t_rows,
        "teacher rows are not a multiple of the global views"
    );
    assert_eq!(
        b * v,
        s_rows,
        "student rows are not a multiple of the batch"
    );

    let log_p = (student_out.to_kind(Kind::Float) / student_temp)
        .log_softmax(-1, Kind::Float)
        .reshape([v, b, k]);
    let q = tch::no_grad(|| {
        ((teacher_out.detach().to_kind(Kind::Float) - center) / teacher_temp)
            .softmax(-1, Kind::Float)
            .reshape([g, b, k])
    });
    // cross[i, w] = mean over the batch of −Σ_k q[i, b, k] · log_p[w, b, k]
    let cross = -q
        .permute([1, 0, 2])
        .matmul(&log_p.permute([1, 2, 0])) // (B, G, V)
        .mean_dim(0, false, None::<Kind>); // (G, V)
    let mask = Tensor::ones([g, v], (Kind::Float, student_out.device()));
    let terms = g * v - g.min(v);
    for i in 0..g.min(v) {
        let _ = mask.get(i).get(i).fill_(0.0);
    }
    (cross * mask).sum(Kind::Float) / terms as f64
}

/// The teacher's centred, sharpened distributions, (globals, B, K), without gradient.
pub fn teacher_probs(
    teacher_out: &Tensor,
    center: &Tensor,
    teacher_temp: f64,
    global_views: usize,
) -> Tensor {
    let g = global_views as i64;
    let (rows, k) = teacher_out.size2().expect("teacher output is (rows, K)");
    tch::no_grad(|| {
        ((teacher_out.detach().to_kind(Kind::Float) - center) / teacher_temp)
            .softmax(-1, Kind::Float)
            .reshape([g, rows / g, k])
    })
}

/// Sum over the student views `view_ids` (the views whose rows `student_out` holds, in order)
/// and every teacher view `i ≠ view` of `mean_batch(−Σ q_i · log_softmax(s / τs))`: part of the
/// objective's numerator, so that view groups can be differentiated separately and summed.
pub fn cross_terms(
    probs: &Tensor,
    student_out: &Tensor,
    view_ids: &[usize],
    student_temp: f64,
) -> Tensor {
    let (g, b, k) = probs.size3().expect("probs are (globals, B, K)");
    let v = view_ids.len() as i64;
    let log_p = (student_out.to_kind(Kind::Float) / student_temp)
        .log_softmax(-1, Kind::Float)
        .reshape([v, b, k]);
    let cross = -probs
        .permute([1, 0, 2])
        .matmul(&log_p.permute([1, 2, 0]))
        .mean_dim(0, false, None::<Kind>); // (G, V)
    let mask: Vec<f32> = (0..g as usize)
        .flat_map(|i| {
            view_ids
                .iter()
                .map(move |&w| if w == i { 0.0 } else { 1.0 })
        })
        .collect();
    let mask = Tensor::from_slice(&mask)
        .reshape([g, v])
        .to_device(student_out.device());
    (cross * mask).sum(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pairwise definition, written out term by term.
    fn naive(s: &Tensor, t: &Tensor, c: &Tensor, ts: f64, tt: f64, g: i64, v: i64) -> f64 {
        let s = (s / ts).chunk(v, 0);
        let t = ((t - c) / tt).softmax(-1, Kind::Float).chunk(g, 0);
        let mut total = 0.0;
        let mut n = 0;
        for (i, q) in t.iter().enumerate() {
            for (w, sv) in s.iter().enumerate() {
                if i == w {
                    continue;
                }
                let term = (-q * sv.log_softmax(-1, Kind::Float))
                    .sum_dim_intlist(-1, false, None::<Kind>)
                    .mean(Kind::Float);
                total += term.double_value(&[]);
                n += 1;
            }
        }
        total / n as f64
    }

    #[test]
    fn matches_the_pairwise_definition() {
        let _rng = crate::test_support::rng_lock();
        tch::manual_seed(3);
        let (b, k) = (3, 64);
        let s = Tensor::randn([10 * b, k], (Kind::Float, tch::Device::Cpu));
        let t = Tensor::randn([2 * b, k], (Kind::Float, tch::Device::Cpu));
        let c = Tensor::randn([1, k], (Kind::Float, tch::Device::Cpu)) * 0.1;
        let ours = ssl_loss(&s, &t, &c, 0.1, 0.04, 2).double_value(&[]);
        let reference = naive(&s, &t, &c, 0.1, 0.04, 2, 10);
        assert!(
            (ours - reference).abs() < 1e-4,
            "ours {ours} vs {reference}"
        );
    }

    #[test]
    fn view_groups_sum_to_the_whole_objective() {
        let _rng = crate::test_support::rng_lock();
        tch::manual_seed(4);
        let (b, k) = (2, 16);
        let s = Tensor::randn([10 * b, k], (Kind::Float, tch::Device::Cpu));
        let t = Tensor::randn([2 * b, k], (Kind::Float, tch::Device::Cpu));
        let c = Tensor::randn([1, k], (Kind::Float, tch::Device::Cpu)) * 0.1;
        let whole = ssl_loss(&s, &t, &c, 0.1, 0.04, 2).double_value(&[]);
        let probs = teacher_probs(&t, &c, 0.04, 2);
        let a = cross_terms(&probs, &s.narrow(0, b, b), &[1], 0.1);
        let rest = Tensor::cat(&[s.narrow(0, 0, b), s.narrow(0, 2 * b, 8 * b)], 0);
        let ids: Vec<usize> = std::iter::once(0).chain(2..10).collect();
        let bsum = cross_terms(&probs, &rest, &ids, 0.1);
        let parts = ((a + bsum) / 18.0).double_value(&[]);
        assert!((parts - whole).abs() < 1e-5, "{parts} vs {whole}");
    }

    #[test]
    fn centre_is_an_ema_of_the_teacher_mean() {
        let _rng = crate::test_support::rng_lock();
        let mut l = SslLoss::new(4, SslLossConfig::default(), tch::Device::Cpu);
        let t = Tensor::from_slice(&[1.0f32, 2., 3., 4., 3., 2., 1., 0.]).reshape([2, 4]);
        l.update_center(&SslLoss::batch_sum(&t), 2);
        let c: Vec<f32> = l.center().reshape([4]).try_into().unwrap();
        assert_eq!(c, vec![0.2, 0.2, 0.2, 0.2]);
    }

    #[test]
    fn only_the_student_gets_gradients() {
        let _rng = crate::test_support::rng_lock();
        let s = Tensor::randn([10, 8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let t = Tensor::randn([2, 8], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let c = Tensor::zeros([1, 8], (Kind::Float, tch::Device::Cpu));
        ssl_loss(&s, &t, &c, 0.1, 0.04, 2).backward();
        assert!(s.grad().defined());
        assert!(!t.grad().defined());
    }
}
