//! The Endo-FM network's configuration: a typed, validated description of the TimeSformer
//! backbone and the DINO projection head, the named presets (`vit_b`, `tiny`), parameter counts,
//! and the reader for the reference implementation's `config.json` format.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The DINO projection head: an MLP to a bottleneck, L2 normalisation, then a weight-normalised
/// linear layer without bias.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// Width of the last (weight-normalised) layer: the number of prototypes.
    pub out_dim: usize,
    /// Width of the hidden MLP layers.
    pub hidden_dim: usize,
    /// Width of the bottleneck before L2 normalisation.
    pub bottleneck_dim: usize,
    /// Number of linear layers in the MLP (the reference uses 3).
    #[serde(default = "default_head_layers")]
    pub layers: usize,
    /// Whether the last layer's gain (`weight_g`) is frozen at 1 (the reference default).
    #[serde(default = "default_true")]
    pub norm_last_layer: bool,
}

/// The whole network: backbone sizes and the projection head.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Token width D.
    pub embed_dim: usize,
    /// Number of divided space-time blocks.
    pub depth: usize,
    /// Attention heads per attention layer; must divide `embed_dim`.
    pub num_heads: usize,
    /// Side of the square patches (conv kernel and stride).
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    /// MLP hidden width = floor(embed_dim * mlp_ratio).
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Whether the qkv projections carry a bias.
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// Image side the spatial position table is sized for (other sizes are resized to).
    pub img_size: usize,
    /// Frame count the time table is sized for (other counts are resized to).
    pub num_frames: usize,
    /// Input channels.
    #[serde(default = "default_in_chans")]
    pub in_chans: usize,
    /// Stochastic-depth rate of the last block; rates grow linearly from 0 over the blocks.
    #[serde(default)]
    pub drop_path_rate: f64,
    /// The DINO projection head.
    pub head: HeadConfig,
}

fn default_head_layers() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn default_patch_size() -> usize {
    16
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_ln_eps() -> f64 {
    1e-6
}
fn default_in_chans() -> usize {
    3
}

/// Named configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// The published Endo-FM: ViT-B/16, 224 px, 8 frames, 65536 prototypes.
    VitB,
    /// The small network of the reference test vectors (`shared/reference/endofm-tiny`).
    Tiny,
}

impl Preset {
    /// Every preset, in the order they are listed to users.
    pub const ALL: [Preset; 2] = [Preset::VitB, Preset::Tiny];

    /// The preset's name as typed on a command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::VitB => "vit_b",
            Preset::Tiny => "tiny",
        }
    }

    /// The configuration this preset stands for.
    pub fn config(self) -> ModelConfig {
        match self {
            Preset::VitB => ModelConfig {
                embed_dim: 768,
                depth: 12,
                num_heads: 12,
                patch_size: 16,
                mlp_ratio: 4.0,
                qkv_bias: true,
                layer_norm_eps: 1e-6,
                img_size: 224,
                num_frames: 8,
                in_chans: 3,
                drop_path_rate: 0.1,
                head: HeadConfig {
                    out_dim: 65536,
                    hidden_dim: 2048,
                    bottleneck_dim: 256,
                    layers: 3,
                    norm_last_layer: true,
                },
            },
            Preset::Tiny => ModelConfig {
                embed_dim: 192,
                depth: 4,
                num_heads: 3,
                patch_size: 16,
                mlp_ratio: 4.0,
                qkv_bias: true,
                layer_norm_eps: 1e-6,
                img_size: 112,
                num_frames: 8,
                in_chans: 3,
                drop_path_rate: 0.1,
                head: HeadConfig {
                    out_dim: 4096,
                    hidden_dim: 512,
                    bottleneck_dim: 128,
                    layers: 3,
                    norm_last_layer: true,
                },
            },
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| Error::UnknownPreset {
                name: s.to_string(),
                known: Preset::ALL.map(Preset::name).join(", "),
            })
    }
}

/// Parameter counts of a configuration (every tensor of the state dict, frozen ones included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    /// Backbone only.
    pub backbone: u64,
    /// Projection head only.
    pub head: u64,
    /// Backbone + head: the student network.
    pub total: u64,
}

