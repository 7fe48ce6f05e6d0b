"""reforge train: packing, the DoRA recipe, resume, outputs and every bad input, on tiny real Llama and Qwen2 models
with a BPE tokenizer built here from SciFact text."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import DATA, build_model, save
from conftest import run as run_cli
from reforge.data.corpus import DocSelection, load_corpus
from reforge.errors import CheckpointNotFoundError, DataError, InvalidOptionError, OutputExistsError
from reforge.io.paths import recorded_path
from reforge.train import TrainConfig, train_adapter
from reforge.train.attention import register_packed_attention
from reforge.train.batching import IGNORE, BatchPlan, collate, make_encoder, pack_rows, token_lengths
from reforge.train.dora import LoopState, setup_data, setup_model, train_loop
from reforge.train.state import work_dir

SCIFACT = DATA / "scifact"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def build_tokenizer():
    """A byte-level BPE (vocab 600) trained on 300 SciFact passages; BOS first, EOS id 2, pad id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [doc.text for doc in load_corpus(SCIFACT, selection=DocSelection(max_docs=300)).docs]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_base(kind, folder, tokenizer, **overrides):
    """A tiny random model of ``kind`` (see conftest.build_model) saved with the tokenizer, as `reforge train` wants."""
    model = build_model(kind, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    save(model, folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory, tokenizer):
    return make_base("llama-causal", tmp_path_factory.mktemp("train") / "llama", tokenizer)


@pytest.fixture(scope="session")
def qwen_base(tmp_path_factory, tokenizer):
    return make_base("qwen2-causal", tmp_path_factory.mktemp("train") / "qwen2", tokenizer, tie_word_embeddings=True)


def config(base, out, **options):
    values = dict(corpus=[str(SCIFACT)], max_docs=8, max_length=64, r=4, lora_alpha=8, batch_size=2)
    values.update(options)
    return TrainConfig(base=str(base), output=str(out), **values)


def doc_loss(model, encode, texts):
    """Mean next-token loss of ``texts``, each on its own (no packing), with the model in eval mode."""
    total = count = 0.0
    with torch.no_grad():
        for ids in encode(texts):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    return total / count


# ---- batching --------------------------------------------------------------------------------------------------


def test_pack_rows_places_every_document_once_and_fills_rows(tokenizer):
    texts = [d.text for d in load_corpus(SCIFACT, selection=DocSelection(max_docs=400)).docs]
    lengths = token_lengths(make_encoder(tokenizer, 256), texts)
    rows = pack_rows(lengths, 256)
    assert sorted(d for row in rows for d in row) == list(range(400))
    sums = [int(lengths[list(row)].sum()) for row in rows]
    assert max(sums) <= 256
    fill = lengths.sum() / (256 * len(rows))
    assert fill > 0.97, fill  # SciFact passages: 124..256 tokens here, best fit leaves under 3% empty
    assert rows == pack_rows(lengths, 256), "deterministic"


def test_collate_builds_shifted_targets_and_restarting_positions():
    batch = collate([[[1, 5, 6, 2], [1, 7, 2]], [[1, 8, 2]]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 5, 6, 2, 1, 7, 2], [1, 8, 2, 0, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]]
    assert batch.targets.tolist() == [[5, 6, 2, IGNORE, 7, 2, IGNORE], [8, 2, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]]
    assert (batch.real, batch.pad, batch.predicted) == (10, 4, 7)
    empty = collate([], pad_id=0)
    assert empty.input_ids.shape == (1, 1) and empty.predicted == 0


@pytest.mark.parametrize("attention", ["sdpa", "packed"])
@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_packed_row_loss_equals_each_document_alone(which, attention, llama_base, qwen_base, tokenizer):
    from transformers import AutoModelForCausalLM

    base = llama_base if which == "llama" else qwen_base
    alone_model = AutoModelForCausalLM.from_pretrained(base).eval()
    impl = register_packed_attention() if attention == "packed" else "sdpa"  # sdpa: transformers' own block mask
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation=impl).eval()
    encode = make_encoder(tokenizer, 40)
    texts = [d.text for d in load_corpus(SCIFACT, selection=DocSelection(max_docs=4)).docs]
    docs = encode(texts[:2]) + [encode([texts[2]])[0][:11], encode([texts[3]])[0][:17]]
    batch = collate([[docs[0], docs[2]], [docs[1], docs[3]]], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        packed = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="none"
        ).view(batch.targets.shape)
    # doc 2 sits after doc 0 in row 0: its per-token losses must not see doc 0
    alone = doc_loss(alone_model, lambda t: [docs[2]], [None]) * (len(docs[2]) - 1)
    assert packed[0, len(docs[0]) : len(docs[0]) + len(docs[2])].sum().item() == pytest.approx(alone, rel=1e-5)
    per_doc = sum(doc_loss(alone_model, lambda t, d=d: [d], [None]) * (len(d) - 1) for d in docs)
    assert packed.sum().item() == pytest.approx(per_doc, rel=1e-5)
    if attention == "packed":  # and a plain forward (no packing) is untouched
        ids = torch.tensor([docs[0]])
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, alone_model(input_ids=ids).logits, atol=1e-6)


