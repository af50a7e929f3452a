"""Images move from workers to the main process through shared memory, not pipes.

The main process owns one shared-memory block cut into equal slots. With each task it gives a worker a free slot;
the worker copies the image into it (float32 images already zero-padded to the network's size, channels last in
memory) and returns only a small description, so the main process uses the pixels where they lie: no pickling,
no pipe, no copy (a batch of one image runs straight from its slot). An image too large for a slot, or a task
sent when every slot is taken, travels the ordinary way (pickled); slots are a speed-up, never a condition.
"""

from __future__ import annotations

import collections
import mmap
import os
import secrets
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from ..preprocess import Preprocessing, padded_size
from .load import LoadedImage, LoadOptions

# Slots are never more than this share of the free space of /dev/shm (tmpfs, where a write past the end kills the
# writer with SIGBUS) nor of the machine's memory.
SHARED_MEMORY_SHARE = 0.25
DEVICE_SLOT_PIXELS = 2048 * 2048  # uint8 images for a device: up to 4 MP travel through slots, larger ones pickled


@dataclass(frozen=True)
class SlotRef:
    """What a worker needs to write into slot ``index`` of the block ``name``."""

    name: str
    index: int
    slot_bytes: int


class SharedSlots:
    """``count`` slots of ``slot_bytes`` in one shared-memory block, handed out and taken back by the owner."""

    def __init__(self, count: int, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        size = max(1, count * slot_bytes)
        # Created (and registered for clean-up if this process dies) by SharedMemory, but read through a mapping
        # of our own that is never closed explicitly: arrays handed out keep it alive (numpy holds a reference to
        # the mmap, not a buffer export, so closing it under them would leave them pointing at unmapped memory).
        remove_stale_blocks()
        self._memory = shared_memory.SharedMemory(name=_new_block_name(), create=True, size=size)
        try:
            self._map = mmap.mmap(self._memory._fd, size)  # noqa: SLF001 - POSIX: the block's descriptor
        finally:
            self._memory.close()
        self._free = collections.deque(range(count))

    @classmethod
    def for_options(cls, options: LoadOptions, wanted: int) -> SharedSlots | None:
        """Slots sized for the images ``options`` produce; fewer (or none) where shared memory is short."""
        slot_bytes = slot_size(options.preprocessing, options.finish_here)
        budget = SHARED_MEMORY_SHARE * min(_free_bytes("/dev/shm"), _memory_bytes())
        count = min(wanted, int(budget // slot_bytes))
        if count < 1 or not hasattr(shared_memory.SharedMemory, "_fd"):
            return None
        return cls(count, slot_bytes)

    def take(self) -> SlotRef | None:
        return SlotRef(self._memory.name, self._free.popleft(), self.slot_bytes) if self._free else None

    def release(self, index: int) -> None:
        self._free.append(index)

    def receive(self, item: LoadedImage) -> LoadedImage:
        """Point ``item``'s arrays at its slot (see :func:`write_into_slot`)."""
        if item.slot is not None and item.pixels is None:
            _attach_arrays(item, self._map, item.slot * self.slot_bytes, item.slot_layout)
        return item

    def close(self) -> None:
        """Remove the block's name. Its memory is freed with the last array pointing into it, so closing never
        invalidates what a caller holds."""
        self._memory.unlink()


def slot_size(spec: Preprocessing, finished: bool) -> int:
    """Bytes of the largest image a worker hands over: float32 padded input, or a uint8 decoded image."""
    if finished:
        height, width = padded_size(spec.min_size, spec.max_size, spec.size_divisibility)
        return 4 * 3 * height * width
    return 3 * DEVICE_SLOT_PIXELS


def write_into_slot(item: LoadedImage, slot: SlotRef | None, divisibility: int) -> LoadedImage:
    """In the worker: move ``item``'s pixels into its slot (float32 zero-padded to ``divisibility``), leaving a
    description that :meth:`SharedSlots.receive` turns back into arrays. Without a slot, or too large: unchanged."""
    if slot is None or not item.ok:
        return item
    pixels = item.pixels
    shape = pixels.shape
    if pixels.dtype == np.float32:
        shape = (3, *padded_size(shape[1], shape[2], divisibility))
    if int(np.prod(shape)) * pixels.dtype.itemsize > slot.slot_bytes:
        return item
    memory = _attached(slot.name)
    target = _slot_array(memory.buf, slot.index * slot.slot_bytes, shape, pixels.dtype)
    if pixels.dtype == np.float32:
        import torch  # only float32 images (resized here) need it, and torch made them

        height, width = pixels.shape[1:]
        padded = torch.from_numpy(target)
        # torch's copy: a resized image comes channels-first, and numpy's transposing copy is ~3x slower (measured)
        padded[:, :height, :width].copy_(torch.from_numpy(pixels))
        padded[:, height:, :] = 0
        padded[:, :height, width:] = 0
    else:
        target[...] = pixels
    item.pixels, item.slot, item.slot_layout = None, slot.index, (shape, pixels.dtype.str, pixels.shape)
    return item


def _slot_array(buffer, offset: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """What a slot holds: a float32 network input ``(3, H, W)`` channels last in memory (the layout the CPU's
    preprocessing gives and its network runs), or decoded uint8 ``(H, W, 3)`` pixels."""
    if np.dtype(dtype) == np.float32:
        channels, height, width = shape
        return np.ndarray((height, width, channels), dtype, buffer=buffer, offset=offset).transpose(2, 0, 1)
    return np.ndarray(shape, dtype, buffer=buffer, offset=offset)


def _attach_arrays(item: LoadedImage, buffer, offset: int, layout) -> None:
    shape, dtype, unpadded = layout
    stored = _slot_array(buffer, offset, shape, np.dtype(dtype))
    if stored.dtype == np.float32:
        item.padded, item.pixels = stored, stored[:, : unpadded[1], : unpadded[2]]
    else:
        item.padded, item.pixels = None, stored


# Blocks are named ``fpnx-<pid namespace>-<owner pid>-<random>``. Python's resource tracker unlinks a block whose
# owner died, but a kill of the whole process group (a job scheduler's SIGKILL) takes the tracker too, and the
# block would hold its memory until the machine restarts: each new owner first removes the blocks of owners that
# no longer exist (in its own pid namespace, where it can tell).
_BLOCK_PREFIX = "fpnx-"
_SHARED_MEMORY_FOLDER = "/dev/shm"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def _new_block_name() -> str:
    return f"{_BLOCK_PREFIX}{_pid_namespace()}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_blocks(folder: str = _SHARED_MEMORY_FOLDER) -> list[str]:
    """Remove the blocks left by fpnx processes of this pid namespace that no longer exist; their names."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    namespace, removed = _pid_namespace(), []
    for name in names:
        parts = name[len(_BLOCK_PREFIX):].split("-") if name.startswith(_BLOCK_PREFIX) else []
        if len(parts) != 3 or parts[0] != namespace or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(name)
        except OSError:  # removed meanwhile, or not ours to remove
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


_ATTACHED: dict[str, shared_memory.SharedMemory] = {}


def _attached(name: str) -> shared_memory.SharedMemory:
    """The block ``name``, opened once per worker process.

    Only the owner registers it with Python's resource tracker (which unlinks it if the owner dies, even by
    kill -9): a worker that registered it too would have it unlinked when the worker exits (Python < 3.13 has no
    ``track=False``), so registration is switched off while a worker opens it (workers are single-threaded).
    """
    memory = _ATTACHED.get(name)
    if memory is None:
        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None
        try:
            memory = shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = register
        _ATTACHED[name] = memory
    return memory


def _free_bytes(path: str) -> int:
    try:
        stat = os.statvfs(path)
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 30
