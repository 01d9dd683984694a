//! Flat parameter buffers and the updates that run over them: AdamW with the reference's
//! parameter groups, per-tensor gradient clipping and the teacher's EMA. Every parameter of a
//! network becomes a view into one contiguous buffer, laid out by role
//! (`[no decay][decay][last layer][frozen]`), so an update is a handful of kernels over large
//! ranges instead of a loop over ~200 tensors, and gradients travel as one flat buffer.

use std::ops::Range;

use tch::{Kind, Tensor};

use crate::model::EndoFm;
use crate::{Error, Result};

/// Role of a parameter in the optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    /// Biases and 1-D tensors (norms): trained, no weight decay.
    NoDecay,
    /// Everything else that is trained.
    Decay,
    /// The head's last layer (`weight_v`): decayed, frozen during the first epoch(s).
    LastLayer,
    /// Not trained (`weight_g`); still part of the teacher's EMA, like the reference.
    Frozen,
}

fn role(name: &str, shape: &[i64], trainable: bool) -> Role {
    if !trainable {
        Role::Frozen
    } else if name.contains("last_layer") {
        Role::LastLayer
    } else if name.ends_with(".bias") || shape.len() == 1 {
        Role::NoDecay
    } else {
        Role::Decay
    }
}

/// One parameter's place in the flat buffer.
#[derive(Debug)]
pub struct Entry {
    /// State-dict key.
    pub name: String,
    /// First element in the flat buffer.
    pub offset: i64,
    /// Number of elements.
    pub numel: i64,
    /// The parameter (a view into the buffer).
    pub var: Tensor,
}

/// A network's parameters as views into one contiguous float32 buffer.
#[derive(Debug)]
pub struct FlatParams {
    buffer: Tensor,
    entries: Vec<Entry>,
    /// Trained parameters: `[0, trainable_end)`.
    trainable_end: i64,
    /// Weight-decayed range.
    decay: Range<i64>,
    /// The last layer's range (inside `decay`).
    last_layer: Range<i64>,
}

impl FlatParams {
    /// Moves every parameter of `model` into one buffer (values unchanged).
    pub fn new(model: &EndoFm) -> Result<Self> {
        let mut vars: Vec<(Role, String, Tensor)> = model
            .var_store()
            .variables()
            .into_iter()
            .map(|(name, t)| (role(&name, &t.size(), t.requires_grad()), name, t))
            .collect();
        vars.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let total: i64 = vars.iter().map(|(_, _, t)| t.numel() as i64).sum();
        let device = model.device();
        let buffer = Tensor::zeros([total], (Kind::Float, device));
        let mut entries = Vec::with_capacity(vars.len());
        let mut offset = 0;
        let (mut decay_start, mut last_start, mut last_end) = (None, None, None);
        for (r, name, mut var) in vars {
            if var.kind() != Kind::Float {
                return Err(Error::DType {
                    name,
                    found: format!("{:?}", var.kind()),
                    expected: "float32 parameters",
                });
            }
            if r >= Role::Decay && decay_start.is_none() {
                decay_start = Some(offset);
            }
            if r >= Role::LastLayer && last_start.is_none() {
                last_start = Some(offset);
            }
            if r == Role::Frozen && last_end.is_none() {
                last_end = Some(offset);
            }
            let numel = var.numel() as i64;
            let view = buffer.narrow(0, offset, numel).view(var.size().as_slice());
            tch::no_grad(|| {
                view.shallow_clone().copy_(&var);
            });
            var.set_data(&view);
            entries.push(Entry {
                name,
                offset,
                numel,
                var,
            });
            offset += numel;
        }
        let last_start = last_start.unwrap_or(offset);
        let trainable_end = last_end.unwrap_or(offset);
        Ok(Self {
            buffer,
            entries,
            trainable_end,
            decay: decay_start.unwrap_or(last_start)..trainable_end,
            last_layer: last_start..trainable_end,
        })
    }

    /// The whole buffer (every parameter, frozen ones last).
    pub fn buffer(&self) -> &Tensor {
        &self.buffer
    }

    /// The parameters, in buffer order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Number of trained elements (the gradient buffer's length).
    pub fn trainable_len(&self) -> i64 {
        self.trainable_end
    }

    /// Trained entries (those with gradients), in buffer order.
    pub fn trainable(&self) -> impl Iterator<Item = &Entry> {
        self.entries
            .iter()
            .filter(|e| e.offset < self.trainable_end)
    }

