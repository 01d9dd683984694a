//! Sizes of the segmentation network around the Endo-FM blocks: the TransUNet R50 hybrid's
//! ResNetV2 stem, its cascaded upsampling decoder and head, as the published
//! `TransUNet/networks/vit_seg_configs.py` (`get_r50_b16_config`) and `train.py` (`n_skip 3`,
//! 2 classes) set them. The Endo-FM blocks' own sizes are a [`crate::ModelConfig`].

use serde::{Deserialize, Serialize};

use crate::error::check;
use crate::{Error, Result};

/// The stem, decoder and head of the TransUNet hybrid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmenterConfig {
    /// Pre-activation bottleneck units in each of the stem's three blocks (published `[3, 4, 9]`).
    pub resnet_units: Vec<usize>,
    /// Stem width: channels of the root convolution, `64 · width_factor` (published 64). The
    /// stem's GroupNorm(32, ·) layers need a multiple of 32.
    pub resnet_width: usize,
    /// Channels after `conv_more`, the decoder's first 3×3 convolution (published 512).
    pub head_channels: usize,
    /// Output channels of the four decoder blocks (published `[256, 128, 64, 16]`).
    pub decoder_channels: Vec<usize>,
    /// Skip connections used, from the deepest (published 3: the stem's block-2, block-1 and root
    /// outputs, with `8·width`, `4·width` and `width` channels).
    pub n_skip: usize,
    /// Classes of the head (2: background, polyp).
    pub n_classes: usize,
    /// Dropout on the token embeddings while training (published `transformer.dropout_rate`
    /// 0.1).
    pub dropout_rate: f64,
}

impl Default for SegmenterConfig {
    fn default() -> Self {
        Self::published()
    }
}

impl SegmenterConfig {
    /// The published R50-ViT-B/16 hybrid.
    pub fn published() -> Self {
        Self {
            resnet_units: vec![3, 4, 9],
            resnet_width: 64,
            head_channels: 512,
            decoder_channels: vec![256, 128, 64, 16],
            n_skip: 3,
            n_classes: 2,
            dropout_rate: 0.1,
        }
    }

    /// The small network of `shared/reference/endofm-tiny-segment` (for tests and CPU runs).
    pub fn tiny() -> Self {
        Self {
            resnet_units: vec![2, 1, 1],
            resnet_width: 32,
            head_channels: 512,
            decoder_channels: vec![16, 16, 16, 8],
            n_skip: 3,
            n_classes: 2,
            dropout_rate: 0.1,
        }
    }

    /// The preset of this name (`vit_b` → published, `tiny` → tiny).
    pub fn for_preset(name: &str) -> Option<Self> {
        match name {
            "vit_b" => Some(Self::published()),
            "tiny" => Some(Self::tiny()),
            _ => None,
        }
    }

    /// Channels of the stem's output (`16 · width`), the input of the patch embedding.
    pub fn stem_channels(&self) -> usize {
        self.resnet_width * 16
    }

