"""SAGE: industrial anomaly reasoning with Self-Guided Fact Enhancement and Entropy-aware DPO.

    model = sage.load_pretrained("weights/sage-tiny-base")   # SageModel, tokenizer attached
"""

from sage.models.sage import SageModel

__version__ = "0.1.0"

# SageModel from an InternVL2-layout directory: (path, dtype=None, device=None, strict=True)
load_pretrained = SageModel.from_pretrained

__all__ = ["SageModel", "load_pretrained", "__version__"]
