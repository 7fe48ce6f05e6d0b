"""Retrieval evaluation: encode a BEIR corpus and its queries, search with faiss, score with ir-measures.

    >>> from reforge.eval import EvalSettings, evaluate  # doctest: +SKIP
    >>> settings = EvalSettings(measures=("nDCG@10", "R@100"))  # doctest: +SKIP
    >>> report = evaluate(["all-MiniLM-L6-v2"], ["scifact"], settings)  # doctest: +SKIP

Modules: ``model`` (finding and loading models), ``encode``, ``cache``,
``search``, ``metrics`` (scores and significance), ``report``, ``pipeline`` (`evaluate`).
"""

from reforge.eval.model import ModelSource, Retriever, resolve_model
from reforge.eval.pipeline import EvalSettings, evaluate
from reforge.eval.report import EvalReport, write_outputs
from reforge.profiles import EncodingProfile

__all__ = [
    "EncodingProfile",
    "EvalReport",
    "EvalSettings",
    "ModelSource",
    "Retriever",
    "evaluate",
    "resolve_model",
    "write_outputs",
]