def test_plan_visits_every_row_once_per_epoch_in_seeded_order(tokenizer):
    lengths = np.array([5, 60, 33, 17, 64, 2, 40, 41, 12, 30, 55])
    plan = BatchPlan.build(lengths, max_length=64, global_batch=3, batching="rows", seed=7)
    for epoch in (0, 1):
        steps = plan.epoch_steps(epoch)
        assert sorted(r for step in steps for r in step) == sorted(plan.rows)
        assert [len(s) for s in steps[:-1]] == [3] * (len(steps) - 1) and len(steps) == plan.steps_per_epoch
    assert plan.epoch_steps(0) == BatchPlan.build(
        lengths, max_length=64, global_batch=3, batching="rows", seed=7
    ).epoch_steps(0)
    assert plan.epoch_steps(0) != plan.epoch_steps(1)


def test_packing_and_length_grouping_leave_little_padding(tokenizer):
    texts = [d.text for d in load_corpus(SCIFACT, selection=DocSelection(max_docs=400)).docs]
    lengths = token_lengths(make_encoder(tokenizer, 2048), texts)  # this small BPE: 200..1900 tokens a passage
    order = np.random.default_rng(0).permutation(400)  # what a random-order padded run (the paper's) pays
    random_pad = sum(
        int(lengths[order[i : i + 4]].max()) * 4 - int(lengths[order[i : i + 4]].sum()) for i in range(0, 400, 4)
    )
    assert random_pad / (random_pad + lengths.sum()) > 0.2
    grouped = BatchPlan.build(lengths, max_length=2048, global_batch=4, batching="grouped", seed=0)
    real, pad = grouped.padding(batch_size=4, world_size=1, grad_accum=1)
    assert real == lengths.sum() and pad < 0.25 * random_pad, (pad, random_pad)
    packed = BatchPlan.build(lengths, max_length=2048, global_batch=4, batching="rows", seed=0)
    real_p, pad_p = packed.padding(batch_size=4, world_size=1, grad_accum=1)
    assert real_p == real and pad_p / (real_p + pad_p) < 0.04, pad_p / (real_p + pad_p)


# ---- training --------------------------------------------------------------------------------------------------


