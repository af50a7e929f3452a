"""Timing the network and the pipeline: ``run_bench`` returns its measurements as data (``BenchReport``)."""

from .cost import model_cost, output_shapes
from .results import BenchReport, BenchRow, PipelineTiming, StageTiming, Timing
from .runner import COMPARE_MODELS, DEFAULT_SIZE, run_bench

__all__ = [
    "COMPARE_MODELS",
    "DEFAULT_SIZE",
    "BenchReport",
    "BenchRow",
    "PipelineTiming",
    "StageTiming",
    "Timing",
    "model_cost",
    "output_shapes",
    "run_bench",
]
