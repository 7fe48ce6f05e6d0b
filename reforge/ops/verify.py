"""`verify`: is a produced checkpoint sound, and does it hold what its inputs say it should?

Checks, each reported by name:
- ``loads``: headers and index are consistent, no partial files left, ``reforge.json`` says complete;
- ``finite``: no NaN or Inf in any tensor;
- ``layout``: names, shapes and dtypes match the retriever (merged models);
- ``recompute``: tensors recomputed from the inputs match the stored ones within the stored dtype's rounding
  (a sample, or every tensor with ``full``). For a delta: base + Delta against the retriever, within the
  rounding recorded at diff time;
- ``encoding`` (merged models): the new model's ``reforge_encoding.json`` gives the retriever's encoding profile;
- ``embeddings`` (merged models, optional): cosine agreement of a few sentences embedded by the retriever and
  the new model; reported, it fails when an embedding is not finite or when the check cannot run.

``encoding`` and ``embeddings`` load and run both models, which is eval's work: the caller passes
`reforge.eval.agreement.compare_embeddings` as ``embeddings`` (`reforge verify` does), since ops does not import eval.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from reforge.errors import CorruptCheckpointError, ReforgeError
from reforge.io.checkpoint import AdapterCheckpoint, open_checkpoint
from reforge.io.index import ShardIndex
from reforge.io.manifest import read_manifest
from reforge.io.progress import ProgressFn
from reforge.io.reader import ShardReader
from reforge.io.target import staging_path
from reforge.ops.chat import apply_head_rule
from reforge.ops.device import resolve_device
from reforge.ops.job import Access


class EmbeddingCompare(Protocol):
    """How ``embeddings`` compares the retriever and the new model: `reforge.eval.agreement.compare_embeddings`
    (passed in by the caller: ops does not import eval). Returns an object with ``checks`` (name, ok, detail) and
    ``cosine``."""

    def __call__(
        self, new: Path, retriever: str, base: str | None, *, token: str | None, allow_pickle: bool
    ) -> Any: ...


@dataclass
class Check:
    """One named check: passed or not, with a one-line detail."""

    name: str
    ok: bool
    detail: str
    skipped: bool = False


@dataclass
class VerifyReport:
    """All checks on one folder. ``ok`` is True when every check passed."""

    path: Path
    kind: str
    checks: list[Check] = field(default_factory=list)
    tensors: dict[str, dict] = field(default_factory=dict)
    cosine: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]

    @property
    def skipped(self) -> list[str]:
        """Checks that could not run, with why: the folder is sound only as far as it was checked."""
        return [f"{c.name}: {c.detail}" for c in self.checks if c.skipped]

    def add(self, name: str, ok: bool, detail: str, *, skipped: bool = False) -> None:
        self.checks.append(Check(name, ok, detail, skipped))


@dataclass(frozen=True)
class VerifyInputs:
    """What the checked folder was made from: the command's ``--base/--retriever/--delta``
    (`reforge.cli.options.source_options`), ``--adapter/--alpha`` (`adapter_options`) and ``--beta``. A field left
    None is taken from the folder's ``reforge.json``: the recorded path while it exists, else its Hub ref; so is
    ``keep_lm_head`` (RE-Adapt of a chat model) when False. Completed so (`_sources`), it is what every recompute
    check starts from, with at most one of ``retriever`` and ``delta``."""

    base: str | None = None
    retriever: str | None = None
    delta: str | None = None
    adapters: list[tuple[str, float]] | None = None
    beta: float | None = None
    keep_lm_head: bool = False


def verify_checkpoint(
    path: str | Path,
    inputs: VerifyInputs | None = None,
    *,
    access: Access | None = None,
    full: bool = False,
    samples: int = 8,
    seed: int = 0,
    embeddings: EmbeddingCompare | bool | None = None,
    progress: ProgressFn | None = None,
    device: str | None = "cpu",
) -> VerifyReport:
    """Verify a delta or merged checkpoint folder; see the module docstring for the checks.

    Args:
        inputs: what the folder was made from; what is not given comes from its ``reforge.json``.
        access: how inputs are opened (Hub token, pickle allowed).
        full, samples, seed: recompute every tensor, or ``samples`` of them chosen with ``seed``.
        embeddings: `reforge.eval.agreement.compare_embeddings` (or another `EmbeddingCompare`) runs the
            ``encoding`` and ``embeddings`` checks; None or False leaves them out; True, which names no
            comparison, reports them as skipped.
        device: where ``recompute`` runs merge's arithmetic (cpu, cuda, or auto: a GPU when there is one; see
            `reforge.ops.device`); the independent recheck stays on the CPU, in float64, by design.
    """
    path = Path(path)
    try:
        record = read_manifest(path)
    except CorruptCheckpointError as e:  # not "no inputs recorded": a damaged record fails the folder
        report = VerifyReport(path, "model")
        report.add("loads", False, str(e))
        return report
    manifest = record.data if record is not None else {}
    where = resolve_device(device)
    report = VerifyReport(path, manifest.get("kind", "model"))
    index = _check_loads(path, manifest, report)
    if index is None:
        return report
    _check_finite(index, report, progress)
    from reforge.io.paths import located_inputs  # issue 26: reforge.json names local inputs relative to its folder

    sources = _sources(located_inputs(manifest, path), inputs or VerifyInputs())
    run = _Run(path, manifest, index, sources, access or Access(), full, samples, seed, report)
    if report.kind == "delta":
        _check_delta(run)
    elif sources.base and (sources.retriever or sources.delta):
        _check_layout(run)
        _check_merge(run, where)
        _check_independent(run)
        if sources.keep_lm_head:
            report.add(
                "embeddings", True, "not applicable: a chat model readapted with --keep-lm-head, not a retriever"
            )
        elif embeddings is True and sources.retriever:
            report.add(
                "embeddings",
                True,
                "skipped: no comparison given (pass embeddings=reforge.eval.agreement.compare_embeddings)",
                skipped=True,
            )
        elif embeddings and sources.retriever:
            _check_embeddings(run, embeddings)
    else:
        report.add(
            "recompute", True, "skipped: no inputs given and none recorded (pass --base and --retriever)", skipped=True
        )
    return report


@dataclass
class _Run:
    """One verification: the folder, its record and index, the resolved inputs and how to open them, which tensors
    to recompute, and the report the checks add to."""

    path: Path
    manifest: dict
    index: ShardIndex
    sources: VerifyInputs
    access: Access
    full: bool
    samples: int
    seed: int
    report: VerifyReport

    def sample(self, keys: list[str], samples: int | None = None, *, seed_offset: int = 0, full: bool | None = None):
        """``keys``, or a seeded sample of them (every key with ``full``)."""
        return _sample(
            keys,
            self.full if full is None else full,
            self.samples if samples is None else samples,
            self.seed + seed_offset,
        )

    def open(self, ref: str):
        return open_checkpoint(ref, token=self.access.token, allow_pickle=self.access.allow_pickle)


def _check_loads(path: Path, manifest: dict, report: VerifyReport) -> ShardIndex | None:
    leftovers = [p.name for p in path.glob("*.incomplete")] + [p.name for p in [staging_path(path)] if p.exists()]
    try:
        index = ShardIndex.from_dir(path)
    except ReforgeError as e:
        report.add("loads", False, str(e))
        return None
    problems = []
    total = index.metadata.get("total_size") if isinstance(index.metadata, dict) else None
    actual = sum(info.nbytes for info in index.tensors.values())
    if total is not None and int(total) != actual:
        problems.append(f"index total_size {total} != {actual} bytes of tensors")
    if leftovers:
        problems.append(f"unfinished files left: {', '.join(leftovers)}")
    if (path / "reforge.json").exists() and not manifest:
        problems.append("reforge.json is not a readable JSON object (malformed or truncated)")
    if manifest and manifest.get("state") != "complete":
        problems.append("reforge.json does not say the write completed")
    report.add(
        "loads",
        not problems,
        "; ".join(problems) or f"{len(index.tensors)} tensors in {len(index.files)} file(s), index consistent",
    )
    return index


def _check_finite(index: ShardIndex, report: VerifyReport, progress) -> None:
    from reforge.io.tensors import all_finite

    bad = []
    total = sum(info.nbytes for info in index.tensors.values())
    done = 0
    with ShardReader(index) as reader:
        for name in reader.keys():
            info = reader.info(name)
            if info.dtype in ("F32", "F16", "BF16", "F64"):
                if not all_finite(reader.get(name)):  # one min/max pass: 28x less CPU than isfinite().all()
                    bad.append(name)
            done += info.nbytes
            if progress:
                progress(done, total)
    report.add(
        "finite", not bad, f"NaN/Inf in {len(bad)} tensor(s), e.g. {bad[0]!r}" if bad else "no NaN or Inf in any tensor"
    )


def _sources(manifest: dict, given: VerifyInputs) -> VerifyInputs:
    """``given`` completed from the folder's record ``manifest`` (its local paths absolute)."""
    from reforge.ops.defaults import PAPER_ALPHA, PAPER_BETA

    def recorded(entry: dict | None) -> str | None:
        if not entry:
            return None
        local = entry.get("path")
        if local and Path(local).exists():
            return local
        return entry.get("repo_id") and (entry["repo_id"] + (f"@{entry['revision']}" if entry.get("revision") else ""))

    adapters = given.adapters
    if adapters is None:
        adapters = [(recorded(a), a.get("alpha", PAPER_ALPHA)) for a in manifest.get("adapters") or []]
        adapters = [(ref, alpha) for ref, alpha in adapters if ref]
    retriever = given.retriever or (None if given.delta else recorded(manifest.get("retriever")))
    delta = given.delta or (None if given.retriever else (manifest.get("delta") or {}).get("path"))
    return VerifyInputs(
        base=given.base or recorded(manifest.get("base")),
        retriever=retriever,
        delta=None if retriever else delta,
        adapters=list(adapters),
        beta=manifest.get("beta", PAPER_BETA) if given.beta is None else given.beta,
        keep_lm_head=given.keep_lm_head or bool(manifest.get("keep_lm_head")),
    )


