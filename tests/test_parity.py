"""PEFT parity: every adapter flavour lorasave merges gives the unmerged PeftModel's logits.

For each variant a tiny fp32 base is saved, a PEFT adapter is trained a few steps and saved, and
``lorasave.merge(base, adapter, out, dtype="float32")`` must give a checkpoint that
``from_pretrained`` loads with no missing / unexpected / mismatched key and whose logits equal
the unmerged PeftModel's (eval mode, fp32 base) within 1e-5 of max|logit|. Flavours lorasave
cannot merge faithfully must be refused with a ``LorasaveError`` that names the problem.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

import _models as M
import _parity as P
import lorasave
from lorasave.errors import LorasaveError


@pytest.fixture(scope="session")
def pz(zoo: Path) -> P.Zoo:
    return P.Zoo(zoo / "parity")


# Variants whose merged logits must equal PEFT's.
LOGIT_VARIANTS = [
    "dora_llama",
    "dora_gpt2",
    "dora_embedding",
    "embedding_lora",
    "modules_to_save_lm_head",
    "resized_vocab",
    "trainable_tokens",
    "lora_bias_qwen2",
    "tied_lm_head",
    "tied_lm_head_resized",
    "tied_untouched",
    "moe_experts",
    "conv2d_vit",
    "loha",
    "lokr",
    "ia3",
    "pissa_converted",
]
# Tuners that may be merged or refused, but nothing in between.
MERGE_OR_REFUSE = ["vera", "adalora", "oft"]
TUNER_PATTERNS = {
    "vera": r"\bvera\b",
    "adalora": r"\badalora\b",
    "oft": r"\boft\b",
    "prompt_tuning": r"prompt[ _-]?tuning",
    "prefix_tuning": r"prefix[ _-]?tuning",
}


def _merged_logits(pz: P.Zoo, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged checkpoint's logits, unmerged PeftModel's logits) on the variant's fixed batch."""
    ref = pz.reference(name)
    out = pz.merge(name)
    model = P.load_merged(out, P.BASES[P.VARIANTS[name].base].auto)
    return P.logits(model, ref.inputs), ref.logits


# ------------------------------------------------------------------- the references


@pytest.mark.parametrize("name", [*LOGIT_VARIANTS, *MERGE_OR_REFUSE])
def test_reference_is_sane(pz: P.Zoo, name: str) -> None:
    """The adapter moves PEFT's logits by > 5% of max|logit| (so dropping any part of it shows)."""
    ref = pz.reference(name)
    assert torch.isfinite(ref.logits).all()
    effect = P.rel_diff(ref.disabled, ref.logits)
    assert effect > P.MIN_EFFECT, f"adapter changes the logits by only {effect:.3g} of max|logit|"


# -------------------------------------------------------------------- logits parity


@pytest.mark.parametrize("name", LOGIT_VARIANTS)
def test_merged_logits_match_unmerged_peft(pz: P.Zoo, name: str) -> None:
    got, ref = _merged_logits(pz, name)
    P.assert_logits_match(got, ref)


@pytest.mark.parametrize("name", ["dora_llama", "dora_gpt2", "dora_embedding", "embedding_lora", "lora_bias_qwen2", "conv2d_vit", "loha", "lokr", "ia3"])
def test_merged_output_has_the_base_tensors(pz: P.Zoo, name: str) -> None:
    """Adapters that add no module leave the tensor names, shapes and untargeted values alone."""
    v = P.VARIANTS[name]
    out = P.read_tensors(pz.merge(name))
    base = P.read_tensors(pz.base(v.base))
    assert set(out) == set(base)
    changed = [k for k in base if not torch.equal(out[k], base[k])]
    for k in base:
        assert out[k].shape == base[k].shape and out[k].dtype == torch.float32, k
    assert changed, "nothing was merged"
    # only weights and biases of targeted layers move: never a norm
    assert not [k for k in changed if "norm" in k or "layernorm" in k], changed


# ------------------------------------------------------------ vocabulary and modules_to_save


