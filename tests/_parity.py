"""Fixtures for the PEFT parity tests: tiny bases of several architectures, adapters of the PEFT
flavours lorasave merges (each trained a few Adam steps with a high learning rate, so that no
delta is zero), and the references: the logits of the *unmerged* PeftModel.

Every reference value comes from torch / transformers / PEFT, never from lorasave. ``Zoo`` builds
each artefact once (per test module) and caches it, including a merge's exception, so several
tests can look at one merge.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model,
)
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

import _models as M

VOCAB = M.VOCAB  # 128
RESIZED = VOCAB + 2  # two added tokens
TRAINABLE_TOKENS = (3, 7)
N_EXPERTS = 4
IMAGE_SIZE = 16
N_LABELS = 5
# logits of the merged checkpoint vs the unmerged PeftModel, relative to max|logit|
REL_TOL = 1e-5
# the adapter must move the logits by more than this (relative): a merge that drops it fails
MIN_EFFECT = 5e-2


# --------------------------------------------------------------------------- bases


def build_llama_tied(seed: int = 5) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**M._COMMON, "tie_word_embeddings": True})
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def build_qwen3_moe(seed: int = 6) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=N_EXPERTS,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return Qwen3MoeForCausalLM(cfg).eval()


def build_vit(seed: int = 7) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=N_LABELS,
        initializer_range=0.1,
    )
    return ViTForImageClassification(cfg).eval()


@dataclass(frozen=True)
class Base:
    build: Callable[[], PreTrainedModel]
    auto: Any  # AutoModelForCausalLM or AutoModelForImageClassification
    image: bool = False


BASES: dict[str, Base] = {
    "llama": Base(lambda: M.build_llama(0), AutoModelForCausalLM),
    "llama_tied": Base(build_llama_tied, AutoModelForCausalLM),
    "gpt2": Base(M.build_gpt2, AutoModelForCausalLM),
    "qwen2": Base(M.build_qwen2, AutoModelForCausalLM),
    "qwen3_moe": Base(build_qwen3_moe, AutoModelForCausalLM),
    "vit": Base(build_vit, AutoModelForImageClassification, image=True),
}


# --------------------------------------------------------------------------- inputs


def token_batch(vocab: int, gen: torch.Generator, shape: tuple[int, int] = (4, 16)) -> torch.Tensor:
    """Random ids that always contain the trainable tokens and the vocabulary's last two ids."""
    ids = torch.randint(0, vocab, shape, generator=gen)
    planted = torch.tensor([*TRAINABLE_TOKENS, vocab - 2, vocab - 1])
    ids[:, 1 : 1 + len(planted)] = planted
    return ids


def eval_inputs(base: str, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    if BASES[base].image:
        return {"pixel_values": torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)}
    return {"input_ids": token_batch(vocab, gen, (3, 12))}


