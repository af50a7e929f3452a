"""Paths -> images: find the image files an input names, and decode one into RGB pixels."""

from .decoding import ALLOWED_FORMATS, DEFAULT_MAX_PIXELS, DecodedImage, decode_image
from .discovery import IMAGE_EXTENSIONS, Discovery, ImageSource, discover

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "DecodedImage",
    "Discovery",
    "ImageSource",
    "decode_image",
    "discover",
]
