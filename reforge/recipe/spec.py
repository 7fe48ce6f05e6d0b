"""The recipe file: what it may hold, read into a `Recipe` with every value checked and its line kept.

A recipe names the inputs (``base``, ``retriever``, ``corpora``, ``datasets``) and the steps. Each step has a name
and one kind: ``diff``, ``train``, ``tune``, ``merge``, ``eval`` or ``push``. A step's options are the command's own
options, spelled as on the command line without the dashes in front (``max-length``, ``lora-r``, ``exclude-judged``),
and their defaults are the command's (the paper's), read from the API's dataclasses and signatures, never restated.
A step's inputs are references: a step name, ``base`` / ``retriever``, a corpus or dataset name, or a path (relative
to the recipe file). See docs/recipes.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reforge.errors import RecipeError
from reforge.ops.defaults import PAPER_ALPHA  # a merge step without alpha, as `reforge merge` without --alpha
from reforge.recipe.yamlnodes import Node, fail, read_yaml

KINDS = ("diff", "train", "tune", "merge", "eval", "push")
TOP_KEYS = ("recipe", "description", "out", "base", "retriever", "allow-pickle", "corpora", "datasets", "steps")
FORMAT = 1  # the `recipe:` version this code reads
EXTENSION = "x-"  # top-level keys that start so are not read: a place for YAML anchors (`x-train: &train {...}`)


@dataclass(frozen=True)
class Option:
    """One option of a step: its API name (``field``), its type (``int``, ``float``, ``bool``, ``str``, ``list``
    of text, ``grid`` of numbers, ``path``, ``paths``), whether null is allowed, its default, and ``invert`` for a
    flag that is the negation of the API's (``lora`` is ``use_dora: false``, ``no-cache`` is ``cache: false``)."""

    field: str
    type: str
    nullable: bool
    default: Any
    invert: bool = False


# Inputs a step kind takes (references), with what each may name: ``model`` (a step's output folder, base,
# retriever, a path or a Hub id), ``corpus`` / ``dataset`` (a name from corpora/datasets), ``adapter`` / ``delta``
# / ``tune`` (a step of that kind), and whether it is a list. Defaults: base -> base, retriever -> retriever.
ROLES: dict[str, dict[str, tuple[str, bool]]] = {
    "diff": {"base": ("model", False), "retriever": ("model", False)},
    "train": {"base": ("model", False), "corpus": ("corpus", True)},
    "tune": {
        "base": ("model", False),
        "retriever": ("model", False),
        "delta": ("diff", False),
        "adapter": ("train", False),
        "dataset": ("dataset", True),
    },
    "merge": {
        "base": ("model", False),
        "retriever": ("model", False),
        "delta": ("diff", False),
        "adapter": ("train", False),
    },
    "eval": {"models": ("model", True), "datasets": ("dataset", True), "base": ("model", False)},
    "push": {"model": ("model", False)},
}
REQUIRED_ROLES = {"tune": ("adapter",), "merge": ("adapter",), "eval": ("models",), "push": ("model",)}


@dataclass
class StepSpec:
    """One step as written: ``options`` by API field name (defaults filled in), ``refs`` by role as ``(text,
    line)`` pairs, and the lines of what was written (``lines``: option field or role -> line)."""

    name: str
    kind: str
    line: int
    options: dict[str, Any]
    refs: dict[str, list[tuple[str, int]]]
    lines: dict[str, int] = field(default_factory=dict)
    output: tuple[str, int] | None = None


@dataclass
class Recipe:
    """A recipe, read and type-checked (references are checked by `reforge.recipe.plan.expand`).

    ``folder`` is the recipe file's folder: relative paths in it are relative to that folder. ``out`` is where the
    step outputs go (default ``runs/<recipe name>`` beside the recipe). ``corpora`` maps a name to its paths,
    ``datasets`` a name to a BEIR folder. ``allow_pickle`` lets every step read pickle weights (weights-only), as
    the commands' ``--allow-pickle`` does.
    """

    path: Path
    text: str
    sha256: str
    out: Path
    base: str
    retriever: str
    corpora: dict[str, list[str]]
    datasets: dict[str, str]
    steps: dict[str, StepSpec]
    lines: dict[str, int]
    allow_pickle: bool = False

    @property
    def folder(self) -> Path:
        return self.path.parent

    def local(self, text: str) -> Path:
        """A path written in the recipe, as a path here (``~`` expanded, relative to the recipe's folder)."""
        path = Path(text).expanduser()
        return Path(os.path.normpath(path if path.is_absolute() else self.folder / path))

    def error(self, line: int | None, problem: str, *, key: str | None = None, hint: str | None = None) -> RecipeError:
        """A `RecipeError` naming this recipe and ``line``."""
        return fail(self.path, line, problem, key=key, hint=hint)