def _check_delta(run: _Run) -> None:
    from reforge.ops.delta import DeltaCheckpoint

    report, manifest = run.report, run.manifest
    if not (run.sources.base and run.sources.retriever):
        report.add(
            "recompute", True, "skipped: pass --base and --retriever to check base + Delta = retriever", skipped=True
        )
        return
    delta = DeltaCheckpoint.open(run.path)
    base = run.open(run.sources.base)
    retriever = run.open(run.sources.retriever)
    if isinstance(retriever, AdapterCheckpoint):
        _check_adapter_delta(run, delta, base.path, retriever.path)
        return
    if run.sources.keep_lm_head:
        apply_head_rule(base, retriever, True)
    base_keys, retriever_keys = base.canonical_keys(), retriever.canonical_keys()
    keys = run.sample(list(delta.shapes))
    failures = []
    with base.reader() as b, retriever.reader() as r, delta.reader() as d:
        for key in keys:
            if key not in retriever_keys:
                failures.append(f"{key}: not in the retriever")
                continue
            expected = r.get(retriever_keys[key]).float()
            rebuilt = delta.get(d, key)
            if key in base_keys:
                base_value = b.get(base_keys[key]).float()
                rebuilt[: base_value.shape[0]] += base_value
            error = float((rebuilt - expected).abs().max()) if expected.numel() else 0.0
            recorded = ((manifest.get("records") or {}).get(key) or {}).get("max_abs_rounding", 0.0)
            tolerance = recorded + _fp32_slack(expected)
            report.tensors[key] = {
                "max_abs_error": error,
                "tolerance": tolerance,
                "relative_error": error / max(float(expected.abs().max()), 1e-30),
            }
            if not error <= tolerance:
                failures.append(f"{key}: |base + Delta - retriever| = {error:.3g} > {tolerance:.3g}")
    report.add(
        "recompute",
        not failures,
        "; ".join(failures[:3])
        or f"base + Delta matches the retriever on {len(keys)} tensor(s) within the recorded rounding",
    )


