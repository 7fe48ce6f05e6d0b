"""The LM generator: a causal LM writes one query per document from the few-shot `Prompt`.

Batched `model.generate` (KV cache, left padding), greedy by default; with ``temperature`` > 0 it samples, from a
torch generator seeded by the seed and the batch's documents, so the same documents give the same queries. On the
GPU when there is one (bfloat16 where supported), else the CPU in float32.

Each finished batch is appended to a `QueryLog` (one JSON line per document, one write per batch, fsynced): a killed
run resumes where it stopped, and a finished one is a cache. The log's file name is a key over the generator's
content key (`reforge.io.checkpoint.content_key`, over every weight byte), the prompt, the generation settings and
the seed; each line is keyed by the document's content (id, title, text), so an edited document gets a new query and
the others are reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reforge.data.lazy import Document
from reforge.io.progress import ProgressFn
from reforge.queries.prompt import Prompt

LOG_FORMAT = 1


@dataclass(frozen=True)
class GenerationSettings:
    """How the LM decodes: ``batch_size`` documents at a time, at most ``max_new_tokens``, greedy when
    ``temperature`` is 0. ``device`` None picks cuda when available."""

    batch_size: int = 8
    max_new_tokens: int = 32
    temperature: float = 0.0
    device: str | None = None

    def key_facts(self) -> dict:
        """What changes the generated text (the device and batch size are assumed not to)."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature}


def document_key(doc: Document) -> str:
    """SHA-256 of the document's id, title and text: a log line is reused only for the same document."""
    digest = hashlib.sha256()
    for part in (doc.id, doc.title, doc.text):
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


class QueryLog:
    """An append-only JSONL file of ``{"doc": key, "id": doc_id, "query": text}``; a torn last line (a kill in the
    middle of a write) is ignored and overwritten by the next append."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, str]:
        """``{document key: query}`` of every whole line."""
        found: dict[str, str] = {}
        if not self.path.is_file():
            return found
        for line in self.path.read_bytes().split(b"\n"):
            try:
                row = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue  # torn or empty
            if isinstance(row, dict) and isinstance(row.get("doc"), str) and isinstance(row.get("query"), str):
                found[row["doc"]] = row["query"]
        return found

    def append(self, rows: Sequence[dict]) -> None:
        """Append ``rows`` in one write, after cutting any torn last line, and fsync."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows)
        with self.path.open("ab+") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":  # torn: keep up to the last newline
                    handle.seek(0)
                    whole = handle.read().rfind(b"\n") + 1
                    handle.truncate(whole)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def log_key(generator_key: str, prompt: Prompt, settings: GenerationSettings, seed: int, template: str) -> str:
    """The log's name: the generator's content key, prompt, rendered template, decoding settings and seed."""
    facts = {
        "format": LOG_FORMAT,
        "generator": generator_key,
        "prompt": prompt.digest,
        "template": template,
        "settings": settings.key_facts(),
        "seed": seed if settings.temperature > 0 else None,  # greedy decoding does not use it
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


class Generator:
    """A causal LM's tokenizer, and the model itself once a query must be written (a run whose queries are all in
    the log loads no weights)."""

    def __init__(self, path: Path, settings: GenerationSettings) -> None:
        import torch
        from transformers import AutoTokenizer

        self.path = path
        self.settings = settings
        self.device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat = getattr(self.tokenizer, "chat_template", None) is not None
        self._model: Any = None

    @property
    def model(self) -> Any:
        """The LM, loaded on first use: bfloat16 on a GPU that has it, else float32."""
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM

            cuda = self.device.startswith("cuda")
            dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
            self._model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).to(self.device).eval()
        return self._model

    def render(self, prompt: Prompt, doc: Document) -> str:
        """The prompt text for one document: through the chat template when the tokenizer has one."""
        if not self.chat:
            return prompt.plain(doc)
        try:
            chat = prompt.messages(doc)
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - jinja's TemplateError: a template that raises on a system turn
            chat = prompt.messages(doc, system=False)
            return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    def queries(self, prompt: Prompt, docs: Sequence[Document], seed: int) -> list[str]:
        """One query per document (the first line of what the model writes, cleaned)."""
        import torch

        texts = [self.render(prompt, doc) for doc in docs]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not self.chat)
        batch = batch.to(self.device)
        options: dict[str, Any] = {"max_new_tokens": self.settings.max_new_tokens, "use_cache": True}
        if self.settings.temperature > 0:
            keys = "".join(document_key(d) for d in docs)
            torch.manual_seed(int(hashlib.sha256(f"{seed}:{keys}".encode()).hexdigest()[:15], 16))
            options.update(do_sample=True, temperature=self.settings.temperature, top_p=1.0, top_k=0)
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**batch, **options, pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1] :]
        return [clean(t) for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


def clean(text: str) -> str:
    """The first non-empty line, without a ``Query:`` label or surrounding quotes.

    Example:
        >>> clean(' Query: "how does basalt form"\\nDocument: ...')
        'how does basalt form'
    """
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    for label in ("query:", "relevant query:", "search query:"):
        if line.lower().startswith(label):
            line = line[len(label) :].strip()
    return line.strip("\"'` ").strip()


def generate(
    generator: Generator,
    prompt: Prompt,
    docs: Sequence[Document],
    *,
    seed: int,
    log: QueryLog,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, str], int]:
    """``({doc_id: query}, newly generated)``: queries from the log where it has them, the rest generated in
    batches of ``settings.batch_size`` and appended to the log batch by batch."""
    done = log.read()
    keys = {doc.id: document_key(doc) for doc in docs}
    pending = [doc for doc in docs if keys[doc.id] not in done]
    total, fresh = len(docs), 0
    if progress:
        progress(total - len(pending), total)
    size = generator.settings.batch_size
    for start in range(0, len(pending), size):
        chunk = pending[start : start + size]
        texts = generator.queries(prompt, chunk, seed)
        rows = [{"doc": keys[d.id], "id": d.id, "query": t} for d, t in zip(chunk, texts, strict=True)]
        log.append(rows)
        done.update((r["doc"], r["query"]) for r in rows)
        fresh += len(chunk)
        if progress:
            progress(total - len(pending) + start + len(chunk), total)
    return {doc.id: done[keys[doc.id]] for doc in docs}, fresh


def settings_dict(settings: GenerationSettings) -> dict:
    """JSON form, for the record."""
    return asdict(settings)
