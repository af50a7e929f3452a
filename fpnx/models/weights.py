"""The catalogue of known checkpoints, each carrying the preprocessing and network settings it was trained with.

Named weights download once into the torch hub cache (``$TORCH_HOME/hub/checkpoints``). torchvision publishes
the first hex digits of each file's sha256 in its name, and fpnx checks them on every load; detectron2 publishes
no checksum, so for those files fpnx records the sha256 of what it loaded in every output it writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.error
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DownloadError, WeightsError
from ..preprocess import DETECTRON2, TORCHVISION, Preprocessing

DEFAULT_WEIGHTS = "fasterrcnn_resnet50_fpn.coco_v1"
RANDOM = "random"


@dataclass(frozen=True)
class Weights:
    """A checkpoint and everything needed to use it correctly.

    ``bn_eps`` is the frozen batch norm's epsilon the checkpoint was trained with; ``stride_in_1x1`` says where
    a bottleneck's stride sits (detectron2's MSRA weights: in the first 1x1 conv; torchvision: in the 3x3).
    ``fpn_trained`` is False for classifier checkpoints (ResNet body only) and for random weights.
    """

    name: str
    depth: int
    preprocessing: Preprocessing
    bn_eps: float
    stride_in_1x1: bool = False
    fpn_trained: bool = True
    body_trained: bool = True
    url: str | None = None
    framework: str = "torchvision"
    description: str = ""
    file: str | None = None
    sha256: str | None = None
    seed: int | None = None
    extras: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def trained(self) -> bool:
        return self.body_trained and self.fpn_trained

    @property
    def filename(self) -> str | None:
        return self.url.rsplit("/", 1)[-1] if self.url else None

    @property
    def published_sha256_prefix(self) -> str | None:
        """torch hub convention: ``name-<first hex digits of sha256>.pth``."""
        if self.framework != "torchvision" or not self.filename:
            return None
        stem = self.filename.rsplit(".", 1)[0]
        return stem.rsplit("-", 1)[-1] if "-" in stem else None

    def replace(self, **changes: Any) -> "Weights":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, stored in every output file."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extras"}
        data["preprocessing"] = self.preprocessing.to_dict()
        data["trained"] = self.trained
        return data


_TV = "https://download.pytorch.org/models/"
_D2 = "https://dl.fbaipublicfiles.com/detectron2/"


def _torchvision_detector(name: str, file: str, what: str) -> Weights:
    return Weights(name, 50, TORCHVISION, bn_eps=0.0, url=_TV + file, description=f"torchvision {what}, COCO")


def _torchvision_classifier(name: str, depth: int, file: str, what: str) -> Weights:
    return Weights(
        name, depth, TORCHVISION, bn_eps=1e-5, fpn_trained=False, url=_TV + file,
        description=f"torchvision ResNet-{depth} ImageNet {what}: body only, the FPN is untrained",
    )


def _detectron2(name: str, path: str, what: str) -> Weights:
    return Weights(
        name, 50, DETECTRON2, bn_eps=1e-5, stride_in_1x1=True, url=_D2 + path, framework="detectron2",
        description=f"detectron2 model zoo {what}, COCO",
    )


CATALOGUE: dict[str, Weights] = {
    w.name: w
    for w in [
        # torchvision trained its COCO_V1 detectors with frozen BN eps 0 (it calls overwrite_eps(model, 0.0))
        _torchvision_detector(DEFAULT_WEIGHTS, "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth", "Faster R-CNN R50-FPN"),
        _torchvision_detector("maskrcnn_resnet50_fpn.coco_v1", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", "Mask R-CNN R50-FPN"),
        _torchvision_detector(
            "keypointrcnn_resnet50_fpn.coco_v1", "keypointrcnn_resnet50_fpn_coco-fc266e95.pth", "Keypoint R-CNN R50-FPN"
        ),
        _torchvision_classifier("resnet18.imagenet1k_v1", 18, "resnet18-f37072fd.pth", "V1"),
        _torchvision_classifier("resnet34.imagenet1k_v1", 34, "resnet34-b627a593.pth", "V1"),
        _torchvision_classifier("resnet50.imagenet1k_v1", 50, "resnet50-0676ba61.pth", "V1"),
        _torchvision_classifier("resnet50.imagenet1k_v2", 50, "resnet50-11ad3fa6.pth", "V2"),
        _torchvision_classifier("resnet101.imagenet1k_v1", 101, "resnet101-63fe2227.pth", "V1"),
        _torchvision_classifier("resnet152.imagenet1k_v1", 152, "resnet152-394f9c45.pth", "V1"),
        _detectron2(
            "detectron2.faster_rcnn_R_50_FPN_3x",
            "COCO-Detection/faster_rcnn_R_50_FPN_3x/137849458/model_final_280758.pkl",
            "Faster R-CNN R50-FPN 3x",
        ),
        _detectron2(
            "detectron2.mask_rcnn_R_50_FPN_3x",
            "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl",
            "Mask R-CNN R50-FPN 3x",
        ),
    ]
}


def random_weights(depth: int = 50, seed: int = 0) -> Weights:
    return Weights(
        RANDOM, depth, TORCHVISION, bn_eps=1e-5, fpn_trained=False, body_trained=False, framework="random",
        description=f"seeded random initialisation (seed {seed}): untrained, for smoke runs", seed=seed,
    )


def local_weights(path: str | Path, *, framework: str) -> Weights:
    """A local file gets its framework's preprocessing: detectron2 for ``.pkl``, torchvision otherwise."""
    path = Path(path)
    if framework == "detectron2":
        return Weights(str(path), 50, DETECTRON2, bn_eps=1e-5, stride_in_1x1=True, framework="detectron2",
                       description="local detectron2 checkpoint", file=str(path))
    return Weights(str(path), 50, TORCHVISION, bn_eps=1e-5, framework="torchvision",
                   description="local torchvision-style checkpoint", file=str(path))