def test_train_writes_a_peft_dora_adapter_that_loads_and_learned(llama_base, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "psi"
    seen = []
    result = train_adapter(
        config(llama_base, out, lr=1e-1, epochs=4, lora_dropout=0.0),
        progress=lambda step, total, stats: seen.append((step, total, stats.loss)),
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_record.json",
    ]
    assert not work_dir(out).exists()
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o644 for p in out.iterdir())
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["use_dora"]) == (4, 8, True)
    assert sorted(adapter_config["target_modules"]) == sorted(TARGETS)
    assert adapter_config["base_model_name_or_path"] == recorded_path(llama_base, out)  # ../llama, not /tmp/...
    keys = set(load_file(out / "adapter_model.safetensors"))
    expected = {
        f"base_model.model.model.layers.{i}.{part}.{t}.{kind}"
        for i in range(2)
        for part, names in (("self_attn", TARGETS[:3]), ("mlp", TARGETS[3:]))
        for t in names
        for kind in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    }
    assert keys == expected
    # progress: every step, in order
    assert [s for s, _, _ in seen] == list(range(1, result.steps + 1)) and seen[-1][1] == result.steps == 16
    # the record
    record = json.loads((out / "training_record.json").read_text())
    corpus = load_corpus(SCIFACT, selection=DocSelection(max_docs=8))
    assert record["corpus"]["sha256"] == corpus.sha256 and record["corpus"]["documents"] == 8
    assert record["base"]["ref"] == record["base"]["path"] == recorded_path(llama_base, out)
    assert record["base"]["fingerprint"] and record["paths_relative_to"] == "the folder holding this file"
    # published with the folder: no absolute local path anywhere; each names its file relative to the folder
    assert not [v for v in _strings(record) if Path(v).is_absolute()], [v for v in _strings(record) if "/" in v]
    assert [(out / p).resolve() for p in record["corpus"]["paths"]] == [Path(SCIFACT).resolve()]
    assert (out / record["config"]["base"]).resolve() == Path(llama_base).resolve()
    assert record["config"]["output"] == "."
    assert [(out / p).resolve() for p in record["config"]["corpus"]] == [Path(SCIFACT).resolve()]
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert f.metadata()["reforge_base"] == recorded_path(llama_base, out)
    assert record["config"]["lr"] == 1e-1 and record["config"]["target_modules"] == TARGETS
    assert record["tokens"]["trained"] == 4 * (8 * 64 - 8) == result.tokens  # 8 docs cut at 64, 4 epochs
    assert record["loss"]["final"] == result.final_loss and len(record["loss"]["history"]) == 16
    assert record["reforge_version"] and record["wall_time_s"] > 0
    # loads with peft, changes the output, and lowered the loss on the documents it read
    base = AutoModelForCausalLM.from_pretrained(llama_base).eval()
    encode = make_encoder(tokenizer, 64)
    texts = [d.text for d in corpus.docs]
    before = doc_loss(base, encode, texts)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_base), out).eval()
    after = doc_loss(tuned, encode, texts)
    assert after < before - 0.05, (before, after)  # measured: 6.406 -> 6.301 (a random tiny model learns slowly)
    losses = [loss for _, loss in record["loss"]["history"]]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.05, losses


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_tied_qwen2_trains_and_its_adapter_loads(qwen_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train_adapter(config(qwen_base, tmp_path / "psi", max_steps=2))
    assert result.steps == 2 and np.isfinite(result.final_loss)
    keys = set(load_file(tmp_path / "psi" / "adapter_model.safetensors"))
    assert len(keys) == 2 * 5 * 3 and not any("lm_head" in k or "embed" in k for k in keys)
    base = AutoModelForCausalLM.from_pretrained(qwen_base).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen_base), tmp_path / "psi").eval()
    ids = torch.tensor([[1, 40, 41, 42, 2]])
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, tuned(input_ids=ids).logits)


