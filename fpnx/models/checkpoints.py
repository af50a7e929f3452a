"""Read checkpoint files without running their code, and copy fpnx-named tensors into a network.

``.pth``/``.pt`` go through ``torch.load(weights_only=True)``, detectron2 ``.pkl`` through an unpickler that
admits only numpy arrays, ``.safetensors`` through its reference reader. Key names are mapped by
:mod:`fpnx.models.checkpoint_keys`.
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

from ..errors import WeightsError, first_line
from .checkpoint_keys import few


def _written_by_torch_save(path: Path) -> bool:
    """Starts as a zip archive (torch.save since PyTorch 1.6) or a pickle (protocol 2 and later: 0x80) does; a
    truncated one still does, and gets torch's own error."""
    with open(path, "rb") as file:
        head = file.read(2)
    return head == b"PK" or head[:1] == b"\x80"


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
            if not _written_by_torch_save(path):
                raise WeightsError(f"{path}: not a checkpoint (torch.save writes a zip or pickle file; also read: "
                                   f"detectron2 .pkl and .safetensors files)")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except RefusedPickle as error:
        raise WeightsError(f"{path}: refused to load checkpoint: {error}") from None
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():  # torch.load(weights_only=True) met a non-tensor global
            raise WeightsError(f"{path}: refused to load checkpoint: {_refused_global(error)}") from None
        raise WeightsError(f"{path}: not a readable checkpoint (truncated or corrupt?): {first_line(error)}") from None
    except (EOFError, RuntimeError, OSError, ValueError, zipfile.BadZipFile, KeyError) as error:
        raise WeightsError(f"{path}: not a readable checkpoint (truncated or corrupt?): {first_line(error)}") from None
    return _tensors_only(path, _unwrap(state))


def _refused_global(error: Exception) -> str:
    """What torch's long weights-only refusal comes to: the class it would have had to run code to rebuild."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if found is None:
        return re.sub(r"\x1b\[[0-9;]*m", "", first_line(error))  # without the terminal's bold on and off
    return (f"it holds a pickled {found.group(1)} object, not only tensors, and loading it would run code; save "
            f"its state_dict() instead (torch.save(model.state_dict(), path))")


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
        raise WeightsError(f"checkpoint lacks keys the network needs: {few(missing)}")
    if unexpected:
        raise WeightsError(f"checkpoint has keys the network does not: {few(unexpected)}")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise WeightsError(f"checkpoint shapes differ from the network: {few(wrong, 2)}")
    with torch.no_grad():
        for key, target in expected.items():
            if key in state:
                target.copy_(state[key].to(target.dtype))
    return allowed
