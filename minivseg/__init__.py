"""minivseg: minimal, readable PyTorch video segmentation (TubeFormer-DeepLab and friends)."""

__version__ = "0.1.0"
