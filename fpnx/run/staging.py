"""Moving pixels to the model's device and features back, with as few copies as possible.

- :class:`HostStage` (the CPU runs the model): workers already resized and normalised each image into a
  shared-memory slot, zero-padded; a batch of one runs straight from its slot, larger batches are stacked once.
  Features come back as numpy views of the cropped, cast tensors.
- :class:`CudaStage` (a GPU runs it): workers only decode; the uint8 pixels are copied once into a reused pinned
  buffer and sent on an upload stream, then scaled, normalised, resized and padded on the GPU. Features are
  cropped and cast on the GPU and copied back asynchronously, on a download stream, into reused pinned buffers;
  the writer thread waits for them, writes them, and hands the buffers back (a bounded pool: the only place the
  loop waits for the disk).
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..loader import ImageLoader, LoadedImage
from ..loader.slots import slot_size
from ..models import map_size
from ..preprocess import Preprocessing, finish_on_device, padded_size, pixels_tensor


@dataclass
class HostFeatures:
    """One image's features on the host: ``arrays`` to write once ``ready()`` returns; ``done()`` after writing."""

    arrays: dict[str, np.ndarray]
    ready: Callable[[], None] | None = None
    done: Callable[[], None] | None = None


class HostStage:
    """Batches for, and features from, a model running on the CPU (or a device without CUDA's streams, such as
    MPS, which gets the CPU's batches copied over)."""

    def __init__(self, loader: ImageLoader, divisibility: int, device: torch.device) -> None:
        self.loader = loader
        self.divisibility = divisibility
        self.device = device

    def inputs(self, batch: Sequence[LoadedImage]) -> torch.Tensor:
        """The padded float32 batch; the images' slots stay taken until :meth:`release`."""
        if len(batch) == 1 and batch[0].padded is not None:
            # (1, 3, H, W) over the slot's (H, W, 3) memory: channels_last, as the CPU network runs
            return torch.from_numpy(batch[0].padded.transpose(1, 2, 0))[None].permute(0, 3, 1, 2).to(self.device)
        height, width = padded_size(batch[0].input_height, batch[0].input_width, self.divisibility)
        stacked = torch.zeros(len(batch), height, width, 3).permute(0, 3, 1, 2)
        for index, item in enumerate(batch):
            stacked[index, :, : item.input_height, : item.input_width] = torch.from_numpy(item.pixels)
        return stacked.to(self.device)

    def release(self, batch: Sequence[LoadedImage]) -> None:
        for item in batch:
            self.loader.release(item)

    def to_host(self, crops: Sequence[Mapping[str, torch.Tensor]]) -> list[HostFeatures]:
        return [HostFeatures({name: tensor.cpu().numpy() for name, tensor in features.items()}) for features in crops]