/// Keys of the reference `config.json` that describe the test set-up rather than the network.
const REFERENCE_NON_MODEL_KEYS: &[&str] = &[
    "local_px",
    "seed",
    "global_frames",
    "local_frames",
    "batch",
    "teacher_temp",
    "student_temp",
    "center",
    "loss_terms",
    "note",
];

impl ModelConfig {
    /// Spatial patch grid side for the configured image size.
    pub fn grid(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Hidden width of the transformer MLPs.
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Stochastic-depth rate of each block: `linspace(0, drop_path_rate, depth)`.
    pub fn drop_path_rates(&self) -> Vec<f64> {
        match self.depth {
            0 => vec![],
            1 => vec![0.0],
            n => (0..n)
                .map(|i| self.drop_path_rate * i as f64 / (n - 1) as f64)
                .collect(),
        }
    }

    /// Checks every field and every relation between fields; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("embed_dim", self.embed_dim),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
            ("patch_size", self.patch_size),
            ("img_size", self.img_size),
            ("num_frames", self.num_frames),
            ("in_chans", self.in_chans),
            ("head.out_dim", self.head.out_dim),
            ("head.hidden_dim", self.head.hidden_dim),
            ("head.bottleneck_dim", self.head.bottleneck_dim),
            ("head.layers", self.head.layers),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(Error::invalid(field, "must be at least 1"));
            }
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return Err(Error::invalid(
                "num_heads",
                format!(
                    "{} heads do not divide embed_dim {}",
                    self.num_heads, self.embed_dim
                ),
            ));
        }
        if self.img_size < self.patch_size {
            return Err(Error::invalid(
                "img_size",
                format!(
                    "{} is smaller than patch_size {}",
                    self.img_size, self.patch_size
                ),
            ));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.mlp_hidden() == 0 {
            return Err(Error::invalid(
                "mlp_ratio",
                format!("{} gives an empty MLP", self.mlp_ratio),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::invalid(
                "layer_norm_eps",
                format!("{} must be a positive number", self.layer_norm_eps),
            ));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return Err(Error::invalid(
                "drop_path_rate",
                format!("{} is outside [0, 1)", self.drop_path_rate),
            ));
        }
        Ok(())
    }

    /// Parameter counts, computed from the sizes (the worker checks them against the real
    /// network in its tests).
    pub fn param_counts(&self) -> ParamCounts {
        let d = self.embed_dim as u64;
        let p = self.patch_size as u64;
        let g = self.grid() as u64;
        let hm = self.mlp_hidden() as u64;
        let qkv_bias = if self.qkv_bias { 3 * d } else { 0 };
        let attention = 3 * d * d + qkv_bias + d * d + d;
        let block = 2 * d // norm1
            + attention
            + 2 * d // temporal_norm1
            + attention
            + d * d + d // temporal_fc
            + 2 * d // norm2
            + d * hm + hm + hm * d + d;
        let backbone = d // cls_token
            + (1 + g * g) * d // pos_embed
            + self.num_frames as u64 * d // time_embed
            + d * self.in_chans as u64 * p * p + d // patch_embed
            + self.depth as u64 * block
            + 2 * d; // final norm
        let widths = self.head_mlp_widths();
        let mlp: u64 = widths.windows(2).map(|w| (w[0] * w[1] + w[1]) as u64).sum();
        let out = self.head.out_dim as u64;
        let head = mlp + out * self.head.bottleneck_dim as u64 + out;
        ParamCounts {
            backbone,
            head,
            total: backbone + head,
        }
    }

    /// Widths along the head MLP: `[embed_dim, hidden.., bottleneck]` (`layers + 1` entries).
    pub fn head_mlp_widths(&self) -> Vec<usize> {
        let mut widths = vec![self.embed_dim];
        widths.extend(std::iter::repeat_n(
            self.head.hidden_dim,
            self.head.layers.saturating_sub(1),
        ));
        widths.push(self.head.bottleneck_dim);
        widths
    }

    /// Reads a configuration document: either this crate's own format (a serialised
    /// [`ModelConfig`], unknown fields refused) or the reference test vectors' `config.json`
    /// (flat keys, `global_px` for the image size, head sizes at the top level). Keys of the
    /// reference format that describe the test set-up are ignored; any other unknown key is an
    /// error naming it. A document with a `model` object (a run configuration, or the resolved
    /// `config.json` a pre-training run writes next to its checkpoints) stands for that object.
    /// The result is validated.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        let parse = |source| Error::Parse {
            origin: origin.to_string(),
            source,
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(parse)?;
        let serde_json::Value::Object(mut map) = value else {
            return Err(Error::invalid("(document)", "expected a JSON object"));
        };
        if let Some(serde_json::Value::Object(model)) = map.remove("model") {
            map = model;
        }
        let config: ModelConfig = if map.contains_key("head") {
            serde_json::from_value(serde_json::Value::Object(map)).map_err(parse)?
        } else {
            for key in REFERENCE_NON_MODEL_KEYS {
                map.remove(*key);
            }
            if let Some(px) = map.remove("global_px") {
                map.insert("img_size".into(), px);
            }
            let mut head = serde_json::Map::new();
            for (from, to) in [
                ("out_dim", "out_dim"),
                ("hidden_dim", "hidden_dim"),
                ("bottleneck_dim", "bottleneck_dim"),
                ("head_layers", "layers"),
                ("norm_last_layer", "norm_last_layer"),
            ] {
                if let Some(v) = map.remove(from) {
                    head.insert(to.into(), v);
                }
            }
            map.insert("head".into(), serde_json::Value::Object(head));
            serde_json::from_value(serde_json::Value::Object(map)).map_err(parse)?
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b_counts_match_the_published_model() {
        let counts = Preset::VitB.config().param_counts();
        assert_eq!(counts.backbone, 121_258_752);
        assert_eq!(counts.total, 144_397_312);
    }

    #[test]
    fn presets_validate_and_parse() {
        for p in Preset::ALL {
            p.config().validate().unwrap();
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        }
        let err = "vit_huge".parse::<Preset>().unwrap_err().to_string();
        assert!(err.contains("vit_huge") && err.contains("vit_b"), "{err}");
    }

    #[test]
    fn drop_path_is_linear_over_blocks() {
        let rates = Preset::VitB.config().drop_path_rates();
        assert_eq!(rates.len(), 12);
        assert_eq!(rates[0], 0.0);
        assert!((rates[11] - 0.1).abs() < 1e-12);
        assert!((rates[1] - 0.1 / 11.0).abs() < 1e-12);
    }

    #[test]
    fn reads_the_reference_config_format() {
        let text = r#"{"embed_dim": 192, "depth": 4, "num_heads": 3, "global_px": 112,
            "local_px": 48, "num_frames": 8, "out_dim": 4096, "hidden_dim": 512,
            "bottleneck_dim": 128, "seed": 0, "global_frames": [8, 16], "batch": 2,
            "patch_size": 16, "mlp_ratio": 4, "qkv_bias": true, "layer_norm_eps": 1e-06,
            "drop_path_rate": 0.0, "note": "x"}"#;
        let c = ModelConfig::from_json_str(text, "test").unwrap();
        let mut tiny = Preset::Tiny.config();
        tiny.drop_path_rate = 0.0;
        assert_eq!(c, tiny);
    }

    #[test]
    fn own_format_round_trips_and_refuses_unknown_fields() {
        let c = Preset::VitB.config();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(ModelConfig::from_json_str(&text, "t").unwrap(), c);
        let bad = text.replacen("\"depth\"", "\"detph\"", 1);
        let err = ModelConfig::from_json_str(&bad, "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("detph"), "{err}");
    }

    #[test]
    fn inconsistent_values_name_the_field() {
        let mut c = Preset::Tiny.config();
        c.num_heads = 5;
        assert!(c.validate().unwrap_err().to_string().contains("num_heads"));
        let mut c = Preset::Tiny.config();
        c.head.out_dim = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("head.out_dim")
        );
        let mut c = Preset::Tiny.config();
        c.drop_path_rate = 1.5;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("drop_path_rate")
        );
        let run = format!(
            "{{\"data\": \"x\", \"model\": {}}}",
            serde_json::to_string(&Preset::Tiny.config()).unwrap()
        );
        assert_eq!(
            ModelConfig::from_json_str(&run, "t").unwrap(),
            Preset::Tiny.config()
        );
        let err = ModelConfig::from_json_str("{\"embed_dim\": 10, \"bogus\": 1}", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus") || err.contains("missing"), "{err}");
    }
}