def load_recipe(path: str | Path) -> Recipe:
    """Read and type-check a recipe file.

    Raises:
        RecipeError: the file is missing or not YAML; a key is unknown, misspelt or given twice; a value has the
            wrong type or is out of range; a required key is missing. The message names the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise fail(path, None, f"cannot be read ({e})") from e
    root = read_yaml(path, text)
    if not isinstance(root.value, dict):
        raise fail(path, root.line, f"must be a mapping of keys (base, retriever, steps, ...), not {root.kind}")
    top = {key: node for key, node in root.value.items() if not key.startswith(EXTENSION)}
    _check_keys(path, top, TOP_KEYS, "the recipe")
    for required in ("base", "retriever", "steps"):
        if required not in top:
            raise fail(path, root.line, f"needs a {required!r} key", hint=_HINTS[required])
    version = _scalar(path, top["recipe"], "int", "recipe") if "recipe" in top else FORMAT
    if version != FORMAT:
        raise fail(path, top["recipe"].line, f"is format {version}; this reforge reads format {FORMAT}", key="recipe")
    base = _scalar(path, top["base"], "str", "base")
    retriever = _scalar(path, top["retriever"], "str", "retriever")
    out_text = _scalar(path, top["out"], "str", "out") if "out" in top else f"runs/{path.stem}"
    corpora = {
        name: _paths(path, node, f"corpora.{name}") for name, node in _mapping(path, top.get("corpora"), "corpora")
    }
    datasets = {
        name: _scalar(path, node, "str", f"datasets.{name}")
        for name, node in _mapping(path, top.get("datasets"), "datasets")
    }
    steps_node = top["steps"]
    if not isinstance(steps_node.value, dict) or not steps_node.value:
        raise fail(
            path, steps_node.line, f"must be a mapping of step names to steps, not {steps_node.kind}", key="steps"
        )
    steps = {name: _step(path, name, node) for name, node in steps_node.value.items()}
    recipe = Recipe(
        path=path.resolve(),
        text=text,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        out=Path(),
        base=base,
        retriever=retriever,
        corpora=corpora,
        datasets=datasets,
        steps=steps,
        lines={key: node.line for key, node in top.items()},
    )
    for group in ("corpora", "datasets"):
        for name, node in _mapping(path, top.get(group), group):
            recipe.lines[f"{group}.{name}"] = node.line
    recipe.out = recipe.local(out_text)
    if "allow-pickle" in top:
        recipe.allow_pickle = _scalar(path, top["allow-pickle"], "bool", "allow-pickle")
    _check_names(recipe)
    return recipe


_HINTS = {
    "base": "Name the pretrained LM, e.g. base: meta-llama/Llama-2-7b-hf.",
    "retriever": "Name the retriever made from it, e.g. retriever: castorini/repllama-v1-7b-lora-passage.",
    "steps": "List the steps, e.g. steps: {psi: {train: {}}, readapted: {merge: {adapter: psi}}}.",
}


def _check_names(recipe: Recipe) -> None:
    """A step may not share its name with an input it could be confused with."""
    reserved = {"base", "retriever"}
    for name, step in recipe.steps.items():
        if name in reserved or name in recipe.corpora or name in recipe.datasets:
            raise recipe.error(
                step.line,
                f"step {name!r} has the name of an input (base, retriever, a corpus or a dataset)",
                key=f"steps.{name}",
                hint="Give the step another name.",
            )
        if not name or "/" in name or name.startswith("."):
            raise recipe.error(step.line, f"step name {name!r} must be a plain name (no '/', not hidden)")


def _step(path: Path, name: str, node: Node) -> StepSpec:
    where = f"steps.{name}"
    if not isinstance(node.value, dict):
        raise fail(path, node.line, f"must be a mapping with one of {', '.join(KINDS)}, not {node.kind}", key=where)
    _check_keys(path, node.value, (*KINDS, "output"), where)
    kinds = [k for k in node.value if k in KINDS]
    if len(kinds) != 1:
        raise fail(
            path,
            node.line,
            f"must have exactly one kind ({', '.join(KINDS)}); it has {', '.join(kinds) or 'none'}",
            key=where,
        )
    kind = kinds[0]
    body = node.value[kind]
    if body.value is None:
        body = Node({}, body.line)
    if not isinstance(body.value, dict):
        raise fail(path, body.line, f"must be a mapping of options, not {body.kind}", key=f"{where}.{kind}")
    schema, roles = SCHEMAS[kind](), ROLES[kind]
    _check_keys(path, body.value, (*roles, *schema, *(("alpha",) if kind == "merge" else ())), f"{where}.{kind}")
    step = StepSpec(name, kind, node.line, {}, {})
    if "output" in node.value:
        step.output = (_scalar(path, node.value["output"], "str", f"{where}.output"), node.value["output"].line)
    for role, (_, many) in roles.items():
        if role in body.value:
            value = body.value[role]
            items = value.value if isinstance(value.value, list) else [value]
            if not many and isinstance(value.value, list):
                raise fail(path, value.line, "takes one reference, not a list", key=f"{where}.{kind}.{role}")
            if not items:
                raise fail(path, value.line, "is an empty list", key=f"{where}.{kind}.{role}")
            step.refs[role] = [(_scalar(path, item, "str", f"{where}.{kind}.{role}"), item.line) for item in items]
            step.lines[role] = value.line
    for key, option in schema.items():
        if key in body.value:
            value = body.value[key]
            if kind == "train" and key == "seed" and isinstance(value.value, list):
                step.options["seed"] = _seeds(path, value, f"{where}.train.seed")
            else:
                step.options[option.field] = _value(path, value, option, f"{where}.{kind}.{key}")
            step.lines[option.field] = value.line
        else:
            step.options[option.field] = option.default
    if kind == "merge":
        step.options["alpha"] = _alpha(path, body.value.get("alpha"), f"{where}.merge.alpha")
        if "alpha" in body.value:
            step.lines["alpha"] = body.value["alpha"].line
    for role in REQUIRED_ROLES.get(kind, ()):
        if role not in step.refs:
            raise fail(path, body.line, f"needs {role!r}", key=f"{where}.{kind}")
    return step


def _alpha(path: Path, node: Node | None, where: str) -> list[float] | str:
    """A merge's alpha: one number, a list of numbers (one merge each), or the name of a tune step (its best)."""
    if node is None:
        return [PAPER_ALPHA]
    if isinstance(node.value, str):
        return node.value
    values = node.value if isinstance(node.value, list) else [node]
    numbers = [_scalar(path, v, "float", where) for v in values]
    if not numbers:
        raise fail(path, node.line, "is an empty list", key=where)
    if len(set(numbers)) != len(numbers):
        raise fail(path, node.line, "gives an alpha twice", key=where)
    return numbers


