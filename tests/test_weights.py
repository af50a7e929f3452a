"""The weights catalogue, downloading into the hub cache, checksums and the offline error."""

from __future__ import annotations

import hashlib
import shutil
import urllib.error

import pytest
import torch
from checkpoint_factory import save, torchvision_detector

import fpnx
from fpnx.models import weights as catalogue
from fpnx.errors import WeightsError


def test_every_entry_carries_its_preprocessing_and_network_settings():
    entries = {entry.name: entry for entry in fpnx.list_weights()}
    assert fpnx.DEFAULT_WEIGHTS == "fasterrcnn_resnet50_fpn.coco_v1" and fpnx.DEFAULT_WEIGHTS in entries
    for name in ("fasterrcnn_resnet50_fpn.coco_v1", "maskrcnn_resnet50_fpn.coco_v1", "keypointrcnn_resnet50_fpn.coco_v1"):
        entry = entries[name]
        assert entry.bn_eps == 0.0 and entry.fpn_trained and not entry.stride_in_1x1
        assert entry.preprocessing.pixel_order == "RGB" and entry.preprocessing.value_range == 1.0
        assert entry.published_sha256_prefix and entry.url.endswith(f"-{entry.published_sha256_prefix}.pth")
    for depth in (18, 34, 50, 101, 152):
        assert entries[f"resnet{depth}.imagenet1k_v1"].depth == depth
        assert not entries[f"resnet{depth}.imagenet1k_v1"].fpn_trained
    detectron2 = entries["detectron2.faster_rcnn_R_50_FPN_3x"]
    assert detectron2.stride_in_1x1 and detectron2.bn_eps == 1e-5
    assert detectron2.preprocessing.pixel_order == "BGR" and detectron2.preprocessing.value_range == 255.0
    assert detectron2.published_sha256_prefix is None  # detectron2 publishes no checksum
    with pytest.raises(WeightsError, match="unknown weights 'nope'"):
        fpnx.get_weights("nope")
    assert fpnx.get_weights("random") == entries["random"] and not entries["random"].trained


def test_offline_error_says_where_the_file_goes(monkeypatch):
    def offline(url, dst, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as error:
        fpnx.build_model(fpnx.DEFAULT_WEIGHTS)
    message = str(error.value)
    assert error.value.exit_code == 1  # the run could not complete; nothing on the command line was wrong
    expected = catalogue.cache_dir() / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    assert str(expected) in message and "--weights PATH" in message and "\n" not in message


def _entry_for(path, name="test.coco_v1"):
    prefix = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    base = fpnx.get_weights(fpnx.DEFAULT_WEIGHTS)
    return base.replace(name=name, url=f"https://example.invalid/models/test_coco-{prefix}.pth", bn_eps=1e-5)


def test_download_once_into_the_cache_then_verify(monkeypatch, tmp_path):
    detector = torchvision_detector("fasterrcnn", seed=2)
    published = save(detector.state_dict(), tmp_path / "published.pth")
    entry = _entry_for(published)
    calls = []

    def fake_download(url, dst, **kwargs):
        calls.append(url)
        shutil.copyfile(published, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    first = fpnx.build_model(entry)
    second = fpnx.build_model(entry)
    assert calls == [entry.url]  # downloaded once, then read from the cache
    assert first.weights.file == str(catalogue.cache_dir() / entry.filename)
    assert first.weights.sha256 == hashlib.sha256(published.read_bytes()).hexdigest()
    assert torch.equal(first.state_dict()["bottom_up.res3.0.conv2.weight"], second.state_dict()["bottom_up.res3.0.conv2.weight"])

    cached = catalogue.cache_dir() / entry.filename
    cached.write_bytes(cached.read_bytes()[:-10] + b"0123456789")  # corrupted in the cache
    with pytest.raises(WeightsError, match="checksum mismatch"):
        fpnx.build_model(entry)


def test_local_file_records_its_checksum(tmp_path):
    path = save(torchvision_detector("fasterrcnn", seed=4).state_dict(), tmp_path / "mine.pth")
    model = fpnx.build_model(path)
    assert model.weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.weights.framework == "torchvision" and model.weights.bn_eps == 1e-5
    assert model.weights.to_dict()["preprocessing"]["pixel_order"] == "RGB"
    with pytest.raises(WeightsError, match="no such checkpoint file"):
        fpnx.build_model(tmp_path / "missing.pth")


def test_a_local_copy_of_a_catalogue_file_gets_its_entry_and_its_checksum_check(monkeypatch, tmp_path):
    published = save(torchvision_detector("fasterrcnn", seed=5).state_dict(), tmp_path / "published.pth")
    entry = _entry_for(published).replace(bn_eps=0.0)  # the local default would be 1e-5
    monkeypatch.setitem(catalogue.CATALOGUE, entry.name, entry)
    for path in (tmp_path / entry.filename, tmp_path / "renamed.pth"):  # by its published name, by its checksum
        shutil.copyfile(published, path)
        weights = fpnx.build_model(path).weights
        assert (weights.name, weights.bn_eps, weights.file) == (entry.name, 0.0, str(path))
        assert weights.sha256 == hashlib.sha256(published.read_bytes()).hexdigest()
    # a file under the name of the default weights that is not that file
    impostor = shutil.copyfile(published, tmp_path / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth")
    with pytest.raises(WeightsError, match="checksum mismatch for fasterrcnn_resnet50_fpn.coco_v1"):
        fpnx.build_model(impostor)
