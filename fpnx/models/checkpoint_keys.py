"""Checkpoint key names: which framework's layout a state dict is in, and its tensors under fpnx's names.

Pure renaming, no file reading and no model: fpnx's own names follow detectron2
(``bottom_up.res2.0.conv1.norm.weight``), with the FPN convs named by the level they produce
(``lateral_convs.p2``, ``output_convs.p2``). Supported layouts:

- torchvision detector (``backbone.body.*``, ``backbone.fpn.*``, plus heads that are ignored),
- torchvision ``BackboneWithFPN`` (``body.*``, ``fpn.*``), with old (``fpn.inner_blocks.0.weight``) and new
  (``fpn.inner_blocks.0.0.weight``) FPN key names,
- torchvision classifier (``conv1.weight``, ``layer1.*``; ``fc.*`` ignored): the ResNet body only,
- detectron2 (``backbone.bottom_up.*``, ``backbone.fpn_lateral2.*``; heads ignored),
- fpnx's own names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import WeightsError
from .resnet import RESNET_SPECS, BottleneckBlock

TORCHVISION_DETECTOR = "torchvision-detector"
TORCHVISION_BACKBONE = "torchvision-backbone"
TORCHVISION_CLASSIFIER = "torchvision-classifier"
DETECTRON2 = "detectron2"
FPNX = "fpnx"


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    keys = state.keys()
    if any(k.startswith("backbone.bottom_up.") for k in keys):
        return DETECTRON2
    if any(k.startswith("backbone.body.") for k in keys):
        return TORCHVISION_DETECTOR
    if any(k.startswith("body.") for k in keys):
        return TORCHVISION_BACKBONE
    if any(k.startswith("bottom_up.") for k in keys):
        return FPNX
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return TORCHVISION_CLASSIFIER
    sample = ", ".join(sorted(keys)[:3])
    raise WeightsError(f"unrecognised checkpoint layout (first keys: {sample})")


_LAYER = r"(?:body\.)?layer(\d)\.(\d+)"


def _stage(match: re.Match) -> str:
    return f"bottom_up.res{int(match[1]) + 1}.{match[2]}"


# applied to keys without "backbone."; the "body." of BackboneWithFPN is optional
_TORCHVISION_RULES = [
    (re.compile(r"(?:body\.)?conv1\.weight"), lambda m: "bottom_up.stem.conv1.weight"),
    (re.compile(r"(?:body\.)?bn1\.(\w+)"), lambda m: f"bottom_up.stem.conv1.norm.{m[1]}"),
    (re.compile(_LAYER + r"\.conv(\d)\.weight"), lambda m: f"{_stage(m)}.conv{m[3]}.weight"),
    (re.compile(_LAYER + r"\.bn(\d)\.(\w+)"), lambda m: f"{_stage(m)}.conv{m[3]}.norm.{m[4]}"),
    (re.compile(_LAYER + r"\.downsample\.0\.weight"), lambda m: f"{_stage(m)}.shortcut.weight"),
    (re.compile(_LAYER + r"\.downsample\.1\.(\w+)"), lambda m: f"{_stage(m)}.shortcut.norm.{m[3]}"),
    # torchvision's FPN v1 keys lack the ".0" of the Conv2dNormActivation wrapper
    (re.compile(r"fpn\.inner_blocks\.(\d)(?:\.0)?\.(weight|bias)"), lambda m: f"lateral_convs.p{int(m[1]) + 2}.{m[2]}"),
    (re.compile(r"fpn\.layer_blocks\.(\d)(?:\.0)?\.(weight|bias)"), lambda m: f"output_convs.p{int(m[1]) + 2}.{m[2]}"),
]

_DETECTRON2_RULES = [
    (re.compile(r"bottom_up\.(.+)"), lambda m: f"bottom_up.{m[1]}"),
    (re.compile(r"fpn_lateral(\d)\.(weight|bias)"), lambda m: f"lateral_convs.p{m[1]}.{m[2]}"),
    (re.compile(r"fpn_output(\d)\.(weight|bias)"), lambda m: f"output_convs.p{m[1]}.{m[2]}"),
]

_FPNX_RULES = [(re.compile(r".+"), lambda m: m[0])]

# per layout: (prefix stripped where present, rules, prefixes of keys that are not the backbone's)
_LAYOUTS = {
    DETECTRON2: ("backbone.", _DETECTRON2_RULES, ("proposal_generator.", "roi_heads.", "pixel_mean", "pixel_std")),
    TORCHVISION_DETECTOR: ("backbone.", _TORCHVISION_RULES, ("rpn.", "roi_heads.")),
    TORCHVISION_BACKBONE: ("", _TORCHVISION_RULES, ()),
    TORCHVISION_CLASSIFIER: ("", _TORCHVISION_RULES, ("fc.",)),
    FPNX: ("", _FPNX_RULES, ()),
}


def to_fpnx_names(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's backbone tensors under fpnx's names, and the layout they came in.

    Keys of detection heads and classifiers are dropped; any other key that does not map is an error.
    """
    layout = detect_layout(state)
    prefix, rules, ignored = _LAYOUTS[layout]
    renamed: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state.items():
        if key.endswith("num_batches_tracked") or key.startswith(ignored):
            continue
        name = key[len(prefix) :] if prefix and key.startswith(prefix) else key
        for pattern, rename in rules:
            if match := pattern.fullmatch(name):
                renamed[rename(match)] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise WeightsError(f"unexpected keys in {layout} checkpoint: {few(unmapped)}")
    return renamed, layout


def infer_depth(state: Mapping[str, torch.Tensor]) -> int:
    """ResNet depth from fpnx-named keys: blocks per stage and whether blocks have a third conv."""
    blocks = []
    for stage in (2, 3, 4, 5):
        indices = {int(m[1]) for k in state if (m := re.match(rf"bottom_up\.res{stage}\.(\d+)\.", k))}
        blocks.append(len(indices))
    bottleneck = any(".conv3." in k for k in state)
    for depth, (block_type, counts) in RESNET_SPECS.items():
        if tuple(blocks) == counts and (block_type is BottleneckBlock) == bottleneck:
            return depth
    raise WeightsError(f"checkpoint is not a ResNet-18/34/50/101/152 (blocks per stage {blocks})")


def few(keys: list[str], count: int = 4) -> str:
    shown = ", ".join(keys[:count])
    return shown + (f" and {len(keys) - count} more" if len(keys) > count else "")
