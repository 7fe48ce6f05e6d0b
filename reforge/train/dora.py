"""The knowledge-adapter recipe: a DoRA (or LoRA) adapter on the base causal LM, trained by next-token prediction
over unlabeled documents (RE-AdaptIR; hyperparameters in its Appendix A). Reads top to bottom, one function per phase:

    train_adapter(config)
      setup_data   read and filter the corpus, count tokens, lay out the steps (4 documents each, by default)
      setup_model  load the base LM, check it, add the adapter, optimizer and schedule
      train_loop   a plain loop: micro-batches -> loss -> backward -> clip -> step, checkpoints every N steps
      save         adapter_config.json + adapter_model.safetensors + training_record.json, renamed into place

Data parallel runs (``torchrun`` / ``accelerate launch``) use the same code: each rank measures the token length of
its share of the documents, every rank derives the same plan from those lengths, and each trains on its own rows
of every step under DistributedDataParallel. The loss is the sum over the step's predicted tokens divided by
their global count, so one step's gradient does not depend on how its rows are split over ranks and micro-steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from reforge import __version__
from reforge.data.corpus import Corpus, DocSelection, DocTexts, corpus_texts, load_corpus
from reforge.dist import Ranks, all_sum, barrier, join, shutdown
from reforge.errors import CheckpointNotFoundError, DataError, InvalidOptionError
from reforge.io.manifest import TRAINING_RECORD, write_record
from reforge.io.target import OutputLock, write_error
from reforge.io.tensors import save_peft_adapter
from reforge.train.attention import AttentionPlan, plan_attention
from reforge.train.batching import IGNORE, Batch, BatchPlan, Encoder, collate, make_encoder, split_step, token_lengths
from reforge.train.config import TrainConfig
from reforge.train.lengths import cached_token_lengths, lengths_key
from reforge.train.state import (
    check_output,
    latest_checkpoint,
    load_checkpoint,
    publish,
    save_checkpoint,
    start_fresh,
    work_dir,
)
from reforge.train.weight_norm import step_cached_weight_norm

RECORD_NAME = TRAINING_RECORD
RECORD_FORMAT = "reforge-train-record/1"
_HISTORY_POINTS = 1000


@dataclass(frozen=True)
class StepStats:
    """What `train_loop` reports after each optimizer step: mean loss per predicted token, learning rate, non-pad
    tokens per second (all ranks, this session) and seconds spent training (all sessions)."""

    loss: float
    lr: float
    tokens_per_s: float
    elapsed_s: float


ProgressFn = Callable[[int, int, StepStats], None]


@dataclass(frozen=True)
class TrainResult:
    """What a run produced. ``output`` is None for a dry run; ``record`` is the training record (written as
    ``training_record.json`` next to the adapter). ``tokens`` counts tokens that carried a loss; ``padding_share``
    is pad positions / all positions fed to the model. ``is_main`` is False on ranks other than 0."""

    output: Path | None
    record: dict[str, Any]
    steps: int
    documents: int
    tokens: int
    padding_share: float
    final_loss: float | None
    wall_time_s: float
    tokens_per_s: float
    resumed_from: int | None
    is_main: bool = True
    dry_run: bool = False


@dataclass
class Data:
    """Everything `setup_data` derives from the corpus. ``texts[i]`` is document i of ``plan`` (read on demand)."""

    corpus: Corpus
    texts: Sequence[str]
    plan: BatchPlan
    encode: Encoder
    pad_id: int
    total_steps: int


@dataclass
class Run:
    """Everything `setup_model` builds. ``engine`` is ``model`` itself, or its DistributedDataParallel wrapper.
    ``forward_budget``: most padded tokens per forward pass (None: a whole micro-batch at once)."""

    config: TrainConfig
    ranks: Ranks
    device: Any
    bf16: bool
    model: Any
    engine: Any
    optimizer: Any
    scheduler: Any
    forward_budget: int | None = None
    attention: AttentionPlan | None = None


@dataclass
class LoopState:
    """Counters that survive a resume: steps done, global token counts, training seconds, loss per step."""

    step: int = 0
    predicted: int = 0
    real: int = 0
    pad: int = 0
    train_time_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None


def train_adapter(
    config: TrainConfig,
    progress: ProgressFn | None = None,
    *,
    token: str | None = None,
    dry_run: bool = False,
    readme: Callable[[dict[str, Any]], str] | None = None,
    stage: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a knowledge adapter on ``config.base`` over ``config.corpus`` and write it to ``config.output``.

    Args:
        config: every option (defaults are the paper's).
        progress: called on rank 0 after each optimizer step as ``progress(step, total_steps, stats)``.
        token: Hugging Face token for a private base on the Hub (never saved).
        dry_run: read the corpus and lay out the steps, then stop; nothing is written.
        readme: turns the training record into the folder's README.md (the CLI passes
            `reforge.card.render_adapter_card`); None writes no README.
        stage: called on rank 0 with a short text as each phase before the first step begins (reading the corpus,
            counting tokens, loading the model, the first step).

    Returns:
        A `TrainResult`; the adapter folder holds ``adapter_config.json``, ``adapter_model.safetensors`` (peft
        layout) and ``training_record.json``.

    Raises:
        InvalidOptionError: an option is out of range, a target module matches nothing, max_length is above the
            model's limit, or ``resume`` meets a checkpoint made with other options.
        CheckpointNotFoundError: the base is missing, has no tokenizer, or is not a causal LM with an LM head.
        DataError: the corpus is missing, malformed or has no usable text.
        OutputExistsError: the output folder holds something else (pass ``overwrite``).

    Example:
        >>> result = train_adapter(TrainConfig(base="tiny-llama", corpus=["scifact"], output="psi"))  # doctest: +SKIP
    """
    import torch

    config.validate()
    started = time.perf_counter()
    checkpoint = _open_base(config, token)
    base = checkpoint.path
    resume_from = check_output(config)
    device_type = torch.device(config.device).type if config.device else "cuda" if torch.cuda.is_available() else "cpu"
    ranks = join(device_type)
    lock = OutputLock(config.output) if ranks.main and not dry_run else None  # the lock every writer takes
    try:
        if lock is not None:
            lock.acquire()
        device = torch.device(config.device or (f"cuda:{ranks.local}" if device_type == "cuda" else "cpu"))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # planned once, before the corpus is read: --attention flex on a CPU is refused before any work
        attention = None if dry_run else _plan_attention(config, base, device)
        say = stage if stage is not None and ranks.main else (lambda text: None)
        tokenizer = _load_tokenizer(config.base, base)
        data = setup_data(config, tokenizer, ranks, stage=say)
        if dry_run:
            return _plan_result(config, data, ranks, device, time.perf_counter() - started, base)
        work = work_dir(config.output)
        if resume_from is None:
            start_fresh(work, ranks)
        say(f"Loading {Path(str(config.base).rstrip('/')).name} and adding the adapter")
        run = setup_model(config, base, ranks, device, data.total_steps, attention=attention)
        state = LoopState()
        if resume_from is not None:
            meta = load_checkpoint(
                resume_from,
                config,
                model=run.model,
                optimizer=run.optimizer,
                scheduler=run.scheduler,
                ranks=ranks,
                corpus_sha256=data.corpus.sha256,
            )
            state = LoopState(**{k: meta[k] for k in asdict(state) if k != "resumed_from"}, resumed_from=meta["step"])
        say(f"Starting step {state.step + 1} of {data.total_steps:,}")
        state = train_loop(run, data, state, progress, work=work)
        return save(
            run, data, state, base=checkpoint, work=work, wall_time_s=time.perf_counter() - started, readme=readme
        )
    finally:
        if lock is not None:
            lock.release()
        shutdown(ranks)


