"""Every training option, with the paper's values as defaults (RE-AdaptIR Appendix A: DoRA on q,k,v,up,down; r 32,
lora_alpha 64, dropout 0.05; batch 4; AdamW lr 2e-4 with a linear schedule; one epoch; max length 1024).

"batch 4" means four documents per optimizer step (``batching="documents"``), each cut at ``max_length`` tokens, as
the paper's "a max length of 1024 for any example" does. ``batching="rows"`` (four packed rows of ``max_length``
tokens per step) and ``"grouped"`` (four documents of similar length per step) are speed options that deviate from
it: rows fit more documents into a step, so a run takes fewer optimizer steps; grouping changes which documents
share a step.

The CLI fills a `TrainConfig`; the recipe reads nothing else. The resolved config is saved in the training record.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from reforge.errors import InvalidOptionError

PAPER_TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
BATCHINGS = ("documents", "rows", "grouped")
ATTENTIONS = ("auto", "split", "padded", "flex")  # reforge.train.attention.plan_attention reads them

# Options that change what is trained; `--resume` refuses a checkpoint made with different values.
RESUME_KEYS = (
    "base",
    "corpus",
    "text_field",
    "per_line",
    "skip_bad_lines",
    "max_docs",
    "exclude_ids",
    "only_ids",
    "exclude_judged",
    "only_judged",
    "use_dora",
    "target_modules",
    "r",
    "lora_alpha",
    "lora_dropout",
    "batch_size",
    "grad_accum",
    "lr",
    "weight_decay",
    "warmup_steps",
    "schedule",
    "max_grad_norm",
    "epochs",
    "max_steps",
    "max_length",
    "batching",
    "seed",
    "precision",
)


@dataclass
class TrainConfig:
    """Options of `reforge.train.train_adapter`; defaults are the paper's.

    ``batch_size`` is per process and micro-step: one optimizer step sees ``batch_size * grad_accum * world_size``
    documents (``batching`` "documents", the paper's, or "grouped") or packed rows of ``max_length`` tokens
    ("rows"). ``max_steps`` caps the run (the schedule is laid out over the capped length). ``save_every`` 0 writes
    no intermediate checkpoints. ``attention`` picks how each document attends to itself only
    (`reforge.train.attention.plan_attention`); every path gives the same loss, so it is not a resume key.
    """

    base: str
    corpus: list[str]
    output: str
    # corpus reading and filters
    text_field: str | None = None
    per_line: bool = False
    skip_bad_lines: bool = False
    max_docs: int | None = None
    exclude_ids: str | None = None
    only_ids: str | None = None
    exclude_judged: list[str] = field(default_factory=list)
    only_judged: list[str] = field(default_factory=list)
    # adapter
    use_dora: bool = True
    target_modules: list[str] = field(default_factory=lambda: list(PAPER_TARGETS))
    r: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.05
    # optimization
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: int | None = None
    max_length: int = 1024
    batching: str = "documents"
    seed: int = 42
    # machine
    precision: str = "auto"
    gradient_checkpointing: bool = False
    attention: str = "auto"
    device: str | None = None
    # run management
    save_every: int = 500
    resume: bool = False
    overwrite: bool = False
    allow_pickle: bool = False

    def validate(self) -> None:
        """Check ranges and combinations before anything is read.

        Raises:
            InvalidOptionError: naming the option and the allowed values.
        """
        _check_numbers(self)
        positive = {
            "r": self.r,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "epochs": self.epochs,
            "max_length": self.max_length,
        }
        for name, value in positive.items():
            if value < 1:
                _bad(name, f"must be at least 1, got {value}")
        for name in ("max_docs", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                _bad(name, f"must be at least 1, got {value}")
        if self.max_length < 2:
            _bad("max_length", "must be at least 2 (one token to read, one to predict)")
        if not 0.0 <= self.lora_dropout < 1.0:
            _bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.lr <= 0 or self.lora_alpha <= 0:
            _bad("lr" if self.lr <= 0 else "lora_alpha", "must be positive")
        for name in ("warmup_steps", "save_every", "max_grad_norm", "weight_decay", "seed"):
            if getattr(self, name) < 0:
                _bad(name, f"must not be negative, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            _bad("schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.batching not in BATCHINGS:
            _bad("batching", f"must be one of {', '.join(BATCHINGS)}, got {self.batching!r}")
        if self.attention not in ATTENTIONS:
            _bad("attention", f"must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.precision not in PRECISIONS:
            _bad("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.target_modules:
            _bad("target_modules", "needs at least one module name")
        never = [t for t in self.target_modules if "lm_head" in t or "embed" in t]
        if never:
            _bad(
                "target_modules",
                f"{', '.join(never)}: the LM head and embeddings are never trained "
                "(the knowledge adapter must fold into a retriever that has neither)",
            )
        if not self.corpus:
            _bad("corpus", "needs at least one path")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """The inverse of `to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            _bad(unknown[0], f"is not a training option (known: {', '.join(sorted(names))})")
        return cls(**data)


def _check_numbers(config: TrainConfig) -> None:
    """Every numeric option is a finite number of the right kind: ``lr nan`` or ``lora_alpha inf`` would train a
    NaN adapter, or none, and exit 0."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if value is None or kind.startswith(("str", "list")):
            continue
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                _bad(f.name, f"must be true or false, got {value!r}")
        elif kind.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                _bad(f.name, f"must be a whole number, got {value!r}")
        elif kind.startswith("float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                _bad(f.name, f"must be a finite number, got {value!r}")


def _bad(option: str, problem: str) -> None:
    raise InvalidOptionError(f"Training option {option} {problem}.", option=option)
