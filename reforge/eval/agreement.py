"""Do two models embed alike? `reforge verify`'s ``encoding`` and ``embeddings`` checks on a merged model.

The retriever and the new model each embed a few fixed sentences with the retriever's encoding profile; the
cosine of each pair is the agreement. This lives in eval (it loads and runs models), not in `reforge.ops.verify`
(ops, train and eval do not import each other): the command composes the two, passing `compare_embeddings` to
`reforge.ops.verify.verify_checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from reforge.errors import PoolingUndeterminedError, ReforgeError
from reforge.profiles import PROFILE_FILE

SENTENCES = [
    "What is the capital of France?",
    "Vaccines train the immune system to recognise a pathogen.",
    "Stock prices fell sharply after the announcement.",
    "A transformer maps tokens to vectors.",
]


@dataclass
class Agreement:
    """The checks' outcomes: ``checks`` holds ``(name, ok, detail)`` (``encoding`` when the retriever's profile is
    known, then ``embeddings``); ``cosine`` one value per sentence (empty when the models could not embed)."""

    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)


def compare_embeddings(
    new: str | Path, retriever: str, base: str | None, *, token: str | None = None, allow_pickle: bool = False
) -> Agreement:
    """Embed `SENTENCES` with the ``retriever`` (over ``base``) and the ``new`` model and compare.

    ``encoding``: the new model is encoded like the retriever (its ``reforge_encoding.json``). ``embeddings``: cosine
    agreement per sentence; it fails when the new model's vectors are not finite, or when either model cannot embed
    (a check that cannot run fails; ``--no-embeddings`` skips it on purpose).
    """
    import numpy as np

    from reforge.eval.encode import encode
    from reforge.eval.model import resolve_model

    result = Agreement()
    try:
        try:
            old = resolve_model(retriever, base=base, token=token, allow_pickle=allow_pickle, builtin_class=True)
            known = True
        except PoolingUndeterminedError:  # no profile to carry; agreement is still measured, with mean pooling
            old = resolve_model(
                retriever, base=base, token=token, allow_pickle=allow_pickle, pooling="mean", builtin_class=True
            )
            known = False
        new_source = resolve_model(
            new, token=token, allow_pickle=allow_pickle, pooling=None if known else "mean", builtin_class=True
        )
        if known:
            same = new_source.profile == old.profile
            result.checks.append(
                (
                    "encoding",
                    same,
                    f"encoded like the retriever ({old.profile.name} profile)"
                    if same
                    else f"the new model would be encoded as {new_source.profile.to_dict()}, the retriever as "
                    f"{old.profile.to_dict()}; {PROFILE_FILE} is missing or differs",
                )
            )
        vectors = []
        for source in (old, new_source):
            model = source.load(device="cpu", dtype=None, allow_pickle=allow_pickle)
            vectors.append(encode(model, SENTENCES, old.profile, batch_size=len(SENTENCES)))
    except ReforgeError as e:
        result.checks.append(
            ("embeddings", False, f"could not embed with both models: {e} (--no-embeddings skips this check)")
        )
        return result
    old_vectors, new_vectors = vectors
    cosine = (old_vectors * new_vectors).sum(1) / (
        np.linalg.norm(old_vectors, axis=1) * np.linalg.norm(new_vectors, axis=1)
    )
    result.cosine = [float(c) for c in cosine]
    finite = bool(np.isfinite(new_vectors).all())
    pooled = "" if known else " (pooling unknown: compared with mean pooling)"
    result.checks.append(
        (
            "embeddings",
            finite,
            f"cosine(retriever, new) on {len(cosine)} sentences: min {cosine.min():.4f}, "
            f"mean {cosine.mean():.4f}{pooled}"
            if finite
            else "the new model's embeddings are not finite",
        )
    )
    return result
