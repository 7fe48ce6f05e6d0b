"""reforge: readapt LLM-based dense retrievers with unlabeled in-domain text (RE-AdaptIR)."""

__version__ = "0.1.0"