    /// The gradients of the trained parameters as one flat buffer (zeros where a parameter got
    /// none), then clears the parameters' own gradients. `into`, when given and of the right
    /// size, receives them (no allocation per step).
    pub fn take_grads_into(&self, into: Option<&Tensor>) -> Tensor {
        let parts: Vec<Tensor> = self
            .trainable()
            .map(|e| {
                let g = e.var.grad();
                if g.defined() {
                    g.detach().reshape([-1]).to_kind(Kind::Float)
                } else {
                    Tensor::zeros([e.numel], (Kind::Float, self.buffer.device()))
                }
            })
            .collect();
        let flat = match into {
            Some(buf) if buf.size() == [self.trainable_end] => Tensor::cat_out(buf, &parts, 0),
            _ => Tensor::cat(&parts, 0),
        };
        for e in self.trainable() {
            let mut v = e.var.shallow_clone();
            v.zero_grad();
        }
        flat
    }

    /// [`FlatParams::take_grads_into`] into a new buffer.
    pub fn take_grads(&self) -> Tensor {
        self.take_grads_into(None)
    }

    /// Per-tensor clipping (the reference's): every parameter's gradient whose L2 norm exceeds
    /// `max_norm` is scaled by `max_norm / (norm + 1e-6)`. Returns the norms before clipping.
    pub fn clip_per_tensor(&self, grads: &mut Tensor, max_norm: f64) -> Tensor {
        let norms = Tensor::stack(
            &self
                .trainable()
                .map(|e| grads.narrow(0, e.offset, e.numel).norm())
                .collect::<Vec<_>>(),
            0,
        );
        let coef = (max_norm / (&norms + 1e-6)).clamp_max(1.0);
        let counts = Tensor::from_slice(&self.trainable().map(|e| e.numel).collect::<Vec<_>>())
            .to_device(grads.device());
        let scale = coef.repeat_interleave_self_tensor(&counts, 0, Some(self.trainable_end));
        let _ = grads.g_mul_(&scale);
        norms
    }

    /// Copies another buffer of the same layout into this one (teacher ← student).
    pub fn copy_from(&mut self, other: &FlatParams) -> Result<()> {
        if self.buffer.size() != other.buffer.size() {
            return Err(Error::Input {
                name: "flat parameters".into(),
                reason: format!(
                    "layouts differ: {:?} vs {:?}",
                    self.buffer.size(),
                    other.buffer.size()
                ),
            });
        }
        tch::no_grad(|| self.buffer.copy_(&other.buffer));
        Ok(())
    }

    /// `self ← m·self + (1 − m)·other` over every parameter (the teacher's EMA).
    pub fn ema_from(&mut self, other: &FlatParams, momentum: f64) {
        tch::no_grad(|| {
            let _ = self.buffer.g_mul_scalar_(momentum);
            let _ = self
                .buffer
                .g_add_(&(other.buffer.detach() * (1.0 - momentum)));
        });
    }
}

/// AdamW hyper-parameters that do not follow a schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// AdamW over a [`FlatParams`] layout (PyTorch's algorithm: decoupled decay, bias correction
/// per parameter; the last layer counts its own steps since it skips the frozen epoch).
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Scratch for the denominator (no allocation per step).
    scratch: Tensor,
    /// Steps taken by everything but the last layer.
    pub steps: u64,
    /// Steps taken by the last layer.
    pub last_layer_steps: u64,
}

impl AdamW {
    /// Zero state for `params`.
    pub fn new(params: &FlatParams, cfg: AdamWConfig) -> Self {
        let opts = (Kind::Float, params.buffer.device());
        Self {
            cfg,
            exp_avg: Tensor::zeros([params.trainable_end], opts),
            exp_avg_sq: Tensor::zeros([params.trainable_end], opts),
            scratch: Tensor::zeros([params.trainable_end], opts),
            steps: 0,
            last_layer_steps: 0,
        }
    }

    /// First moments (flat, trainable layout).
    pub fn exp_avg(&self) -> &Tensor {
        &self.exp_avg
    }

    /// Second moments (flat, trainable layout).
    pub fn exp_avg_sq(&self) -> &Tensor {
        &self.exp_avg_sq
    }