def catalogue_entry_of(path: Path, digest: str) -> Weights | None:
    """The catalogue entry a local file is: by its published file name, or (renamed torchvision files) by the
    sha256 prefix published in that name. A file under a published name must then pass its checksum."""
    for entry in CATALOGUE.values():
        prefix = entry.published_sha256_prefix
        if entry.filename == path.name or (prefix and digest.startswith(prefix)):
            return entry
    return None


def list_weights() -> list[Weights]:
    """Every named entry: the catalogue, then ``random``."""
    return [*CATALOGUE.values(), random_weights()]


def get_weights(name: str) -> Weights:
    if name == RANDOM:
        return random_weights()
    try:
        return CATALOGUE[name]
    except KeyError:
        known = ", ".join([RANDOM, *CATALOGUE])
        raise WeightsError(f"unknown weights {name!r}; known: {known}, or a path to a local checkpoint") from None


def cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(weights: Weights, *, progress: bool = True) -> tuple[Path, str]:
    """The cached file of named ``weights`` and its sha256, downloading it once; checked on every call."""
    if weights.url is None:
        raise WeightsError(f"{weights.name}: has no download address")
    target = cache_dir() / weights.filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights.url, str(target), progress=progress)
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise DownloadError(
                f"cannot download {weights.name} ({reason}); put the file at {target}, "
                f"or pass a local checkpoint with --weights PATH (or --weights random for an offline smoke run)"
            ) from None
    return target, verify_checksum(weights, target)


def verify_checksum(weights: Weights, path: Path, digest: str | None = None) -> str:
    """The sha256 of ``path`` (``digest`` if already known); WeightsError if it differs from the published one."""
    digest = digest or sha256_of(path)
    prefix = weights.published_sha256_prefix
    if prefix and not digest.startswith(prefix):
        raise DownloadError(
            f"{path}: checksum mismatch for {weights.name} (sha256 {digest[:12]}..., published {prefix}...); "
            f"delete the file and download it again"
        )
    return digest


def resolve(weights: str | os.PathLike | Weights | None, *, depth: int = 50) -> tuple[Weights, Path | None]:
    """The catalogue entry or local description of ``weights`` and the file to load (None for random)."""
    if weights is None or weights == RANDOM:
        return random_weights(depth), None
    if isinstance(weights, Weights):
        entry = weights
    elif str(weights) in CATALOGUE:
        entry = CATALOGUE[str(weights)]
    else:
        path = Path(weights)
        if not path.exists():
            if not path.suffix and os.sep not in str(weights):
                get_weights(str(weights))  # raises the "unknown weights" error with the known names
            raise WeightsError(f"{path}: no such checkpoint file")
        digest = sha256_of(path)
        known = catalogue_entry_of(path, digest)
        if known is not None:  # the catalogue's settings (its batch-norm eps), and its checksum checked
            return known.replace(file=str(path), sha256=verify_checksum(known, path, digest)), path
        framework = "detectron2" if path.suffix == ".pkl" else "torchvision"
        return local_weights(path, framework=framework).replace(sha256=digest), path
    if entry.file:
        path = Path(entry.file)
        digest = verify_checksum(entry, path)
    else:
        path, digest = fetch(entry)
    return entry.replace(file=str(path), sha256=digest), path


def warn_if_untrained(weights: Weights) -> None:
    if not weights.body_trained:
        return
    if not weights.fpn_trained:
        warnings.warn(
            f"{weights.name}: the checkpoint holds only the ResNet body; the FPN is randomly initialised "
            f"(untrained), and the output metadata says so",
            stacklevel=3,
        )