def test_modules_to_save_lm_head_replaced(pz: P.Zoo) -> None:
    out = P.read_tensors(pz.merge("modules_to_save_lm_head"))
    base = P.read_tensors(pz.base("llama"))
    assert set(out) == set(base)
    assert not torch.equal(out["lm_head.weight"], base["lm_head.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


@pytest.mark.parametrize("name", ["resized_vocab", "tied_lm_head_resized"])
def test_resized_vocabulary_in_config_and_tensors(pz: P.Zoo, name: str) -> None:
    out = pz.merge(name)
    assert P.read_json(out / "config.json")["vocab_size"] == P.RESIZED
    tensors = P.read_tensors(out)
    assert tensors["model.embed_tokens.weight"].shape[0] == P.RESIZED
    if "lm_head.weight" in tensors:
        assert tensors["lm_head.weight"].shape[0] == P.RESIZED
    got, ref = _merged_logits(pz, name)
    assert ref.shape[-1] == P.RESIZED
    # the new tokens' rows: logits columns of the new tokens, and the new tokens as inputs
    new_cols = (got[..., P.VOCAB :] - ref[..., P.VOCAB :]).abs().max().item()
    assert new_cols <= P.REL_TOL * ref.abs().max().item(), f"new tokens' logits differ by {new_cols:.3g}"
    P.assert_logits_match(got, ref)


def test_resized_vocab_without_lm_head_rows_refused(pz: P.Zoo, tmp_path: Path) -> None:
    adapter = pz.adapter("resized_vocab_no_lm_head")
    saved = M.read_file_tensors(adapter / "adapter_model.safetensors")
    # fixture check: new embedding rows are in the adapter, lm_head rows are not
    assert any("embed_tokens" in k and t.shape[0] == P.RESIZED for k, t in saved.items()), sorted(saved)
    assert not any("lm_head" in k for k in saved), sorted(saved)
    with pytest.raises(LorasaveError) as err:
        lorasave.merge(pz.base("llama"), adapter, tmp_path / "out", dtype="float32")
    assert "vocab" in P.message(err.value).lower(), str(err.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ tied embeddings


def test_tied_base_fixture_is_tied(pz: P.Zoo) -> None:
    base = pz.base("llama_tied")
    assert P.read_json(base / "config.json").get("tie_word_embeddings") is True
    assert "lm_head.weight" not in P.tensor_names(base)


def test_tied_lm_head_lora_unties(pz: P.Zoo) -> None:
    out = pz.merge("tied_lm_head")
    tensors = P.read_tensors(out)
    base = P.read_tensors(pz.base("llama_tied"))
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(tensors)
    assert P.read_json(out / "config.json").get("tie_word_embeddings") is False
    # PEFT adapted lm_head only: the input embedding keeps the base's values
    assert torch.equal(tensors["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(tensors["lm_head.weight"], base["model.embed_tokens.weight"])


def test_tied_lm_head_with_saved_embeddings_and_new_tokens(pz: P.Zoo) -> None:
    """The acceptance case: LoRA on lm_head + modules_to_save embed_tokens + 2 added tokens, tied base."""
    out = pz.merge("tied_lm_head_resized")
    assert P.read_json(out / "config.json").get("tie_word_embeddings") is False
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= P.tensor_names(out)
    got, ref = _merged_logits(pz, "tied_lm_head_resized")
    P.assert_logits_match(got, ref)


def test_untouched_tied_embeddings_stay_tied(pz: P.Zoo) -> None:
    out = pz.merge("tied_untouched")
    assert "lm_head.weight" not in P.tensor_names(out)
    assert P.read_json(out / "config.json").get("tie_word_embeddings") is True
    model = P.load_merged(out, P.BASES["llama_tied"].auto)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# --------------------------------------------------------------------------------- MoE


def _expert_weights(tensors: dict[str, torch.Tensor], layer: int, expert: int) -> dict[str, torch.Tensor]:
    """gate / up / down of one expert, from per-expert names or from fused 3-D tensors."""
    prefix = f"model.layers.{layer}.mlp.experts"
    per = {p: f"{prefix}.{expert}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    if all(k in tensors for k in per.values()):
        return {p: tensors[k] for p, k in per.items()}
    gate, up = tensors[f"{prefix}.gate_up_proj"][expert].chunk(2, dim=0)
    return {"gate_proj": gate, "up_proj": up, "down_proj": tensors[f"{prefix}.down_proj"][expert]}


def test_moe_every_targeted_expert_merged(pz: P.Zoo) -> None:
    base = P.read_tensors(pz.base("qwen3_moe"))
    out = P.read_tensors(pz.merge("moe_experts"))
    # PEFT's own merge says what each expert must become (and that no expert's delta is zero)
    peft_merged = pz.peft_model("moe_experts").merge_and_unload().state_dict()
    for layer in range(2):
        for expert in range(P.N_EXPERTS):
            b = _expert_weights(base, layer, expert)
            o = _expert_weights(out, layer, expert)
            p = _expert_weights({k: v.detach() for k, v in peft_merged.items()}, layer, expert)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                where = f"layer {layer} expert {expert} {proj}"
                assert not torch.equal(p[proj], b[proj]), f"fixture: PEFT's delta is zero for {where}"
                assert o[proj].shape == b[proj].shape, where
                assert not torch.equal(o[proj], b[proj]), f"{where} not merged"
                tol = 1e-5 * p[proj].abs().max().item()
                assert (o[proj] - p[proj]).abs().max().item() <= tol, where
    # untargeted tensors (attention, router) are copied
    for k in base:
        if ".experts." not in k:
            assert torch.equal(out[k], base[k]), k


# ----------------------------------------------------------------------- other tuners


@pytest.mark.parametrize("name", MERGE_OR_REFUSE)
def test_other_tuner_merged_or_refused_by_name(pz: P.Zoo, name: str) -> None:
    try:
        got, ref = _merged_logits(pz, name)
    except LorasaveError as err:
        assert re.search(TUNER_PATTERNS[name], P.message(err), re.IGNORECASE), f"refusal does not name {name}: {err}"
        return
    P.assert_logits_match(got, ref)


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_refused_by_name(pz: P.Zoo, name: str, tmp_path: Path) -> None:
    with pytest.raises(LorasaveError) as err:
        lorasave.merge(pz.base("llama"), pz.adapter(name), tmp_path / "out", dtype="float32")
    assert re.search(TUNER_PATTERNS[name], P.message(err.value), re.IGNORECASE), str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["pissa", "olora"])
def test_unconverted_pissa_olora_refused(pz: P.Zoo, name: str, tmp_path: Path) -> None:
    """PiSSA / OLoRA rewrite the base at init; A, B saved without conversion belong to that base."""
    assert P.read_json(pz.adapter(name) / "adapter_config.json")["init_lora_weights"] == name
    with pytest.raises(LorasaveError) as err:
        lorasave.merge(pz.base("llama"), pz.adapter(name), tmp_path / "out", dtype="float32")
    msg = P.message(err.value).lower()
    assert name in msg or "init_lora_weights" in msg, msg
    assert "base" in msg and re.search(r"modif|chang|residual|alter|rewr", msg), f"does not say the base was modified: {msg}"


# ----------------------------------------------------------------- tokenizer fidelity

ADDED_TOKENS = ("<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


@pytest.fixture(scope="session")
def finetune_tokenizer_adapter(zoo: Path, llama_plain: Path) -> Path:
    """``llama_plain`` plus the fine-tune's tokenizer: 2 added tokens, a new eos, a chat template."""
    path = zoo / "adapter_finetune_tokenizer"
    shutil.copytree(llama_plain, path)
    tok = M.build_tokenizer()
    assert tok.add_tokens(list(ADDED_TOKENS), special_tokens=True) == 2
    tok.eos_token = ADDED_TOKENS[1]
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    again = AutoTokenizer.from_pretrained(path)
    assert again.eos_token == ADDED_TOKENS[1] and again.eos_token_id != 2
    assert len(again) <= M.VOCAB  # the added tokens fit the base's embedding: no resize
    return path


def _tokenizer_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in ADAPTER_FILES)


def test_finetune_tokenizer_carried(llama_base: Path, finetune_tokenizer_adapter: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    lorasave.merge(llama_base, finetune_tokenizer_adapter, out)
    ft: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(finetune_tokenizer_adapter)
    files = _tokenizer_files(finetune_tokenizer_adapter)
    assert "tokenizer.json" in files
    for f in files:
        assert (out / f).is_file(), f"{f} missing from the output"
        assert (out / f).read_bytes() == (finetune_tokenizer_adapter / f).read_bytes(), f
    got: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(out)
    assert len(got) == len(ft)
    for t in ADDED_TOKENS:
        assert got.convert_tokens_to_ids(t) == ft.convert_tokens_to_ids(t) != got.unk_token_id
    assert got.eos_token == ADDED_TOKENS[1]
    assert got.eos_token_id == ft.eos_token_id
    assert got.chat_template == CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "w1 w2"}]
    assert got.apply_chat_template(msgs, tokenize=False) == ft.apply_chat_template(msgs, tokenize=False)
    gen = P.read_json(out / "generation_config.json")
    assert P.read_json(llama_base / "generation_config.json")["eos_token_id"] != ft.eos_token_id  # fixture check
    assert gen["eos_token_id"] in (ft.eos_token_id, [ft.eos_token_id]), gen
