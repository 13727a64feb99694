"""Loss pieces and the core methods on small hand-built tensors where the right answer is known."""

import math

import pytest
import torch

from SSLSegmentLib.ml.methods import available_methods, get_method
from SSLSegmentLib.ml.methods.brl import BidirectionalRegionLoss
from SSLSegmentLib.ml.methods.losses import (
    masked_cross_entropy,
    masked_dice_loss,
    masked_mse,
    normalized_entropy,
    sigmoid_rampup,
    supervised_loss,
)
from SSLSegmentLib.ml.methods.ua_mt import UAMT


def _probs_to_logits(p_fg: torch.Tensor) -> torch.Tensor:
    """(B,1,...) foreground probabilities → 2-class logits with exactly those softmax probabilities."""
    return torch.cat([torch.zeros_like(p_fg), torch.log(p_fg) - torch.log1p(-p_fg)], 1)


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(500, 100) == 1.0 and sigmoid_rampup(3, 0) == 1.0


def test_masked_cross_entropy_counts_only_masked_voxels():
    p = torch.tensor([0.9, 0.2, 0.6, 0.5]).view(1, 1, 1, 1, 4)
    y = torch.tensor([1, 0, 0, 1]).view(1, 1, 1, 1, 4)
    m = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 1, 4)
    expected = -(math.log(0.9) + math.log(0.8)) / 2
    assert masked_cross_entropy(_probs_to_logits(p), y, m).item() == pytest.approx(expected, rel=1e-5)
    assert masked_cross_entropy(_probs_to_logits(p), y, torch.zeros_like(m)).item() == 0.0


def test_masked_dice_matches_hand_computation():
    p_fg = torch.tensor([0.9, 0.2, 0.6, 0.5]).view(1, 1, 1, 1, 4)
    probs = torch.cat([1 - p_fg, p_fg], 1)
    y = torch.tensor([1, 0, 1, 1]).view(1, 1, 1, 1, 4)
    m = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 1, 1, 4)
    inter = 0.9 + 0.6
    denom = (0.81 + 0.04 + 0.36) + 2
    assert masked_dice_loss(probs, y, m, smooth=0.0).item() == pytest.approx(1 - 2 * inter / denom, rel=1e-5)
    perfect = torch.cat([1 - y.float(), y.float()], 1)
    assert masked_dice_loss(perfect, y, torch.ones_like(m)).item() == pytest.approx(0.0, abs=1e-6)


def _reference_dices(probs, target, mask, smooth):
    """The two masked soft Dice losses the methods used before they became one function, written out: the V-Net /
    UA-MT form (squared denominator, foreground classes, batch pooled) and nnU-Net's (per sample and class)."""
    onehot = torch.nn.functional.one_hot(target[:, 0], probs.shape[1]).movedim(-1, 1).float()
    losses = []
    for c in range(1, probs.shape[1]):
        p, y = probs[:, c : c + 1] * mask, onehot[:, c : c + 1] * mask
        losses.append(1.0 - (2.0 * (p * y).sum() + smooth) / ((p * p).sum() + y.sum() + smooth))
    squared = torch.stack(losses).mean()
    axes = tuple(range(2, probs.dim()))
    tp = (probs * onehot * mask).sum(axes)
    fp = (probs * (1 - onehot) * mask).sum(axes)
    fn = ((1 - probs) * onehot * mask).sum(axes)
    nnunet = 1.0 - ((2 * tp + smooth) / (2 * tp + fp + fn + smooth + 1e-8)).mean()
    return squared, nnunet


@pytest.mark.parametrize("batch_size,fraction", [(1, 0.5), (2, 0.01), (4, 1.0), (3, 0.3)])
def test_one_masked_dice_gives_the_methods_losses_and_gradients_bit_for_bit(batch_size, fraction):
    """Every method's Dice terms go through masked_dice_loss; for two classes it reproduces both earlier losses
    exactly, values and gradients, so method results do not move."""
    g = torch.Generator().manual_seed(batch_size)
    shape = (batch_size, 2, 6, 10, 12)
    logits = torch.randn(shape, generator=g, requires_grad=True)
    target = torch.randint(0, 2, (batch_size, 1, *shape[2:]), generator=g)
    mask = (torch.rand(batch_size, 1, *shape[2:], generator=g) < fraction).float()
    mask[0] = 0.0  # a sample without voxels in the region
    probs = logits.softmax(1)
    for smooth in (1e-5, 1.0, 20.0):
        squared, nnunet = _reference_dices(probs, target, mask, smooth)
        ours = masked_dice_loss(probs, target, mask, smooth)
        ours_nn = masked_dice_loss(probs, target, mask, smooth, squared_pred=False, include_background=True, batch=False)
        if smooth >= 1.0:  # nnU-Net's extra 1e-8 is below float32 resolution once the smoothing is >= 1
            assert torch.equal(ours_nn, nnunet)
            assert torch.equal(*(torch.autograd.grad(v, logits, retain_graph=True)[0] for v in (ours_nn, nnunet)))
        assert torch.equal(ours, squared)
        assert torch.equal(*(torch.autograd.grad(v, logits, retain_graph=True)[0] for v in (ours, squared)))


