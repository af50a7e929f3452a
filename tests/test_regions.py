"""Region features from the cache (FeatureReader.roi_align): parity with torchvision's MultiScaleRoIAlign and with
detectron2's ROIPooler rule, on stored maps and end to end; level assignment; the bottom and right edges."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from checkpoint_factory import save, save_detectron2_pickle, torchvision_detector
from PIL import Image
from test_extract import torchvision_reference
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import initLevelMapper

import fpnx
from fpnx.errors import StoreError, UsageError
from fpnx.preprocess import pad_image, padded_size, prepare_image
from fpnx.store import FeatureWriter, ImageRecord

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
PHOTOS = ["chelsea.png", "coffee.png"]  # 300x451 and 400x600: inputs 425x640 and 426x640, padded to 448x640
SIZES = {"min_size": 480, "max_size": 640}
POOLED = ["p2", "p3", "p4", "p5"]
STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
# In input pixels; sqrt(area) 59, 165, 320, 483 (levels 2, 3, 4, 5) and a tiny one, each over a stride inside
# the bottom and right edges (inputs are 425-427 x 640)
INTERIOR = [[10, 20, 60, 90], [100, 50, 260, 220], [200, 40, 520, 360], [5, 5, 600, 380], [300, 200, 303, 202]]


def edge_boxes(info: dict) -> list:
    """Boxes down to the image's bottom edge, thin enough for their last samples to fall in its last stride."""
    bottom = info["input_height"]
    return [[100, bottom - 10, 600, bottom], [50, bottom - 26, 620, bottom], [100, bottom - 200, 500, bottom]]


def per_box_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest over boxes of max|diff| / max|ref| within the box."""
    diff = (out - ref).flatten(1).abs().max(dim=1).values
    scale = ref.flatten(1).abs().max(dim=1).values.clamp_min(1e-12)
    return float((diff / scale).max())


def original_boxes(boxes_in_input: list, info: dict) -> np.ndarray:
    """Boxes given in input pixels, in the original image's pixels (what a user holds)."""
    boxes = np.array(boxes_in_input, np.float64)
    boxes[:, 0::2] *= info["width"] / info["input_width"]
    boxes[:, 1::2] *= info["height"] / info["input_height"]
    return boxes


def padded_maps(maps: dict, info: dict, names=("0", "1", "2", "3")) -> dict:
    """Stored maps zero-padded to the padded input's maps, as (1, C, H, W), under torchvision's names."""
    height, width = padded_size(info["input_height"], info["input_width"], 32)
    out = {}
    for name, level in zip(names, POOLED):
        array = torch.from_numpy(maps[level]).float()
        rows, cols = height // STRIDES[level] - array.shape[1], width // STRIDES[level] - array.shape[2]
        out[name] = F.pad(array, (0, cols, 0, rows))[None]
    return out


@pytest.fixture(scope="module")
def detector():
    return torchvision_detector("fasterrcnn", seed=5)


@pytest.fixture(scope="module")
def stores(detector, tmp_path_factory):
    folder = tmp_path_factory.mktemp("regions")
    tv = save(detector.state_dict(), folder / "tv.pth")
    d2 = save_detectron2_pickle(detector.state_dict(), folder / "d2.pkl")
    photos = folder / "photos"  # stored sources are then the names
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(SAMPLES / name, photos / name)
    for weights, out in ((tv, folder / "tv.h5"), (d2, folder / "d2.h5")):
        summary = fpnx.extract([photos], out, weights=weights, workers=0, device="cpu", **SIZES)
        assert summary.images_stored == len(PHOTOS)
    return {"torchvision": folder / "tv.h5", "detectron2": folder / "d2.h5", "d2_weights": d2}


def compare(reader, name: str, pool, network) -> tuple[float, float, float]:
    """fpnx's roi_align against ``pool`` (the framework's rule: (maps, boxes, info) -> features) on the stored
    maps zero-padded, and against ``pool`` on the network's own maps: relative errors on all boxes, on the
    interior ones and on those at the edge."""
    info = reader.info(name)
    boxes = original_boxes(INTERIOR + edge_boxes(info), info)
    ours = reader.roi_align(name, boxes)
    assert ours.shape == (len(boxes), 256, 7, 7) and ours.dtype == torch.float32
    on_stored = per_box_error(ours, pool(padded_maps(reader[name], info), boxes, info))
    reference = pool(network(name, info), boxes, info)
    interior = len(INTERIOR)
    return on_stored, per_box_error(ours[:interior], reference[:interior]), per_box_error(ours[interior:], reference[interior:])


