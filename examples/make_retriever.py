"""Train the small retriever: a LoRA bi-encoder over SmolLM2-135M-Instruct with RepLLaMA's prefixes and mean pooling
(so not RepLLaMA's last-token mechanism), written to examples/assets/repllama-smol/.

RepLLaMA's recipe (Ma et al. 2023; Tevatron) at small scale, on a 2-core CPU, with one change: mean pooling.

- model: the BARE base model (``AutoModel`` -> ``LlamaModel``, no lm_head) with a peft LoRA on q, k, v, o, gate, up
  and down projections of all 30 layers: r 8, lora_alpha 16, dropout 0.1 (RepLLaMA: r 32 / alpha 64 on a 7B model;
  r 8 keeps the committed file under 10 MB: 2,442,240 float32 parameters = 9.8 MB). Adapter keys are
  ``base_model.model.layers.N.self_attn.q_proj.lora_A.weight``, exactly like castorini/repllama-v1-7b-lora-passage.
- encoding: `examples.encoding` (``query: `` / ``passage: `` prefixes, EOS appended after truncation, MEAN pooling
  over the real tokens, L2 norm, 128 tokens). RepLLaMA pools the EOS (last token; ``--pooling last``), but on this
  135M model the last-token runs collapsed (all cosines 0.93-0.98, loss stuck at ln of the passages per batch) at
  temperatures 0.01-0.2 and learning rates 1e-4-1e-3, while mean pooling learned within 20 steps (docs/results.md).
- data: SciFact train (809 queries, 919 query-positive pairs) from ``../shared/data/scifact``; every pair is one
  example per epoch. One BM25 hard negative per example, drawn from the BM25 top 30 of the query minus its positives.
- loss: InfoNCE over the batch with temperature 0.05: each query against every passage of the batch (its positive,
  the other queries' positives, all hard negatives); passages that are judged positive for the query, other than
  its own target, are masked out.
- optimizer: AdamW, lr 3e-4, 10 warmup steps then linear decay to 0, gradient norm clipped at 1.0; one epoch:
  114 steps of 8 queries (the last 7 of the 919 shuffled pairs are dropped); seed 13.
- precision: float32 weights and LoRA parameters, matmuls under CPU autocast to bfloat16 (1.5-1.9x more tokens per
  CPU-second than float32 on this AVX512-BF16 CPU; on a CPU without native bf16 pass --no-autocast-bf16); 1 thread
  (on the busy shared machine 1 thread got more done per CPU-second than 2). Same inputs, versions, precision and
  thread count give the same adapter bytes.

Usage::

    python -m examples.prepare_base                   # once: converts the fetched GGUF
    nice -n 10 python -m examples.make_retriever      # 45-90 min on a busy 2-core CPU (or bench/make_retriever.py)
    python -m examples.make_retriever --max-steps 2 --out /tmp/smoke    # a quick smoke run
    # last-token pooling, warm-started from the committed retriever: examples/assets/repllama-smol-last, byte for
    # byte (docs/results.md section 1: SciFact nDCG@10 0.618 on the 1,000-document sample; 7-25 min of one thread)
    python -m examples.make_retriever --pooling last --init-adapter examples/assets/repllama-smol \
        --learning-rate 3e-4 --temperature 0.01 --max-steps 60 --heldout-split test --threads 1 \
        --out examples/assets/repllama-smol-last

The committed adapter names its base symbolically (``base_model_name_or_path: SmolLM2-135M-Instruct``, the folder
name `examples.prepare_base` writes inside ``$REFORGE_MODELS``); tools are given the base path explicitly, e.g.
``reforge eval examples/assets/repllama-smol --base ~/.cache/reforge-models/SmolLM2-135M-Instruct``.
``training.json`` records the base's SHA-256, so a mismatched base can be detected.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python examples/make_retriever.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import encoding
from examples.bm25 import BM25
from examples.prepare_base import BASE_NAME, MARKER, default_base_dir
from reforge.errors import CheckpointNotFoundError, DataError, InvalidOptionError, short_path
from reforge.io.checkpoint import sha256_file

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "examples" / "assets" / "repllama-smol"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "scifact"
TARGET_MODULES = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")
RECORD = "training.json"


@dataclass(frozen=True)
class RecipeConfig:
    """Every setting of the retriever recipe (the defaults made the committed adapter)."""

    rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = TARGET_MODULES
    temperature: float = 0.05
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    batch_queries: int = 8
    hard_negatives: int = 1
    negative_depth: int = 30
    epochs: int = 1
    max_steps: int | None = None
    max_length: int = encoding.MAX_LENGTH
    pooling: str = encoding.POOLING
    seed: int = 13
    threads: int = 1
    autocast_bf16: bool = True
    split: str = "train"
    # warm start: continue training this peft LoRA folder (e.g. the mean-pooling retriever) instead of a fresh LoRA;
    # its own rank, alpha, dropout and modules then apply
    init_adapter: str | None = None
    # measure in-batch MRR on this split's batches (seed + 1) before and after training; None: no measurement
    heldout_split: str | None = None
    heldout_batches: int = 12

    def check(self) -> None:
        """Raise `InvalidOptionError` for settings that cannot work."""
        for name in ("rank", "batch_queries", "negative_depth", "epochs", "threads", "heldout_batches"):
            if getattr(self, name) < 1:
                raise InvalidOptionError(f"{name} must be at least 1, got {getattr(self, name)}.", option=name)
        if self.hard_negatives < 0 or self.temperature <= 0 or self.max_length < 2:
            raise InvalidOptionError(
                "hard_negatives must be >= 0, temperature > 0 and max_length >= 2; got "
                f"{self.hard_negatives}, {self.temperature}, {self.max_length}.",
                option="hard_negatives/temperature/max_length",
            )
        if self.pooling not in encoding.POOLINGS:
            raise InvalidOptionError(
                f"pooling must be one of {', '.join(encoding.POOLINGS)}, got {self.pooling!r}.", option="pooling"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise InvalidOptionError(f"max_steps must be at least 1, got {self.max_steps}.", option="max_steps")


@dataclass(frozen=True)
class TrainingData:
    """What training reads: the corpus, the split's queries and qrels, and each query's BM25 hard negatives."""

    passages: dict[str, str]  # doc id -> formatted passage text
    queries: dict[str, str]  # query id -> formatted query text
    qrels: dict[str, set[str]]  # query id -> positive doc ids (grade > 0)
    pairs: list[tuple[str, str]]  # (query id, positive doc id), qrels file order
    negatives: dict[str, list[str]]  # query id -> BM25 top-depth doc ids that are not positives
    files_sha256: dict[str, str] = field(default_factory=dict)


def setup_data(data_dir: str | Path, config: RecipeConfig) -> TrainingData:
    """Read a BEIR folder's corpus, queries and ``qrels/<split>.tsv``, and mine BM25 hard negatives.

    Raises:
        DataError: a file is missing or malformed, or the split has no positive pair.
    """
    from reforge.data.beir import iter_corpus, read_qrels, read_queries

    data_dir = Path(data_dir)
    qrels_path = data_dir / "qrels" / f"{config.split}.tsv"
    documents = list(iter_corpus(data_dir))
    raw_queries = read_queries(data_dir / "queries.jsonl")
    judged = read_qrels(qrels_path)
    doc_ids = {d.id for d in documents}
    pairs = [
        (q, d)
        for q, docs in judged.items()
        for d, grade in docs.items()
        if grade > 0 and d in doc_ids and q in raw_queries
    ]
    if not pairs:
        raise DataError(
            f"{short_path(qrels_path)} has no positive pair whose query and document exist.",
            hint="Check that the qrels match corpus.jsonl and queries.jsonl.",
            path=qrels_path,
            line=None,
        )
    qrels: dict[str, set[str]] = {}
    for q, d in pairs:
        qrels.setdefault(q, set()).add(d)
    index = BM25([d.passage() for d in documents], [d.id for d in documents])
    negatives = {
        q: [d for d, _ in index.search(raw_queries[q], config.negative_depth + len(qrels[q])) if d not in qrels[q]][
            : config.negative_depth
        ]
        for q in qrels
    }
    files = {name: sha256_file(data_dir / name) for name in ("corpus.jsonl", "queries.jsonl")}
    files[f"qrels/{config.split}.tsv"] = sha256_file(qrels_path)
    return TrainingData(
        passages={d.id: encoding.format_passage(d.title, d.text) for d in documents},
        queries={q: encoding.format_query(raw_queries[q]) for q in qrels},
        qrels=qrels,
        pairs=pairs,
        negatives=negatives,
        files_sha256=files,
    )


def make_batches(data: TrainingData, config: RecipeConfig) -> list[list[tuple[str, str, list[str]]]]:
    """Shuffle the pairs once per epoch (seeded) into full batches of ``(query id, positive id, negative ids)``.

    The last incomplete batch of an epoch is dropped; ``max_steps`` cuts the list.
    """
    rng = random.Random(config.seed)
    all_ids = sorted(data.passages)
    batches = []
    for _ in range(config.epochs):
        order = list(data.pairs)
        rng.shuffle(order)
        for start in range(0, len(order) - config.batch_queries + 1, config.batch_queries):
            batch = []
            for query_id, positive in order[start : start + config.batch_queries]:
                pool = data.negatives.get(query_id) or [d for d in all_ids if d not in data.qrels[query_id]]
                batch.append((query_id, positive, rng.sample(pool, min(config.hard_negatives, len(pool)))))
            batches.append(batch)
    return batches[: config.max_steps] if config.max_steps else batches


def contrastive_loss(queries, passages, targets, mask, temperature: float):
    """InfoNCE: cross-entropy of ``queries @ passages.T / temperature`` with each query's target passage.

    Args:
        queries: ``(B, d)`` normalized query vectors.
        passages: ``(P, d)`` normalized passage vectors.
        targets: ``(B,)`` index of each query's positive in ``passages``.
        mask: ``(B, P)`` bool, True where the score must be ignored (another judged positive of the same query).
    """
    import torch.nn.functional as F

    logits = (queries @ passages.T) / temperature
    logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, targets)


def setup_model(base_dir: str | Path, config: RecipeConfig):
    """The bare base model with a fresh LoRA (seeded) and its tokenizer.

    Raises:
        CheckpointNotFoundError: ``base_dir`` is not a converted base (see `examples.prepare_base`).
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise CheckpointNotFoundError(
            f"{short_path(base_dir)} is not a model folder (no config.json).",
            hint="Run python -m examples.prepare_base first.",
            ref=str(base_dir),
        )
    torch.manual_seed(config.seed)
    model, info = AutoModel.from_pretrained(base_dir, dtype=torch.float32, output_loading_info=True)
    if info.get("missing_keys"):
        raise CheckpointNotFoundError(
            f"{short_path(base_dir)} lacks tensors of the bare model: {sorted(info['missing_keys'])[:3]}.",
            hint="Rebuild it with python -m examples.prepare_base --force.",
            ref=str(base_dir),
        )
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if config.init_adapter:
        from peft import PeftModel

        if not (Path(config.init_adapter) / "adapter_config.json").is_file():
            raise CheckpointNotFoundError(
                f"{short_path(config.init_adapter)} is not a peft adapter folder (no adapter_config.json).",
                hint="Pass the folder make_retriever wrote, e.g. examples/assets/repllama-smol.",
                ref=str(config.init_adapter),
            )
        return PeftModel.from_pretrained(model, str(config.init_adapter), is_trainable=True), tokenizer
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        task_type=TaskType.FEATURE_EXTRACTION,
    )
    return get_peft_model(model, lora), tokenizer