def test_masked_dice_means_what_monai_means():
    """Same definitions as MONAI's MaskedDiceLoss with the same argument names (MONAI sums in another order, so the
    agreement is to float rounding, which is why the methods use their own)."""
    from monai.losses import MaskedDiceLoss

    g = torch.Generator().manual_seed(0)
    probs = torch.randn(2, 2, 8, 8, 8, generator=g).softmax(1)
    target = torch.randint(0, 2, (2, 1, 8, 8, 8), generator=g)
    mask = (torch.rand(2, 1, 8, 8, 8, generator=g) < 0.6).float()
    # one-hot first: MONAI masks the target before its own one-hot, which would make masked voxels background truth
    onehot = torch.nn.functional.one_hot(target[:, 0], 2).movedim(-1, 1).float()
    for squared, background, batch in ((True, False, True), (False, True, False)):
        monai = MaskedDiceLoss(include_background=background, squared_pred=squared, batch=batch,
                               smooth_nr=1.0, smooth_dr=1.0)(probs, onehot, mask)
        ours = masked_dice_loss(probs, target, mask, 1.0, squared_pred=squared, include_background=background,
                                batch=batch)
        assert ours.item() == pytest.approx(monai.item(), rel=1e-5)


def test_masked_dice_checks_its_arguments_and_is_zero_on_an_empty_mask():
    probs = torch.full((1, 2, 2, 2, 2), 0.5, requires_grad=True)
    y = torch.ones(1, 1, 2, 2, 2, dtype=torch.long)
    empty = torch.zeros(1, 1, 2, 2, 2)
    loss = masked_dice_loss(probs, y, empty, smooth=0.0)
    assert loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match="target"):
        masked_dice_loss(probs, y[:, 0], empty)
    with pytest.raises(ValueError, match="mask"):
        masked_dice_loss(probs, y, empty[0])
    with pytest.raises(ValueError, match="smooth"):
        masked_dice_loss(probs, y, empty, smooth=-1.0)


def test_supervised_loss_ignores_unlabeled_voxels():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 4, 4)
    y = torch.randint(0, 2, (2, 1, 4, 4, 4))
    mask = torch.zeros(2, 1, 4, 4, 4)
    mask[:, :, :2] = 1
    y_other = y.clone()
    y_other[:, :, 2:] = 1 - y_other[:, :, 2:]  # change only the unlabeled voxels
    assert supervised_loss(logits, y, mask).item() == pytest.approx(supervised_loss(logits, y_other, mask).item())
    assert supervised_loss(logits, y, torch.ones_like(mask)).item() != pytest.approx(
        supervised_loss(logits, y_other, torch.ones_like(mask)).item()
    )


def test_normalized_entropy_bounds():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.9, 0.1]]).T.reshape(1, 2, 1, 1, 3)
    u = normalized_entropy(p).flatten()
    assert u[0].item() == pytest.approx(1.0, abs=1e-6) and u[1].item() == pytest.approx(0.0, abs=1e-6)
    assert u[2].item() == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2), rel=1e-5)


def test_masked_mse_zero_when_equal_and_masked():
    a = torch.rand(1, 2, 2, 2, 2)
    b = a.clone()
    b[..., 0, 0, 0] += 0.5
    mask = torch.ones(1, 1, 2, 2, 2)
    assert masked_mse(a, a, mask).item() == 0.0
    assert masked_mse(a, b, mask).item() == pytest.approx(2 * 0.25 / (2 * 8), rel=1e-5)
    mask[..., 0, 0, 0] = 0
    assert masked_mse(a, b, mask).item() == 0.0


def test_brl_region_masks_split_by_uncertainty_and_labeled_mask():
    brl = BidirectionalRegionLoss(high_threshold=0.5, low_threshold=0.3)
    u = torch.tensor([0.9, 0.1, 0.9, 0.1, 0.4]).view(1, 1, 1, 1, 5)
    lab = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 1, 5)
    high, certain = brl.region_masks(u, lab)
    assert high.flatten().tolist() == [1, 0, 0, 0, 0]  # uncertain AND labeled
    assert certain.flatten().tolist() == [0, 0, 0, 1, 0]  # certain AND unlabeled (0.4 is neither)


