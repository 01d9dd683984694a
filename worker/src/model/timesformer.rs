//! The TimeSformer backbone with divided space-time attention, as the Endo-FM reference builds it:
//! per-frame patch embedding, a CLS token, spatial and temporal position tables (resized by
//! nearest-neighbour interpolation for other image sizes and frame counts), and blocks that run
//! temporal attention, then spatial attention, then the MLP. Parameter paths equal the reference's
//! state-dict keys under the prefix the caller gives (`backbone`).

use rand::Rng;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use endofm_shared::ModelConfig;

use crate::{Error, Result};

/// Standard deviation of the truncated-normal initialisation of linear weights and tables. The
/// reference truncates at ±2 in absolute terms, 100 standard deviations away, so a plain normal
/// draws the same distribution.
const INIT_STD: f64 = 0.02;

fn linear(p: nn::Path, inp: i64, out: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        inp,
        out,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: INIT_STD,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias,
        },
    )
}

/// A LayerNorm over the last dimension with the reference's `eps`.
pub fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// Stochastic depth: zeroes whole samples (first dimension) with probability `rate` and scales
/// the survivors by `1 / (1 - rate)`, drawing from libtorch's generator like the reference.
pub fn drop_path(x: &Tensor, rate: f64, train: bool) -> Tensor {
    if !train || rate == 0.0 {
        return x.shallow_clone();
    }
    let keep = 1.0 - rate;
    let mut shape = vec![1i64; x.dim()];
    shape[0] = x.size()[0];
    let own = DROP_RNG.with(|cell| {
        cell.borrow_mut().as_mut().map(|rng| {
            let draws: Vec<f32> = (0..shape[0])
                .map(|_| (keep + rng.random::<f64>()).floor() as f32)
                .collect();
            Tensor::from_slice(&draws)
                .reshape(shape.as_slice())
                .to_kind(x.kind())
                .to_device(x.device())
        })
    });
    let mask = own
        .unwrap_or_else(|| (Tensor::rand(shape.as_slice(), (x.kind(), x.device())) + keep).floor());
    x / keep * mask
}

/// Element-wise dropout (`nn.Dropout`): zeroes each element with probability `rate` and scales
/// the rest by `1 / (1 - rate)`; draws from the generator of [`with_drop_path_seed`] when one
/// is set on this thread, else from libtorch's.
pub fn dropout(x: &Tensor, rate: f64, train: bool) -> Tensor {
    if !train || rate == 0.0 {
        return x.shallow_clone();
    }
    let keep = 1.0 - rate;
    let numel = x.numel();
    let own = DROP_RNG.with(|cell| {
        cell.borrow_mut().as_mut().map(|rng| {
            let draws: Vec<f32> = (0..numel)
                .map(|_| f32::from(u8::from(rng.random::<f64>() < keep)))
                .collect();
            Tensor::from_slice(&draws)
                .reshape(x.size())
                .to_kind(x.kind())
                .to_device(x.device())
        })
    });
    let mask = own.unwrap_or_else(|| {
        let mut m = x.empty_like().detach();
        let _ = m.bernoulli_float_(keep);
        m
    });
    x * mask / keep
}

thread_local! {
    /// The drop-path generator of this thread while [`with_drop_path_seed`] runs.
    static DROP_RNG: std::cell::RefCell<Option<rand_chacha::ChaCha8Rng>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with drop-path masks drawn from a generator of this thread seeded by `seed`
/// (instead of libtorch's process-wide one), so that forward passes on several threads at once
/// stay reproducible.
pub fn with_drop_path_seed<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    use rand::SeedableRng;
    DROP_RNG.with(|cell| *cell.borrow_mut() = Some(rand_chacha::ChaCha8Rng::seed_from_u64(seed)));
    let out = f();
    DROP_RNG.with(|cell| *cell.borrow_mut() = None);
    out
}

/// The spatial position table `(1, 1 + s², D)` (a square grid after the CLS entry) for a
/// `gh × gw` patch grid: the reference's nearest-neighbour resize of the grid, CLS entry
/// untouched; the table itself when it already fits.
pub fn resize_pos_table(table: &Tensor, gh: i64, gw: i64) -> Tensor {
    let (n, d) = (table.size()[1], table.size()[2]);
    if 1 + gh * gw == n {
        return table.shallow_clone();
    }
    let side = ((n - 1) as f64).sqrt() as i64;
    let grid = table
        .narrow(1, 1, n - 1)
        .transpose(1, 2)
        .reshape([1, d, side, side])
        .upsample_nearest2d([gh, gw], None, None)
        .flatten(2, 3)
        .transpose(1, 2);
    Tensor::cat(&[table.narrow(1, 0, 1), grid], 1)
}

