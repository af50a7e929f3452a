"""``extract``'s options, validated once, and the settings a run must share with the file it resumes or merges.

:class:`ExtractOptions` is what ``fpnx.extract(inputs, out, **options)`` and ``fpnx extract`` accept; an
impossible value is a :class:`~fpnx.errors.UsageError` naming the option, raised before any weights are loaded
or files are touched. :meth:`ExtractOptions.settings` is the resume/merge contract: two runs whose settings
differ never write into one file.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError
from .loader import DEFAULT_TIMEOUT_S
from .models import PRECISIONS
from .models.build import check_bn_eps
from .models.weights import DEFAULT_WEIGHTS, Weights
from .preprocess import PIXEL_ORDERS, Preprocessing
from .sources import DEFAULT_MAX_PIXELS
from .store.schema import COMPRESSIONS, DTYPES, POOLS
from .store.shards import Shard, as_shard
from .version import __version__

LEVELS = ("p2", "p3", "p4", "p5", "p6")  # what every fpnx network produces; checked before loading weights


@dataclass(frozen=True)
class ExtractOptions:
    """Every option of ``extract`` (the command's options, with underscores), checked on creation.

    ``pool`` (``"avg"`` or ``"max"``) also stores each image's per-channel mean or max over the valid region of
    each level; ``maps=False`` stores only those vectors. ``progress`` is True for a tqdm bar, or a callable receiving :class:`fpnx.run.progress.Progress`.
    ``model`` runs an already built network instead of building one from ``weights``. ``command`` is recorded
    in the output's metadata (default: this process's command line). ``commit_every_s`` (advanced; default:
    the writer's 10 s) bounds the work a crash can lose. ``archives=False`` leaves ``.tar``/``.zip`` files
    found in folders unopened (archives given directly or in a ``@list`` are still read).
    ``decode_timeout_s``: an image whose worker takes longer is stopped and recorded as failed (0 or None: no
    limit; with ``workers=0`` there is none).
    """

    weights: str | os.PathLike | Weights | None = DEFAULT_WEIGHTS
    depth: int | None = None
    bn_eps: float | None = None
    levels: Sequence[str] | None = None
    batch_size: int = 1
    device: str = "auto"
    precision: str = "fp32"
    workers: int | None = None
    min_size: int = 800
    max_size: int = 1333
    pixel_order: str | None = None
    dtype: str = "float32"
    compression: str = "none"
    overwrite: bool = False
    allow_truncated: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout_s: float | None = DEFAULT_TIMEOUT_S
    archives: bool = True
    commit_every_s: float | None = None
    channels_last: bool = True
    progress: bool | Callable[[Any], None] = False
    command: str | None = None
    model: torch.nn.Module | None = None
    shard: Shard | str | tuple[int, int] | None = None
    pool: str | None = None
    maps: bool = True

    def __post_init__(self) -> None:
        unknown = [name for name in self.levels or () if name not in LEVELS]
        if unknown:
            raise UsageError(f"unknown level {unknown[0]!r}; choose from {', '.join(LEVELS)}")
        if self.levels is not None and not list(self.levels):
            raise UsageError(f"--levels names no level; choose from {', '.join(LEVELS)}")
        if self.bn_eps is not None:
            check_bn_eps(self.bn_eps, "--bn-eps")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.min_size < 1 or self.max_size < 1:
            raise UsageError(f"--min-size and --max-size must be positive, got {self.min_size} and {self.max_size}")
        if self.pixel_order is not None and self.pixel_order not in PIXEL_ORDERS:
            raise UsageError(f"--pixel-order must be RGB or BGR, got {self.pixel_order!r}")
        check_precision(self.precision)
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.compression not in COMPRESSIONS:
            raise UsageError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be 0 or more, got {self.workers}")
        if self.max_pixels < 1:
            raise UsageError(f"--max-pixels must be positive, got {self.max_pixels}")
        if self.decode_timeout_s is not None and not self.decode_timeout_s >= 0:
            raise UsageError(f"--decode-timeout must be 0 (no limit) or more, got {self.decode_timeout_s}")
        if self.pool is not None and self.pool not in POOLS:
            raise UsageError(f"--pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if not self.maps and self.pool is None:
            raise UsageError("--no-maps stores pooled vectors only: give --pool avg or --pool max with it")
        if self.commit_every_s is not None and not self.commit_every_s > 0:
            raise UsageError(f"commit_every_s must be positive, got {self.commit_every_s}")
        object.__setattr__(self, "shard", as_shard(self.shard))

    def replace(self, **changes: Any) -> "ExtractOptions":
        return dataclasses.replace(self, **changes)

    @property
    def store_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def preprocessing(self, weights: Preprocessing) -> Preprocessing:
        """The weights' preprocessing with this run's sizes and pixel order."""
        return weights.replace(min_size=self.min_size, max_size=self.max_size, pixel_order=self.pixel_order)

    def chosen_levels(self, produced: Sequence[str]) -> list[str]:
        """The levels to store, in the network's order and without repeats."""
        return [name for name in produced if name in (self.levels or produced)]

    def settings(self, weights: Weights, preprocessing: Preprocessing, levels: Sequence[str]) -> dict[str, Any]:
        """What must be equal to resume this run's output or merge it with another (the store adds its layout).

        The weights count by identity (name, sha256, architecture and preprocessing), not by where their file
        lies; the precision counts because it changes the values.
        """
        return {
            "weights": {k: v for k, v in weights.to_dict().items() if k not in ("file", "description")},
            "preprocessing": preprocessing.to_dict(),
            "levels": list(levels),
            "dtype": self.dtype,
            "compression": self.compression,
            "precision": self.precision,
        }


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def check_output_is_not_an_input(out: Path, images: Sequence[Any]) -> None:
    """An ``--out`` that names one of the input images would be replaced by the features: refused."""
    if not out.exists():
        return
    for image in images:
        if os.path.basename(image.path) == out.name and os.path.samefile(image.path, out):
            raise UsageError(f"{out} is one of the input images; choose another --out")


def run_metadata(options: ExtractOptions, inputs: Sequence[str | os.PathLike], device: torch.device) -> dict[str, Any]:
    """What a run records beside its settings (never compared on resume).

    ``inputs`` are recorded resolved (absolute paths; ``@lists`` as ``@`` + absolute path) together with the
    run's working folder, so that tools reading the file later (``fpnx inspect --plot``) can find the images
    from any folder.
    """
    return {
        "fpnx_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": options.command or " ".join(sys.argv),
        "device": str(device),
        "torch_version": torch.__version__,
        "working_dir": os.getcwd(),
        "inputs": [_resolved(item) for item in inputs],
    }


def _resolved(item: str | os.PathLike) -> str:
    text = os.fsdecode(item)
    if isinstance(item, str) and text.startswith("@"):
        return "@" + os.path.abspath(text[1:])
    return os.path.abspath(text)

