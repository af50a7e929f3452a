"""Read checkpoint files safely and map their key names onto fpnx's network.

fpnx's own names follow detectron2 (``bottom_up.res2.0.conv1.norm.weight``), with the FPN convs named by the
level they produce (``lateral_convs.p2``, ``output_convs.p2``). Supported layouts:

- torchvision detector (``backbone.body.*``, ``backbone.fpn.*``, plus heads that are ignored),
- torchvision ``BackboneWithFPN`` (``body.*``, ``fpn.*``), with old (``fpn.inner_blocks.0.weight``) and new
  (``fpn.inner_blocks.0.0.weight``) FPN key names,
- torchvision classifier (``conv1.weight``, ``layer1.*``; ``fc.*`` ignored): the ResNet body only,
- detectron2 (``backbone.bottom_up.*``, ``backbone.fpn_lateral2.*``; heads ignored),
- fpnx's own names.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .errors import WeightsError

TORCHVISION_DETECTOR = "torchvision-detector"
TORCHVISION_BACKBONE = "torchvision-backbone"
TORCHVISION_CLASSIFIER = "torchvision-classifier"
DETECTRON2 = "detectron2"
FPNX = "fpnx"


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt``, detectron2 ``.pkl`` or ``.safetensors`` file, without running its code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    try:
        if path.suffix == ".pkl":
            state = _read_detectron2_pickle(path)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except RefusedPickle as error:
        raise WeightsError(f"{path}: refused to load checkpoint: {error}") from None
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():  # torch.load(weights_only=True) met a non-tensor global
            raise WeightsError(f"{path}: refused to load checkpoint: {_first_line(error)}") from None
        raise WeightsError(f"{path}: not a readable checkpoint (truncated or corrupt?): {_first_line(error)}") from None
    except (EOFError, RuntimeError, OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
        raise WeightsError(f"{path}: not a readable checkpoint (truncated or corrupt?): {_first_line(error)}") from None
    return _tensors_only(path, _unwrap(state))


def _unwrap(state: object) -> object:
    """Training checkpoints nest the weights under "model" or "state_dict"."""
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            return state[key]
    return state


def _tensors_only(path: Path, state: object) -> dict[str, torch.Tensor]:
    if not isinstance(state, Mapping) or not state:
        raise WeightsError(f"{path}: holds no state dict (expected a mapping of parameter names to tensors)")
    tensors = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
    if not tensors:
        raise WeightsError(f"{path}: holds no tensors")
    return tensors


class RefusedPickle(pickle.UnpicklingError):
    """A pickle asked for something other than numpy arrays."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain containers; refuses every other global (os.system, eval, ...)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise RefusedPickle(f"it wants to call {module}.{name}; only numpy arrays are allowed")
        if module == "collections":
            return OrderedDict
        # numpy 2 moved numpy.core to numpy._core; old pickles name the old module
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def _read_detectron2_pickle(path: Path) -> object:
    data = path.read_bytes()
    # detectron2 reads its model zoo files with latin1, as some were pickled by Python 2
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


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
        raise WeightsError(f"unexpected keys in {layout} checkpoint: {_few(unmapped)}")
    return renamed, layout


def infer_depth(state: Mapping[str, torch.Tensor]) -> int:
    """ResNet depth from fpnx-named keys: blocks per stage and whether blocks have a third conv."""
    blocks = []
    for stage in (2, 3, 4, 5):
        indices = {int(m[1]) for k in state if (m := re.match(rf"bottom_up\.res{stage}\.(\d+)\.", k))}
        blocks.append(len(indices))
    bottleneck = any(".conv3." in k for k in state)
    from .models.resnet import RESNET_SPECS, BottleneckBlock

    for depth, (block_type, counts) in RESNET_SPECS.items():
        if tuple(blocks) == counts and (block_type is BottleneckBlock) == bottleneck:
            return depth
    raise WeightsError(f"checkpoint is not a ResNet-18/34/50/101/152 (blocks per stage {blocks})")


def _few(keys: list[str], count: int = 4) -> str:
    shown = ", ".join(keys[:count])
    return shown + (f" and {len(keys) - count} more" if len(keys) > count else "")


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, allow_missing_fpn: bool) -> list[str]:
    """Copy fpnx-named tensors into ``model``; returns the missing FPN keys that were allowed.

    Missing or unexpected keys and shape mismatches are errors naming a few of them, never silently ignored.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    allowed = [k for k in missing if allow_missing_fpn and k.startswith(("lateral_convs.", "output_convs."))]
    missing = [k for k in missing if k not in allowed]
    if missing:
        raise WeightsError(f"checkpoint lacks keys the network needs: {_few(missing)}")
    if unexpected:
        raise WeightsError(f"checkpoint has keys the network does not: {_few(unexpected)}")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise WeightsError(f"checkpoint shapes differ from the network: {_few(wrong, 2)}")
    with torch.no_grad():
        for key, target in expected.items():
            if key in state:
                target.copy_(state[key].to(target.dtype))
    return allowed