def _seeds(path: Path, node: Node, where: str) -> list[int]:
    """A train step's list of seeds: one job (one adapter) per seed."""
    seeds = [_scalar(path, v, "int", where) for v in node.value]
    if not seeds:
        raise fail(path, node.line, "is an empty list", key=where)
    if len(set(seeds)) != len(seeds):
        raise fail(path, node.line, "gives a seed twice", key=where)
    return seeds


def _check_keys(path: Path, mapping: dict[str, Node], known: tuple | dict, where: str) -> None:
    for key, node in mapping.items():
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f"Did you mean {near[0]!r}?" if near else f"Known keys: {', '.join(sorted(known))}."
            raise fail(path, node.line, f"{key!r} is not a key of {where}", hint=hint)


def _mapping(path: Path, node: Node | None, where: str) -> list[tuple[str, Node]]:
    if node is None or node.value is None:
        return []
    if not isinstance(node.value, dict):
        raise fail(path, node.line, f"must be a mapping of names to paths, not {node.kind}", key=where)
    return list(node.value.items())


def _paths(path: Path, node: Node, where: str) -> list[str]:
    items = node.value if isinstance(node.value, list) else [node]
    if not items:
        raise fail(path, node.line, "is an empty list", key=where)
    return [_scalar(path, item, "str", where) for item in items]


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}