class CudaStage:
    """Batches for, and features from, a model running on a CUDA device (see the module's docstring)."""

    def __init__(self, loader: ImageLoader, device: torch.device, spec: Preprocessing, divisibility: int,
                 output_bytes: int, buffers: int) -> None:
        self.loader = loader
        self.device = device
        self.spec = spec
        self.divisibility = divisibility
        # Two copy streams beside compute: the features of batch k go back once everything queued before their crops
        # is done (the forward of batch k+1 included), and the pixels of batch k+2 must not queue behind them.
        self.uploads = torch.cuda.Stream(device)
        self.downloads = torch.cuda.Stream(device)
        self._staging: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self._next_staging = 0
        self._output_bytes = output_bytes
        self._free_outputs: queue.Queue[torch.Tensor] = queue.Queue()
        self._outputs_left = buffers  # pinned output buffers not allocated yet

    def inputs(self, batch: Sequence[LoadedImage]) -> torch.Tensor:
        """The padded float32 batch on the device, preprocessed there; the slots are free again on return."""
        height, width = padded_size(batch[0].input_height, batch[0].input_width, self.divisibility)
        stacked = torch.zeros(len(batch), 3, height, width, device=self.device)
        compute = torch.cuda.current_stream(self.device)
        for index, item in enumerate(batch):
            pixels = self._send(item.pixels)
            self.loader.release(item)
            pixels.record_stream(compute)
            image = finish_on_device(pixels, self.spec, (item.input_height, item.input_width))
            stacked[index, :, : item.input_height, : item.input_width] = image
        return stacked

    def release(self, batch: Sequence[LoadedImage]) -> None:
        """Slots were freed by :meth:`inputs`, once their pixels were in pinned memory."""

    def _send(self, pixels: np.ndarray) -> torch.Tensor:
        """``pixels`` on the device: through the next of a ring of reused pinned buffers and the copy stream,
        which compute waits for. A buffer too small for an image grows to it: an ordinary copy from pageable
        memory would run on the compute stream and make the host wait for every forward queued there."""
        source = pixels_tensor(pixels)
        if not self._staging:
            size = self.loader.slot_bytes or slot_size(self.spec, finished=False)
            self._staging = [(torch.empty(size, dtype=torch.uint8, pin_memory=True), None) for _ in range(4)]
        index = self._next_staging
        self._next_staging = (index + 1) % len(self._staging)
        buffer, last_copy = self._staging[index]
        if last_copy is not None:  # the buffer's previous image must be on its way first
            last_copy.synchronize()
        if source.numel() > buffer.numel():  # a large photo: this buffer grows to it, and is reused so
            buffer = torch.empty(source.numel(), dtype=torch.uint8, pin_memory=True)
        host = buffer[: source.numel()].view(source.shape)
        host.copy_(source)
        with torch.cuda.stream(self.uploads):
            sent = host.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.uploads)
        torch.cuda.current_stream(self.device).wait_event(copied)
        self._staging[index] = (buffer, copied)
        return sent

    def to_host(self, crops: Sequence[Mapping[str, torch.Tensor]]) -> list[HostFeatures]:
        """Asynchronous copies of each image's crops into pinned buffers, on the download stream after compute."""
        self.downloads.wait_stream(torch.cuda.current_stream(self.device))
        results = []
        for features in crops:
            buffer = self._output_buffer()
            arrays, offset = {}, 0
            with torch.cuda.stream(self.downloads):
                for name, tensor in features.items():
                    offset = -(-offset // 64) * 64  # every array starts aligned
                    size = tensor.numel() * tensor.element_size()
                    host = buffer[offset : offset + size].view(tensor.dtype).view(tensor.shape)
                    host.copy_(tensor, non_blocking=True)
                    tensor.record_stream(self.downloads)
                    arrays[name] = host.numpy()
                    offset += size
                copied = torch.cuda.Event()
                copied.record(self.downloads)
            results.append(HostFeatures(arrays, ready=copied.synchronize,
                                        done=lambda buffer=buffer: self._free_outputs.put(buffer)))
        return results

    def _output_buffer(self) -> torch.Tensor:
        """A free pinned buffer for one image's features; waits for the writer when all are in use."""
        try:
            return self._free_outputs.get_nowait()
        except queue.Empty:
            if self._outputs_left > 0:
                self._outputs_left -= 1
                return torch.empty(self._output_bytes, dtype=torch.uint8, pin_memory=True)
        return self._free_outputs.get()


def max_output_bytes(spec: Preprocessing, strides: Mapping[str, int], channels: Mapping[str, int],
                     itemsize: int) -> int:
    """Bytes of the largest image's stored maps: every resized input fits in the padded ``min_size`` x
    ``max_size`` (in one orientation or the other, with the same map areas); 64 more per level for alignment."""
    height, width = padded_size(spec.min_size, spec.max_size, spec.size_divisibility)
    return sum(channels[name] * int(np.prod(map_size(height, width, stride))) * itemsize + 64
               for name, stride in strides.items())