    /// Restores moments and step counts (from a checkpoint).
    pub fn restore(
        &mut self,
        exp_avg: &Tensor,
        exp_avg_sq: &Tensor,
        steps: u64,
        last_layer_steps: u64,
    ) -> Result<()> {
        if exp_avg.size() != self.exp_avg.size() || exp_avg_sq.size() != self.exp_avg_sq.size() {
            return Err(Error::Input {
                name: "optimiser state".into(),
                reason: format!(
                    "has {:?} elements, the network has {:?}",
                    exp_avg.size(),
                    self.exp_avg.size()
                ),
            });
        }
        tch::no_grad(|| {
            self.exp_avg.copy_(exp_avg);
            self.exp_avg_sq.copy_(exp_avg_sq);
        });
        self.steps = steps;
        self.last_layer_steps = last_layer_steps;
        Ok(())
    }

    /// One update with learning rate `lr` and weight decay `wd` (applied to the decay group);
    /// with `freeze_last_layer` the last layer is left untouched (no gradient, no decay, no
    /// state change), as the reference does in its first epoch. `grads` serves as scratch: its
    /// contents are not preserved.
    pub fn step(
        &mut self,
        params: &FlatParams,
        grads: &Tensor,
        lr: f64,
        wd: f64,
        freeze_last_layer: bool,
    ) {
        let end = if freeze_last_layer {
            params.last_layer.start
        } else {
            params.trainable_end
        };
        if end == 0 {
            return;
        }
        let AdamWConfig { beta1, beta2, eps } = self.cfg;
        tch::no_grad(|| {
            let p = params.buffer.narrow(0, 0, end);
            let g = grads.narrow(0, 0, end);
            let mut m = self.exp_avg.narrow(0, 0, end);
            let mut v = self.exp_avg_sq.narrow(0, 0, end);
            let decay = params.decay.start.min(end)..end;
            if wd != 0.0 && decay.start < decay.end {
                let _ = params
                    .buffer
                    .narrow(0, decay.start, decay.end - decay.start)
                    .g_mul_scalar_(1.0 - lr * wd);
            }
            let _ = m.lerp_(&g, 1.0 - beta1);
            // v ← β2·v + (1 − β2)·g², with g scaled in place (the caller's buffer is spent).
            let mut g = g.shallow_clone();
            let _ = g.g_mul_scalar_((1.0 - beta2).sqrt());
            let _ = v.g_mul_scalar_(beta2);
            let _ = v.addcmul_(&g, &g);

            self.steps += 1;
            if !freeze_last_layer {
                self.last_layer_steps += 1;
            }
            let mut segments = vec![(0, params.last_layer.start.min(end), self.steps)];
            if end > params.last_layer.start {
                segments.push((params.last_layer.start, end, self.last_layer_steps));
            }
            for (start, stop, steps) in segments {
                if stop <= start {
                    continue;
                }
                let n = stop - start;
                let bc1 = 1.0 - beta1.powi(steps as i32);
                let bc2_sqrt = (1.0 - beta2.powi(steps as i32)).sqrt();
                let step_size = lr / bc1;
                // p ← p − step·m / (√v / √bc2 + ε), through one scratch buffer.
                let mut denom = self.scratch.narrow(0, start, n);
                let _ = v.narrow(0, start, n).sqrt_out(&denom);
                let _ = denom.g_mul_scalar_(1.0 / bc2_sqrt);
                let _ = denom.g_add_scalar_(eps);
                let _ = denom.g_mul_scalar_(-1.0 / step_size);
                let _ = p
                    .narrow(0, start, n)
                    .addcdiv_(&m.narrow(0, start, n), &denom);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endofm_shared::Preset;
    use tch::Device;

    fn tiny() -> EndoFm {
        let mut cfg = Preset::Tiny.config();
        cfg.depth = 1;
        cfg.head.out_dim = 32;
        EndoFm::new(&cfg, Device::Cpu).unwrap()
    }

    #[test]
    fn layout_groups_parameters_like_the_reference() {
        let _rng = crate::test_support::rng_lock();
        let model = tiny();
        let before: Vec<(String, Tensor)> = model
            .var_store()
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.copy()))
            .collect();
        let flat = FlatParams::new(&model).unwrap();
        // Values are unchanged and the variables now live in the buffer.
        for (k, v) in &before {
            assert!(model.var_store().variables()[k].equal(v), "{k} changed");
        }
        let names: Vec<&str> = flat.entries().iter().map(|e| e.name.as_str()).collect();
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
        assert!(
            pos("backbone.norm.weight") < pos("backbone.cls_token"),
            "norms are not decayed"
        );
        assert!(pos("backbone.blocks.0.attn.qkv.bias") < pos("backbone.blocks.0.attn.qkv.weight"));
        assert_eq!(names[names.len() - 2], "head.last_layer.weight_v");
        assert_eq!(names[names.len() - 1], "head.last_layer.weight_g");
        let g = &flat.entries()[flat.entries().len() - 1];
        assert_eq!(flat.trainable_len(), g.offset);
        // Writing through the buffer changes the model.
        tch::no_grad(|| {
            let _ = flat.buffer().narrow(0, 0, 1).fill_(42.0);
        });
        let first = &flat.entries()[0];
        assert_eq!(
            model.var_store().variables()[&first.name]
                .reshape([-1])
                .double_value(&[0]),
            42.0
        );
    }

    #[test]
    fn clipping_is_per_tensor() {
        let _rng = crate::test_support::rng_lock();
        let model = tiny();
        let flat = FlatParams::new(&model).unwrap();
        let mut grads = Tensor::ones([flat.trainable_len()], (Kind::Float, Device::Cpu));
        let norms = flat.clip_per_tensor(&mut grads, 3.0);
        for (i, e) in flat.trainable().enumerate() {
            let n = (e.numel as f64).sqrt();
            assert!((norms.double_value(&[i as i64]) - n).abs() < 1e-3 * n);
            let after = grads.narrow(0, e.offset, e.numel).norm().double_value(&[]);
            let want = if n > 3.0 { 3.0 * n / (n + 1e-6) } else { n };
            assert!(
                (after - want).abs() < 1e-4 * want.max(1.0),
                "{}: {after} vs {want}",
                e.name
            );
        }
    }

    /// PyTorch's single-tensor AdamW, written out for one scalar parameter.
    fn adamw_reference(p0: f64, grads: &[f64], lr: f64, wd: f64) -> f64 {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (i, g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            p *= 1.0 - lr * wd;
            m = m + (g - m) * (1.0 - b1);
            v = v * b2 + (1.0 - b2) * g * g;
            let denom = (v.sqrt() / (1.0 - b2.powi(t)).sqrt()) + eps;
            p -= lr / (1.0 - b1.powi(t)) * m / denom;
        }
        p
    }

    #[test]
    fn adamw_matches_pytorch_and_respects_groups_and_freezing() {
        let _rng = crate::test_support::rng_lock();
        let model = tiny();
        let flat = FlatParams::new(&model).unwrap();
        let before = flat.buffer().copy();
        let mut opt = AdamW::new(&flat, AdamWConfig::default());
        let grads_seq = [0.5, -0.25, 1.0];
        for (i, g) in grads_seq.iter().enumerate() {
            let grads = Tensor::full([flat.trainable_len()], *g, (Kind::Float, Device::Cpu));
            opt.step(&flat, &grads, 0.01, 0.1, i == 0);
        }
        let after = flat.buffer();
        for e in flat.entries() {
            let b = before.double_value(&[e.offset]);
            let a = after.double_value(&[e.offset]);
            let want = match e.name.as_str() {
                n if n.ends_with("weight_g") => b,
                n if n.contains("last_layer") => adamw_reference(b, &grads_seq[1..], 0.01, 0.1),
                n if n.ends_with(".bias") || e.var.dim() == 1 => {
                    adamw_reference(b, &grads_seq, 0.01, 0.0)
                }
                _ => adamw_reference(b, &grads_seq, 0.01, 0.1),
            };
            assert!(
                (a - want).abs() < 1e-6,
                "{}: {a} vs {want} (start {b})",
                e.name
            );
        }
        assert_eq!((opt.steps, opt.last_layer_steps), (3, 2));
    }

    #[test]
    fn ema_moves_the_teacher_towards_the_student() {
        let _rng = crate::test_support::rng_lock();
        let s = tiny();
        let t = tiny();
        let sf = FlatParams::new(&s).unwrap();
        let mut tf = FlatParams::new(&t).unwrap();
        let (sb, tb) = (sf.buffer().copy(), tf.buffer().copy());
        tf.ema_from(&sf, 0.9);
        let want = tb * 0.9 + sb * 0.1;
        assert!(tf.buffer().allclose(&want, 1e-6, 1e-7, false));
    }
}
