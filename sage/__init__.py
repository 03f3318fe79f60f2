"""SAGE: industrial anomaly reasoning with Self-Guided Fact Enhancement and Entropy-aware DPO."""

__version__ = "0.1.0"


def load_pretrained(path, dtype=None, device=None, strict=True):
    """Load a SageModel from an InternVL2-layout directory (see sage.checkpoint.load_pretrained)."""
    from sage.checkpoint import load_pretrained as _load

    return _load(path, dtype=dtype, device=device, strict=strict)
