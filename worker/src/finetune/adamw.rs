//! AdamW as `torch.optim.AdamW` computes it (β = (0.9, 0.999), eps 1e-8, no amsgrad): decoupled
//! weight decay `p ← p·(1 − lr·wd)`, moments `m ← β₁m + (1 − β₁)g`, `v ← β₂v + (1 − β₂)g²`,
//! `p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + eps)`; and the polynomial decay the
//! published TransUNet trainer sets after every step, `lr · (1 − step/steps)^power`. The moments
//! are ours, so a checkpoint holds them and a resumed run continues bit for bit.

use std::collections::BTreeMap;

use tch::Tensor;

use super::sgd::{average_grads, buffers_like};
use crate::Result;
use crate::collective::Collective;

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

/// The learning rate of global step `step` of `steps`: `base · (1 − step/steps)^power`.
pub fn poly_lr(base: f64, step: usize, steps: usize, power: f64) -> f64 {
    let frac = 1.0 - step as f64 / steps.max(1) as f64;
    base * frac.max(0.0).powf(power)
}

/// AdamW over named parameters.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    weight_decay: f64,
    /// Updates done.
    pub steps: u64,
}

impl AdamW {
    /// An optimiser for `params` (name, variable) with zero moments.
    pub fn new(params: Vec<(String, Tensor)>, weight_decay: f64) -> Self {
        let exp_avg = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let exp_avg_sq = params.iter().map(|(_, p)| p.zeros_like()).collect();
        Self {
            params,
            exp_avg,
            exp_avg_sq,
            weight_decay,
            steps: 0,
        }
    }

    /// The trainable variables of `vs` in key order (the all-reduce layout); buffers such as
    /// BatchNorm statistics are left out.
    pub fn for_store(vs: &tch::nn::VarStore, weight_decay: f64) -> Self {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, v)| v.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new(params, weight_decay)
    }

    /// Averages every gradient over the ranks.
    pub fn all_reduce_grads(&mut self, collective: &mut dyn Collective) -> Result<()> {
        average_grads(&self.params, collective)
    }

    /// One update at `lr`; parameters without a gradient are skipped (like PyTorch), gradients
    /// are zeroed afterwards.
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let t = self.steps as i32;
        let bc1 = 1.0 - BETA1.powi(t);
        let bc2 = 1.0 - BETA2.powi(t);
        tch::no_grad(|| {
            for (((_, p), m), v) in self
                .params
                .iter_mut()
                .zip(&mut self.exp_avg)
                .zip(&mut self.exp_avg_sq)
            {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                // In place, like torch's single-tensor AdamW: two temporaries per parameter.
                if self.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let _ = m.lerp_(&g, 1.0 - BETA1);
                let _ = v.g_mul_scalar_(BETA2);
                let _ = v.addcmul_(&(&g * (1.0 - BETA2)), &g);
                if lr != 0.0 {
                    let mut denom = v.sqrt();
                    let _ = denom.g_div_scalar_(bc2.sqrt()).g_add_scalar_(EPS);
                    // p += m / (denom · (−bc1/lr)) = p − (lr/bc1) · m / denom.
                    let _ = denom.g_mul_scalar_(-bc1 / lr);
                    let _ = p.addcdiv_(m, &denom);
                }
                let _ = g.zero_();
            }
        });
    }

    /// Host copies of the moments under `exp_avg.<key>` and `exp_avg_sq.<key>`.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (((name, _), m), v) in self.params.iter().zip(&self.exp_avg).zip(&self.exp_avg_sq) {
            out.insert(format!("exp_avg.{name}"), crate::run::checkpoint::host(m));
            out.insert(
                format!("exp_avg_sq.{name}"),
                crate::run::checkpoint::host(v),
            );
        }
        out
    }

    /// Restores the moments of [`AdamW::state`]; every one must be present with its
    /// parameter's shape (`origin` names the file in errors).
    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        origin: &std::path::Path,
        steps: u64,
    ) -> Result<()> {
        let first = buffers_like(&self.params, state, "exp_avg", origin)?;
        let second = buffers_like(&self.params, state, "exp_avg_sq", origin)?;
        self.exp_avg = first;
        self.exp_avg_sq = second;
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn poly_decay_is_the_published_one() {
        assert_eq!(poly_lr(1e-4, 0, 100, 0.9), 1e-4);
        assert!((poly_lr(1.0, 50, 100, 0.9) - 0.5f64.powf(0.9)).abs() < 1e-12);
        assert_eq!(poly_lr(1.0, 100, 100, 0.9), 0.0);
    }

    #[test]
    fn updates_match_torch_adamw_by_hand() {
        // torch.optim.AdamW([p], lr=0.1, weight_decay=0.5), p = 1, grads 1 then −2:
        // step 1: p = 1·(1 − 0.05) = 0.95; m = 0.1, v = 0.001; m̂ = 1, √v̂ = 1 → p = 0.85.
        // step 2: p = 0.85·0.95 = 0.8075; m = 0.09 − 0.2 = −0.11; v = 0.000999 + 0.004
        //   = 0.004999; m̂ = −0.11/0.19; √v̂ = √(0.004999/0.001999);
        //   p = 0.8075 + 0.1·(0.11/0.19)/√(0.004999/0.001999).
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], 0.5);
        for g in [1.0f64, -2.0] {
            (&p * g).sum(Kind::Float).backward();
            opt.step(0.1);
        }
        let v_hat: f64 = 0.004999 / (1.0 - 0.999f64.powi(2));
        let want = 0.8075 + 0.1 * (0.11 / 0.19) / (v_hat.sqrt() + 1e-8);
        assert!(
            (p.double_value(&[0]) - want).abs() < 1e-6,
            "{}",
            p.double_value(&[0])
        );
        let state = opt.state();
        let mut other = AdamW::new(vec![("p".into(), p.shallow_clone())], 0.5);
        other
            .load_state(&state, std::path::Path::new("x"), 2)
            .unwrap();
        let err = other
            .load_state(&BTreeMap::new(), std::path::Path::new("x"), 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exp_avg.p"), "{err}");
    }
}
