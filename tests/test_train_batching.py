"""The paper's batching by default (issue 15): each optimizer step is --batch-size documents, its loss the mean over
their tokens as a padded batch's is, packed into rows so no compute goes to padding. Also: training on nothing and
non-finite options are errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_train import build_tokenizer, make_base

from conftest import DATA
from reforge.cli import cli
from reforge.data.corpus import DocSelection, load_corpus
from reforge.dist import Ranks
from reforge.errors import DataError, InvalidOptionError
from reforge.train import TrainConfig, train_adapter
from reforge.train.batching import BatchPlan
from reforge.train.dora import _forward_backward, _step_batches, setup_data, setup_model

SCIFACT = DATA / "scifact"
# fp32 gradients of one step computed two ways differ only by summation order: about 1e-7 of the largest element
GRAD_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory, tokenizer):
    return make_base("llama-causal", tmp_path_factory.mktemp("batching") / "llama", tokenizer)


@pytest.fixture(scope="module")
def titles(tmp_path_factory):
    """The first sentences of 40 SciFact passages: short documents of varied length, so a row holds several."""
    path = tmp_path_factory.mktemp("titles") / "titles.jsonl"
    path.write_text(
        "".join(
            json.dumps({"_id": d.id, "t": d.text.split(". ")[0]}) + "\n"
            for d in load_corpus(SCIFACT, selection=DocSelection(max_docs=40)).docs
        )
    )
    return path


def _config(base, out, corpus, **options) -> TrainConfig:
    values = dict(corpus=[str(corpus)], text_field="t", max_docs=4, max_length=128, r=4, lora_alpha=8, lora_dropout=0.0)
    values.update(options)
    return TrainConfig(base=str(base), output=str(out), **values)


def _adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "attention, precision", [("split", "fp32"), ("padded", "fp32"), ("split", "bf16"), ("padded", "bf16")]
)
def test_default_step_has_the_gradient_of_a_padded_batch_of_its_four_documents(
    attention, precision, llama_base, tokenizer, titles, tmp_path
):
    """Both tested attention paths (--attention split, the default, and padded) through the training loop's own
    batch assembly and backward, against a stock padded batch through peft and HF's loss (float32). bf16 runs the
    GPU's mixed precision (bf16 weights, bf16 autocast: `_forward_backward`'s CUDA branch) on the CPU's autocast,
    within a few bf16 roundings (2e-2 of the largest gradient)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _config(llama_base, tmp_path / "psi", titles, attention=attention, precision=precision)
    data = setup_data(config, tokenizer)
    (step,) = data.plan.epoch_steps(0)
    assert sorted(d for row in step for d in row) == [0, 1, 2, 3]  # one step: exactly the 4 documents
    run = setup_model(config, Path(llama_base), Ranks(), torch.device("cpu"), data.total_steps)
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without a gradient to compare
        for name, param in run.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    assert run.attention.path == attention and run.bf16 == (precision == "bf16")
    batches = _step_batches(run, data, [step])
    if attention == "split":
        assert sum(b.input_ids.shape[0] for b in batches) < 4, "the documents share rows: no compute goes to padding"
        assert sum(b.pad for b in batches) == 0 and all(b.attention_mask is None for b in batches)
    else:
        assert sum(b.input_ids.shape[0] for b in batches) == 4 and all(b.attention_mask is not None for b in batches)
    _forward_backward(run, batches, sum(b.predicted for b in batches))
    packed = _adapter_grads(run.model)

    # the reference: the paper's padded batch of the same documents through a stock model and HF's own loss
    model = AutoModelForCausalLM.from_pretrained(llama_base, attn_implementation="eager", dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=config.target_modules,
            use_dora=True,
            task_type="CAUSAL_LM",
        ),
    )
    model.load_state_dict(run.model.state_dict())
    ids = data.encode([data.texts[d] for d in range(4)])
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [data.pad_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    labels = torch.where(mask.bool(), input_ids, -100)
    assert (mask == 0).sum() > 0, "the padded batch really pads"
    model.train()
    model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
    padded = _adapter_grads(model)
    assert packed.keys() == padded.keys() and len(packed) > 0
    scale = max(float(g.abs().max()) for g in padded.values())
    worst = max(float((packed[n] - padded[n]).abs().max()) for n in packed)
    tolerance = GRAD_TOLERANCE if precision == "fp32" else 2e-2
    assert scale > 0 and worst <= tolerance * scale, (worst, scale)


def test_dry_run_on_40_documents_is_10_steps_by_default(llama_base, titles, tmp_path):
    def plan(*options):
        result = CliRunner().invoke(
            cli,
            [
                "train",
                str(llama_base),
                "--corpus",
                str(titles),
                "--text-field",
                "t",
                "--max-length",
                "256",
                "-o",
                str(tmp_path / "psi"),
                "--dry-run",
                "--json",
                *options,
            ],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    paper = plan()
    assert paper["steps"] == 10 and paper["record"]["batching"] == "documents" and paper["documents"] == 40
    assert paper["padding_share"] == 0.0
    rows = plan("--batching", "rows")  # several short documents to a row: fewer steps, the deviation
    assert rows["steps"] < 10 and rows["record"]["batching"] == "rows"


def test_documents_mode_packs_each_step_and_keeps_its_documents():
    import numpy as np

    lengths = np.array([100, 700, 300, 200, 900, 50, 1024, 20, 600])
    plan = BatchPlan.build(lengths, max_length=1024, global_batch=4, batching="documents", seed=3)
    steps = plan.epoch_steps(0)
    assert [len(s) for s in steps] == [4, 4, 1] and plan.steps_per_epoch == 3
    assert sorted(d for s in steps for row in s for d in row) == list(range(9))
    for step in steps:
        rows = plan.pack_micro(step)
        assert sorted(d for row in rows for d in row) == sorted(d for row in step for d in row)
        assert all(plan.row_tokens(row) <= 1024 for row in rows)


def test_training_on_nothing_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # a tokenizer that knows only "zqzq": any other text gives no token at all (no unknown token, no byte fallback)
    bpe = Tokenizer(models.BPE(vocab={"<pad>": 0, "<s>": 1, "</s>": 2, "zqzq": 3}, merges=[], unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    blind = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>")
    base = make_base("llama-causal", tmp_path / "base", blind)
    config = TrainConfig(
        base=str(base), corpus=[str(SCIFACT)], output=str(tmp_path / "psi"), max_docs=5, max_length=256
    )
    with pytest.raises(DataError, match="No tokens to train on: the tokenizer gives the 5 documents"):
        train_adapter(config)
    result = CliRunner().invoke(
        cli,
        [
            "train",
            str(base),
            "--corpus",
            str(SCIFACT),
            "--max-docs",
            "5",
            "--max-length",
            "256",
            "-o",
            str(tmp_path / "psi"),
        ],
    )
    assert result.exit_code == 1 and "No tokens to train on" in result.stderr
    assert not (tmp_path / "psi").exists()


@pytest.mark.parametrize(
    "option, value",
    [
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("lora_alpha", float("nan")),
        ("lora_alpha", float("inf")),
        ("weight_decay", float("nan")),
        ("max_grad_norm", float("inf")),
        ("lora_dropout", float("nan")),
        ("r", 2.5),
        ("batch_size", True),
        ("use_dora", "yes"),
    ],
)
def test_every_numeric_option_is_finite_and_of_its_kind(option, value, tmp_path):
    config = TrainConfig(base="b", corpus=["c"], output=str(tmp_path / "o"), **{option: value})
    with pytest.raises(InvalidOptionError, match=f"Training option {option} must") as caught:
        config.validate()
    assert caught.value.option == option


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--lora-alpha", "nan"),
        ("--lora-alpha", "-1"),
        ("--max-grad-norm", "inf"),
        ("--lr", "0"),
        ("--seed", "-1"),
    ],
)
def test_cli_refuses_non_finite_and_out_of_range_numbers_before_reading_anything(flag, value, tmp_path):
    result = CliRunner().invoke(
        cli, ["train", str(tmp_path / "no-base"), "--corpus", str(SCIFACT), "-o", str(tmp_path / "psi"), flag, value]
    )
    assert result.exit_code == 2, result.output
    assert "Training option " + flag[2:].replace("-", "_") in result.stderr
