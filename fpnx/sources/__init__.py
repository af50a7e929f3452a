"""Paths -> images: find the image files (and archive members) an input names, and decode one into RGB pixels."""

from .archives import ArchiveMember
from .decoding import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, DecodedImage, decode_image, decode_source, heif_available
from .discovery import IMAGE_EXTENSIONS, Discovery, ImageSource, discover, locate_image

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ArchiveMember",
    "DecodedImage",
    "Discovery",
    "ImageSource",
    "decode_image",
    "decode_source",
    "discover",
    "heif_available",
    "locate_image",
]
