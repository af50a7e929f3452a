"""The wiring: ``extract()`` runs the stages in order (paths -> images -> preprocess -> model -> store -> report)
in one process, as a shard, or under torchrun."""

from .extract import extract
from .progress import Progress
from .summary import ExtractSummary

__all__ = ["ExtractSummary", "Progress", "extract"]