def _scalar(path: Path, node: Node, kind: str, where: str, nullable: bool = False) -> Any:
    value = node.value
    if value is None and nullable:
        return None
    ok = isinstance(value, _TYPES[kind]) and not (kind in ("int", "float") and isinstance(value, bool))
    if not ok:
        raise fail(path, node.line, f"must be {_TYPE_WORDS[kind]}, not {node.kind} {value!r}", key=where)
    return float(value) if kind == "float" else value


def _value(path: Path, node: Node, option: Option, where: str) -> Any:
    if node.value is None and option.nullable:
        return None
    if option.type in ("list", "paths", "grid"):
        if option.type == "grid" and isinstance(node.value, (str, int, float)) and not isinstance(node.value, bool):
            return _grid(path, node, where)
        items = node.value if isinstance(node.value, list) else [node]
        if option.type == "list" and not isinstance(node.value, list) and isinstance(node.value, str):
            items = [Node(part.strip(), node.line) for part in node.value.split(",") if part.strip()]
        kind = "float" if option.type == "grid" else "str"
        values = [_scalar(path, item, kind, where) for item in items]
        return tuple(values) if option.type == "grid" else values
    kind = "str" if option.type == "path" else option.type
    value = _scalar(path, node, kind, where, option.nullable)
    return (not value) if option.invert else value


def _grid(path: Path, node: Node, where: str) -> tuple[float, ...]:
    from reforge.errors import InvalidOptionError
    from reforge.tune import parse_grid

    try:
        return parse_grid(str(node.value), option=where.rsplit(".", 1)[-1])
    except InvalidOptionError as e:
        raise fail(path, node.line, f"is not a grid: {e}", key=where) from e


# ---------------------------------------------------------------------------------------------------------------------
# The options of each kind, read from the API: field names, types and defaults


def _type_of(annotation: Any) -> tuple[str, bool]:
    """``"int | None"`` -> ("int", True); ``"list[str]"`` / ``"tuple[str, ...]"`` -> ("list", False)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    nullable = "None" in text
    head = text.split("|")[0].strip()
    if head.startswith(("list", "tuple", "Sequence")):
        return ("grid" if "float" in head else "list"), nullable
    return head, nullable


def _from_dataclass(cls: Any, instance: Any, hidden: set[str], renames: dict[str, str], inverted=()) -> dict:
    schema = {}
    for f in dataclasses.fields(cls):
        if f.name in hidden:
            continue
        kind, nullable = _type_of(f.type)
        key = renames.get(f.name, f.name.replace("_", "-"))
        default = getattr(instance, f.name)
        schema[key] = Option(f.name, kind, nullable, default, invert=f.name in inverted)
    return schema


def _from_signature(function: Any, names: dict[str, str], types: dict[str, str] | None = None) -> dict:
    """Options from a function's keyword parameters: ``names`` maps parameter -> recipe key."""
    parameters = inspect.signature(function).parameters
    schema = {}
    for name, key in names.items():
        parameter = parameters[name]
        kind, nullable = _type_of(parameter.annotation)
        kind = (types or {}).get(name, kind)
        default = parameter.default
        schema[key] = Option(name, kind, nullable, tuple(default) if kind == "grid" else default)
    return schema


# Paths among train's options: inputs of the step (they must exist and their content is in its fingerprint).
TRAIN_PATHS = ("exclude_ids", "only_ids", "exclude_judged", "only_judged")


def train_schema() -> dict[str, Option]:
    """`reforge train`'s options, from `TrainConfig`: ``lora-r`` is ``r``, ``lora`` is ``use_dora: false``."""
    from reforge.train.config import TrainConfig

    hidden = {"base", "corpus", "output", "resume", "overwrite", "allow_pickle"}
    defaults = TrainConfig(base="", corpus=[""], output="")
    schema = _from_dataclass(TrainConfig, defaults, hidden, {"r": "lora-r", "use_dora": "lora"}, ("use_dora",))
    for key, option in schema.items():
        if option.field in TRAIN_PATHS:
            schema[key] = dataclasses.replace(option, type="paths" if option.type == "list" else "path")
    return schema


