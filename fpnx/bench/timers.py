"""Clocks and memory gauges for one device, and per-stage timing through the model's own stage modules.

On CUDA, times come from CUDA events with a synchronisation after each iteration; elsewhere from
``time.perf_counter`` (MPS synchronises at each mark).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

import torch
from torch import nn


class Clock:
    """Marks on one device's timeline: CUDA events, or perf_counter (after a synchronise on MPS)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda events" if device.type == "cuda" else "time.perf_counter"

    def mark(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))  # the stream the work runs on, also for cuda:N
            return event
        if self.device.type == "mps":
            torch.mps.synchronize()
        return time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """After :meth:`sync`."""
        if self.device.type == "cuda":
            return float(start.elapsed_time(end))
        return (end - start) * 1000.0


class PeakMemory:
    """CUDA max allocated after a reset; on the CPU the process's peak RSS (reset through /proc where allowed)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda max allocated"
        elif device.type == "mps":
            self.kind = "mps driver allocated"
        elif _can_reset_rss_peak():
            self.kind = "process peak RSS"
        else:
            self.kind = "process peak RSS since start"

    def reset(self) -> int | None:
        """Start a new peak; returns the memory in use now where the rise can be told (CUDA), else None.

        A process's RSS hardly rises during a forward once the allocator holds memory from earlier ones, so
        on the CPU only the peak itself is reported.
        """
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        if self.kind == "process peak RSS":
            _reset_rss_peak()
        return None

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.device.type == "mps":
            return int(torch.mps.driver_allocated_memory())
        if self.kind == "process peak RSS":
            peak = _status_kb("VmHWM")
            if peak is not None:
                return peak * 1024
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(usage if sys.platform == "darwin" else usage * 1024)  # bytes on macOS, KB on Linux


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _can_reset_rss_peak() -> bool:
    return _status_kb("VmHWM") is not None and _reset_rss_peak()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as info:
                for line in info:
                    if line.startswith("model name"):
                        return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
        except OSError:
            pass
        return f"CPU ({os.cpu_count()} cores)"
    return device.type


class StageTimer:
    """Marks the start and end of every stage module of ``model.stages()`` during forwards, through hooks.

    The forward itself is the model's own: hooks only record clock marks. Use as a context manager; after each
    forward, :meth:`take` (after the clock's sync) returns the milliseconds spent in each stage.
    """

    def __init__(self, model: nn.Module, clock: Clock) -> None:
        self.clock = clock
        self.stages = list(model.stages())
        self._marks: list[tuple[str, Any, Any]] = []
        self._handles = []
        for stage, modules in model.stages().items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._start(stage)))
                self._handles.append(module.register_forward_hook(self._end))

    def _start(self, stage: str):
        def hook(module, inputs):
            self._marks.append((stage, self.clock.mark(), None))
        return hook

    def _end(self, module, inputs, output) -> None:
        stage, start, _ = self._marks[-1]
        self._marks[-1] = (stage, start, self.clock.mark())

    def take(self) -> list[float]:
        """Milliseconds per stage (in ``self.stages`` order) of the forwards since the last call."""
        spent = dict.fromkeys(self.stages, 0.0)
        for stage, start, end in self._marks:
            spent[stage] += self.clock.elapsed_ms(start, end)
        self._marks.clear()
        return [spent[stage] for stage in self.stages]

    def __enter__(self) -> "StageTimer":
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