/// The time table `(1, T₀, D)` for `t` frames: nearest-neighbour resize (8 → 2 keeps frames 0
/// and 4); the table itself when it already fits.
pub fn resize_time_table(table: &Tensor, t: i64) -> Tensor {
    if t == table.size()[1] {
        return table.shallow_clone();
    }
    table
        .transpose(1, 2)
        .upsample_nearest1d([t], None)
        .transpose(1, 2)
}

/// Multi-head self-attention with one fused qkv projection (fused scaled-dot-product kernel).
#[derive(Debug)]
pub struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    num_heads: i64,
}

impl Attention {
    fn new(p: nn::Path, dim: i64, num_heads: i64, qkv_bias: bool) -> Self {
        Self {
            qkv: linear(&p / "qkv", dim, 3 * dim, qkv_bias),
            proj: linear(&p / "proj", dim, dim, true),
            num_heads,
        }
    }

    /// The fused qkv projection of `x` (B, N, C), split per head: three (B, heads, N, C/heads).
    fn heads(&self, x: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, n, c) = x.size3().expect("attention input is (B, N, C)");
        let h = self.num_heads;
        let qkv = x
            .apply(&self.qkv)
            .reshape([b, n, 3, h, c / h])
            .permute([2, 0, 3, 1, 4]);
        (qkv.get(0), qkv.get(1), qkv.get(2))
    }

    /// softmax(q·kᵀ · head_dim^-0.5) · v, written out (the reference's arithmetic).
    fn explicit(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let scale = (q.size()[3] as f64).powf(-0.5);
        (q.matmul(&k.transpose(-2, -1)) * scale)
            .softmax(-1, None::<Kind>)
            .matmul(v)
    }

    /// `x`: (batch, tokens, dim) → (batch, tokens, dim).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, c) = x.size3().expect("attention input is (B, N, C)");
        let (q, k, v) = self.heads(x);
        // On CUDA the fused kernel is faster and avoids materialising the attention maps; on
        // the CPU the explicit form is faster for training (the fused CPU backward recomputes
        // the maps). Same math: scale head_dim^-0.5, softmax over keys.
        let out = if q.device().is_cuda() {
            Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                None::<Tensor>,
                0.0,
                false,
                None,
                false,
            )
        } else {
            Self::explicit(&q, &k, &v)
        };
        out.transpose(1, 2).reshape([b, n, c]).apply(&self.proj)
    }

    /// The output for the first token only: `x` (batch, tokens, dim) → (batch, dim). The same
    /// qkv projection of every token (keys and values are all needed), then one query row per
    /// sequence instead of all of them.
    pub fn forward_first_query(&self, x: &Tensor) -> Tensor {
        let (b, _, c) = x.size3().expect("attention input is (B, N, C)");
        let (q, k, v) = self.heads(x);
        Self::explicit(&q.narrow(2, 0, 1), &k, &v) // (B, H, 1, C/H)
            .reshape([b, c])
            .apply(&self.proj)
    }
}

/// The transformer MLP: fc1, exact GELU, fc2.
#[derive(Debug)]
pub struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Mlp {
    fn new(p: nn::Path, dim: i64, hidden: i64) -> Self {
        Self {
            fc1: linear(&p / "fc1", dim, hidden, true),
            fc2: linear(&p / "fc2", hidden, dim, true),
        }
    }

    /// Applies the MLP to the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.fc1).gelu("none").apply(&self.fc2)
    }
}

/// One divided space-time block.
#[derive(Debug)]
pub struct Block {
    norm1: nn::LayerNorm,
    attn: Attention,
    temporal_norm1: nn::LayerNorm,
    temporal_attn: Attention,
    temporal_fc: nn::Linear,
    norm2: nn::LayerNorm,
    mlp: Mlp,
    drop_path: f64,
}