    /// Channels of each decoder block's skip input, deepest first: `[8·w, 4·w, w, 0]` with the
    /// entries from `n_skip` on set to 0 (the published `DecoderCup`).
    pub fn skip_channels(&self) -> [usize; 4] {
        let w = self.resnet_width;
        let mut skips = [8 * w, 4 * w, w, 0];
        for s in skips.iter_mut().skip(self.n_skip) {
            *s = 0;
        }
        skips
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        check(self.resnet_units.len() == 3, "resnet_units", || {
            format!("{:?}: the stem has exactly three blocks", self.resnet_units)
        })?;
        check(
            self.resnet_units.iter().all(|&u| u >= 1),
            "resnet_units",
            || {
                format!(
                    "{:?}: every block needs at least one unit",
                    self.resnet_units
                )
            },
        )?;
        check(
            self.resnet_width >= 32 && self.resnet_width.is_multiple_of(32),
            "resnet_width",
            || {
                format!(
                    "{}: GroupNorm(32, ·) needs a positive multiple of 32",
                    self.resnet_width
                )
            },
        )?;
        check(self.head_channels >= 1, "head_channels", || {
            "must be at least 1".into()
        })?;
        check(self.decoder_channels.len() == 4, "decoder_channels", || {
            format!(
                "{:?}: the decoder has exactly four blocks",
                self.decoder_channels
            )
        })?;
        check(
            self.decoder_channels.iter().all(|&c| c >= 1),
            "decoder_channels",
            || {
                format!(
                    "{:?}: every entry must be at least 1",
                    self.decoder_channels
                )
            },
        )?;
        check(self.n_skip <= 3, "n_skip", || {
            format!("{}: the stem offers 3 skip features", self.n_skip)
        })?;
        check(self.n_classes >= 2, "n_classes", || {
            format!("{}: at least background and one class", self.n_classes)
        })?;
        check(
            (0.0..1.0).contains(&self.dropout_rate),
            "dropout_rate",
            || format!("{} is outside [0, 1)", self.dropout_rate),
        )?;
        Ok(())
    }

    /// The network of a run: the fields of `given` (a JSON object) over the preset's network
    /// (`tiny` → [`SegmenterConfig::tiny`], anything else or none → the published one),
    /// validated.
    ///
    /// # Errors
    /// `given` not an object, an unknown field or a bad value; the error names the field.
    pub fn resolve(preset: Option<&str>, given: Option<&serde_json::Value>) -> Result<Self> {
        let base = preset
            .and_then(Self::for_preset)
            .unwrap_or_else(Self::published);
        let cfg: Self = crate::overlay::overlay(&base, given, "segmenter")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a JSON object of these fields (missing ones take the published values) and
    /// validates it; `origin` names the source in errors.
    pub fn from_json_value(value: &serde_json::Value, origin: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_value(value.clone())
            .map_err(|e| Error::invalid("segmenter", format!("{origin}: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_skips_follow_the_stem() {
        SegmenterConfig::published().validate().unwrap();
        SegmenterConfig::tiny().validate().unwrap();
        assert_eq!(
            SegmenterConfig::published().skip_channels(),
            [512, 256, 64, 0]
        );
        assert_eq!(SegmenterConfig::tiny().skip_channels(), [256, 128, 32, 0]);
        let none = SegmenterConfig {
            n_skip: 0,
            ..SegmenterConfig::tiny()
        };
        assert_eq!(none.skip_channels(), [0, 0, 0, 0]);
    }

    #[test]
    fn a_partial_section_completes_the_presets_network() {
        let given = serde_json::json!({"head_channels": 64});
        let tiny = SegmenterConfig::resolve(Some("tiny"), Some(&given)).unwrap();
        assert_eq!(
            (tiny.head_channels, tiny.resnet_units.clone()),
            (64, vec![2, 1, 1])
        );
        let published = SegmenterConfig::resolve(Some("vit_b"), Some(&given)).unwrap();
        assert_eq!(published.resnet_units, vec![3, 4, 9]);
        assert_eq!(
            SegmenterConfig::resolve(Some("tiny"), None).unwrap(),
            SegmenterConfig::tiny()
        );
        let err = SegmenterConfig::resolve(None, Some(&serde_json::json!({"n_skip": 5})))
            .unwrap_err()
            .to_string();
        assert!(err.contains("n_skip"), "{err}");
    }

    #[test]
    fn bad_fields_are_named() {
        let bad = SegmenterConfig {
            resnet_width: 48,
            ..SegmenterConfig::tiny()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("resnet_width")
        );
        let bad = SegmenterConfig {
            decoder_channels: vec![16, 8],
            ..SegmenterConfig::tiny()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("decoder_channels")
        );
        let err = SegmenterConfig::from_json_value(&serde_json::json!({"n_skips": 2}), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("n_skips"), "{err}");
    }
}