def setup_data(
    config: TrainConfig, tokenizer, ranks: Ranks = Ranks(), stage: Callable[[str], None] = lambda text: None
) -> Data:
    """Read and filter the corpus, measure each document's tokens (each rank its share), and plan the steps.
    ``stage`` hears when each of the two begins."""
    stage("Reading the corpus")
    selection = DocSelection.from_files(
        only_ids=config.only_ids,
        exclude_ids=config.exclude_ids,
        only_judged=config.only_judged,
        exclude_judged=config.exclude_judged,
        max_docs=config.max_docs,
    )
    corpus = load_corpus(
        config.corpus,
        text_field=config.text_field,
        per_line=config.per_line,
        skip_bad_lines=config.skip_bad_lines,
        selection=selection,
    )
    texts = corpus_texts(corpus)  # JSONL text is read on demand: only lengths and offsets are held
    stage(f"Counting the tokens of {len(texts):,} documents")
    encode = make_encoder(tokenizer, config.max_length)
    key = lengths_key(corpus.sha256, tokenizer, config.max_length)  # cached: --dry-run and --resume reuse them
    lengths, _ = cached_token_lengths(texts, lambda share: token_lengths(encode, share), key, ranks)
    global_batch = config.batch_size * config.grad_accum * ranks.world
    _refuse_nothing_to_learn(corpus, lengths)
    plan = BatchPlan.build(
        lengths, max_length=config.max_length, global_batch=global_batch, batching=config.batching, seed=config.seed
    )
    total = plan.steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    return Data(corpus, texts, plan, encode, pad_id, total)