impl Block {
    /// A block's parameters under `p` (`…/blocks/<i>` in the reference), with stochastic depth
    /// `drop_path`.
    pub fn new(p: nn::Path, cfg: &ModelConfig, drop_path: f64) -> Self {
        let d = cfg.embed_dim as i64;
        let heads = cfg.num_heads as i64;
        let eps = cfg.layer_norm_eps;
        let temporal_fc = nn::linear(
            &p / "temporal_fc",
            d,
            d,
            nn::LinearConfig {
                ws_init: nn::Init::Const(0.0),
                bs_init: Some(nn::Init::Const(0.0)),
                bias: true,
            },
        );
        Self {
            norm1: layer_norm(&p / "norm1", d, eps),
            attn: Attention::new(&p / "attn", d, heads, cfg.qkv_bias),
            temporal_norm1: layer_norm(&p / "temporal_norm1", d, eps),
            temporal_attn: Attention::new(&p / "temporal_attn", d, heads, cfg.qkv_bias),
            temporal_fc,
            norm2: layer_norm(&p / "norm2", d, eps),
            mlp: Mlp::new(&p / "mlp", d, cfg.mlp_hidden() as i64),
            drop_path,
        }
    }

    /// What both outputs of a block share. `x`: (B, 1 + H·W·T, D) with patch tokens ordered
    /// (h, w, t). Temporal attention (each (b, h, w) location over its `t` frames), then the
    /// spatial attention's input (each (b, t) frame's H·W tokens plus the CLS token). Returns
    /// the CLS token (B, 1, D), the patch tokens after the temporal residual (B, H·W·T, D) and
    /// the normalised spatial input (B·T, 1 + H·W, D).
    fn temporal_then_spatial_input(&self, x: &Tensor, t: i64, train: bool) -> [Tensor; 3] {
        let (b, n, d) = x.size3().expect("block input is (B, N, D)");
        let hw = (n - 1) / t;
        let cls = x.narrow(1, 0, 1);
        let patches = x.narrow(1, 1, n - 1);

        let xt = patches.reshape([b * hw, t, d]);
        let res = drop_path(
            &self.temporal_attn.forward(&xt.apply(&self.temporal_norm1)),
            self.drop_path,
            train,
        );
        let res = res.reshape([b, hw * t, d]).apply(&self.temporal_fc);
        let xt = patches + res; // (B, HW·T, D)

        let cls_rep = cls.expand([b, t, d], false).reshape([b * t, 1, d]);
        let xs = xt
            .reshape([b, hw, t, d])
            .transpose(1, 2)
            .reshape([b * t, hw, d]);
        let xs = Tensor::cat(&[cls_rep, xs], 1).apply(&self.norm1);
        [cls, xt, xs]
    }

    /// `x + drop_path(mlp(norm2(x)))`.
    fn mlp_residual(&self, x: Tensor, train: bool) -> Tensor {
        let res = drop_path(
            &self.mlp.forward(&x.apply(&self.norm2)),
            self.drop_path,
            train,
        );
        x + res
    }

    /// `x`: (B, 1 + H·W·T, D) with patch tokens ordered (h, w, t); `t` frames, `w` grid columns.
    pub fn forward_t(&self, x: &Tensor, t: i64, w: i64, train: bool) -> Tensor {
        let (b, n, d) = x.size3().expect("block input is (B, N, D)");
        let hw = (n - 1) / t;
        debug_assert_eq!(hw % w, 0);
        let [cls, xt, xs] = self.temporal_then_spatial_input(x, t, train);
        let res = drop_path(&self.attn.forward(&xs), self.drop_path, train); // (B·T, 1 + HW, D)
        let cls_res = res
            .select(1, 0)
            .reshape([b, t, d])
            .mean_dim(1, true, None::<Kind>);
        let res_patches = res
            .narrow(1, 1, hw)
            .reshape([b, t, hw, d])
            .transpose(1, 2)
            .reshape([b, hw * t, d]);
        self.mlp_residual(Tensor::cat(&[cls + cls_res, xt + res_patches], 1), train)
    }

    /// The CLS token's output only, (B, D), for the last block when nothing else is read: the
    /// temporal attention and the spatial keys/values still cover every token, but the spatial
    /// queries, projection and MLP run on the CLS rows alone. Same arithmetic per row as
    /// [`Block::forward_t`] and the same drop-path draws in the same order.
    pub fn forward_cls(&self, x: &Tensor, t: i64, train: bool) -> Tensor {
        let (b, _, d) = x.size3().expect("block input is (B, N, D)");
        let [cls, _, xs] = self.temporal_then_spatial_input(x, t, train);
        let res = drop_path(&self.attn.forward_first_query(&xs), self.drop_path, train); // (B·T, D)
        let x = cls.squeeze_dim(1) + res.reshape([b, t, d]).mean_dim(1, false, None::<Kind>);
        self.mlp_residual(x, train)
    }
}

