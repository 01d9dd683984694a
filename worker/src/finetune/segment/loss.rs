//! The published segmentation objective and the argmax prediction it is scored by
//! (`TransUNet/trainer.py` and `utils.py`): `0.5 · CrossEntropy + 0.5 · DiceLoss(softmax)`.

use tch::{Kind, Tensor};

/// The loss and its two terms, each a float32 scalar tensor on the logits' device.
#[derive(Debug)]
pub struct SegLoss {
    /// `0.5 · ce + 0.5 · dice`.
    pub loss: Tensor,
    /// Mean cross-entropy over every pixel of every frame.
    pub ce: Tensor,
    /// The published `DiceLoss`: per class `1 − (2·Σ p·t + 1e-5) / (Σ p² + Σ t² + 1e-5)` over
    /// the whole batch (softmax probabilities `p`, one-hot labels `t`), averaged over classes.
    pub dice: Tensor,
}

/// Smoothing term of the published `DiceLoss`.
const SMOOTH: f64 = 1e-5;

/// The objective for `logits` (N, C, H, W) (any float kind; computed in float32) and `labels`
/// (N, H, W) int64 in `0..C`.
pub fn seg_loss(logits: &Tensor, labels: &Tensor) -> SegLoss {
    let logits = logits.to_kind(Kind::Float);
    let classes = logits.size()[1];
    let ce = logits.cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Mean, -100, 0.0);
    let probs = logits.softmax(1, Kind::Float);
    let mut dice = Tensor::zeros([], (Kind::Float, logits.device()));
    for c in 0..classes {
        let p = probs.select(1, c);
        let t = labels.eq(c).to_kind(Kind::Float);
        let intersect = (&p * &t).sum(Kind::Float);
        let y_sum = (&t * &t).sum(Kind::Float);
        let z_sum = (&p * &p).sum(Kind::Float);
        let term = 1.0 - (intersect * 2.0 + SMOOTH) / (z_sum + y_sum + SMOOTH);
        dice += term;
    }
    let dice = dice / classes as f64;
    let loss = &ce * 0.5 + &dice * 0.5;
    SegLoss { loss, ce, dice }
}

/// The predicted class of each pixel, (N, H, W) uint8, as the published `eval_dice` takes it:
/// `argmax(softmax(logits, 1), 1)` (the softmax can only merge near-ties, which then go to the
/// lower class like `torch.argmax`).
pub fn predict_classes(logits: &Tensor) -> Tensor {
    logits
        .to_kind(Kind::Float)
        .softmax(1, Kind::Float)
        .argmax(1, false)
        .to_kind(Kind::Uint8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_perfect_prediction_has_low_loss_and_a_wrong_one_high() {
        let labels = Tensor::from_slice(&[0i64, 1, 1, 0]).reshape([1, 2, 2]);
        let onehot = labels.one_hot(2).permute([0, 3, 1, 2]).to_kind(Kind::Float);
        let good = seg_loss(&(&onehot * 20.0), &labels);
        let bad = seg_loss(&((1.0 - &onehot) * 20.0), &labels);
        assert!(good.loss.double_value(&[]) < 1e-3);
        assert!(bad.loss.double_value(&[]) > 0.9);
        // Dice loss of the wrong prediction: both classes miss entirely → 1 each.
        assert!((bad.dice.double_value(&[]) - 1.0).abs() < 1e-4);
        let pred = predict_classes(&(&onehot * 20.0));
        assert_eq!(pred.to_kind(Kind::Int64), labels);
    }
}
