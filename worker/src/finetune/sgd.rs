//! SGD with momentum as `torch.optim.SGD` computes it (dampening 0, no Nesterov): with weight
//! decay `g ← g + wd·p`, then `buf ← momentum·buf + g` (the first step sets `buf = g`, which a
//! zero buffer reproduces exactly), `p ← p − lr·buf`; and the cosine schedule of
//! `CosineAnnealingLR(T_max = epochs, eta_min)` stepped once per epoch, as the published
//! fine-tuning (`eval_finetune.py`) uses them. The momentum buffers are ours, so a checkpoint
//! holds them and a resumed run continues bit for bit.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::collective::Collective;
use crate::{Error, Result};

/// The learning rate of `epoch` under `CosineAnnealingLR(T_max = epochs, eta_min)` stepped at
/// every epoch end: `eta_min + (lr − eta_min)·(1 + cos(π·epoch/epochs))/2`.
pub fn cosine_lr(base: f64, eta_min: f64, epoch: usize, epochs: usize) -> f64 {
    let t = epoch as f64 / epochs.max(1) as f64;
    eta_min + (base - eta_min) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
}

/// Averages the gradients of `params` over the ranks (one all-reduce of one flat buffer; the
/// ranks' mean, like DistributedDataParallel). Parameters without a gradient count as zero.
pub fn average_grads(params: &[(String, Tensor)], collective: &mut dyn Collective) -> Result<()> {
    let world = collective.world_size();
    if world == 1 {
        return Ok(());
    }
    // A parameter this rank's batch did not reach still takes part (as a zero gradient,
    // created by a zero backward) so that every rank reduces buffers of one layout.
    let missing: Vec<Tensor> = params
        .iter()
        .filter(|(_, p)| !p.grad().defined())
        .map(|(_, p)| p.sum(Kind::Float) * 0.0)
        .collect();
    if !missing.is_empty() {
        Tensor::stack(&missing, 0).sum(Kind::Float).backward();
    }
    let flat: Vec<Tensor> = params.iter().map(|(_, p)| p.grad().reshape([-1])).collect();
    let mut buffer = Tensor::cat(&flat, 0);
    collective.all_reduce_sum(&mut buffer)?;
    let buffer = buffer / world as f64;
    let mut offset = 0;
    for (_, p) in params {
        let n = p.numel() as i64;
        let mut g = p.grad();
        g.copy_(&buffer.narrow(0, offset, n).view_as(p));
        offset += n;
    }
    Ok(())
}

/// The optimiser buffers `<prefix>.<name>` of every parameter in `state`, each checked to have
/// its parameter's shape and moved to its device (`origin` names the file in errors).
pub(crate) fn buffers_like(
    params: &[(String, Tensor)],
    state: &BTreeMap<String, Tensor>,
    prefix: &str,
    origin: &std::path::Path,
) -> Result<Vec<Tensor>> {
    params
        .iter()
        .map(|(name, p)| {
            let key = format!("{prefix}.{name}");
            let t = state.get(&key).ok_or_else(|| Error::MissingKey {
                path: origin.to_path_buf(),
                key: key.clone(),
                expected: p.size(),
            })?;
            if t.size() != p.size() {
                return Err(Error::ShapeMismatch {
                    path: origin.to_path_buf(),
                    key,
                    expected: p.size(),
                    found: t.size(),
                });
            }
            Ok(t.to_kind(Kind::Float).to_device(p.device()))
        })
        .collect()
}

/// SGD with momentum over named parameters (every trainable variable of a store).
#[derive(Debug)]
pub struct Sgd {
    params: Vec<(String, Tensor)>,
    buffers: Vec<Tensor>,
    momentum: f64,
    weight_decay: f64,
    /// Updates done.
    pub steps: u64,
}

impl Sgd {
    /// An optimiser for `params` (name, variable), zero momentum buffers.
    pub fn new(params: Vec<(String, Tensor)>, momentum: f64, weight_decay: f64) -> Self {
        let buffers = params.iter().map(|(_, p)| p.zeros_like()).collect();
        Self {
            params,
            buffers,
            momentum,
            weight_decay,
            steps: 0,
        }
    }

    /// The parameters, in update order.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Averages every gradient over the ranks ([`average_grads`]).
    pub fn all_reduce_grads(&mut self, collective: &mut dyn Collective) -> Result<()> {
        average_grads(&self.params, collective)
    }

    /// One update with learning rate `lr`; parameters without a gradient are skipped (like
    /// PyTorch). Gradients are zeroed afterwards.
    pub fn step(&mut self, lr: f64) {
        tch::no_grad(|| {
            for ((_, p), buf) in self.params.iter_mut().zip(&mut self.buffers) {
                let mut g = p.grad();
                if !g.defined() {
                    continue;
                }
                let d = if self.weight_decay != 0.0 {
                    &g + &*p * self.weight_decay
                } else {
                    g.shallow_clone()
                };
                let _ = buf.g_mul_scalar_(self.momentum).g_add_(&d);
                let _ = p.g_sub_(&(&*buf * lr));
                let _ = g.zero_();
            }
        });
        self.steps += 1;
    }

    /// Zeroes every gradient.
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Host copies of the momentum buffers under `momentum_buffer.<key>`.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        self.params
            .iter()
            .zip(&self.buffers)
            .map(|((name, _), b)| {
                (
                    format!("momentum_buffer.{name}"),
                    crate::run::checkpoint::host(b),
                )
            })
            .collect()
    }

    /// Restores the momentum buffers from [`Sgd::state`]'s tensors; every buffer must be
    /// present with its parameter's shape (`origin` names the file in errors).
    pub fn load_state(
        &mut self,
        state: &BTreeMap<String, Tensor>,
        origin: &std::path::Path,
        steps: u64,
    ) -> Result<()> {
        let loaded = buffers_like(&self.params, state, "momentum_buffer", origin)?;
        self.buffers = loaded;
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn cosine_follows_cosine_annealing_lr() {
        assert_eq!(cosine_lr(1.0, 0.0, 0, 20), 1.0);
        assert!((cosine_lr(1.0, 0.0, 10, 20) - 0.5).abs() < 1e-12);
        assert!((cosine_lr(1.0, 0.1, 20, 20) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn updates_match_torch_sgd_by_hand() {
        // p = 1, grads 1 then 2, lr 0.1, momentum 0.9, wd 0:
        // step 1: buf = 1, p = 0.9; step 2: buf = 0.9 + 2 = 2.9, p = 0.9 - 0.29 = 0.61.
        let p = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let mut sgd = Sgd::new(vec![("p".into(), p.shallow_clone())], 0.9, 0.0);
        for g in [1.0f32, 2.0] {
            (&p * g as f64).sum(Kind::Float).backward();
            sgd.step(0.1);
        }
        assert!((p.double_value(&[0]) - 0.61).abs() < 1e-6);
        let state = sgd.state();
        assert!((state["momentum_buffer.p"].double_value(&[0]) - 2.9).abs() < 1e-6);
        let mut other = Sgd::new(vec![("p".into(), p.shallow_clone())], 0.9, 0.0);
        other
            .load_state(&state, std::path::Path::new("x"), 2)
            .unwrap();
        let bad: BTreeMap<String, Tensor> = [(
            "momentum_buffer.p".to_string(),
            Tensor::zeros([2], (Kind::Float, Device::Cpu)),
        )]
        .into();
        let err = other
            .load_state(&bad, std::path::Path::new("x"), 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("momentum_buffer.p"), "{err}");
    }
}
