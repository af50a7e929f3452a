"""Images -> batches: worker processes decode and preprocess (handing pixels over through shared memory), then
images of one padded size are grouped into batches."""

from .batching import Batches, default_window
from .load import LoadedImage, LoadOptions, load_image
from .pool import DEFAULT_TIMEOUT_S, ImageLoader, LoadFunction
from .slots import SharedSlots

__all__ = ["DEFAULT_TIMEOUT_S", "Batches", "ImageLoader", "LoadFunction", "LoadOptions", "LoadedImage", "SharedSlots",
           "default_window", "load_image"]
