"""Parity of fpnx's from-scratch ResNet + FPN with torchvision on the same weights and inputs.

Tolerance: max|diff| <= 1e-4 * max|ref| per output level, in fp32.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from checkpoint_factory import (
    save,
    save_detectron2_pickle,
    torchvision_detector,
    torchvision_resnet,
)

import fpnx
from fpnx.errors import UsageError, WeightsError

TOLERANCE = 1e-4
SIZES = [(64, 64), (97, 131), (120, 75), (33, 200), (1, 1)]
TV_NAMES = {"p2": "0", "p3": "1", "p4": "2", "p5": "3", "p6": "pool"}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def assert_pyramid_equal(model, tv_backbone, sizes=SIZES, tolerance=TOLERANCE):
    generator = torch.Generator().manual_seed(1)
    for height, width in sizes:
        x = torch.randn(2, 3, height, width, generator=generator)
        with torch.no_grad():
            ref = tv_backbone(x)
            out = model(x)
        assert list(out) == list(TV_NAMES)
        for level, tv_name in TV_NAMES.items():
            assert out[level].shape == ref[tv_name].shape, (level, height, width)
            error = relative_error(out[level], ref[tv_name])
            assert error <= tolerance, f"{level} at {height}x{width}: relative error {error:.2e}"


@pytest.fixture(scope="module")
def faster_rcnn():
    return torchvision_detector("fasterrcnn")


def test_faster_rcnn_state_dict_parity(faster_rcnn, tmp_path):
    path = save(faster_rcnn.state_dict(), tmp_path / "fasterrcnn.pth")
    model = fpnx.build_model(path)
    assert model.weights.extras["layout"] == "torchvision-detector"
    assert model.weights.trained and model.weights.bn_eps == 1e-5
    assert_pyramid_equal(model, faster_rcnn.backbone)


def test_folded_norms_keep_parity(faster_rcnn, tmp_path):
    path = save(faster_rcnn.state_dict(), tmp_path / "fasterrcnn.pth")
    model = fpnx.build_model(path, fold_norm=True)
    assert not any(isinstance(m, fpnx.models.FrozenBatchNorm2d) for m in model.modules())
    assert_pyramid_equal(model, faster_rcnn.backbone, sizes=[(97, 131)])


@pytest.mark.parametrize("kind", ["maskrcnn", "keypointrcnn"])
def test_other_detectors_parity(kind, tmp_path):
    detector = torchvision_detector(kind, seed=3)
    model = fpnx.build_model(save(detector.state_dict(), tmp_path / f"{kind}.pth"))
    assert_pyramid_equal(model, detector.backbone, sizes=[(97, 131)])


def test_backbone_only_state_dict(faster_rcnn, tmp_path):
    model = fpnx.build_model(save(faster_rcnn.backbone.state_dict(), tmp_path / "backbone.pt"))
    assert model.weights.extras["layout"] == "torchvision-backbone"
    assert_pyramid_equal(model, faster_rcnn.backbone, sizes=[(97, 131)])


def test_old_fpn_key_names(faster_rcnn, tmp_path):
    old = {k.replace(".0.weight", ".weight").replace(".0.bias", ".bias") if ".fpn." in k else k: v
           for k, v in faster_rcnn.state_dict().items()}
    assert "backbone.fpn.inner_blocks.0.weight" in old
    model = fpnx.build_model(save(old, tmp_path / "old.pth"))
    assert_pyramid_equal(model, faster_rcnn.backbone, sizes=[(97, 131)])


def test_eps_zero_matters_and_matches(tmp_path):
    # small running variances make eps 1e-5 vs 0 a visible difference
    detector = torchvision_detector("fasterrcnn", seed=5, var_range=(1e-4, 1e-3))
    for module in detector.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 0.0
    path = save(detector.state_dict(), tmp_path / "eps0.pth")
    model = fpnx.build_model(path, bn_eps=0.0)
    assert model.weights.bn_eps == 0.0
    assert_pyramid_equal(model, detector.backbone, sizes=[(64, 96)])
    wrong = fpnx.build_model(path)  # local files default to eps 1e-5
    with pytest.raises(AssertionError):
        assert_pyramid_equal(wrong, detector.backbone, sizes=[(64, 96)])


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_resnet_bodies_match_torchvision(depth, tmp_path):
    reference = torchvision_resnet(depth, seed=depth)
    with pytest.warns(UserWarning, match="FPN is randomly initialised"):
        model = fpnx.build_model(save(reference.state_dict(), tmp_path / f"r{depth}.pth"))
    assert model.weights.depth == depth and not model.weights.fpn_trained
    x = torch.randn(1, 3, 67, 93, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model.bottom_up(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for index, name in enumerate(["res2", "res3", "res4", "res5"], start=1):
            y = getattr(reference, f"layer{index}")(y)
            assert relative_error(outputs[name], y) <= TOLERANCE, (depth, name)
    shapes = model.bottom_up.output_shape()
    assert [shapes[n].stride for n in shapes] == [4, 8, 16, 32]
    expansion = 1 if depth < 50 else 4
    assert [shapes[n].channels for n in shapes] == [64 * expansion * 2**i for i in range(4)]


def test_depth_mismatch_is_an_error(faster_rcnn, tmp_path):
    with pytest.raises(WeightsError, match="ResNet-50, not a ResNet-101"):
        fpnx.build_model(save(faster_rcnn.state_dict(), tmp_path / "f.pth"), depth=101)
    with pytest.raises(UsageError):
        fpnx.build_model(None, depth=42)


def test_detectron2_pickle_layout_and_stride_in_1x1(faster_rcnn, tmp_path):
    path = save_detectron2_pickle(faster_rcnn.state_dict(), tmp_path / "model_final.pkl")
    model = fpnx.build_model(path)
    weights = model.weights
    # what differs from torchvision, pinned
    assert weights.extras["layout"] == "detectron2" and weights.framework == "detectron2"
    assert weights.stride_in_1x1 and weights.bn_eps == 1e-5
    prep = model.preprocessing
    assert (prep.pixel_order, prep.value_range, prep.resize) == ("BGR", 255.0, "detectron2")
    assert prep.mean == (103.530, 116.280, 123.675) and prep.std == (1.0, 1.0, 1.0)
    block = model.bottom_up.res3[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)

    # Same tensors with the stride moved back equal torchvision: the key mapping is exact.
    assert_pyramid_equal(fpnx.build_model(path, stride_in_1x1=False), faster_rcnn.backbone, sizes=[(97, 131)])
    # With the stride in the 1x1 conv, fpnx equals torchvision's network with its strides moved the same way.
    for layer in (faster_rcnn.backbone.body.layer2, faster_rcnn.backbone.body.layer3, faster_rcnn.backbone.body.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    try:
        assert_pyramid_equal(model, faster_rcnn.backbone, sizes=[(64, 64), (97, 131)])
    finally:
        for layer in (faster_rcnn.backbone.body.layer2, faster_rcnn.backbone.body.layer3, faster_rcnn.backbone.body.layer4):
            layer[0].conv1.stride, layer[0].conv2.stride = (1, 1), (2, 2)


def test_safetensors_checkpoint(faster_rcnn, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in faster_rcnn.state_dict().items()}, str(path))
    assert_pyramid_equal(fpnx.build_model(path), faster_rcnn.backbone, sizes=[(64, 64)])


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_hostile_pickle_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": _Exploit(marker)}}))
    with pytest.raises(WeightsError, match=r"refused.*os\.system|refused.*posix\.system"):
        fpnx.build_model(path)
    assert not marker.exists()


def test_hostile_torch_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": _Exploit(marker)}, path)
    with pytest.raises(WeightsError, match="evil.pth"):
        fpnx.build_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_truncated_checkpoint(faster_rcnn, tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    if suffix == ".pkl":
        save_detectron2_pickle(faster_rcnn.state_dict(), full)
    else:
        save(faster_rcnn.state_dict(), full)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        fpnx.build_model(cut)


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    for name, data in (("notes.pth", b"hello\n"), ("features.h5", b"\x89HDF\r\n\x1a\n" + bytes(64))):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(WeightsError, match=f"{name}: not a checkpoint .torch.save writes a zip or pickle file"):
            fpnx.build_model(path)


def test_a_whole_pickled_model_says_to_save_its_state_dict(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(torch.nn.Conv2d(3, 4, 1), path)  # the model object, not its state_dict: loading it runs code
    with pytest.raises(WeightsError) as caught:
        fpnx.build_model(path)
    assert str(caught.value) == (
        f"{path}: refused to load checkpoint: it holds a pickled torch.nn.modules.conv.Conv2d object, not only "
        "tensors, and loading it would run code; save its state_dict() instead (torch.save(model.state_dict(), path))"
    )


def test_missing_and_unexpected_keys_are_named(faster_rcnn, tmp_path):
    state = dict(faster_rcnn.state_dict())
    del state["backbone.body.layer3.2.conv2.weight"]
    with pytest.raises(WeightsError, match=r"res4\.2\.conv2\.weight"):
        fpnx.build_model(save(state, tmp_path / "missing.pth"))
    state = dict(faster_rcnn.state_dict())
    state["backbone.body.layer9.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"res10\.0\.conv1"):
        fpnx.build_model(save(state, tmp_path / "extra.pth"))


def test_random_weights_are_seeded_and_untrained():
    first, second = fpnx.build_model("random"), fpnx.build_model(None)
    assert not first.weights.trained and first.weights.name == "random"
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    other = fpnx.build_model("random", seed=1)
    assert not torch.equal(other.state_dict()["bottom_up.stem.conv1.weight"], first.state_dict()["bottom_up.stem.conv1.weight"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = first(x)
    assert all(torch.isfinite(v).all() and v.abs().max() > 0 for v in out.values())


def test_output_shape_without_running():
    model = fpnx.build_model("random", depth=18)
    shapes = model.output_shape()
    assert [(s.name, s.channels, s.stride) for s in shapes.values()] == [
        ("p2", 256, 4), ("p3", 256, 8), ("p4", 256, 16), ("p5", 256, 32), ("p6", 256, 64)
    ]
    assert shapes["p3"].spatial_size(97, 131) == (13, 17)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 97, 131))
    assert {k: tuple(v.shape[-2:]) for k, v in out.items()} == {
        k: s.spatial_size(97, 131) for k, s in shapes.items()
    }


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_is_close_and_never_overflows(precision):
    from fpnx.models import forward

    model = fpnx.build_model("random")
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    reference = forward(model, x, "fp32").outputs
    result = forward(model, x, precision)
    assert not result.fell_back_to_fp32
    for level, ref in reference.items():
        assert relative_error(result.outputs[level].float(), ref) < 0.1, level

    with torch.no_grad():  # activations beyond fp16's 65504: fp32 stays finite
        model.bottom_up.stem.conv1.weight.mul_(1e6)
    reference = forward(model, x, "fp32").outputs
    assert all(torch.isfinite(v).all() for v in reference.values())
    assert max(v.abs().max().item() for v in reference.values()) > 65504
    result = forward(model, x, precision)
    assert all(torch.isfinite(v).all() for v in result.outputs.values())
    if precision == "fp16":
        assert result.fell_back_to_fp32
        for level, ref in reference.items():
            assert relative_error(result.outputs[level], ref) <= TOLERANCE


def test_random_weights_leave_the_callers_random_state_alone():
    # seeding the weights must not reset the global generator: callers seeded differently stay different
    draws = []
    for caller_seed in (123, 456):
        torch.manual_seed(caller_seed)
        fpnx.build_model("random", depth=18, seed=7)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1])


def test_float16_storage_clamps_what_it_cannot_hold_and_counts_it():
    from fpnx.models import valid_regions
    from fpnx.models.inference import FLOAT16_MAX

    strides = {"p2": 4, "p3": 8}
    for layout in (torch.contiguous_format, torch.channels_last):  # the crops of each take their own path
        outputs = {"p2": torch.zeros(2, 4, 8, 8), "p3": torch.ones(2, 4, 4, 4)}
        outputs["p2"][1, 0, 0, 0] = 1e6
        outputs["p2"][1, 1, 1, 1] = -float("inf")
        outputs["p2"][1, 2, 2, 2] = float("nan")
        outputs["p2"][1, 3, 7, 7] = 1e9  # outside the crop below: neither stored nor counted
        outputs = {name: tensor.contiguous(memory_format=layout) for name, tensor in outputs.items()}
        crops, clamped = valid_regions(outputs, 1, (20, 24), strides, torch.float16)
        p2 = crops["p2"]
        assert p2.shape == (4, 5, 6) and p2.dtype == torch.float16 and p2.is_contiguous()
        assert p2[0, 0, 0] == FLOAT16_MAX and p2[1, 1, 1] == -FLOAT16_MAX and torch.isnan(p2[2, 2, 2])
        assert int(clamped) == 2
        assert torch.equal(crops["p3"], torch.ones(4, 3, 3, dtype=torch.float16))
        nan_only = {"p2": torch.zeros(1, 4, 8, 8)}
        nan_only["p2"][0, 1, 2, 3] = float("nan")  # NaN alone also takes the pass, and stays NaN, uncounted
        crops, clamped = valid_regions(nan_only, 0, (32, 32), {"p2": 4}, torch.float16)
        assert torch.isnan(crops["p2"][1, 2, 3]) and int(clamped) == 0
    crops, clamped = valid_regions(outputs, 1, (20, 24), strides, torch.float32)
    assert crops["p2"][0, 0, 0] == 1e6 and int(clamped) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("direct_crop", ["one copy", "in passes"])
def test_channels_last_outputs_give_the_same_crops_overflows_and_vectors(dtype, direct_crop, monkeypatch):
    """The model gives channels_last maps on the CPU, which crops and per-channel reductions read in their own order
    (small crops in one copy, larger ones cast in passes: both ways here)."""
    from fpnx.models import inference, pooled_vectors, valid_regions

    if direct_crop == "in passes":
        monkeypatch.setattr(inference, "DIRECT_CROP", 0)

    torch.manual_seed(0)
    planar = {"p2": torch.randn(2, 8, 12, 17), "p3": torch.randn(2, 8, 6, 9), "p6": torch.randn(2, 8, 1, 2)}
    planar["p3"][1, 2, 3, 4] = 7e4
    stored_last = {name: tensor.contiguous(memory_format=torch.channels_last) for name, tensor in planar.items()}
    strides = {"p2": 4, "p3": 8, "p6": 64}
    for index, size in ((0, (48, 68)), (1, (45, 61)), (1, (1, 1))):
        expected, expected_clamped = valid_regions(planar, index, size, strides, dtype)
        crops, clamped = valid_regions(stored_last, index, size, strides, dtype)
        assert int(clamped) == int(expected_clamped)
        for name, crop in crops.items():
            assert crop.dtype == dtype and torch.equal(crop, expected[name]), name
            assert crop.is_contiguous() or dtype == torch.float32  # the same dtype may stay a view
        for how in ("avg", "max"):
            vectors = pooled_vectors(stored_last, index, size, strides, how)
            reference = pooled_vectors(planar, index, size, strides, how)
            for name, vector in vectors.items():
                assert vector.dtype == torch.float32 and vector.shape == (8,)
                assert torch.allclose(vector, reference[name], rtol=1e-6, atol=1e-7), (name, how)
                assert how == "avg" or torch.equal(vector, reference[name])


def test_large_crops_transposed_in_pieces_and_on_two_threads_give_the_same_values():
    """A large channels-last map is cast and transposed piece by piece, its second half on a helper thread where
    there are two cores: the same crop as from the channels-first map, a piece's remainder included."""
    from fpnx.models import valid_regions
    from fpnx.models.inference import TRANSPOSE_PIECE, TRANSPOSE_SPLIT

    torch.manual_seed(0)
    planar = {"p2": torch.randn(2, 64, 140, 150)}
    stored_last = {"p2": planar["p2"].contiguous(memory_format=torch.channels_last)}
    size = (4 * 137, 4 * 149)  # 137 x 149 values per channel: more than the split, not whole pieces
    assert 137 * 149 * 64 > TRANSPOSE_SPLIT and (137 * 149) % TRANSPOSE_PIECE
    expected = [valid_regions(planar, index, size, {"p2": 4}, torch.float16)[0]["p2"] for index in (0, 1)]
    for index in (0, 1):
        crops, _ = valid_regions(stored_last, index, size, {"p2": 4}, torch.float16)
        assert crops["p2"].is_contiguous() and torch.equal(crops["p2"], expected[index])
    if hasattr(os, "fork"):  # a forked child (a DataLoader worker, say) gets a helper of its own, not a hang
        child = os.fork()
        if child == 0:  # one thread, as DataLoader workers set it: PyTorch's own thread pool does not survive a fork
            try:
                torch.set_num_threads(1)
                crops, _ = valid_regions(stored_last, 0, size, {"p2": 4}, torch.float16)
                os._exit(0 if torch.equal(crops["p2"], expected[0]) else 1)
            finally:
                os._exit(2)  # never back into pytest
        deadline = time.monotonic() + 30
        while (waited := os.waitpid(child, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        if waited == (0, 0):
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        assert waited[0] == child and os.waitstatus_to_exitcode(waited[1]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_all_finite_finds_any_nan_or_inf(dtype, layout):
    from fpnx.models.inference import all_finite

    outputs = {"p2": torch.randn(2, 8, 12, 17), "p6": torch.randn(2, 8, 1, 2)}
    outputs = {name: tensor.to(dtype).contiguous(memory_format=layout) for name, tensor in outputs.items()}
    assert bool(all_finite(outputs))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for name, where in (("p2", (1, 7, 11, 16)), ("p6", (0, 0, 0, 0))):
            spoiled = {key: tensor.clone() for key, tensor in outputs.items()}
            spoiled[name][where] = bad
            assert not bool(all_finite(spoiled)), (bad, name)


def test_fp32_keeps_cuda_tf32_off_and_tf32_turns_it_on():
    """PyTorch lets cuDNN use TF32 for fp32 convolutions by default (about 1e-3 off): fpnx's fp32 is IEEE fp32."""
    from fpnx.models import autocast

    flags = [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]
    if all(hasattr(flag, "fp32_precision") for flag in flags):  # PyTorch's flags, set and read as fpnx does
        def state():
            return [flag.fp32_precision for flag in flags]
        off, on = ["ieee"] * 3, ["tf32"] * 3
    else:  # an older PyTorch: only the allow_tf32 flags
        def state():
            return [torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32]
        off, on = [False] * 2, [True] * 2
    saved = state()
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # PyTorch's cuDNN default
        before = state()
        with autocast("cuda", "fp32"):
            assert state() == off
        assert state() == before
        with autocast("cuda", "tf32"):
            assert state() == on
        assert state() == before
    finally:
        for flag, value in zip(flags, saved):
            if isinstance(value, str):
                flag.fp32_precision = value
        if not isinstance(saved[0], str):
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_tf32_switch_after_pytorchs_newer_tf32_flags_were_used():
    """Once a program sets PyTorch's fp32_precision flags (set_float32_matmul_precision does), reading the older
    allow_tf32 flags raises: fpnx's switch must work then too, and leave every flag as it found it."""
    from fpnx.models import autocast

    flags = [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]
    if not all(hasattr(flag, "fp32_precision") for flag in flags):
        pytest.skip("this PyTorch has no fp32_precision flags")
    saved, matmul_precision = [flag.fp32_precision for flag in flags], torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        before = [flag.fp32_precision for flag in flags]
        for precision, inside in (("fp32", "ieee"), ("tf32", "tf32")):
            with autocast("cuda", precision):
                assert [flag.fp32_precision for flag in flags] == [inside] * 3
            assert [flag.fp32_precision for flag in flags] == before
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
        for flag, value in zip(flags, saved):
            flag.fp32_precision = value


@pytest.mark.parametrize("eps", [-1e-5, float("nan")])
def test_build_model_refuses_a_negative_or_nan_bn_eps(eps):
    from fpnx.errors import UsageError

    with pytest.raises(UsageError, match="bn_eps must be 0 or more"):
        fpnx.build_model("random", bn_eps=eps)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_build_model_on_a_missing_device_says_so_in_one_line():
    from fpnx.errors import UsageError

    with pytest.raises(UsageError, match="device cuda: CUDA is not available on this machine"):
        fpnx.build_model("random", device="cuda")
