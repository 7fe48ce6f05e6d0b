"""Synthetic queries for a corpus without labels: sample documents, write one query per document (a span cropped
from it, or a few-shot causal LM), filter, and write a BEIR folder that `reforge eval` and `reforge tune` score
like any other (``-d OUT --split synthetic``). See docs/queries.md.

One module per step: `sample` (which documents), `crop` and `generate` (the two generators; `prompt` holds the
few-shot prompt), `filters` (what is dropped and why), `build` (the whole command: cache, folder and record).
"""
