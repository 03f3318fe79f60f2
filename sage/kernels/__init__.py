"""Fast kernels behind plain-PyTorch specifications (STYLE §4)."""

from sage.kernels.topk_cosine import topk_cosine

__all__ = ["topk_cosine"]