def _check_layout(run: _Run) -> None:
    report = run.report
    if not run.sources.retriever:
        return
    opened = run.open(run.sources.retriever)
    if isinstance(opened, AdapterCheckpoint):
        report.add("layout", True, "retriever is a peft adapter: output is its full bare model")
        return
    if run.sources.keep_lm_head:
        opened.layout = replace(opened.layout, keep_head=True)
    expected = {
        name: (info.shape, info.dtype)
        for name, info in opened.index.tensors.items()
        if opened.layout.canonical(name) is not None
    }
    found = {name: (info.shape, info.dtype) for name, info in run.index.tensors.items()}
    problems = [f"missing {n!r}" for n in expected if n not in found][:3]
    problems += [f"unexpected {n!r}" for n in found if n not in expected][:3]
    problems += [f"{n!r} is {found[n]} not {expected[n]}" for n in expected if n in found and found[n] != expected[n]][
        :3
    ]
    report.add(
        "layout",
        not problems,
        "; ".join(problems) or f"same {len(expected)} tensor names, shapes and dtypes as the retriever",
    )


def _check_merge(run: _Run, device=None) -> None:
    import torch

    from reforge.ops import merge_compute
    from reforge.ops.merge_inputs import open_inputs
    from reforge.ops.stream import scratch_for

    given, report, index = run.sources, run.report, run.index
    source = open_inputs(
        given.base, given.retriever, given.delta, given.adapters, access=run.access, keep_lm_head=given.keep_lm_head
    )
    touched = [k for k in source.shapes if any(k in a.modules for a, _ in source.adapters)]
    untouched = [k for k in source.shapes if k not in touched]
    keys = (
        list(source.shapes)
        if run.full
        else run.sample(touched, full=False) + run.sample(untouched, max(2, run.samples // 4), full=False)
    )
    failures = []
    scratch = scratch_for(device)()
    with merge_compute.InputLoader(source, given.beta) as loader:
        with ShardReader(index) as stored_reader:
            for key in keys:
                name = source.stored_names[key]
                if name not in index.tensors:
                    failures.append(f"{name}: missing")
                    continue
                stored = stored_reader.get(name)
                dtype = stored.dtype
                expected, _ = scratch.compute(
                    lambda here, key=key, dtype=dtype: merge_compute.compute_output(
                        source, here, key, given.beta, dtype, scratch=scratch
                    ),
                    loader.load(key),
                    lambda shape, dtype=dtype: torch.empty(shape, dtype=dtype),
                )
                expected = expected.float()
                error = float((stored.float() - expected).abs().max()) if stored.numel() else 0.0
                tolerance = _ulp(stored.dtype) * float(expected.abs().max()) if stored.numel() else 0.0
                report.tensors[name] = {"max_abs_error": error, "tolerance": tolerance}
                if not error <= tolerance:
                    failures.append(f"{name}: differs from the recomputed merge by {error:.3g} > {tolerance:.3g}")
    report.add(
        "recompute",
        not failures,
        "; ".join(failures[:3])
        or f"{len(keys)} tensor(s) recomputed from the inputs match within one rounding of their dtype",
    )


def _check_independent(run: _Run) -> None:
    """Recompute a sample (all with ``full``) by `reforge.ops.recheck`'s plain formula, sharing no code with merge."""
    from reforge.io.checkpoint import resolve_local
    from reforge.ops.recheck import recheck_merge

    names = run.sample(sorted(run.index.tensors), seed_offset=1)
    access = run.access

    def resolve(ref: str) -> Path:
        return resolve_local(ref, token=access.token, allow_pickle=access.allow_pickle)

    result = recheck_merge(run.path, names, run.sources, resolve)
    _report_recheck("independent", result, run.report, "recomputed by the plain formula from the input files")


def _check_adapter_delta(run: _Run, delta, base_dir: Path, adapter_dir: Path) -> None:
    """A delta from a LoRA retriever: Delta against the adapter folded by the plain formula (`reforge.ops.recheck`)."""
    from reforge.ops.recheck import recheck_adapter_delta

    names = run.sample(list(delta.shapes))
    result = recheck_adapter_delta(run.path, names, base_dir, adapter_dir, run.manifest)
    _report_recheck("recompute", result, run.report, "of Delta equal the LoRA retriever folded by the plain formula")


def _report_recheck(check: str, result, report: VerifyReport, what: str) -> None:
    failures = result.failures
    missing = result.not_recomputed
    for name, (error, tolerance) in result.checked.items():
        report.tensors.setdefault(name, {}).update({f"{check}_error": error, f"{check}_tolerance": tolerance})
    if failures:
        report.add(check, False, "; ".join(failures[:3]))
    elif missing and not result.checked:
        reason = next(iter(missing.values()))
        report.add(check, True, f"skipped: {len(missing)} tensor(s) not recomputed ({reason})", skipped=True)
    elif missing:
        name, reason = next(iter(missing.items()))
        report.add(
            check,
            True,
            f"{len(result.checked)} tensor(s) {what}; {len(missing)} not recomputed (e.g. {name!r}: {reason})",
            skipped=True,
        )
    else:
        report.add(check, True, f"{len(result.checked)} tensor(s) {what}, within one rounding of their dtype")


def _check_embeddings(run: _Run, compare: EmbeddingCompare) -> None:
    """``encoding`` and ``embeddings``, by ``compare`` (`reforge.eval.agreement.compare_embeddings`)."""
    agreement = compare(
        run.path,
        run.sources.retriever,
        run.sources.base,
        token=run.access.token,
        allow_pickle=run.access.allow_pickle,
    )
    for name, ok, detail in agreement.checks:
        run.report.add(name, ok, detail)
    run.report.cosine = list(agreement.cosine)


def _sample(keys: list[str], full: bool, samples: int, seed: int) -> list[str]:
    if full or len(keys) <= samples:
        return list(keys)
    return sorted(random.Random(seed).sample(keys, samples))


def _ulp(dtype) -> float:
    """Relative spacing of ``dtype`` (2 * unit roundoff): the most two correct roundings can differ by."""
    import torch

    return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0


def _fp32_slack(reference) -> float:
    import torch

    return 4 * float(torch.finfo(torch.float32).eps) * float(reference.abs().max()) if reference.numel() else 0.0