def test_torchvision_parity(stores, detector):
    """As torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2) with torchvision's resize_boxes."""
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)

    def pool(maps, boxes, info):
        in_input = resize_boxes(torch.tensor(boxes, dtype=torch.float32), [info["height"], info["width"]],
                                [info["input_height"], info["input_width"]])
        return pooler(maps, [in_input], [(info["input_height"], info["input_width"])])

    def network(name, info):  # torchvision's transform and backbone on the image file
        features, size = torchvision_reference(detector, SAMPLES / name, **SIZES)
        assert tuple(size) == (info["input_height"], info["input_width"])
        return features

    with fpnx.open_features(stores["torchvision"]) as reader:
        assert reader.metadata["weights"]["framework"] == "torchvision"
        info = reader.info(0)
        in_input = resize_boxes(torch.tensor(original_boxes(INTERIOR, info), dtype=torch.float32),
                                [info["height"], info["width"]], [info["input_height"], info["input_width"]])
        assert initLevelMapper(2, 5)([in_input]).tolist() == [0, 1, 2, 3, 0], "the boxes span P2-P5"
        edges = []
        for name in PHOTOS:
            on_stored, interior, edge = compare(reader, name, pool, network)
            assert on_stored <= 1e-5 and interior <= 1e-3, (name, on_stored, interior)
            edges.append(edge)
    # in the last stride the network's maps go on over its padding, which fpnx does not store
    assert max(edges) > 1e-3, edges


def detectron2_pool(maps: dict, boxes: np.ndarray, info: dict) -> torch.Tensor:
    """detectron2's pooling as documented: ResizeTransform.apply_coords (x * new_w / w in float64),
    assign_boxes_to_levels (floor(4 + log2(sqrt(area) / 224 + 1e-8)), clamped to 2..5), ROIAlignV2 with the
    sampling ratio of its R-CNN configs (POOLER_SAMPLING_RATIO = 0: adaptive)."""
    scaled = boxes * np.array([info["input_width"] * 1.0 / info["width"], info["input_height"] * 1.0 / info["height"]] * 2)
    tensor = torch.as_tensor(scaled, dtype=torch.float32)
    area = (tensor[:, 2] - tensor[:, 0]) * (tensor[:, 3] - tensor[:, 1])
    level = torch.clamp(torch.floor(4 + torch.log2(torch.sqrt(area) / 224 + 1e-8)), 2, 5).long()
    out = torch.zeros(len(boxes), 256, 7, 7)
    for k in range(2, 6):
        chosen = (level == k).nonzero().flatten()
        rois = torch.cat([torch.zeros(len(chosen), 1), tensor[chosen]], dim=1)
        out[chosen] = roi_align(maps[str(k - 2)], rois, 7, spatial_scale=2.0**-k, sampling_ratio=0, aligned=True)
    return out


def test_detectron2_parity(stores):
    """As detectron2's ROIPooler(7, scales 1/4..1/32, 0, "ROIAlignV2"), against the network's own maps of the
    padded input (fpnx's network equals detectron2's, tests/test_models.py)."""
    model = fpnx.build_model(stores["d2_weights"])
    spec = model.preprocessing.replace(**SIZES)

    def network(name, info):
        with Image.open(SAMPLES / name) as image:
            prepared = prepare_image(np.asarray(image.convert("RGB")), spec)
        assert (prepared.input_height, prepared.input_width) == (info["input_height"], info["input_width"])
        height, width = padded_size(prepared.input_height, prepared.input_width, 32)
        with torch.no_grad():
            outputs = model(pad_image(prepared.tensor, height, width)[None])
        return {str(k): outputs[level] for k, level in enumerate(POOLED)}

    with fpnx.open_features(stores["detectron2"]) as reader:
        assert reader.metadata["weights"]["framework"] == "detectron2"
        edges = []
        for name in PHOTOS:
            on_stored, interior, edge = compare(reader, name, detectron2_pool, network)
            assert on_stored <= 1e-5 and interior <= 1e-3, (name, on_stored, interior)
            edges.append(edge)
    assert max(edges) > 1e-3, edges  # aligned=True: only the last half stride, at 427 rows for P2


def test_the_framework_decides(stores):
    """The same maps and boxes pooled by the other framework's rule give other features."""
    with fpnx.open_features(stores["torchvision"]) as reader:
        boxes = original_boxes(INTERIOR, reader.info(0))
        own = reader.roi_align(0, boxes)
        assert torch.equal(own, reader.roi_align(0, boxes, framework="torchvision"))
        assert not torch.allclose(own, reader.roi_align(0, boxes, framework="detectron2"))
        assert reader.roi_align(0, np.zeros((0, 4))).shape == (0, 256, 7, 7)
        assert reader.roi_align(0, boxes[:1], output_size=(3, 5), sampling_ratio=0).shape == (1, 256, 3, 5)
        # each framework samples as its own detectors do: torchvision 2 points per bin, detectron2 adaptively
        assert torch.equal(own, reader.roi_align(0, boxes, sampling_ratio=2))
        assert torch.equal(own, reader.roi_align(0, boxes, sampling_ratio=np.int64(2)))  # as positions take them
        theirs = reader.roi_align(0, boxes, framework="detectron2")
        assert torch.equal(theirs, reader.roi_align(0, boxes, framework="detectron2", sampling_ratio=0))
        assert not torch.allclose(theirs, reader.roi_align(0, boxes, framework="detectron2", sampling_ratio=2))
        assert reader.roi_align(0, boxes[:1], sampling_ratio=64).shape == (1, 256, 7, 7)  # the largest allowed
        for bad in (-1, 1.5, True, "2", 65, 10**9):
            with pytest.raises(UsageError, match="sampling_ratio must be an int from 0 .adaptive. to 64"):
                reader.roi_align(0, boxes, sampling_ratio=bad)