/// The backbone: patch embedding, tables, blocks, final norm.
#[derive(Debug)]
pub struct TimeSformer {
    patch_embed: nn::Conv2D,
    cls_token: Tensor,
    pos_embed: Tensor,
    time_embed: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    cfg: ModelConfig,
}

impl TimeSformer {
    /// Creates the backbone's parameters under `p` (the reference prefix is `backbone`).
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Self {
        let d = cfg.embed_dim as i64;
        let ps = cfg.patch_size as i64;
        let grid = cfg.grid() as i64;
        let patch_embed = nn::conv2d(
            &p / "patch_embed" / "proj",
            cfg.in_chans as i64,
            d,
            ps,
            nn::ConvConfig {
                stride: ps,
                ..Default::default()
            },
        );
        let table = nn::Init::Randn {
            mean: 0.0,
            stdev: INIT_STD,
        };
        let cls_token = p.var("cls_token", &[1, 1, d], table);
        let pos_embed = p.var("pos_embed", &[1, 1 + grid * grid, d], table);
        let time_embed = p.var(
            "time_embed",
            &[1, cfg.num_frames as i64, d],
            nn::Init::Const(0.0),
        );
        let blocks = cfg
            .drop_path_rates()
            .into_iter()
            .enumerate()
            .map(|(i, rate)| Block::new(&p / "blocks" / i, cfg, rate))
            .collect();
        let norm = layer_norm(&p / "norm", d, cfg.layer_norm_eps);
        Self {
            patch_embed,
            cls_token,
            pos_embed,
            time_embed,
            blocks,
            norm,
            cfg: cfg.clone(),
        }
    }

    /// The configuration the backbone was built with.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Checks that `x` is a float (B, C, T, H, W) video batch this backbone can take.
    pub fn check_input(&self, name: &str, x: &Tensor) -> Result<()> {
        let err = |reason: String| Error::Input {
            name: name.to_string(),
            reason,
        };
        let size = x.size();
        if size.len() != 5 {
            return Err(err(format!(
                "expected a (batch, channels, frames, height, width) tensor, got shape {size:?}"
            )));
        }
        if !matches!(
            x.kind(),
            Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
        ) {
            return Err(Error::DType {
                name: name.to_string(),
                found: format!("{:?}", x.kind()),
                expected: "a floating-point type (float32)",
            });
        }
        let ps = self.cfg.patch_size as i64;
        if size[1] != self.cfg.in_chans as i64 {
            return Err(err(format!(
                "has {} channels, the model takes {} (shape {size:?})",
                size[1], self.cfg.in_chans
            )));
        }
        if size[0] == 0 || size[2] == 0 {
            return Err(err(format!("is empty (shape {size:?})")));
        }
        if size[3] < ps || size[4] < ps {
            return Err(err(format!(
                "frames of {}x{} are smaller than one {ps}x{ps} patch",
                size[3], size[4]
            )));
        }
        Ok(())
    }

    /// Patch embedding plus position and time tables: (B, C, T, H, W) → (B, 1 + h·w·T, D),
    /// returning also T and the grid width w.
    fn embed(&self, x: &Tensor) -> (Tensor, i64, i64) {
        let (b, c, t, h, w) = x.size5().expect("checked by check_input");
        let d = self.cfg.embed_dim as i64;
        let frames = x.permute([0, 2, 1, 3, 4]).reshape([b * t, c, h, w]);
        let tokens = frames.apply(&self.patch_embed); // (B·T, D, gh, gw)
        let (gh, gw) = (tokens.size()[2], tokens.size()[3]);
        let tokens = tokens.flatten(2, 3).transpose(1, 2); // (B·T, gh·gw, D)

        let pos = resize_pos_table(&self.pos_embed, gh, gw);
        let cls_pos = (&self.cls_token + pos.narrow(1, 0, 1)).expand([b, 1, d], false);
        let patches = tokens + pos.narrow(1, 1, gh * gw); // (B·T, hw, D)

        let time = resize_time_table(&self.time_embed, t);
        let patches = patches.reshape([b, t, gh * gw, d]).transpose(1, 2) + time.unsqueeze(0); // (B, hw, T, D)
        let patches = patches.reshape([b, gh * gw * t, d]);
        (Tensor::cat(&[cls_pos, patches], 1), t, gw)
    }