def train_inputs(base: str, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    if BASES[base].image:
        return {
            "pixel_values": torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
            "labels": torch.randint(0, N_LABELS, (4,), generator=gen),
        }
    ids = token_batch(vocab, gen)
    return {"input_ids": ids, "labels": ids}


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits.float()


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, f"logits shape {tuple(got.shape)} != reference {tuple(ref.shape)}"
    return (got - ref).abs().max().item() / ref.abs().max().item()


def assert_logits_match(got: torch.Tensor, ref: torch.Tensor, tol: float = REL_TOL) -> None:
    d = rel_diff(got, ref)
    assert d <= tol, f"max |logit diff| is {d:.3g} of max|logit| (> {tol:g})"


# -------------------------------------------------------------------------- training


def train(peft_model: PeftModel, base: str, vocab: int, *, seed: int, steps: int, lr: float) -> None:
    """A few Adam steps; afterwards every trainable tensor must differ from its initial value."""
    torch.manual_seed(seed)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert params, "nothing trainable"
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(**train_inputs(base, vocab, gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    for n, p in params.items():
        assert not torch.equal(p.detach(), before[n]), f"{n} did not change in training"


# -------------------------------------------------------------------------- variants


def lora(**kw: Any) -> LoraConfig:
    kw.setdefault("r", 8)
    kw.setdefault("lora_alpha", 16)
    kw.setdefault("lora_dropout", 0.0)
    return LoraConfig(**kw)


@dataclass(frozen=True)
class Variant:
    base: str
    config: Callable[[], PeftConfig]
    seed: int
    resize_to: int | None = None  # resize_token_embeddings before get_peft_model
    save_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 6
    lr: float = 2e-2
    # False: PEFT's unmerged reference is not meaningful (the merge must be refused)
    check_reference: bool = True
    # PiSSA / OLoRA: save the initial adapter first, then let PEFT convert the trained one into a
    # plain LoRA on the unmodified base (save_pretrained's path_initial_model_for_weight_conversion)
    convert_initial: bool = False

    @property
    def vocab(self) -> int:
        return self.resize_to or VOCAB


QKVO_MLP = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

VARIANTS: dict[str, Variant] = {
    # 1. DoRA
    "dora_llama": Variant("llama", lambda: lora(target_modules=QKVO_MLP, use_dora=True), seed=20),
    "dora_gpt2": Variant("gpt2", lambda: lora(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True), seed=21),
    "dora_embedding": Variant("llama", lambda: lora(target_modules=["embed_tokens"], use_dora=True), seed=22),
    # 2. embedding LoRA
    "embedding_lora": Variant("llama", lambda: lora(target_modules=["embed_tokens", "q_proj"]), seed=23),
    # 3. modules_to_save, resized vocabulary
    "modules_to_save_lm_head": Variant("llama", lambda: lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]), seed=24),
    "resized_vocab": Variant(
        "llama",
        lambda: lora(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]),
        seed=25,
        resize_to=RESIZED,
    ),
    # new embed_tokens rows but no lm_head rows on an untied base: the new lm_head rows are unknown
    "resized_vocab_no_lm_head": Variant(
        "llama",
        lambda: lora(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"]),
        seed=26,
        resize_to=RESIZED,
        save_kwargs={"save_embedding_layers": False},
        check_reference=False,
    ),
    # 4. trainable tokens
    "trainable_tokens": Variant(
        "llama",
        lambda: lora(target_modules=["q_proj", "v_proj"], trainable_token_indices={"embed_tokens": list(TRAINABLE_TOKENS)}),
        seed=27,
    ),
    # 5. lora_bias
    "lora_bias_qwen2": Variant("qwen2", lambda: lora(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True), seed=28),
    # 6. tied embeddings
    "tied_lm_head": Variant("llama_tied", lambda: lora(target_modules=["lm_head"]), seed=29),
    "tied_lm_head_resized": Variant(
        "llama_tied",
        lambda: lora(target_modules=["lm_head"], modules_to_save=["embed_tokens"]),
        seed=30,
        resize_to=RESIZED,
    ),
    "tied_untouched": Variant("llama_tied", lambda: lora(target_modules=["q_proj"]), seed=31),
    # 7. MoE experts as parameters
    "moe_experts": Variant(
        "qwen3_moe",
        lambda: lora(r=4, lora_alpha=8, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
        seed=32,
    ),
    # 8. Conv2d
    "conv2d_vit": Variant("vit", lambda: lora(target_modules=["projection", "query", "value"]), seed=33),
    # 9. other tuners
    "loha": Variant("llama", lambda: LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), seed=34),
    "lokr": Variant("llama", lambda: LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), seed=35),
    "ia3": Variant("llama", lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), seed=36),
    "vera": Variant("llama", lambda: VeraConfig(r=8, target_modules=["q_proj", "v_proj"], save_projection=True), seed=37),
    "adalora": Variant(
        "llama",
        lambda: AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], total_step=100, tinit=50, tfinal=10),
        seed=38,
    ),
    "oft": Variant("llama", lambda: OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"]), seed=39),
    "prompt_tuning": Variant("llama", lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=40, check_reference=False),
    "prefix_tuning": Variant("llama", lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), seed=41, check_reference=False),
    # 10. PiSSA / OLoRA saved without conversion: the saved A, B go with a *modified* base
    "pissa": Variant("llama", lambda: lora(target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"), seed=42, check_reference=False),
    "olora": Variant("llama", lambda: lora(target_modules=["q_proj", "v_proj"], init_lora_weights="olora"), seed=43, check_reference=False),
    "pissa_converted": Variant("llama", lambda: lora(target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"), seed=44, convert_initial=True),
    # multi-adapter merges: overlapping on q_proj, different r / alpha
    "multi_a": Variant("llama", lambda: lora(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]), seed=50),
    "multi_b": Variant("llama", lambda: lora(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "o_proj"]), seed=51),
    "multi_dora_a": Variant("llama", lambda: lora(target_modules=["q_proj", "v_proj"], use_dora=True), seed=52),
    "multi_dora_b": Variant("llama", lambda: lora(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True), seed=53),
    "multi_mts_a": Variant("llama", lambda: lora(target_modules=["q_proj"], modules_to_save=["lm_head"]), seed=54),
    "multi_mts_b": Variant("llama", lambda: lora(target_modules=["v_proj"], modules_to_save=["lm_head"]), seed=55),
}

# tuner name as it must appear in a refusal: (peft_type words accepted in the message)
TUNER_NAMES: dict[str, tuple[str, ...]] = {
    "vera": ("vera",),
    "adalora": ("adalora",),
    "oft": ("oft",),
    "prompt_tuning": ("prompt_tuning", "prompt tuning", "prompt-tuning"),
    "prefix_tuning": ("prefix_tuning", "prefix tuning", "prefix-tuning"),
}


# ------------------------------------------------------------------------------ zoo


@dataclass
class Reference:
    logits: torch.Tensor  # unmerged PeftModel, eval mode
    disabled: torch.Tensor  # same model with the adapter disabled
    inputs: dict[str, torch.Tensor]


class Zoo:
    """Builds bases, adapters, references and merges on demand, each once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._bases: dict[str, Path] = {}
        self._adapters: dict[str, Path] = {}
        self._refs: dict[str, Reference] = {}
        self._merges: dict[tuple[Any, ...], Path | BaseException] = {}

    def base(self, name: str) -> Path:
        if name not in self._bases:
            path = self.root / f"base_{name}"
            BASES[name].build().save_pretrained(path)
            self._bases[name] = path
        return self._bases[name]

    def load_base(self, name: str, resize_to: int | None = None) -> PreTrainedModel:
        model = BASES[name].auto.from_pretrained(self.base(name), dtype=torch.float32)
        if resize_to is not None:
            model.resize_token_embeddings(resize_to)
        return model

    def adapter(self, name: str) -> Path:
        if name not in self._adapters:
            v = VARIANTS[name]
            path = self.root / f"adapter_{name}"
            model = self.load_base(v.base, v.resize_to)
            torch.manual_seed(v.seed)
            peft_model = get_peft_model(model, v.config())
            save_kwargs = dict(v.save_kwargs)
            if v.convert_initial:
                initial = self.root / f"adapter_{name}_initial"
                peft_model.save_pretrained(initial)
                save_kwargs["path_initial_model_for_weight_conversion"] = str(initial)
            train(peft_model, v.base, v.vocab, seed=v.seed, steps=v.steps, lr=v.lr)
            peft_model.save_pretrained(path, **save_kwargs)
            self._adapters[name] = path
        return self._adapters[name]

    def peft_model(self, name: str, *, seed: int = 0) -> PeftModel:
        """The unmerged PeftModel as a user loads it: fp32 base (resized first if the fine-tune was)."""
        v = VARIANTS[name]
        torch.manual_seed(seed)  # resize_token_embeddings draws the new rows at random
        model = self.load_base(v.base, v.resize_to)
        return PeftModel.from_pretrained(model, self.adapter(name)).eval()

    def reference(self, name: str) -> Reference:
        if name not in self._refs:
            v = VARIANTS[name]
            inputs = eval_inputs(v.base, v.vocab)
            pm = self.peft_model(name)
            ref = logits(pm, inputs)
            with pm.disable_adapter():
                disabled = logits(pm, inputs)
            if v.resize_to is not None:
                # the new rows drawn by resize_token_embeddings must not matter: the adapter carries them
                again = logits(self.peft_model(name, seed=1), inputs)
                assert torch.equal(again, ref), "reference depends on the random rows of resize_token_embeddings"
            self._refs[name] = Reference(ref, disabled, inputs)
        return self._refs[name]

    def merge(self, name: str | Sequence[str], *, base: str | None = None, **kw: Any) -> Path:
        """``lorasave.merge`` of the variant(s) into their base, fp32; cached, exceptions too."""
        import lorasave

        names = [name] if isinstance(name, str) else list(name)
        base = base or VARIANTS[names[0]].base
        key = (tuple(names), base, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in self._merges:
            out = self.root / f"merged_{len(self._merges)}_{'+'.join(names)}"
            adapters = [self.adapter(n) for n in names]
            kw.setdefault("dtype", "float32")
            try:
                lorasave.merge(self.base(base), adapters if len(adapters) > 1 else adapters[0], out, **kw)
                self._merges[key] = out
            except BaseException as exc:  # cached, re-raised for every test that asks
                self._merges[key] = exc
        res = self._merges[key]
        if isinstance(res, BaseException):
            raise res
        return res


# -------------------------------------------------------------------------- checking


def load_merged(out: Path, auto: Any) -> PreTrainedModel:
    """Load the merged output and assert transformers found every weight, and nothing else."""
    model, info = auto.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{kind}: {sorted(map(str, info[kind]))}"
    return model.eval()


def message(err: BaseException) -> str:
    """The error's text without file paths: fixture folders are named after the variant, so a
    message that merely quotes a path (``.../adapter_pissa/...``) must not count as naming it."""
    return re.sub(r"\S*/\S*", "<path>", str(err))


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return M.read_tensors(folder)


def tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            names |= set(fh.keys())
    return names


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))


# ------------------------------------------------------------------- several adapters


def multi_peft_model(zoo: Zoo, names: Sequence[str], weights: Sequence[float] | None = None) -> PeftModel:
    """One PeftModel with every adapter loaded and active at once, each LoRA scaled by its weight.

    PEFT's LoRA layers add ``scaling[name] * B(A(x))`` for every active adapter, so with the
    scalings multiplied by w_i this computes W0 x + sum_i w_i * s_i * B_i A_i x, unmerged.
    """
    from peft.tuners.lora import LoraLayer

    base = VARIANTS[names[0]].base
    model = zoo.load_base(base)
    pm = PeftModel.from_pretrained(model, zoo.adapter(names[0]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(zoo.adapter(n), adapter_name=n)
    pm.base_model.set_adapter(list(names))
    if weights is not None:
        for module in pm.modules():
            if isinstance(module, LoraLayer):
                for n, w in zip(names, weights, strict=True):
                    if n in module.scaling:
                        module.scaling[n] *= w
    return pm.eval()


def multi_reference(zoo: Zoo, names: Sequence[str], weights: Sequence[float] | None = None) -> torch.Tensor:
    return logits(multi_peft_model(zoo, names, weights), eval_inputs(VARIANTS[names[0]].base))