# -- level assignment and arguments, on small synthetic stores ---------------------------------------------------


def small_store(path: Path, levels: list[str], metadata: dict) -> Path:
    strides = {level: 2 ** int(level[1:]) for level in levels}
    with FeatureWriter(path, settings={}, metadata=metadata, levels=levels, channels=dict.fromkeys(levels, 2),
                       strides=strides) as writer:
        rng = np.random.default_rng(0)
        arrays = {level: rng.standard_normal((2, math.ceil(96 / s), math.ceil(128 / s))).astype("float32")
                  for level, s in strides.items()}
        writer.add(ImageRecord("a.jpg", 192, 256, 96, 128, 0.5), arrays)
        writer.finalize()
    return path


TV_METADATA = {"weights": {"framework": "torchvision"}, "preprocessing": {"resize": "torchvision", "size_divisibility": 32}}


def test_levels_follow_torchvision_to_the_last_bit(tmp_path):
    """Boxes whose sqrt(area) lies within a hair of 112, 224 and 448: torchvision's LevelMapper (eps 1e-6 after
    the log) and fpnx agree on every one; detectron2's rule (eps 1e-8 inside) puts some one level lower."""
    from fpnx.store.regions import RegionRule

    with fpnx.open_features(small_store(tmp_path / "f.h5", ["p2", "p3", "p4", "p5", "p6"], TV_METADATA)) as reader:
        torchvision_rule = RegionRule.of(reader.layout, reader.metadata, reader.path)
        detectron2_rule_ = RegionRule.of(reader.layout, reader.metadata, reader.path, "detectron2")
    sides = torch.tensor([size * (1 + step * 1e-7) for size in (112.0, 224.0, 448.0) for step in range(-40, 41)])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    expected = initLevelMapper(2, 5)([boxes])
    assert torch.equal(torchvision_rule.assign(boxes), expected)
    assert (detectron2_rule_.assign(boxes) <= expected).all() and (detectron2_rule_.assign(boxes) < expected).any()


def test_stored_levels_bound_the_assignment(tmp_path):
    from fpnx.store.regions import RegionRule

    path = small_store(tmp_path / "f.h5", ["p3", "p5", "p6"], TV_METADATA)
    with fpnx.open_features(path) as reader:
        rule = RegionRule.of(reader.layout, reader.metadata, reader.path)
        assert rule.levels == ("p3", "p5")
        sides = torch.tensor([10.0, 150.0, 300.0, 1000.0])  # want p2 (clamped to p3), p3, p4 (missing: p3), p5
        boxes = torch.stack([torch.zeros(4), torch.zeros(4), sides, sides], dim=1)
        assert rule.assign(boxes).tolist() == [0, 0, 0, 1]
        assert reader.roi_align(0, [[0, 0, 20, 20], [0, 0, 250, 180]]).shape == (2, 2, 7, 7)


def test_bad_arguments(tmp_path):
    path = small_store(tmp_path / "f.h5", ["p2", "p3"], TV_METADATA)
    with fpnx.open_features(path) as reader:
        for boxes, message in (([[0, 0, 1]], r"\(K, 4\)"), ([[5, 0, 1, 1]], "x1 <= x2"), ([[0, 0, np.nan, 1]], "finite")):
            with pytest.raises(UsageError, match=message):
                reader.roi_align(0, boxes)
        with pytest.raises(UsageError, match="output_size"):
            reader.roi_align(0, [[0, 0, 1, 1]], output_size=0)
        with pytest.raises(UsageError, match="framework must be one of"):
            reader.roi_align(0, [[0, 0, 1, 1]], framework="mmdet")
    with fpnx.open_features(small_store(tmp_path / "p6.h5", ["p6"], TV_METADATA)) as reader:
        with pytest.raises(UsageError, match="stores none of p2, p3, p4, p5"):
            reader.roi_align(0, [[0, 0, 1, 1]])
    with fpnx.open_features(small_store(tmp_path / "bare.h5", ["p2"], {})) as reader:
        with pytest.raises(StoreError, match=r"bare\.h5 does not record .*pass framework="):
            reader.roi_align(0, [[0, 0, 1, 1]])
        assert reader.roi_align(0, [[0, 0, 1, 1]], framework="detectron2").shape == (1, 2, 7, 7)
