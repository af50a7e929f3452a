"""fpnx: folders of images into exact ResNet + FPN feature maps (P2-P6) stored in HDF5."""

__version__ = "0.1.0"