    /// All tokens after the final norm: (B, 1 + h·w·T, D), patch tokens ordered (h, w, t).
    pub fn forward_tokens(&self, x: &Tensor, train: bool) -> Tensor {
        let (mut tokens, t, w) = self.embed(x);
        for block in &self.blocks {
            tokens = block.forward_t(&tokens, t, w, train);
        }
        tokens.apply(&self.norm)
    }

    /// The CLS feature: (B, C, T, H, W) → (B, D), equal to `forward_tokens(x).select(1, 0)`
    /// (the reference's computation) without the last block's work that only patch tokens
    /// would read.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        let (mut tokens, t, w) = self.embed(x);
        let Some((last, rest)) = self.blocks.split_last() else {
            return tokens.apply(&self.norm).select(1, 0);
        };
        for block in rest {
            tokens = block.forward_t(&tokens, t, w, train);
        }
        last.forward_cls(&tokens, t, train).apply(&self.norm)
    }
}

impl nn::ModuleT for TimeSformer {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        TimeSformer::forward_t(self, xs, train)
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Tensor {
        Mlp::forward(self, xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// A two-block backbone with every parameter drawn at random (the published
    /// initialisation zeroes `temporal_fc`, which would hide the temporal path).
    fn randomised(drop_path_rate: f64) -> (nn::VarStore, TimeSformer) {
        let mut cfg = crate::test_support::small_model(2);
        cfg.drop_path_rate = drop_path_rate;
        let vs = nn::VarStore::new(Device::Cpu);
        let net = TimeSformer::new(vs.root() / "backbone", &cfg);
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                let noise = Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.3;
                v.copy_(&noise);
            }
        });
        (vs, net)
    }

    fn worst_relative(a: &Tensor, b: &Tensor) -> f64 {
        let scale = b.abs().max().double_value(&[]).max(1e-12);
        (a - b).abs().max().double_value(&[]) / scale
    }

    #[test]
    fn cls_only_last_block_equals_the_full_forward() {
        let _rng = crate::test_support::rng_lock();
        tch::manual_seed(11);
        let (vs, net) = randomised(0.5);
        for (t, px) in [(4, 32), (2, 16), (8, 48)] {
            let x = Tensor::randn([3, 3, t, px, px], (Kind::Float, Device::Cpu));
            // Eval mode.
            let fast = net.forward_t(&x, false);
            let full = net.forward_tokens(&x, false).select(1, 0);
            let err = worst_relative(&fast, &full);
            assert!(
                err < 1e-5,
                "eval, {t} frames of {px} px: worst relative error {err:e}"
            );

            // Train mode: the same drop-path draws, and the same gradients.
            let run = |cls_only: bool| {
                let out = with_drop_path_seed(5, || {
                    if cls_only {
                        net.forward_t(&x, true)
                    } else {
                        net.forward_tokens(&x, true).select(1, 0)
                    }
                });
                let weights =
                    Tensor::linspace(-1.0, 1.0, out.numel() as i64, (Kind::Float, Device::Cpu))
                        .reshape(out.size());
                let vars = vs.variables();
                let mut names: Vec<&String> = vars.keys().collect();
                names.sort();
                let inputs: Vec<Tensor> = names.iter().map(|n| vars[*n].shallow_clone()).collect();
                let grads = Tensor::run_backward(
                    &[(&out * &weights).sum(Kind::Float)],
                    &inputs,
                    false,
                    false,
                );
                (out.detach(), grads)
            };
            let (fast, fast_grads) = run(true);
            let (full, full_grads) = run(false);
            let err = worst_relative(&fast, &full);
            assert!(
                err < 1e-5,
                "train, {t} frames: worst relative error {err:e}"
            );
            for (i, (g, h)) in fast_grads.iter().zip(&full_grads).enumerate() {
                let err = worst_relative(g, h);
                assert!(
                    err < 1e-4,
                    "train, {t} frames: gradient {i} worst relative error {err:e}"
                );
            }
        }
    }
}
