"""Fast kernels behind plain-PyTorch specifications (docs/design.md §8.4)."""

from sage.kernels.topk_cosine import topk_cosine

__all__ = ["topk_cosine"]