def test_brl_loss_equals_hand_computation():
    brl = BidirectionalRegionLoss(beta=2.0, high_threshold=0.5, low_threshold=0.5)
    # 4 voxels: two labeled (one where the teacher is unsure), two unlabeled (one where the teacher is sure).
    student = torch.tensor([0.8, 0.3, 0.7, 0.4]).view(1, 1, 1, 1, 4)
    teacher = torch.tensor([0.55, 0.02, 0.99, 0.6]).view(1, 1, 1, 1, 4)
    label = torch.tensor([1, 0, 0, 0]).view(1, 1, 1, 1, 4)
    lab = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 1, 4)
    out = brl.loss_from_predictions(_probs_to_logits(student), torch.cat([1 - teacher, teacher], 1), label, lab, weight=0.5)
    ce = lambda p, y: -math.log(p if y else 1 - p)  # noqa: E731
    eps = 1e-5
    # supervised on voxels 0, 1
    sup_ce = (ce(0.8, 1) + ce(0.3, 0)) / 2
    sup_dice = 1 - (2 * 0.8 + eps) / (0.8**2 + 0.3**2 + 1 + eps)
    # URL: voxel 0 only (teacher 0.55 → high entropy); voxel 1 (0.02) is certain
    url = 0.5 * (ce(0.8, 1) + (1 - (2 * 0.8 + eps) / (0.64 + 1 + eps)))
    # CRL: voxel 2 only (teacher 0.99, pseudo-label 1); voxel 3 (0.6) is uncertain
    crl = 0.5 * (ce(0.7, 1) + (1 - (2 * 0.7 + eps) / (0.49 + 1 + eps)))
    expected = 0.5 * (sup_ce + sup_dice) + 2.0 * url + 0.5 * crl
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)
    assert out.terms["high_frac"] == pytest.approx(0.5) and out.terms["certain_frac"] == pytest.approx(0.5)


def test_brl_partial_label_uses_both_branches():
    """A corrected case: reviewed voxels take the supervised branch, the rest the pseudo-label branch."""
    brl = BidirectionalRegionLoss()
    student = _probs_to_logits(torch.full((1, 1, 1, 1, 4), 0.5))
    teacher = torch.tensor([0.5, 0.5, 0.01, 0.99]).view(1, 1, 1, 1, 4)
    label = torch.tensor([1, 0, 0, 0]).view(1, 1, 1, 1, 4)
    reviewed = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 1, 4)
    out = brl.loss_from_predictions(student, torch.cat([1 - teacher, teacher], 1), label, reviewed, weight=1.0)
    assert out.terms["url"] > 0 and out.terms["crl"] > 0 and out.terms["high_frac"] == 1.0


def test_brl_options_are_validated():
    with pytest.raises(ValueError, match="normalised entropy"):
        BidirectionalRegionLoss(high_threshold=1.5)
    with pytest.raises(ValueError, match="beta"):
        BidirectionalRegionLoss(beta=-1)


def test_ua_mt_certainty_mask_follows_ramped_threshold():
    uamt = UAMT()
    teacher = torch.tensor([0.5, 0.8, 0.95, 0.95]).view(1, 1, 1, 1, 4)
    probs = torch.cat([1 - teacher, teacher], 1)
    lab = torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 1, 4)
    # entropy (nats): 0.693, 0.500, 0.199 ; threshold 0.75·ln2 = 0.520 at the start, ln2 at the end
    assert uamt.certainty_mask(probs, lab, rampup=0.0).flatten().tolist() == [0, 1, 1, 0]
    teacher2 = torch.tensor([0.7, 0.8, 0.95, 0.95]).view(1, 1, 1, 1, 4)  # entropy 0.611: only kept late
    probs2 = torch.cat([1 - teacher2, teacher2], 1)
    assert uamt.certainty_mask(probs2, lab, rampup=0.0).flatten().tolist() == [0, 1, 1, 0]
    assert uamt.certainty_mask(probs2, lab, rampup=1.0).flatten().tolist() == [1, 1, 1, 0]


def test_registry_lists_core_methods_and_refuses_unknown():
    names = set(available_methods())
    assert {"supervised", "mean-teacher", "ua-mt", "brl"} <= names
    assert get_method("brl", beta=0.5).beta == 0.5
    with pytest.raises(KeyError, match="unknown method"):
        get_method("nope")