def eval_schema() -> dict[str, Option]:
    """`reforge eval`'s options, from `EvalSettings`: ``metric`` is ``measures``, ``no-cache`` is ``cache: false``."""
    from reforge.eval.pipeline import EvalSettings

    hidden = {"base", "token", "allow_pickle", "tokenizer", "query_chunk_size"}
    schema = _from_dataclass(
        EvalSettings, EvalSettings(), hidden, {"measures": "metric", "cache": "no-cache"}, ("cache",)
    )
    return schema


def tune_schema() -> dict[str, Option]:
    """`reforge tune`'s options, from `reforge.tune.tune`'s signature, plus eval's encoding options."""
    from reforge.tune import tune

    own = _from_signature(
        tune,
        {
            "alphas": "alpha",
            "betas": "beta",
            "metric": "metric",
            "split": "split",
            "test_split": "test-split",
            "i_know": "i-know",
            "max_queries": "max-queries",
            "corpus_sample": "corpus-sample",
            "seed": "seed",
        },
        {"alphas": "grid", "betas": "grid", "metric": "str", "split": "str", "test_split": "str", "i_know": "bool"},
    )
    encoding = {k: v for k, v in eval_schema().items() if k not in own and k not in ("split",)}
    return {**own, **encoding}


def _write_schema() -> dict[str, Option]:
    from reforge.ops.job import WriteOptions

    return _from_dataclass(WriteOptions, WriteOptions(), {"overwrite", "dry_run", "command"}, {})


def diff_schema() -> dict[str, Option]:
    """`reforge diff`'s options: `reforge.ops.diff.diff`'s keywords and `WriteOptions`."""
    from reforge.ops.diff import diff

    names = ("low_rank", "rank", "energy", "allow_missing", "keep_lm_head", "device")
    types = {"low_rank": "bool", "rank": "int", "energy": "float", "allow_missing": "bool", "keep_lm_head": "bool"}
    return {
        **_from_signature(diff, {n: n.replace("_", "-") for n in names}, {**types, "device": "str"}),
        **_write_schema(),
    }


def merge_schema() -> dict[str, Option]:
    """`reforge merge`'s options (``alpha`` is read apart): `reforge.ops.merge.merge`'s keywords, `WriteOptions`."""
    from reforge.ops.merge import merge

    names = {"beta": "beta", "keep_lm_head": "keep-lm-head", "device": "device"}
    return {
        **_from_signature(merge, names, {"beta": "float", "keep_lm_head": "bool", "device": "str"}),
        **_write_schema(),
    }


def push_schema() -> dict[str, Option]:
    """`reforge push`'s options, from `reforge.publish.push_folder`: ``public`` is ``private: false``,
    ``skip-verify`` is ``verify: false``; ``repo`` may hold ``{corpus}``, ``{alpha}``, ``{dataset}``, ``{step}``."""
    from reforge.publish import push_folder

    parameters = inspect.signature(push_folder).parameters
    return {
        "repo": Option("repo", "str", False, None),
        "public": Option("private", "bool", False, parameters["private"].default, invert=True),
        "revision": Option("revision", "str", True, parameters["revision"].default),
        "message": Option("commit_message", "str", True, parameters["commit_message"].default),
        "skip-verify": Option("verify", "bool", False, parameters["verify"].default, invert=True),
    }


SCHEMAS = {
    "diff": diff_schema,
    "train": train_schema,
    "tune": tune_schema,
    "merge": merge_schema,
    "eval": lambda: {**eval_schema(), "matched": Option("matched", "bool", False, True)},
    "push": push_schema,
}


def option_key(kind: str, field_name: str) -> str:
    """The recipe key of an API field (``r`` -> ``lora-r``), for messages."""
    for key, option in SCHEMAS[kind]().items():
        if option.field == field_name:
            return key
    return field_name.replace("_", "-")