def setup_model(
    config: TrainConfig, base: Path, ranks: Ranks, device, total_steps: int, *, attention: AttentionPlan | None = None
) -> Run:
    """Load the base LM (with per-document attention for packed rows, see `reforge.train.attention`), refuse one
    without an LM head, add the adapter (seeded), wrap for DDP, build AdamW and the schedule. Only ``lora_*``
    tensors are trainable; the LM head and embeddings never are. ``attention``: the plan `train` made (planned here
    when not given)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_scheduler

    if attention is None:
        attention = _plan_attention(config, base, device)
    bf16 = config.precision == "bf16" or (
        config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    with _quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(
            base,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            output_loading_info=True,
            attn_implementation=attention.implementation,
            use_safetensors=None if config.allow_pickle else True,
            device_map={"": device} if device.type == "cuda" else None,
        )
    if info["missing_keys"]:
        raise CheckpointNotFoundError(
            f"{config.base} lacks {len(info['missing_keys'])} tensors a {type(model).__name__} needs "
            f"(e.g. {sorted(info['missing_keys'])[0]}): it is not a causal LM with its LM head, maybe a retriever.",
            hint="Train on the base causal LM the retriever was made from.",
            ref=config.base,
        )
    _check_targets(model, config)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.seed)
    peft_config = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        use_dora=config.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _quiet_transformers():
        model = get_peft_model(model, peft_config).to(device)
    step_cached_weight_norm(model)  # DoRA's norm once per optimizer step, not per forward pass
    not_adapter = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    if not_adapter:  # a bug, not a user error: peft must leave the base (LM head, embeddings) frozen
        raise RuntimeError(f"non-adapter tensors are trainable: {not_adapter[:3]}")
    torch.manual_seed(config.seed + ranks.rank)  # each rank its own dropout masks
    engine = model
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        engine = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    schedule = "constant_with_warmup" if config.schedule == "constant" else config.schedule
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)
    return Run(
        config, ranks, device, bf16, model, engine, optimizer, scheduler, _forward_budget(config, device), attention
    )


def _plan_attention(config: TrainConfig, base: Path, device) -> AttentionPlan:
    """`plan_attention` for ``--attention`` on the base's config and this run's device."""
    from transformers import AutoConfig

    return plan_attention(AutoConfig.from_pretrained(base), device.type, config.attention)


def train_loop(
    run: Run, data: Data, state: LoopState, progress: ProgressFn | None = None, *, work: Path | None = None
) -> LoopState:
    """Run the optimizer steps from ``state.step`` to ``data.total_steps``; checkpoint every ``save_every`` steps
    into ``work``. The same steps, in the same order, whether or not the run was resumed."""
    import torch

    config, ranks = run.config, run.ranks
    params = [p for p in run.model.parameters() if p.requires_grad]
    run.engine.train()
    session_start, session_real = time.perf_counter(), 0
    steps, epoch = [], -1
    for step in range(state.step, data.total_steps):
        if step // data.plan.steps_per_epoch != epoch:
            epoch = step // data.plan.steps_per_epoch
            steps = data.plan.epoch_steps(epoch)
        micro = split_step(
            steps[step % data.plan.steps_per_epoch],
            rank=ranks.rank,
            rank_count=ranks.world,
            batch_size=config.batch_size,
            grad_accum=config.grad_accum,
        )
        batches = _step_batches(run, data, micro)
        predicted, real, pad = all_sum(
            [sum(b.predicted for b in batches), sum(b.real for b in batches), sum(b.pad for b in batches)],
            ranks,
            run.device,
        )
        loss_sum = _forward_backward(run, batches, predicted)
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr = run.scheduler.get_last_lr()[0]
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        loss = all_sum([loss_sum], ranks, run.device)[0] / max(predicted, 1)
        session_real += int(real)
        seconds = time.perf_counter() - session_start
        state.step, state.predicted, state.real, state.pad = (
            step + 1,
            state.predicted + int(predicted),
            state.real + int(real),
            state.pad + int(pad),
        )
        state.losses.append(loss)
        if progress is not None and ranks.main:
            progress(
                step + 1,
                data.total_steps,
                StepStats(loss, lr, session_real / max(seconds, 1e-9), state.train_time_s + seconds),
            )
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < data.total_steps and work:
            meta = {
                **asdict(state),
                "train_time_s": state.train_time_s + seconds,
                "config": config.to_dict(),
                "world_size": ranks.world,
                "corpus_sha256": data.corpus.sha256,
            }
            save_checkpoint(
                work,
                step + 1,
                model=run.model,
                optimizer=run.optimizer,
                scheduler=run.scheduler,
                meta=meta,
                ranks=ranks,
            )
    state.train_time_s += time.perf_counter() - session_start
    return state


def save(
    run: Run,
    data: Data,
    state: LoopState,
    *,
    base,
    work: Path,
    wall_time_s: float,
    readme: Callable[[dict[str, Any]], str] | None = None,
) -> TrainResult:
    """Write the peft adapter and the training record under ``work/final`` and rename it to the output (rank 0)."""
    import copy
    import shutil

    from peft import get_peft_model_state_dict

    config, ranks = run.config, run.ranks
    output = Path(config.output)
    record = _recorded_paths(_record(run, data, state, base, wall_time_s), output)
    if ranks.main:
        final = work / "final"
        shutil.rmtree(final, ignore_errors=True)
        # peft's state dict first: it opens base_model_name_or_path (from the working folder) to see whether the
        # vocabulary was resized, so it must still be the base as given
        tensors = get_peft_model_state_dict(run.model)
        adapter = copy.deepcopy(run.model.peft_config["default"])
        # a local base relative to the adapter folder, as the training record names it (a pushed adapter carries no
        # local absolute path); a Hub base its repo id. `reforge eval` resolves a relative one against the folder.
        adapter.base_model_name_or_path = record["config"]["base"]
        adapter.revision = record["base"].get("commit") or record["base"].get("revision")
        try:
            save_peft_adapter(
                final,
                adapter,
                tensors,
                provenance={"reforge_version": __version__, "reforge_base": record["config"]["base"]},
            )
            if readme is not None:
                (final / "README.md").write_text(readme(record), encoding="utf-8")
            write_record(final / RECORD_NAME, record)
        except OSError as e:
            raise write_error(e, final, _unsaved_hint(config, work)) from e
        publish(final, output, work)
    barrier(ranks)
    return _result(record, output, state, data, ranks)


# ---- helpers ---------------------------------------------------------------------------------------------------
def _unsaved_hint(config: TrainConfig, work: Path) -> str:
    checkpoint = latest_checkpoint(work)
    if checkpoint is not None:
        return (
            f"Training finished; its last checkpoint is {checkpoint}: free some space and rerun with --resume "
            "to save the adapter from there."
        )
    return "Training finished but nothing could be saved; free some space (--save-every N keeps checkpoints)."


def _forward_budget(config: TrainConfig, device) -> int | None:
    """On CPU, a micro-batch goes through the model in groups of at most ``max_length`` padded tokens: the same
    gradient (the loss is a sum over tokens), but tensors small enough to stay in cache; measured 15-20% more
    tokens per second on 4 packed rows of 1024. GPUs get the whole micro-batch."""
    return config.max_length if device.type == "cpu" else None


def _refuse_nothing_to_learn(corpus: Corpus, lengths: np.ndarray) -> None:
    """A corpus whose documents tokenize to nothing (or to the end marker alone) has no token to predict: training
    would "finish" with loss 0 and write an untrained adapter."""
    if int(np.maximum(lengths - 1, 0).sum()) == 0:
        where = ", ".join(str(p) for p in corpus.paths)
        raise DataError(
            f"No tokens to train on: the tokenizer gives the {len(lengths):,} documents of {where} no "
            f"token to predict.",
            hint="Check --text-field and that the corpus holds text the base's tokenizer reads.",
            path=where,
            line=None,
        )


def _step_batches(run: Run, data: Data, micro: list[list]) -> list[Batch]:
    """The forward passes of this rank's micro-batches: packed rows (every attention path but ``padded``), or one
    document per row, padded, with an attention mask."""
    packed = run.attention is None or run.attention.packed
    return [
        _tokenized_batch(data, group, padded=not packed)
        for rows in micro
        for group in data.plan.forward_groups(rows, run.forward_budget, packed=packed)
    ]


def _tokenized_batch(data: Data, rows, *, padded: bool = False) -> Batch:
    docs = [d for row in rows for d in row]
    texts = data.texts.take(docs) if isinstance(data.texts, DocTexts) else [data.texts[d] for d in docs]
    ids = iter(data.encode(texts) if docs else [])
    return collate([[next(ids) for _ in row] for row in rows], data.pad_id, padded=padded)


def _forward_backward(run: Run, batches: list[Batch], predicted: float) -> float:
    """Sum of token losses over this rank's micro-batches; gradients of (that sum / the step's global predicted
    tokens), times the world size because DDP averages gradients over ranks."""
    import torch
    import torch.nn.functional as F

    scale = run.ranks.world / max(predicted, 1)
    total = 0.0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = nullcontext() if last or run.ranks.world == 1 else run.engine.no_sync()
        autocast = torch.autocast(run.device.type, dtype=torch.bfloat16) if run.bf16 else nullcontext()
        with sync:
            with autocast:
                mask = None if batch.attention_mask is None else batch.attention_mask.to(run.device)
                logits = run.engine(
                    input_ids=batch.input_ids.to(run.device),
                    position_ids=batch.position_ids.to(run.device),
                    attention_mask=mask,
                    use_cache=False,
                ).logits
            loss_sum = F.cross_entropy(
                logits.float().flatten(0, 1),
                batch.targets.to(run.device).flatten(),
                ignore_index=IGNORE,
                reduction="sum",
            )
            (loss_sum * scale).backward()
        total += float(loss_sum.detach())
    return total


@contextmanager
def _quiet_transformers():
    """No tqdm bar from transformers' loader (the CLI draws its own), no deprecation noise from peft's calls."""
    import warnings

    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _open_base(config: TrainConfig, token: str | None):
    """Open the base (local folder or Hub repo) and check, before any weight is read, that it is a causal LM with
    an LM head and that max_length is within its limit."""
    from reforge.io.checkpoint import open_model

    checkpoint = open_model(config.base, token=token, allow_pickle=config.allow_pickle)
    archs = list((checkpoint.config or {}).get("architectures") or [])
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if (archs and not causal) or checkpoint.layout.is_bare:
        kind = f"a {archs[0]}" if archs else "a bare model (no LM head, no 'model.' prefix)"
        raise CheckpointNotFoundError(
            f"{config.base} is {kind}, not a causal LM with an LM head (a retriever?). The knowledge adapter is "
            f"trained by next-token prediction on the base LM.",
            hint="Pass the base causal LM the retriever was made from (e.g. meta-llama/Llama-2-7b-hf for RepLLaMA).",
            ref=config.base,
        )
    limit = (checkpoint.config or {}).get("max_position_embeddings")
    if limit is not None and config.max_length > limit:
        raise InvalidOptionError(
            f"--max-length {config.max_length} is above {config.base}'s limit of {limit} "
            f"tokens (max_position_embeddings).",
            hint=f"Pass --max-length {limit} or less.",
            option="max_length",
        )
    return checkpoint


def _check_targets(model, config: TrainConfig) -> None:
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    missing = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise InvalidOptionError(
            f"Target modules {', '.join(missing)} match no Linear module of {config.base}; "
            f"it has: {', '.join(leaves)}.",
            hint="Pass --target-modules with names from that list.",
            option="target_modules",
        )


def _load_tokenizer(ref: str, base: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise CheckpointNotFoundError(
            f"{ref} has no usable tokenizer ({e}).",
            hint="Save the base model's tokenizer into its folder (tokenizer.save_pretrained).",
            ref=ref,
        ) from e


def _record(run: Run, data: Data, state: LoopState, base, wall_time_s: float) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    config = run.config
    every = max(1, len(state.losses) // _HISTORY_POINTS)
    history = [[i + 1, round(loss, 6)] for i, loss in enumerate(state.losses) if (i + 1) % every == 0 or i == 0]
    return {
        "format": RECORD_FORMAT,
        "reforge_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "adapter": "dora" if config.use_dora else "lora",
        "base": {
            **base.provenance,
            "architectures": (base.config or {}).get("architectures"),
            "tie_word_embeddings": (base.config or {}).get("tie_word_embeddings"),
        },
        "corpus": _corpus_facts(config, data),
        "tokens": {
            "trained": state.predicted,
            "input": state.real,
            "padding": state.pad,
            "padding_share": state.pad / max(state.real + state.pad, 1),
        },
        "steps": state.step,
        "global_batch": data.plan.global_batch,
        "batching": config.batching,
        "world_size": run.ranks.world,
        "device": run.device.type,
        "precision": "bf16" if run.bf16 else "fp32",
        "attention": run.attention.to_dict() if run.attention else None,
        "loss": {
            "first": state.losses[0] if state.losses else None,
            "final": state.losses[-1] if state.losses else None,
            "history": history,
        },
        "train_time_s": round(state.train_time_s, 3),
        "wall_time_s": round(wall_time_s, 3),
        "tokens_per_s": state.real / max(state.train_time_s, 1e-9),
        "resumed_from_step": state.resumed_from,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "config": config.to_dict(),
    }


def _recorded_paths(record: dict[str, Any], output: Path) -> dict[str, Any]:
    """``record`` as the adapter folder ``output`` publishes it: every local path (the base's ``path`` and ``ref``,
    the corpus files, the options naming files) relative to ``output``, as ``reforge.json`` records them
    (`reforge.io.paths.recorded_inputs`); a Hub base stays its repo id."""
    from reforge.io.paths import recorded_inputs, recorded_path

    local_base = isinstance(record["base"].get("path"), str)
    recorded_inputs(record, output)  # base.path and base.ref, and says paths_relative_to
    record["corpus"]["paths"] = [recorded_path(p, output) for p in record["corpus"]["paths"]]
    config = record["config"]
    config["base"] = recorded_path(config["base"], output) if local_base else config["base"]
    config["output"] = "."
    for key in ("corpus", "exclude_judged", "only_judged"):
        config[key] = [recorded_path(p, output) for p in config[key]]
    for key in ("exclude_ids", "only_ids"):
        config[key] = recorded_path(config[key], output) if config[key] is not None else None
    return record


def _corpus_facts(config: TrainConfig, data: Data) -> dict[str, Any]:
    corpus, lengths = data.corpus, data.plan.lengths
    return {
        "paths": [str(p.resolve()) for p in corpus.paths],
        "kinds": list(corpus.kinds),
        "sha256": corpus.sha256,
        "documents": len(corpus.docs),
        "documents_read": corpus.read,
        "documents_empty": corpus.empty,
        "documents_filtered": corpus.filtered,
        "only_ids_missing": corpus.only_missing,
        "documents_at_max_length": int((lengths >= config.max_length).sum()),
        "tokens": int(lengths.sum()),
        "rows": len(data.plan.rows),
    }


def _result(
    record: dict[str, Any], output: Path | None, state: LoopState, data: Data, ranks: Ranks, dry_run: bool = False
) -> TrainResult:
    tokens = record["tokens"]
    return TrainResult(
        output=output,
        record=record,
        steps=record["steps"],
        documents=len(data.corpus.docs),
        tokens=tokens["trained"],
        padding_share=tokens["padding_share"],
        final_loss=record.get("loss", {}).get("final"),
        wall_time_s=record["wall_time_s"],
        tokens_per_s=record.get("tokens_per_s", 0.0),
        resumed_from=state.resumed_from,
        is_main=ranks.main,
        dry_run=dry_run,
    )


def _plan_result(config: TrainConfig, data: Data, ranks: Ranks, device, wall_time_s: float, base: Path) -> TrainResult:
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(base)
    attention = plan_attention(model_config, "cuda", config.attention)  # the plan is for a GPU
    real, pad = data.plan.padding(
        config.batch_size, ranks.world, config.grad_accum, _forward_budget(config, device), packed=attention.packed
    )
    epochs_done = data.total_steps / data.plan.steps_per_epoch
    record = {
        "corpus": _corpus_facts(config, data),
        "steps": data.total_steps,
        "global_batch": data.plan.global_batch,
        "batching": config.batching,
        "tokens": {
            "trained": int(np.maximum(data.plan.lengths - 1, 0).sum() * epochs_done),
            "input": real,
            "padding": pad,
            "padding_share": pad / max(real + pad, 1),
        },
        "wall_time_s": round(wall_time_s, 3),
        "attention": attention.to_dict(),
        "memory": _gpu_memory_plan(config, model_config, attention.path),
        "config": config.to_dict(),
    }
    return _result(record, None, LoopState(), data, ranks, dry_run=True)


def _gpu_memory_plan(config: TrainConfig, model_config, path: str) -> dict[str, Any]:
    """`reforge.train.plan.plan_memory` for this run on one GPU: bf16 unless ``--precision fp32``, attention
    ``path`` (what ``--attention`` gives on CUDA)."""
    from reforge.train.plan import plan_memory

    bf16 = config.precision != "fp32"
    plan = plan_memory(
        model_config,
        target_modules=config.target_modules,
        r=config.r,
        use_dora=config.use_dora,
        lora_dropout=config.lora_dropout,
        batch_size=config.batch_size,
        max_length=config.max_length,
        bf16=bf16,
        attention=path,
    )
    return {**plan.to_dict(), "precision": "bf16" if bf16 else "fp32", "attention": path}
