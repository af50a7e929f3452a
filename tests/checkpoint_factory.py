"""Checkpoints the tests make: torchvision models with non-trivial batch-norm statistics, saved as published."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision.models import detection, resnet


def randomise_norms(model: torch.nn.Module, seed: int = 0, var_range: tuple[float, float] = (0.5, 1.5)) -> None:
    """Give every BatchNorm non-trivial statistics, so a wrong mapping or eps cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    low, high = var_range
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                variance = torch.rand(n, generator=generator) * (high - low) + low
                module.running_var.copy_(variance)
                # keeps each norm's gain near 1 whatever the variances, so activations stay finite
                module.weight.copy_((torch.rand(n, generator=generator) + 0.5) * variance.sqrt())
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def torchvision_detector(kind: str = "fasterrcnn", seed: int = 0, **norm_options) -> torch.nn.Module:
    torch.manual_seed(seed)
    builder = getattr(detection, f"{kind}_resnet50_fpn")
    model = builder(weights=None, weights_backbone=None).eval()
    randomise_norms(model, seed, **norm_options)
    return model


def torchvision_resnet(depth: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = getattr(resnet, f"resnet{depth}")(weights=None).eval()
    randomise_norms(model, seed)
    return model


def save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


def to_detectron2_names(tv_state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A torchvision detector's backbone under detectron2's key names, as numpy arrays (model zoo .pkl style)."""
    out = {}
    for key, value in tv_state.items():
        if not key.startswith("backbone.") or key.endswith("num_batches_tracked"):
            continue
        name = key[len("backbone.") :]
        parts = name.split(".")
        if parts[0] == "fpn":
            kind = {"inner_blocks": "lateral", "layer_blocks": "output"}[parts[1]]
            new = f"fpn_{kind}{int(parts[2]) + 2}.{parts[-1]}"
        elif parts[1] in ("conv1", "bn1"):
            new = "bottom_up.stem.conv1." + ("weight" if parts[1] == "conv1" else "norm." + parts[2])
        else:
            stage = f"res{int(parts[1][-1]) + 1}.{parts[2]}"
            layer = parts[3]
            if layer == "downsample":
                new = f"bottom_up.{stage}.shortcut." + ("weight" if parts[4] == "0" else "norm." + parts[5])
            elif layer.startswith("conv"):
                new = f"bottom_up.{stage}.{layer}.weight"
            else:
                new = f"bottom_up.{stage}.conv{layer[-1]}.norm.{parts[4]}"
        out["backbone." + new] = value.numpy().copy()
    out["roi_heads.box_predictor.cls_score.weight"] = np.zeros((81, 1024), np.float32)
    return out


def save_detectron2_pickle(tv_state: dict[str, torch.Tensor], path: Path) -> Path:
    with open(path, "wb") as file:
        pickle.dump({"model": to_detectron2_names(tv_state), "__author__": "fpnx tests"}, file)
    return path