def train_loop(
    model,
    tokenizer,
    data: TrainingData,
    batches,
    config: RecipeConfig,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Train the LoRA with the contrastive loss over ``batches``; returns the loss of every step.

    ``progress(step, total, loss)`` is called after each step.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    total = len(batches)
    warmup = min(config.warmup_steps, max(total - 1, 0))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    model.train()
    losses = []
    for step, batch in enumerate(batches, start=1):
        query_ids, doc_ids, q_vec, p_vec = _embed_batch(model, tokenizer, data, batch, config)
        mask = torch.tensor(
            [[j != i and d in data.qrels[q] for j, d in enumerate(doc_ids)] for i, q in enumerate(query_ids)]
        )
        loss = contrastive_loss(q_vec, p_vec, torch.arange(len(batch)), mask, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(step, total, losses[-1])
    model.eval()
    return losses


def _embed_batch(model, tokenizer, data: TrainingData, batch, config: RecipeConfig):
    """One batch's ``(query ids, passage ids, query vectors, passage vectors)``: the passages are every query's
    positive, then every hard negative; matmuls under CPU bfloat16 autocast when the recipe asks for it."""
    import torch

    query_ids = [q for q, _, _ in batch]
    doc_ids = [p for _, p, _ in batch] + [n for _, _, negs in batch for n in negs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast_bf16):
        q_vec = encoding.embed(
            model, encoding.tokenize(tokenizer, [data.queries[q] for q in query_ids], config.max_length), config.pooling
        )
        p_vec = encoding.embed(
            model, encoding.tokenize(tokenizer, [data.passages[d] for d in doc_ids], config.max_length), config.pooling
        )
    return query_ids, doc_ids, q_vec, p_vec


def in_batch_mrr(model, tokenizer, data: TrainingData, batches, config: RecipeConfig) -> float:
    """Mean reciprocal rank of each query's positive among its batch's passages (the training task, no gradient,
    dropout off; other judged positives of the query are masked as in the loss), with ``config.pooling``."""
    import torch

    was_training = model.training
    model.eval()
    ranks = []
    with torch.inference_mode():
        for batch in batches:
            query_ids, doc_ids, q_vec, p_vec = _embed_batch(model, tokenizer, data, batch, config)
            scores = (q_vec @ p_vec.T).float()
            for i, q in enumerate(query_ids):
                others = [j for j, d in enumerate(doc_ids) if j != i and d not in data.qrels[q]]
                ranks.append(1 + int((scores[i, others] > scores[i, i]).sum()))
    model.train(was_training)
    return sum(1 / r for r in ranks) / len(ranks)


def save(model, out: str | Path, record: dict, config: RecipeConfig) -> Path:
    """Write the adapter folder atomically: peft files (base named symbolically), encoding profile, record, README."""
    from reforge.profiles import save_profile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's generic card; ours is written below
        adapter_config = json.loads((tmp / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = BASE_NAME
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])  # peft writes a set's order
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        save_profile(tmp, encoding_profile(config))
        weights = tmp / "adapter_model.safetensors"
        record["adapter"] = {
            "file": weights.name,
            "bytes": weights.stat().st_size,
            "sha256": sha256_file(weights),
            **_adapter_stats(weights),
        }
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(record, out.name))
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600 files
        tmp.chmod(0o755)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def encoding_profile(config: RecipeConfig):
    """The `reforge.eval` profile of this retriever: RepLLaMA's with the recipe's pooling and length."""
    from reforge.profiles import builtin_profile

    profile = builtin_profile("repllama", max_length=config.max_length)
    return profile if config.pooling == "last" else replace(profile, name="custom", pooling=config.pooling)


def make_retriever(
    base_dir: str | Path | None = None,
    data_dir: str | Path = DEFAULT_DATA,
    out: str | Path = ASSETS,
    config: RecipeConfig | None = None,
    log=print,
) -> dict:
    """Train the retriever and write its adapter folder; returns the training record.

    Args:
        base_dir: the converted base (default: `examples.prepare_base.default_base_dir()`).
        data_dir: a BEIR folder with ``qrels/<config.split>.tsv`` (default ``../shared/data/scifact``).
        out: the adapter folder to (re)write (default ``examples/assets/repllama-smol``).
        config: the recipe (default `RecipeConfig()`).
        log: called with one line per step (``None`` for silence).

    Raises:
        CheckpointNotFoundError, DataError, InvalidOptionError: before training starts.
    """
    import peft
    import torch
    import transformers

    log = log or (lambda line: None)
    config = config or RecipeConfig()
    config.check()
    base_dir = Path(base_dir) if base_dir else default_base_dir()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    data = setup_data(data_dir, config)
    batches = make_batches(data, config)
    log(
        f"{len(data.pairs)} pairs from {len(data.qrels)} queries; {len(batches)} steps of {config.batch_queries} "
        f"queries x (1 positive + {config.hard_negatives} BM25 negatives)."
    )
    model, tokenizer = setup_model(base_dir, config)
    heldout = None
    if config.heldout_split:
        held_config = replace(config, split=config.heldout_split, seed=config.seed + 1, epochs=1, max_steps=None)
        held_data = setup_data(data_dir, held_config)
        held_batches = make_batches(held_data, held_config)[: config.heldout_batches]
        candidates = config.batch_queries * (1 + config.hard_negatives)
        heldout = {
            "split": config.heldout_split,
            "batches": len(held_batches),
            "passages_per_batch": candidates,
            "chance_mrr": round(sum(1 / k for k in range(1, candidates + 1)) / candidates, 4),
            "mrr_before": round(in_batch_mrr(model, tokenizer, held_data, held_batches, config), 4),
        }
        log(f"held-out in-batch MRR before training: {heldout['mrr_before']} (chance {heldout['chance_mrr']})")
    step_times: list[float] = []

    def report(step: int, total: int, loss: float) -> None:
        step_times.append(time.perf_counter())
        rate = (step_times[-1] - step_times[0]) / (len(step_times) - 1) if len(step_times) > 1 else float("nan")
        log(f"step {step}/{total}  loss {loss:.4f}  {rate:.1f} s/step")

    train_started = time.perf_counter()
    losses = train_loop(model, tokenizer, data, batches, config, progress=report)
    train_seconds = time.perf_counter() - train_started
    if heldout:
        heldout["mrr_after"] = round(in_batch_mrr(model, tokenizer, held_data, held_batches, config), 4)
        log(f"held-out in-batch MRR after training: {heldout['mrr_after']}")
    record = {
        "recipe": f"a LoRA bi-encoder with RepLLaMA's prefixes and {config.pooling} pooling (not a RepLLaMA): LoRA "
        "over the bare LlamaModel, InfoNCE with in-batch and BM25 hard negatives (examples/make_retriever.py)",
        "base": _base_record(base_dir),
        "data": {
            "folder": Path(data_dir).name,
            "split": config.split,
            "queries": len(data.qrels),
            "pairs": len(data.pairs),
            "corpus_documents": len(data.passages),
            "files_sha256": data.files_sha256,
        },
        "negatives": {
            "method": "BM25 (k1 0.9, b 0.4, lowercased \\w+ tokens, examples/bm25.py), top "
            f"{config.negative_depth} minus the query's positives, sampled per example",
            "queries_without_negatives": sum(1 for q in data.qrels if not data.negatives.get(q)),
        },
        "encoding": {
            "query": "query: {q}",
            "passage": "passage: {title} {text}",
            "eos_appended": True,
            "pooling": config.pooling,
            "normalized": True,
            "max_length": config.max_length,
        },
        "hyperparameters": asdict(config),
        **({"heldout_in_batch_mrr": heldout} if heldout else {}),
        "training": {
            "steps": len(losses),
            "examples": len(losses) * config.batch_queries,
            "train_seconds": round(train_seconds, 1),
            "seconds_per_step": round(train_seconds / max(1, len(losses)), 2),
            "total_seconds": round(time.perf_counter() - started, 1),
            "loss": _loss_summary(losses),
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": sys.version.split()[0],
        },
    }
    save(model, out, record, config)
    log(
        f"Wrote {short_path(out)} ({record['adapter']['bytes'] / 1e6:.1f} MB) in {train_seconds / 60:.1f} min "
        f"of training; loss {record['training']['loss']['first_10_mean']:.3f} -> "
        f"{record['training']['loss']['last_10_mean']:.3f}."
    )
    return json.loads((Path(out) / RECORD).read_text())


def _loss_summary(losses: list[float]) -> dict:
    chunks = [losses[i : i + 10] for i in range(0, len(losses), 10)]
    return {
        "first": round(losses[0], 4),
        "last": round(losses[-1], 4),
        "first_10_mean": round(sum(losses[:10]) / len(losses[:10]), 4),
        "last_10_mean": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "mean_per_10_steps": [round(sum(c) / len(c), 4) for c in chunks],
        "all": [round(x, 4) for x in losses],
    }


def _base_record(base_dir: Path) -> dict:
    marker = base_dir / MARKER
    source = json.loads(marker.read_text()) if marker.is_file() else {}
    weights = base_dir / "model.safetensors"
    return {
        "name": BASE_NAME,
        "model_safetensors_sha256": sha256_file(weights) if weights.is_file() else None,
        "converted_from": source.get("source"),
        "converted_from_sha256": source.get("source_sha256"),
        "dtype": source.get("dtype", "float32"),
    }


def _adapter_stats(weights: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as handle:
        keys = sorted(handle.keys())
        parameters = sum(handle.get_slice(k).get_shape()[0] * handle.get_slice(k).get_shape()[1] for k in keys)
    return {"tensors": len(keys), "parameters": parameters}


def _readme(record: dict, folder: str = ASSETS.name) -> str:
    h, t, a = record["hyperparameters"], record["training"], record["adapter"]
    start = f"continues training `{h['init_adapter']}` (warm start): " if h.get("init_adapter") else ""
    title = f"a {_POOLING_TITLE[h['pooling']]} LoRA bi-encoder with RepLLaMA's prefixes, over SmolLM2-135M-Instruct"
    return f"""# {folder}: {title}

A peft LoRA retriever (r {h["rank"]}, alpha {h["lora_alpha"]}, {", ".join(h["target_modules"])}; {a["parameters"]:,}
float32 parameters, {a["bytes"] / 1e6:.1f} MB) over the **bare** SmolLM2-135M-Instruct (`LlamaModel`, no lm_head):
keys are `base_model.model.layers.N.<module>.lora_A.weight` / `lora_B.weight`, as in castorini's RepLLaMA.
Made by `python -m examples.make_retriever`: {start}{t["steps"]} steps, {t["train_seconds"] / 60:.0f} min on
{h["threads"]} thread(s) of a shared 2-core CPU. `training.json` records data, hyperparameters, losses, versions and
the SHA-256 of the base it was trained on.

## Base
`base_model_name_or_path` is the symbolic name `{BASE_NAME}`: the float32 safetensors folder that
`python -m examples.prepare_base` converts from the 4-bit GGUF of `../shared/scripts/fetch-models.sh`, in
`$REFORGE_MODELS` (default `~/.cache/reforge-models/{BASE_NAME}`). It is not the Hub's
HuggingFaceTB/SmolLM2-135M-Instruct (those are the unquantized weights). Pass the base path explicitly:

    reforge eval examples/assets/{folder} --base ~/.cache/reforge-models/{BASE_NAME} -d ../shared/data/scifact

## Encoding convention (also in `reforge_encoding.json`, read by `reforge eval`)
- query: `query: {{q}}`; passage: `passage: {{title}} {{text}}` (just `passage: {{text}}` without a title)
- no BOS (SmolLM2's tokenizer adds none); truncate to {h["max_length"] - 1} tokens, then append EOS `<|im_end|>` (id 2)
- {_POOLING_TEXT[h["pooling"]]}
- L2-normalized, inner product; at most {h["max_length"]} tokens for queries and passages
"""


_POOLING_TITLE = {"mean": "mean-pooling", "last": "last-token (EOS) pooling"}
_POOLING_TEXT = {
    "mean": "**mean** pooling over the real tokens, EOS included (RepLLaMA pools the last token, the EOS; on this\n"
    "  135M model last-token training collapsed: see docs/results.md)",
    "last": "last-token pooling (the hidden state of that EOS; pad = EOS, so find it from the attention mask)",
}


def main(argv: list[str] | None = None) -> int:
    """``python -m examples.make_retriever [--base DIR] [--data DIR] [--out DIR] [--max-steps N] ...``"""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base", type=Path, default=None, help="converted base folder (default $REFORGE_MODELS/SmolLM2-135M-Instruct)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BEIR folder with qrels/train.tsv")
    parser.add_argument("--out", type=Path, default=ASSETS, help="adapter folder to write")
    defaults = RecipeConfig()
    names = (
        "max_steps",
        "epochs",
        "batch_queries",
        "hard_negatives",
        "learning_rate",
        "temperature",
        "rank",
        "seed",
        "threads",
    )
    for name in names:
        kind = float if isinstance(getattr(defaults, name), float) else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    parser.add_argument("--pooling", choices=encoding.POOLINGS, default=defaults.pooling)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument(
        "--init-adapter", default=None, help="warm start: continue training this LoRA folder instead of a fresh one"
    )
    parser.add_argument(
        "--heldout-split", default=None, help="log and record in-batch MRR on this split before and after training"
    )
    parser.add_argument(
        "--autocast-bf16",
        action=argparse.BooleanOptionalAction,
        default=defaults.autocast_bf16,
        help="bfloat16 matmuls under CPU autocast (default on)",
    )
    args = parser.parse_args(argv)
    from reforge.errors import ReforgeError

    config = RecipeConfig(
        **{k: getattr(args, k) for k in names},
        autocast_bf16=args.autocast_bf16,
        pooling=args.pooling,
        lora_alpha=2 * args.rank,
        warmup_steps=args.warmup_steps,
        init_adapter=args.init_adapter,
        heldout_split=args.heldout_split,
    )
    try:
        make_retriever(
            args.base, args.data, args.out, config, log=lambda line: print(line, file=sys.stderr, flush=True)
        )
    except ReforgeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
