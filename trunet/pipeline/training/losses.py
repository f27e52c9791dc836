"""The training loss: soft Dice + cross-entropy on the labelled frames only, under deep supervision, and
:func:`build_criterion`, the one place it is put together (the trainer and the memory planner call it)."""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from torch import Tensor, nn

from trunet.config import Config

__all__ = [
    "consistency_loss",
    "MaskedDiceCELoss",
    "DeepSupervisionLoss",
    "deep_supervision_weights",
    "downsample_label",
    "build_criterion",
]


class MaskedDiceCELoss(nn.Module):
    """Soft Dice + cross-entropy over the labelled frames of a batch.

    MONAI's :class:`~monai.losses.DiceCELoss` cannot do this: its CE has no ``ignore_index`` path through
    one-hot targets, and its Dice would count unlabelled frames (``ignore_index`` voxels) as wrong
    background. So the frames are selected here first (``frame_mask``): unlabelled frames take no part in
    the loss, and their logits get exactly zero gradient (see the sparse-label test). Within labelled
    frames, any stray ``ignore_index`` voxel is left out of both terms: CE through ``ignore_index``, Dice
    through MONAI's :class:`~monai.losses.MaskedDiceLoss` with a voxel mask. Foreground classes only;
    computed in float32 whatever the autocast.

    Args:
        num_classes: ``K``.
        ignore_index: label value of unlabelled voxels (255).
        dice_weight / ce_weight: weights of the two terms.
        per_frame: one Dice per class and labelled frame, averaged (``train.dice: frame``); default
            nnU-Net's batch Dice, one per class over all selected frames pooled.

    Shapes:
        logits ``(B, T, K, X, Y, Z)``, label ``(B, T, X, Y, Z)`` integer, frame_mask ``(B, T)`` bool ->
        a scalar. A batch without any labelled frame gives ``0 * logits.sum()`` (graph kept).
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, dice_weight: float = 1.0, ce_weight: float = 1.0,
        per_frame: bool = False,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        # target one-hot is built here (not with to_onehot_y) so masked voxels are 0 in every channel
        self.dice = MaskedDiceLoss(include_background=False, softmax=True, batch=not per_frame, smooth_nr=1e-5,
                                   smooth_dr=1e-5)

    def forward(self, logits: Tensor, label: Tensor, frame_mask: Tensor) -> Tensor:
        if logits.dim() != 6 or label.shape != logits.shape[:2] + logits.shape[3:]:
            raise ValueError(f"logits (B, T, K, X, Y, Z) and label (B, T, X, Y, Z) expected, got "
                             f"{tuple(logits.shape)} and {tuple(label.shape)}")
        mask = frame_mask.to(device=logits.device, dtype=torch.bool).reshape(-1)
        if not bool(mask.any()):
            return logits.sum() * 0.0
        x = logits.flatten(0, 1)[mask].float()  # (N, K, X, Y, Z) labelled frames only
        y = label.flatten(0, 1)[mask].long()  # (N, X, Y, Z)
        total = x.new_zeros(())
        valid = y != self.ignore_index
        if self.ce_weight:
            if bool(valid.any()):
                total = total + self.ce_weight * F.cross_entropy(x, y, ignore_index=self.ignore_index)
        if self.dice_weight:
            target = F.one_hot(torch.where(valid, y, 0), self.num_classes).movedim(-1, 1).to(x.dtype)
            voxel_mask = valid.unsqueeze(1).to(x.dtype)
            total = total + self.dice_weight * self.dice(x, target, mask=voxel_mask)
        return total


def consistency_loss(student: Union[Tensor, Sequence[Tensor]], teacher: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    """Mean voxel-wise KL divergence ``KL(softmax(teacher) || softmax(student))`` over classes, in float32.

    Args:
        student: logits ``(B, T, K, X, Y, Z)`` of the corrupted sample (a deep-supervision list: the first,
            full-resolution one is used).
        teacher: logits of the same shape for the uncorrupted sample, computed without gradient.

    Returns:
        A scalar, 0 where the two agree. Its gradient is ``softmax(student) - softmax(teacher)``.
    """
    s = student[0] if isinstance(student, (list, tuple)) else student
    t = teacher[0] if isinstance(teacher, (list, tuple)) else teacher
    log_q = F.log_softmax(s.float(), dim=2)
    log_p = F.log_softmax(t.detach().float(), dim=2)
    return (log_p.exp() * (log_p - log_q)).sum(dim=2).mean()


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's deep-supervision weights: halving per level (1, 1/2, 1/4, ...), normalised to sum 1."""
    w = [0.5**i for i in range(levels)]
    s = sum(w)
    return [v / s for v in w]


def downsample_label(label: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of ``(B, T, X, Y, Z)`` integer labels to spatial ``size``.

    Nearest keeps label values as they are, so ``ignore_index`` stays ``ignore_index``.
    """
    if tuple(label.shape[2:]) == tuple(size):
        return label
    size = tuple(int(s) for s in size)
    return F.interpolate(label.float(), size=size, mode="nearest-exact").to(label.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the outputs of several resolutions (labels downsampled to each).

    A single tensor is passed straight to ``loss``.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, outputs: Tensor | Sequence[Tensor], label: Tensor, frame_mask: Tensor) -> Tensor:
        if isinstance(outputs, Tensor):
            return self.loss(outputs, label, frame_mask)
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for w, out in zip(weights, outputs):
            total = total + w * self.loss(out, downsample_label(label, out.shape[3:]), frame_mask)
        return total


def build_criterion(config: Config) -> nn.Module:
    """The training loss of ``config``: :class:`MaskedDiceCELoss` with the configured weights, wrapped in
    :class:`DeepSupervisionLoss` when ``model.deep_supervision`` (the model then returns several
    resolutions)."""
    t = config.train
    loss = MaskedDiceCELoss(len(config.data.classes), config.data.ignore_index, t.dice_weight, t.ce_weight,
                            per_frame=t.dice == "frame")
    return DeepSupervisionLoss(loss) if config.model.deep_supervision else loss
