"""fpnx.preprocess: resizing, normalising and padding like torchvision and detectron2."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.transforms.functional import to_tensor

from fpnx.preprocess import (
    DETECTRON2,
    PIXEL_ORDERS,
    TORCHVISION,
    Preprocessing,
    finish_on_device,
    pad_image,
    padded_size,
    prepare_image,
    resized_size,
)


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def torchvision_transform(spec: Preprocessing) -> GeneralizedRCNNTransform:
    return GeneralizedRCNNTransform(
        spec.min_size, spec.max_size, list(spec.mean), list(spec.std), size_divisible=spec.size_divisibility
    ).eval()


def fpnx_batch(rgb: np.ndarray, spec: Preprocessing) -> tuple[torch.Tensor, tuple[int, int]]:
    """prepare_image + padding, as one image of a batch."""
    prepared = prepare_image(rgb, spec)
    height, width = prepared.tensor.shape[1:]
    return pad_image(prepared.tensor, *padded_size(height, width, spec.size_divisibility)), (height, width)


# ---------------------------------------------------------------------------------------------------------
# (a) the torchvision rule is GeneralizedRCNNTransform


SMALL = TORCHVISION.replace(min_size=128, max_size=224)


@pytest.mark.parametrize(
    ("height", "width", "spec"),
    [
        (97, 131, SMALL),
        (120, 160, SMALL),
        (131, 97, SMALL),
        (64, 250, SMALL),
        (10, 2000, SMALL),  # the long side decides; the short one floors to 1
        (128, 160, SMALL),  # already the right size: no resize at all
        (72, 96, TORCHVISION),  # the default 800/1333 upsamples a small image
    ],
)
def test_matches_generalized_rcnn_transform(height: int, width: int, spec: Preprocessing) -> None:
    rgb = random_rgb(height, width, seed=height * width)
    reference = torchvision_transform(spec)([to_tensor(Image.fromarray(rgb))])[0]
    batch, size = fpnx_batch(rgb, spec)

    assert size == tuple(reference.image_sizes[0])
    assert resized_size(height, width, spec)[:2] == tuple(reference.image_sizes[0])
    assert batch.shape == reference.tensors.shape[1:]  # the padded shape
    assert batch.dtype == torch.float32
    assert torch.get_num_threads() > 1  # torchvision's usual setting (conftest), where fpnx equals it bit for bit
    assert torch.equal(batch, reference.tensors[0])  # padding included


@pytest.mark.parametrize("spec", [SMALL, SMALL.replace(pixel_order="BGR", value_range=255.0)], ids=["rgb", "bgr"])
@pytest.mark.parametrize(("height", "width"), [(97, 131), (480, 640), (300, 20), (37, 45)])  # up, down, thin, tiny
def test_resize_is_bitwise_torchvisions_on_any_number_of_threads(height, width, spec) -> None:
    """The CPU's normalise + resize equals, bit for bit, the same operations on the channels-first tensor
    GeneralizedRCNNTransform builds, as PyTorch runs them on several threads; and gives the same bits on 1-3."""
    rgb = random_rgb(height, width, seed=height + width)
    channels = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0 / spec.value_range)
    if spec.pixel_order == "BGR":
        channels = channels.flip(0).contiguous()
    mean, std = (torch.tensor(values)[:, None, None] for values in (spec.mean, spec.std))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        size = resized_size(height, width, spec)[:2]
        expected = F.interpolate(((channels - mean) / std)[None], size=size, mode="bilinear", align_corners=False)[0]
        prepared = {}
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            prepared[count] = prepare_image(rgb, spec).tensor
    finally:
        torch.set_num_threads(threads)
    for tensor in prepared.values():
        assert torch.equal(tensor, expected)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (1, 37), (23, 1), (97, 131)])
@pytest.mark.parametrize("pixel_order", PIXEL_ORDERS)
def test_normalising_channels_last_rows_is_bitwise_the_per_channel_broadcast(height, width, pixel_order) -> None:
    """The CPU normalises channels-last memory row by row (mean and std repeated along each row): the same
    subtraction and division of every value as a (3, 1, 1) broadcast over the channels-first image."""
    spec = no_resize(pixel_order=pixel_order, value_range=255.0, mean=(103.53, 116.28, 123.675), std=(57.4, 57.1, 58.4))
    rgb = random_rgb(height, width, seed=height * 1000 + width)
    normalised = finish_on_device(torch.from_numpy(rgb), spec, (height, width))
    channels = torch.from_numpy(rgb).permute(2, 0, 1).float()
    if pixel_order == "BGR":
        channels = channels.flip(0)
    mean, std = (torch.tensor(values)[:, None, None] for values in (spec.mean, spec.std))
    assert torch.equal(normalised, (channels - mean) / std)


def test_thin_strip_keeps_one_row_where_torchvision_fails() -> None:
    # The one deliberate difference: torchvision floors 1 * (224 / 300) to 0 rows and F.interpolate refuses.
    rgb = random_rgb(1, 300)
    transform = torchvision_transform(SMALL)
    with pytest.raises(RuntimeError, match="greater than 0"):
        transform([to_tensor(Image.fromarray(rgb))])
    assert resized_size(1, 300, SMALL) == (1, 224, 224 / 300)

    prepared = prepare_image(rgb, SMALL)
    # torchvision's own steps, with the one row it should have kept
    expected = F.interpolate(
        transform.normalize(to_tensor(Image.fromarray(rgb)))[None], size=(1, 224), mode="bilinear", align_corners=False
    )[0]
    assert prepared.tensor.shape == (3, 1, 224)
    assert (prepared.tensor - expected).abs().max().item() <= 1e-6


def test_torchvision_scale_is_the_interpolate_scale_factor() -> None:
    assert resized_size(97, 131, SMALL) == (128, 172, 128 / 97)
    assert resized_size(64, 250, SMALL) == (57, 224, 224 / 250)
    prepared = prepare_image(random_rgb(97, 131), SMALL)
    assert (prepared.input_height, prepared.input_width, prepared.scale) == (128, 172, 128 / 97)


def test_size_unchanged_means_no_resize_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    real_interpolate, real_resize = F.interpolate, Image.Image.resize

    def counting_interpolate(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append("interpolate")
        return real_interpolate(*args, **kwargs)  # type: ignore[arg-type]

    def counting_resize(self: Image.Image, *args: object, **kwargs: object) -> Image.Image:
        calls.append("resize")
        return real_resize(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "interpolate", counting_interpolate)
    monkeypatch.setattr(Image.Image, "resize", counting_resize)
    prepare_image(random_rgb(128, 160), SMALL)
    prepare_image(random_rgb(128, 160), DETECTRON2.replace(min_size=128, max_size=224))
    assert calls == []
    prepare_image(random_rgb(120, 160), SMALL)
    prepare_image(random_rgb(120, 160), DETECTRON2.replace(min_size=128, max_size=224))
    assert calls == ["interpolate", "resize"]


# ---------------------------------------------------------------------------------------------------------
# (b) the detectron2 rule


@pytest.mark.parametrize(
    ("height", "width", "min_size", "max_size", "expected"),
    [
        (480, 640, 800, 1333, (800, 1067)),  # 640 * 800 / 480 = 1066.67
        (100, 101, 50, 1000, (50, 51)),  # 50.5 rounds half up (Python's round() would give 50)
        (101, 100, 50, 1000, (51, 50)),  # the same when the height is the long side
        (131, 97, 128, 1333, (173, 128)),  # 131 * 128 / 97 = 172.87
        (100, 400, 128, 224, (56, 224)),  # capped: 512 > 224, so both sides * 224 / 512
        (10, 2000, 128, 224, (1, 224)),  # capped: 128 * 224 / 25600 = 1.12
        (64, 64, 128, 224, (128, 128)),
        (1, 5000, 8, 16, (1, 16)),  # 0.0032 would round to 0; no side goes below 1
    ],
)
def test_detectron2_sizes(height: int, width: int, min_size: int, max_size: int, expected: tuple[int, int]) -> None:
    spec = DETECTRON2.replace(min_size=min_size, max_size=max_size)
    assert resized_size(height, width, spec)[:2] == expected


def test_detectron2_scale_is_the_effective_factor() -> None:
    spec = DETECTRON2.replace(min_size=128, max_size=224)
    assert resized_size(100, 400, spec)[2] == pytest.approx(128 / 100 * 224 / 512)  # 0.56
    assert resized_size(97, 131, spec)[2] == pytest.approx(128 / 97)


@pytest.mark.parametrize(("height", "width"), [(97, 131), (160, 120), (100, 400), (128, 128)])
def test_detectron2_pixels(height: int, width: int) -> None:
    spec = DETECTRON2.replace(min_size=128, max_size=224)
    rgb = random_rgb(height, width, seed=7)
    new_height, new_width, _ = resized_size(height, width, spec)
    # computed independently: PIL bilinear on uint8, then BGR, then minus the caffe mean
    resized = np.asarray(Image.fromarray(rgb).resize((new_width, new_height), Image.Resampling.BILINEAR))
    bgr = resized[:, :, ::-1].astype(np.float32)
    expected = (bgr - np.array([103.530, 116.280, 123.675], dtype=np.float32)).transpose(2, 0, 1)

    prepared = prepare_image(rgb, spec)
    assert prepared.tensor.shape == (3, new_height, new_width)
    assert np.abs(prepared.tensor.numpy() - expected).max() <= 1e-6


# ---------------------------------------------------------------------------------------------------------
# (c) channel order and value range


FLAT = np.broadcast_to(np.array([10, 20, 30], dtype=np.uint8), (64, 96, 3))  # R=10, G=20, B=30


def no_resize(**fields: object) -> Preprocessing:
    base = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "resize": "torchvision", "min_size": 64, "max_size": 1000}
    return Preprocessing(**{**base, **fields})  # type: ignore[arg-type]


def first_pixel(spec: Preprocessing) -> list[float]:
    return prepare_image(np.ascontiguousarray(FLAT), spec).tensor[:, 0, 0].tolist()


def test_bgr_reverses_the_channels() -> None:
    assert first_pixel(no_resize(pixel_order="RGB", value_range=255.0)) == [10.0, 20.0, 30.0]
    assert first_pixel(no_resize(pixel_order="BGR", value_range=255.0)) == [30.0, 20.0, 10.0]
    # mean and std are per network channel, so in BGR order for BGR weights
    assert first_pixel(no_resize(pixel_order="BGR", value_range=255.0, mean=(1, 2, 3), std=(1, 2, 4))) == [
        29.0,
        9.0,
        1.75,
    ]


def test_value_range() -> None:
    as_fraction = first_pixel(no_resize(pixel_order="RGB", value_range=1.0))
    expected = torch.tensor([10.0, 20.0, 30.0]).div(255.0).tolist()  # to_tensor's division
    assert as_fraction == expected
    assert first_pixel(no_resize(pixel_order="RGB", value_range=255.0)) == [10.0, 20.0, 30.0]
    detectron2_rgb_fraction = no_resize(pixel_order="RGB", value_range=1.0, resize="detectron2")
    assert first_pixel(detectron2_rgb_fraction) == expected


def test_detectron2_default_is_bgr_0_255_minus_caffe_mean() -> None:
    spec = DETECTRON2.replace(min_size=64, max_size=1000)
    assert first_pixel(spec) == pytest.approx([30 - 103.530, 20 - 116.280, 10 - 123.675])


def test_odd_inputs_are_accepted_quietly_and_left_alone() -> None:
    rgb = random_rgb(97, 131)
    read_only = np.asarray(Image.fromarray(rgb))
    assert not read_only.flags.writeable
    mirrored_view = rgb[:, ::-1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for spec in (SMALL, DETECTRON2.replace(min_size=128, max_size=224)):
            assert torch.equal(prepare_image(read_only, spec).tensor, prepare_image(rgb, spec).tensor)
            expected = prepare_image(np.ascontiguousarray(mirrored_view), spec).tensor
            assert torch.equal(prepare_image(mirrored_view, spec).tensor, expected)
    assert np.array_equal(read_only, rgb)
    assert torch.is_grad_enabled()  # no global state left behind
    assert not prepare_image(rgb, SMALL).tensor.requires_grad
    with pytest.raises(ValueError, match="uint8"):
        prepare_image(rgb.astype(np.float32), SMALL)


# ---------------------------------------------------------------------------------------------------------
# (d) padding


def test_padded_size() -> None:
    assert padded_size(128, 172, 32) == (128, 192)
    assert padded_size(1, 1, 32) == (32, 32)
    assert padded_size(64, 65, 32) == (64, 96)
    assert padded_size(57, 224, 1) == (57, 224)
    assert padded_size(57, 224, 0) == (57, 224)  # detectron2's "no constraint"
    with pytest.raises(ValueError):
        padded_size(57, 224, -32)


def test_pad_image_adds_zeros_at_bottom_and_right() -> None:
    tensor = torch.arange(1, 3 * 5 * 7 + 1, dtype=torch.float32).reshape(3, 5, 7)
    padded = pad_image(tensor, 32, 64)
    assert padded.shape == (3, 32, 64)
    assert torch.equal(padded[:, :5, :7], tensor)
    assert padded[:, 5:, :].abs().sum() == 0 and padded[:, :, 7:].abs().sum() == 0
    assert pad_image(tensor, 5, 7) is tensor
    with pytest.raises(ValueError):
        pad_image(tensor, 4, 64)
