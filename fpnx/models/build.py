"""``build_model``: the network, its weights and the preprocessing those weights need, in one object."""

from __future__ import annotations

import os

import torch

from ..errors import UsageError, WeightsError
from ..preprocess import Preprocessing
from . import checkpoint_keys, checkpoints
from .fpn import FPN
from .device import resolve_device
from .layers import fold_norms
from .resnet import RESNET_SPECS, ResNet
from .weights import Weights, resolve, warn_if_untrained


class FeaturePyramid(FPN):
    """A ResNet + FPN that knows the weights it carries and the preprocessing they were trained with."""

    def __init__(self, weights: Weights):
        super().__init__(ResNet(weights.depth, norm_eps=weights.bn_eps, stride_in_1x1=weights.stride_in_1x1))
        self.weights = weights

    @property
    def preprocessing(self) -> Preprocessing:
        return self.weights.preprocessing

    @property
    def levels(self) -> list[str]:
        return list(self.output_shape())


def check_bn_eps(bn_eps: float, name: str = "bn_eps") -> None:
    """A batch-norm eps is 0 or more: a negative one gives NaN features, and a NaN one can never be resumed (NaN is
    never equal to itself)."""
    if not bn_eps >= 0:  # NaN too
        raise UsageError(f"{name} must be 0 or more, got {bn_eps}")


def build_model(
    weights: str | os.PathLike | Weights | None = None,
    *,
    depth: int | None = None,
    bn_eps: float | None = None,
    stride_in_1x1: bool | None = None,
    device: str | torch.device = "cpu",
    fold_norm: bool = False,
    seed: int = 0,
) -> FeaturePyramid:
    """ResNet + FPN in eval mode, with ``weights`` loaded: a catalogue name, a local file, or None/"random".

    ``depth`` defaults to what the weights hold (50 for random); ``bn_eps`` and ``stride_in_1x1`` default to
    what the weights need. ``fold_norm`` folds each frozen batch norm into its conv for faster inference.
    ``model.weights.preprocessing`` says how to prepare images for it.
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)  # checked before any download
    if depth is not None and depth not in RESNET_SPECS:
        raise UsageError(f"depth must be one of {sorted(RESNET_SPECS)}, got {depth}")
    entry, path = resolve(weights, depth=depth or 50)
    state = None
    if path is not None:
        state, layout = checkpoint_keys.to_fpnx_names(checkpoints.read_checkpoint(path))
        held_depth = checkpoint_keys.infer_depth(state)
        if depth is not None and depth != held_depth:
            raise WeightsError(f"{entry.name}: the checkpoint holds a ResNet-{held_depth}, not a ResNet-{depth}")
        entry = entry.replace(depth=held_depth, extras={"layout": layout})
    elif depth is not None:
        entry = entry.replace(depth=depth)
    if bn_eps is not None:
        check_bn_eps(bn_eps)
        entry = entry.replace(bn_eps=float(bn_eps))
    if stride_in_1x1 is not None:
        entry = entry.replace(stride_in_1x1=stride_in_1x1)

    model = FeaturePyramid(entry)
    if path is None:
        _randomise(model, seed)
    else:
        allowed_missing = checkpoints.load_into(model, state, allow_missing_fpn=True)
        if allowed_missing:
            # a classifier checkpoint: body only; the FPN keeps its seeded standard initialisation
            model.weights = entry.replace(fpn_trained=False)
            _seeded_fpn_init(model, seed)
        warn_if_untrained(model.weights)
    model.eval().requires_grad_(False)
    if fold_norm:
        fold_norms(model)
    return model.to(device)


def _seeded_fpn_init(model: FPN, seed: int) -> None:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model.reset_fpn_parameters()
    torch.random.set_rng_state(generator_state)


def _randomise(model: FeaturePyramid, seed: int) -> None:
    """Kaiming-normal convs and non-trivial but sane batch-norm statistics, from ``seed`` alone."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.bottom_up.state_dict().items():
            if name.endswith("norm.running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
            elif name.endswith("norm.running_mean") or name.endswith("norm.bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name.endswith("norm.weight"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.5)
            elif tensor.dim() == 4:
                fan_out = tensor.shape[0] * tensor.shape[2] * tensor.shape[3]
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / fan_out) ** 0.5)
    _seeded_fpn_init(model, seed)