def test_adapter_is_written_through_reforge_io_and_equals_peft_save(qwen_base, tmp_path):
    """The adapter goes through reforge's own writer (temporary name, provenance header), yet is exactly the folder
    peft's own save_pretrained writes for the same weights: same config, same tensors bit for bit."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "psi"
    train_adapter(config(qwen_base, out, max_steps=2))
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt" and metadata["reforge_version"]
    assert metadata["reforge_base"] == recorded_path(qwen_base, out)  # relative to the folder, as the record says
    resaved = tmp_path / "peft-saved"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen_base), out).save_pretrained(resaved)
    ours, peft_own = load_file(out / "adapter_model.safetensors"), load_file(resaved / "adapter_model.safetensors")
    assert ours.keys() == peft_own.keys() and all(torch.equal(ours[k], peft_own[k]) for k in ours)
    ours_config, peft_config = (json.loads((f / "adapter_config.json").read_text()) for f in (out, resaved))
    assert ours_config["target_modules"] == sorted(peft_config["target_modules"])  # peft: a set, in hash order
    assert {**ours_config, "target_modules": None} == {**peft_config, "target_modules": None}
    assert not list(out.glob(".*"))  # no temporary file left behind


def test_two_dora_steps_change_only_adapter_tensors(llama_base, tokenizer, tmp_path):
    cfg = config(llama_base, tmp_path / "psi", max_steps=2)
    data = setup_data(cfg, tokenizer)
    from reforge.dist import Ranks

    run = setup_model(cfg, llama_base, Ranks(), torch.device("cpu"), data.total_steps)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    state = train_loop(run, data, LoopState())
    assert state.step == 2
    after = dict(run.model.named_parameters())
    adapter = [n for n in before if ".lora_" in n]
    assert len(adapter) == 2 * 5 * 3
    assert all(torch.equal(before[n], after[n]) for n in before if n not in adapter)
    assert all(not torch.equal(before[n], after[n]) for n in adapter)
    assert {n for n, p in run.model.named_parameters() if p.requires_grad} == set(adapter)


@pytest.mark.parametrize("attention", ["auto", "padded"])
def test_a_run_plans_its_attention_once(llama_base, tmp_path, monkeypatch, attention):
    """train plans the attention path once, before reading the corpus, and the model is loaded with that plan
    (setup_model planned it a second time, from the base's config read again)."""
    from reforge.train import dora

    plans, original = [], dora.plan_attention

    def counted(*args, **kwargs):
        plans.append(original(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(dora, "plan_attention", counted)
    result = train_adapter(config(llama_base, tmp_path / "out", max_steps=1, attention=attention))
    assert [plan.path for plan in plans] == ["split" if attention == "auto" else "padded"]
    assert json.loads((result.output / "training_record.json").read_text())["attention"]["path"] == plans[0].path


def test_same_seed_gives_the_same_adapter_bit_for_bit(llama_base, tmp_path):
    runs = [
        train_adapter(config(llama_base, tmp_path / name, seed=seed, max_steps=3))
        for name, seed in (("a", 1), ("b", 1), ("c", 2))
    ]
    a, b, c = (load_file(r.output / "adapter_model.safetensors") for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_gradient_checkpointing_gives_the_same_adapter(llama_base, tmp_path):
    plain, saved = (
        train_adapter(
            config(llama_base, tmp_path / name, max_steps=2, lora_dropout=0.0, gradient_checkpointing=name == "ckpt")
        )
        for name in ("plain", "ckpt")
    )
    a, b = (load_file(r.output / "adapter_model.safetensors") for r in (plain, saved))
    assert saved.record["config"]["gradient_checkpointing"] is True
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6  # recomputation, same math


class Crash(Exception):
    pass


def _crash_at(step):
    def progress(done, total, stats):
        if done == step:
            raise Crash()

    return progress


def test_resume_after_a_crash_gives_the_uninterrupted_adapter(llama_base, tmp_path):
    # dropout on (the paper's 0.05): the resumed run must restore the RNG too
    common = dict(max_docs=12, max_length=32, batch_size=1, grad_accum=2)
    whole = train_adapter(config(llama_base, tmp_path / "whole", **common))
    assert whole.steps == 6
    cfg = config(llama_base, tmp_path / "psi", save_every=2, **common)
    with pytest.raises(Crash):
        train_adapter(cfg, progress=_crash_at(5))
    assert not (tmp_path / "psi").exists()
    assert sorted(p.name for p in (work_dir(tmp_path / "psi") / "checkpoints").iterdir()) == ["step-00000004"]
    with pytest.raises(OutputExistsError, match=r"stopped at step-00000004 .* Pass --resume to continue it"):
        train_adapter(cfg)
    cfg.resume = True
    resumed = train_adapter(cfg)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    a, b = (load_file(r.output / "adapter_model.safetensors") for r in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.record["loss"]["history"] == whole.record["loss"]["history"]
    assert resumed.record["tokens"] == whole.record["tokens"]


def test_resume_refuses_changed_options(llama_base, tmp_path):
    cfg = config(llama_base, tmp_path / "psi", save_every=1)
    with pytest.raises(Crash):
        train_adapter(cfg, progress=_crash_at(2))
    changed = config(llama_base, tmp_path / "psi", save_every=1, resume=True, lr=1e-3)
    with pytest.raises(InvalidOptionError, match=r"Cannot resume .*options changed \(lr: 0.0002 -> 0.001\)"):
        train_adapter(changed)
    fresh = train_adapter(config(llama_base, tmp_path / "psi", overwrite=True, max_steps=1))
    assert fresh.resumed_from is None and fresh.steps == 1


def test_plain_lora_has_no_magnitude(llama_base, tmp_path):
    train_adapter(config(llama_base, tmp_path / "psi", use_dora=False, max_steps=1, target_modules=["q_proj"]))
    keys = set(load_file(tmp_path / "psi" / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{x}.weight" for i in (0, 1) for x in "AB"}
    assert json.loads((tmp_path / "psi" / "adapter_config.json").read_text())["use_dora"] is False


def test_packed_and_padded_runs_train_on_the_same_tokens(llama_base, tmp_path):
    titles = tmp_path / "titles.jsonl"  # short documents of varied length, so rows hold several
    titles.write_text(
        "".join(
            json.dumps({"_id": d.id, "t": d.text.split(". ")[0]}) + "\n"
            for d in load_corpus(SCIFACT, selection=DocSelection(max_docs=16)).docs
        )
    )
    common = dict(corpus=[str(titles)], text_field="t", max_docs=None, max_length=128)
    paper = train_adapter(config(llama_base, tmp_path / "d", **common))
    packed = train_adapter(config(llama_base, tmp_path / "a", batching="rows", **common))
    padded = train_adapter(config(llama_base, tmp_path / "b", batching="grouped", **common))
    assert paper.tokens == packed.tokens == padded.tokens == packed.record["corpus"]["tokens"] - 16
    assert paper.steps == padded.steps == 8 and packed.steps == -(-packed.record["corpus"]["rows"] // 2) < 8
    assert paper.padding_share == 0.0 and paper.record["batching"] == "documents"
    for result, batching in ((paper, "documents"), (packed, "rows"), (padded, "grouped")):  # the plan predicts it
        plan = train_adapter(config(llama_base, tmp_path / "plan", batching=batching, **common), dry_run=True)
        assert plan.record["tokens"]["padding"] == result.record["tokens"]["padding"]
        assert plan.padding_share == pytest.approx(result.padding_share) and plan.steps == result.steps


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("batch_size", 0, "Training option batch_size must be at least 1, got 0."),
        ("lora_dropout", 1.0, "Training option lora_dropout must be in [0, 1), got 1.0."),
        ("schedule", "step", "Training option schedule must be one of linear, cosine, constant, got 'step'."),
        ("save_every", -1, "Training option save_every must not be negative, got -1."),
        (
            "target_modules",
            ["q_proj", "embed_tokens"],
            "Training option target_modules embed_tokens: the LM head and embeddings are never trained",
        ),
    ],
)
def test_config_validation_names_the_option(option, value, message):
    cfg = TrainConfig(base="b", corpus=["c"], output="o", **{option: value})
    with pytest.raises(InvalidOptionError) as e:
        cfg.validate()
    assert str(e.value).startswith(message) and e.value.option == option
    assert TrainConfig.from_dict(TrainConfig(base="b", corpus=["c"], output="o").to_dict()).r == 32
    with pytest.raises(InvalidOptionError, match="rank is not a training option"):
        TrainConfig.from_dict({"base": "b", "corpus": ["c"], "output": "o", "rank": 8})


def test_bare_retriever_is_refused(tokenizer, tmp_path):
    bare = make_base("llama-bare", tmp_path / "retriever", tokenizer)
    with pytest.raises(CheckpointNotFoundError, match=r"is a LlamaModel, not a causal LM with an LM head"):
        train_adapter(config(bare, tmp_path / "psi"))
    assert not (tmp_path / "psi").exists()


def test_target_modules_that_match_nothing_name_the_linear_modules(llama_base, tmp_path):
    with pytest.raises(InvalidOptionError) as e:
        train_adapter(config(llama_base, tmp_path / "psi", target_modules=["q_proj", "qkv_proj"]))
    assert str(e.value).startswith(
        f"Target modules qkv_proj match no Linear module of {llama_base}; it has: "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj."
    )
    with pytest.raises(InvalidOptionError, match=r"lm_head: the LM head and embeddings are never trained"):
        train_adapter(config(llama_base, tmp_path / "psi", target_modules=["lm_head"]))


def test_max_length_above_the_model_limit(llama_base, tmp_path):
    with pytest.raises(
        InvalidOptionError,
        match=r"--max-length 512 is above .*limit of 256 tokens "
        r"\(max_position_embeddings\). Pass --max-length 256 or less.",
    ):
        train_adapter(config(llama_base, tmp_path / "psi", max_length=512))


def test_output_that_holds_something_else(llama_base, tmp_path):
    out = tmp_path / "psi"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # files reforge did not write are never replaced
        with pytest.raises(OutputExistsError, match=r"psi holds files reforge did not write; they are never"):
            train_adapter(config(llama_base, out, max_steps=1, overwrite=overwrite))
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    train_adapter(config(llama_base, out, max_steps=1))
    with pytest.raises(OutputExistsError, match=r"psi already exists and is not empty. Pass --overwrite"):
        train_adapter(config(llama_base, out, max_steps=1))
    train_adapter(config(llama_base, out, max_steps=1, overwrite=True))  # an earlier adapter of reforge's: replaced
    assert (out / "adapter_model.safetensors").is_file()


def test_corpus_errors_stop_before_training(llama_base, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    bad = config(llama_base, tmp_path / "o", corpus=[str(tmp_path / "empty.jsonl")])
    with pytest.raises(DataError, match=r"no usable text: 0 documents read"):
        train_adapter(bad)
    (tmp_path / "c.jsonl").write_text('{"body": "fine"}\n{"body": oops}\n')
    bad.corpus, bad.text_field = [str(tmp_path / "c.jsonl")], "body"
    with pytest.raises(DataError, match=r"c.jsonl, line 2: not a valid JSON object"):
        train_adapter(bad)
    bad.text_field = "text"
    with pytest.raises(DataError, match=r"line 1 has no field 'text' \(fields there: body\)"):
        train_adapter(bad)
    assert not (tmp_path / "o").exists() and not work_dir(tmp_path / "o").exists()


# ---- CLI -------------------------------------------------------------------------------------------------------


def run(*args, ok=True):
    return run_cli("train", *args, ok=ok)


def test_cli_trains_and_reports_json(llama_base, tmp_path):
    out = tmp_path / "psi"
    result = run(
        llama_base,
        "--corpus",
        SCIFACT,
        "-o",
        out,
        "--max-docs",
        6,
        "--max-length",
        64,
        "-r",
        8,
        "--lora-alpha",
        16,
        "--target-modules",
        "q_proj,v_proj",
        "--json",
    )
    report = json.loads(result.stdout)
    assert report["documents"] == 6 and report["steps"] == 2 and report["output"] == str(out)
    assert report["record"]["config"]["r"] == 8 and report["record"]["config"]["batch_size"] == 4
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    assert "6 of 6 documents reach --max-length 64" in result.stderr


def test_cli_dry_run_writes_nothing(llama_base, tmp_path):
    result = run(
        llama_base, "--corpus", SCIFACT, "-o", tmp_path / "psi", "--max-docs", 40, "--max-length", 256, "--dry-run"
    )
    assert "Plan: DoRA r 32, alpha 64 on q_proj,k_proj,v_proj,up_proj,down_proj" in result.stdout
    assert "documents 40 of 5,183 read" in result.stdout
    assert not (tmp_path / "psi").exists() and not work_dir(tmp_path / "psi").exists()


def test_cli_errors_are_one_line(llama_base, tmp_path):
    result = run(
        llama_base,
        "--corpus",
        SCIFACT,
        "-o",
        tmp_path / "psi",
        "--target-modules",
        "nope",
        "--max-length",
        64,
        ok=False,
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: Target modules nope match no Linear module")
    result = run(llama_base, "--corpus", SCIFACT, "-o", tmp_path / "psi", "--lora-dropout", 1.5, ok=False)
    assert result.exit_code == 2 and "--lora-dropout" in result.stderr


def test_forward_groups_fit_the_token_budget():
    plan = BatchPlan.build(
        np.array([500, 300, 300, 200, 900, 100]), max_length=1024, global_batch=6, batching="grouped", seed=0
    )
    rows = [(0,), (1,), (2,), (3,), (4,), (5,)]
    assert plan.forward_groups(rows, 1024) == [[(0,), (1,)], [(2,), (3,)], [(4,)], [(5,)]]
    assert plan.forward_groups(rows, None) == [rows] and plan.forward_groups([], 1024) == [[]]


def test_resume_refuses_a_corpus_that_changed_since_the_checkpoint(llama_base, tmp_path):
    with (SCIFACT / "corpus.jsonl").open(encoding="utf-8") as handle:
        lines = [line for line, _ in zip(handle, range(8))]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(lines))
    cfg = config(llama_base, tmp_path / "psi", corpus=[str(corpus)], save_every=1)
    with pytest.raises(Crash):
        train_adapter(cfg, progress=_crash_at(2))
    row = json.loads(lines[3])
    lines[3] = json.dumps({**row, "text": row["text"] + " An added sentence."}) + "\n"
    corpus.write_text("".join(lines))  # same options, other text: the steps left would not be the planned ones
    cfg.resume = True
    with pytest.raises(InvalidOptionError, match=r"Cannot resume .*: the corpus changed \(sha256 [0-9a-f]{12} -> "):
        train_adapter(cfg)
