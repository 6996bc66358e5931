"""Check that ``lorasave gguf`` writes what llama.cpp's own converter writes (issue 5, point 7).

Run::

    python scripts/gguf_equivalence.py [--workdir DIR] [--cases llama,qwen2,...] [--types f32,f16,bf16,q8_0]
                                       [--smollm2 DIR] [--no-bf16-path] [--converter-dir DIR]

Not part of CI: the converter needs its own virtual environment (1-5 GB with torch).

The converter is llama.cpp's own, of the runtime's version (v0.5.0): ``convert_hf_to_gguf.py``,
``conversion/`` and ``gguf-py/`` from the git bundle ``llama/gitRelease.bundle`` of the npm package
``node-llama-cpp@3.22.1`` (sha512-pinned), in a venv with its own
``requirements/requirements-convert_hf_to_gguf.txt`` (torch 2.11.0, transformers 4.57.6, numpy
2.2.x, sentencepiece, protobuf) and its own gguf-py: ``lorasave install-llama-cpp --converter``
(:mod:`lorasave.runtimes.llama_cpp.converter`; this script installs it when missing, once).

The cases are data: every ``model_type`` of ``lorasave.formats.gguf.arch.ARCHITECTURES`` (so an
architecture added there is picked up), each built tiny by :func:`tiny_model` from transformers'
default config of that type with :data:`TINY`'s sizes (for the keys that type's config has, its
``text_config`` / ``vision_config`` included) and the per-type changes of :data:`OVERRIDES`, plus the
SentencePiece variants of :data:`EXTRA_CASES`.

For each case (a tiny model of the architecture with a LoRA trained a few steps, the tokenizer of
SmolLM2 when ``--smollm2`` points at examples/real_model.py's ``smollm2-hf``, else a tiny byte-level
BPE) it runs:

  M    = ``lorasave merge BASE ADAPTER -o M --dtype float32``
  ref  = converter venv: ``convert_hf_to_gguf.py M --outtype T`` for T in f16, bf16, q8_0
  ours = ``lorasave gguf BASE ADAPTER --type T`` (straight from base + adapter, no M)

and compares the two files: metadata keys, value types and values, tensor names, GGML types and
shapes, and the tensor data bytes, counted per type.

Allowed deviations (the documented list; each is printed anyway, never counted as a difference):

* :data:`STAMP_KEYS` (``general.name``, ``general.tags``, ``general.quantized_by``, ``general.url``,
  ``general.source.url``): names and provenance stamps, not model facts. Both tools derive
  ``general.name`` from a folder name (the converter title-cases M's, "Merged Float32"; lorasave
  uses ``--name``), and the converter copies ``general.tags`` and the other ``general.*`` provenance
  from the model card of the checkpoint it reads: the card ``lorasave merge`` wrote into M, which a
  direct export from base + adapter does not have.
* :data:`LORASAVE_ONLY_KEYS` (``tokenizer.ggml.add_bos_token``, ``tokenizer.ggml.add_eos_token``),
  only when the converter writes no value at all (a different value is a difference): lorasave
  writes what the transformers tokenizer does when the tokenizer files do not say
  (``gguf_vocab._add_flags``); without the keys llama.cpp adds BOS for SentencePiece and GPT-2
  vocabularies, which may disagree with the tokenizer.
* :data:`CUT_TOKEN_KEYS` (``tokenizer.ggml.tokens``, ``tokenizer.ggml.token_type``), only when the
  converter's token list is longer than its own ``token_embd`` has rows and lorasave's list is the
  converter's cut to those rows. Gemma 3 without ``tokenizer.model`` (``Gemma3Model.modify_tensors``)
  cuts ``token_embd`` to ``len(vocab) + len(added_tokens)`` of tokenizer.json but still pads the
  token list to the config's ``vocab_size``; llama.cpp refuses that file (``check_tensor_dims``:
  token_embd has the wrong shape). lorasave writes the same ``token_embd`` and a token list of as
  many entries (``gguf_vocab.embedding_rows``), a file llama.cpp loads.
* The order of the tensors (:data:`ORDER_NOTE`), when both files hold the same names (types, shapes
  and bytes are compared by name). The converter's order is the merged checkpoint's: after the
  generated tensors (``generate_extra_tensors``) it reads the safetensors parts in sorted file-name
  order, each part's tensors sorted by name as strings (gguf-py's ``SafetensorsLocal``, "same as default
  safetensors behavior"), so ``model.layers.10`` comes before ``model.layers.2`` and the order moves
  with the sharding of the checkpoint it reads (and with what ``modify_tensors`` buffers, such as
  stacked experts). lorasave exports straight from base + adapter, without that checkpoint, and writes
  in layer order. llama.cpp's loader keys every tensor by name (``llama_model_loader::weights_map``, a
  map ordered by layer number, then name; ``get_weight`` / ``require_weight`` look names up in it), so
  the order changes nothing it reads.

When the converter does not know the tokenizer's pre-tokenizer hash (any tiny trained BPE) it
raises ``NotImplementedError``; the script runs the converter through a shim that then answers
``tokenizer.ggml.pre`` with the value lorasave wrote (reported in the ``pre shim`` column), so everything
else can still be compared.

With the bf16 merge path (default on) it also builds the tiny Llama with a bf16 base, converts
``lorasave merge --dtype bfloat16`` output (what users do) and compares it with lorasave's direct
GGUF: the converter upcasts the bf16 checkpoint to f32 before encoding, so its file encodes the
bf16-rounded merge, while lorasave encodes the f32 merge W0 + scale * B @ A directly. For bf16
output both are one round-to-nearest-even of the same f32 sum: identical. For f16 and q8_0 the
converter's values went through bf16 first (two roundings), lorasave's did not: the tensors an
adapter changed differ, the rest (embeddings, norms: bf16 values exact in f32) stay identical.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from lorasave.errors import LlamaCppConverterError
from lorasave.runtimes.llama_cpp.converter import GUARD_SETUP, INSTALL_COMMAND, RUN_CONVERTER, Converter, find_converter, install_converter, is_installed

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("f32", "f16", "bf16", "q8_0")
#: Keys allowed to differ: names and provenance stamps, not model facts. Both tools derive
#: ``general.name`` from a folder name (the converter title-cases M's folder name, "Merged Float32";
#: lorasave uses ``--name``/OUT's name); the converter copies ``general.tags`` (and other
#: ``general.*`` provenance) from the model card of the checkpoint it reads, here the card that
#: ``lorasave merge`` wrote into M, which a direct export from base + adapter does not have.
STAMP_KEYS = frozenset({"general.name", "general.tags", "general.quantized_by", "general.url", "general.source.url"})
#: Keys lorasave may write where the converter writes nothing (never a different value): the
#: ``add_bos`` / ``add_eos`` flags, which lorasave derives from what the transformers tokenizer does
#: when its files do not say (``gguf_vocab._add_flags``); without them llama.cpp adds BOS for
#: SentencePiece and GPT-2 vocabularies, which may disagree with the tokenizer.
LORASAVE_ONLY_KEYS = frozenset({"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"})
#: Token-list keys allowed to be the converter's list cut to the rows of the converter's own
#: ``token_embd`` when its list is longer than that (Gemma 3 with a tokenizer.json smaller than the
#: embedding: the converter's file does not load in llama.cpp; see the module docstring).
CUT_TOKEN_KEYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.token_type"})
#: Why the order of the tensors is not compared (printed, never counted as a difference).
ORDER_NOTE = (
    "the converter writes the merged checkpoint's tensors shard by shard, each shard's sorted by HF name as strings "
    "(gguf-py SafetensorsLocal; ModelBase.index_tensors / prepare_tensors), so its order depends on how that checkpoint "
    "was sharded; lorasave writes them in layer order; llama.cpp looks every tensor up by name (llama_model_loader::weights_map)"
)
#: Keys that are GGUF file structure, not metadata, as gguf-py's reader exposes them.
STRUCTURE_KEYS = frozenset({"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"})

# Runs the converter (remote code refused, as lorasave runs it); if its pre-tokenizer hash table has
# no entry for the tokenizer, answer with $LORASAVE_FALLBACK_PRE instead of raising (said on stderr).
SHIM = (
    GUARD_SETUP
    + """
from conversion import base
original = base.TextModel.get_vocab_base_pre
def patched(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        print("LORASAVE-SHIM: pre-tokenizer hash unknown, using", os.environ["LORASAVE_FALLBACK_PRE"], file=sys.stderr)
        return os.environ["LORASAVE_FALLBACK_PRE"]
base.TextModel.get_vocab_base_pre = patched
"""
    + RUN_CONVERTER
)


# --------------------------------------------------------------------------- the converter


def convert(conv: Converter, model: Path, out: Path, outtype: str, fallback_pre: str, args: tuple[str, ...] = ()) -> tuple[float, bool]:
    """Run the converter through :data:`SHIM` (with more options ``args``); return (wall seconds, whether the pre-tokenizer was patched).

    Raises:
        LlamaCppConverterError: the converter failed.
    """
    start = time.perf_counter()
    log = conv.convert(model, out, outtype, env={"LORASAVE_FALLBACK_PRE": fallback_pre}, prelude=SHIM, args=args)
    return time.perf_counter() - start, "LORASAVE-SHIM" in log


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def ensure_converter(folder: Path | None = None) -> Converter:
    """llama.cpp's converter of the runtime's version, installed into ``folder`` (default: lorasave's) when missing."""
    if not is_installed(folder):
        print(f"installing llama.cpp's converter ({INSTALL_COMMAND}; once, several minutes) ...", flush=True)
        print(install_converter(folder).summary(), flush=True)
    return find_converter(folder)


# --------------------------------------------------------------------------- reading + comparing


def field_value(f: Any) -> Any:
    """A GGUF metadata field as plain Python (strings decoded, arrays as lists)."""
    if not f.types:
        return None
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return [field_part(f, i) for i in f.data]
    return field_part(f, f.data[0])


def field_part(f: Any, index: int) -> Any:
    part = f.parts[index]
    if f.types[-1] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0] if len(part) == 1 else part.tolist()


def short(value: Any) -> str:
    text = repr(value)
    if isinstance(value, list) and len(value) > 4:
        text = f"[{len(value)} items: {repr(value[:3])[1:-1]}, ...]"
    return text if len(text) <= 90 else text[:87] + "..."


@dataclass
class Comparison:
    """How one lorasave GGUF compares with the converter's."""

    meta_diffs: list[str] = field(default_factory=list)  # unexpected metadata differences
    stamp_diffs: list[str] = field(default_factory=list)  # differences in STAMP_KEYS
    extra_keys: list[str] = field(default_factory=list)  # LORASAVE_ONLY_KEYS present only in lorasave
    cut_keys: list[str] = field(default_factory=list)  # CUT_TOKEN_KEYS: the converter's list cut to its token_embd rows
    order: str | None = None  # same tensor names in another order (allowed, see ORDER_NOTE)
    layout_diffs: list[str] = field(default_factory=list)  # tensor names / types / shapes
    identical: dict[str, list[int]] = field(default_factory=dict)  # GGML type -> [identical, total]
    data_diffs: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.meta_diffs and not self.layout_diffs and not self.data_diffs


def compare_files(ours: Path, ref: Path) -> Comparison:
    """Compare metadata, tensor layout and data bytes of two GGUF files."""
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    out = Comparison()
    fa = {k: f for k, f in a.fields.items() if k not in STRUCTURE_KEYS}
    fb = {k: f for k, f in b.fields.items() if k not in STRUCTURE_KEYS}
    ref_rows = next((int(t.shape[1]) for t in b.tensors if t.name == "token_embd.weight" and len(t.shape) == 2), None)  # ggml (n_embd, n_vocab)
    for key in sorted(fa.keys() | fb.keys()):
        target = out.stamp_diffs if key in STAMP_KEYS else out.meta_diffs
        if key not in fa:
            target.append(f"{key}: only in converter = {short(field_value(fb[key]))}")
        elif key not in fb:
            target = out.extra_keys if key in LORASAVE_ONLY_KEYS else target
            target.append(f"{key}: only in lorasave = {short(field_value(fa[key]))}")
        else:
            ta, tb = [t.name for t in fa[key].types], [t.name for t in fb[key].types]
            va, vb = field_value(fa[key]), field_value(fb[key])
            if ta != tb:
                target.append(f"{key}: type lorasave {ta} vs converter {tb}")
            elif va != vb and key in CUT_TOKEN_KEYS and ref_rows is not None and len(vb) > ref_rows == len(va) and va == vb[:ref_rows]:
                out.cut_keys.append(f"{key}: lorasave {len(va)} entries = the converter's {len(vb)} cut to its token_embd rows")
            elif va != vb:
                target.append(f"{key}: lorasave {short(va)} vs converter {short(vb)}")
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    names_a, names_b = [t.name for t in a.tensors], [t.name for t in b.tensors]
    if names_a != names_b:
        only_a, only_b = sorted(ta.keys() - tb.keys()), sorted(tb.keys() - ta.keys())
        if only_a or only_b or len(names_a) != len(names_b):
            out.layout_diffs.append(f"tensor names: only lorasave {only_a[:5]}, only converter {only_b[:5]}")
        else:
            i = next(i for i, (x, y) in enumerate(zip(names_a, names_b, strict=True)) if x != y)
            out.order = f"tensor order differs from position {i} on: lorasave {names_a[i]}, converter {names_b[i]}"
    for name in [n for n in ta if n in tb]:
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            out.layout_diffs.append(f"{name}: lorasave {x.tensor_type.name} {list(x.shape)} vs converter {y.tensor_type.name} {list(y.shape)}")
            continue
        same = np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes()
        counts = out.identical.setdefault(x.tensor_type.name, [0, 0])
        counts[0] += same
        counts[1] += 1
        if not same:
            out.data_diffs.append(name)
    return out


# --------------------------------------------------------------------------- cases


def lorasave_cmd() -> list[str]:
    script = Path(sys.executable).parent / "lorasave"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lorasave"]


def tiny_bpe(vocab_size: int, specials: tuple[str, ...] = ("<|endoftext|>",)) -> Any:
    """A byte-level BPE tokenizer trained on a sentence (its hash is unknown to the converter), ``specials`` first."""
    import _models

    return _models.build_byte_bpe_tokenizer("LoRA adapts a frozen model by adding a low-rank update to some of its weight matrices. " * 4, vocab_size, specials)


def tiny_spm(out: Path, vocab_size: int) -> None:
    """A SentencePiece BPE ``tokenizer.model`` (+ config naming ``LlamaTokenizer``) trained on a sentence."""
    import io

    import sentencepiece as spm

    text = "LoRA adapts a frozen model by adding a low-rank update to some of its weight matrices."
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([text, text.upper(), text.lower()] * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        hard_vocab_limit=False,
        minloglevel=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


#: Sizes every tiny model gets, for the keys its default config has (its ``text_config`` and
#: ``vision_config`` too): small, with the real models' relations kept where a key says so (head_dim
#: 16 with 4 heads over hidden 64; 4 experts, top-2; MLA ranks below hidden). ``vocab_size`` and
#: ``vocab_size_per_layer_input`` (Gemma 4's per-layer embeddings: llama.cpp loads them with the token
#: vocabulary's rows, as E2B's 262144 = 262144 does) become the tokenizer's size.
TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "initializer_range": 0.1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 32,
    "q_lora_rank": 48,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "sliding_window": 16,
    "query_pre_attn_scalar": 16,
    "hidden_size_per_layer_input": 16,
    # vision towers
    "depth": 1,
    "out_hidden_size": 64,
    "image_size": 32,
    "patch_size": 8,
}
QWEN35: dict[str, Any] = {
    "num_hidden_layers": 4,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0], "mrope_interleaved": True},
}
LLAMA4_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0}
LLAMA4_ROPE["original_max_position_embeddings"] = 8192
LLAMA4: dict[str, Any] = {
    **{"num_hidden_layers": 4, "interleave_moe_layer_step": 2, "intermediate_size_mlp": 192, "rope_parameters": LLAMA4_ROPE},
    **{"no_rope_layers": None, "moe_layers": None},  # regenerated for the new layer count
}
#: A tiny Llama 4 vision tower (its projector sizes are not among :data:`TINY`'s keys).
LLAMA4_VISION: dict[str, Any] = {
    **{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
    **{"vision_output_dim": 32, "projector_input_dim": 32, "projector_output_dim": 32},
}
#: Gemma 4 E2B's relations (tests/test_gguf_arch_gemma.py): 4 layers sliding / global alternating, the
#: global head twice the sliding one (E2B's ``per_layer_config``), proportional RoPE on global layers (the
#: default's), the last half sharing KV with a double-wide MLP, per-layer inputs, a final softcap that bites.
GEMMA4_PER_LAYER = {"1": {"head_dim": 32}, "3": {"head_dim": 32}}
GEMMA4: dict[str, Any] = {
    **{"num_hidden_layers": 4, "layer_types": ["sliding_attention", "full_attention"] * 2, "per_layer_config": GEMMA4_PER_LAYER},
    **{"intermediate_size": 128, "sliding_window": 8, "num_kv_shared_layers": 2, "use_double_wide_mlp": True},
    **{"hidden_size_per_layer_input": 8, "final_logit_softcapping": 8.0, "max_position_embeddings": 256},
}
#: A one-layer Gemma 4 vision tower (no audio tower), and the multimodal token ids inside the vocabulary
#: (a callable gets the vocabulary size: the last 7 ids, as the test's checkpoint has them).
GEMMA4_VISION: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
GEMMA4_VISION["head_dim"] = 16
GEMMA4_IDS = ("boi_token_id", "eoi_token_id", "image_token_id", "video_token_id", "boa_token_id", "eoa_token_index", "audio_token_id")
DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0}
#: Per ``model_type`` changes to the tiny config (after :data:`TINY`; into its ``text_config`` too). A
#: callable value is called with the vocabulary size.
OVERRIDES: dict[str, dict[str, Any]] = {
    "gemma4_text": GEMMA4,
    "gemma4": {**GEMMA4, "vision_config": GEMMA4_VISION, "audio_config": None, **{k: (lambda n, i=i: n - 1 - i) for i, k in enumerate(GEMMA4_IDS)}},
    "mistral": {"sliding_window": None},
    "mistral3": {"sliding_window": None},
    "ministral3": {"sliding_window": None},
    "phi3": {"pad_token_id": None},
    "qwen3_moe": {"norm_topk_prob": True},
    # Llama 4: 4 layers (RoPE skipped on layer 3), MoE every 2nd layer (Maverick), Scout's llama3 RoPE, dense MLP 2x the expert's
    "llama4_text": LLAMA4,
    "llama4": {**LLAMA4, "vision_config": LLAMA4_VISION},
    # mrope_section sums to head_dim / 2 (16 / 2), as [16, 24, 24] does for Qwen2.5-VL's 128
    "qwen2_5_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
    "qwen3_vl": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2], "mrope_interleaved": True}},
    # Qwen3.5: 4 layers (3 linear attention, 1 full); twice as many linear value heads as key heads (32 / 16),
    # head size hidden / value heads; a quarter of head_dim rotated, mrope_section summing to its half ([11, 11, 10])
    **dict.fromkeys(("qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe"), QWEN35),
    # MLA needs one K/V head per head; one leading dense layer; 4 experts in 2 groups, 1 kept; DeepSeek-V3's
    # config.json names its sigmoid gating (scoring_func), and its YaRN has mscale = mscale_all_dim
    "deepseek_v3": {
        **{
            "num_key_value_heads": 4,
            "head_dim": 8,
            "first_k_dense_replace": 1,
            "n_group": 2,
            "topk_group": 1,
            "scoring_func": "sigmoid",
            "routed_scaling_factor": 2.5,
        },
        "rope_parameters": {**DEEPSEEK_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
    # DeepSeek-V2-Lite's shape: q_proj without a q_lora_rank, which llama.cpp reads only with 26 or 27 layers;
    # no padding row (its zero embedding gave NaN gradients when the LoRA of this 26-layer case was trained)
    "deepseek_v2": {
        **{
            "num_key_value_heads": 4,
            "head_dim": 8,
            "num_hidden_layers": 26,
            "q_lora_rank": None,
            "first_k_dense_replace": 1,
            "n_shared_experts": 2,
            "pad_token_id": None,
        },
        "rope_parameters": {**DEEPSEEK_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
}
#: Options the converter runs with per model type: Qwen3.5 without its MTP block, as lorasave writes it
#: (without ``--no-mtp`` the converter stops on a checkpoint that has none, any transformers save).
#: GLM-4.5 too: lorasave leaves its MTP layers out; without ``--no-mtp`` ``Glm4MoeModel`` counts
#: ``num_nextn_predict_layers`` into ``block_count`` and writes ``nextn_predict_layers``, tensors or not.
CONVERTER_ARGS: dict[str, tuple[str, ...]] = dict.fromkeys(("qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe", "glm4_moe"), ("--no-mtp",))
#: Special tokens the converter's ``set_vocab`` looks up, per model type (``Glm4Model``: ``<|user|>`` ...).
SPECIALS: dict[str, tuple[str, ...]] = {
    "glm4": ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
}
SPECIALS["glm4_moe"] = SPECIALS["glm4"]
#: Modules left out of the case's LoRA (``LoraConfig.exclude_modules``): vision towers and projectors, and
#: Llama 4's router (an ``nn.Linear`` whose forward returns a tuple, which a LoRA layer cannot add to).
VISION_MODULES = r".*(vision|visual|multi_modal_projector|patch_embed|merger|feed_forward\.router).*"
#: Fused expert parameters the case's LoRA also targets (PEFT ``target_parameters``), per model type.
TARGET_PARAMETERS: dict[str, list[str]] = {
    "llama4_text": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"],
}
TARGET_PARAMETERS["llama4"] = TARGET_PARAMETERS["llama4_text"]
#: Model types run with a SentencePiece ``tokenizer.model``: the converter's class reads only that
#: (``conversion/phi.py``) or lorasave's rules take no byte-level BPE (gemma2).
SPM_ONLY = frozenset({"phi3", "gemma2"})
#: Model types run with a SentencePiece BPE (byte fallback) saved as ``tokenizer.json`` alone (what
#: transformers 5 saves): ``Gemma4Model.set_vocab`` reads it with gguf-py's ``LlamaHfVocab``, which takes
#: no byte-level BPE.
HF_SPM = frozenset({"gemma4_text", "gemma4"})
#: Multimodal model types whose config ``AutoModelForCausalLM`` builds as the text model alone
#: (``llama4`` -> ``Llama4ForCausalLM``): built as image-text-to-text, the checkpoint users have.
IMAGE_TEXT = frozenset({"llama4", "gemma4"})
#: Cases beyond one per model type: ``<model_type>-spm`` runs it with a SentencePiece ``tokenizer.model``.
EXTRA_CASES = ("llama-spm", "gemma3_text-spm")


def default_cases() -> list[str]:
    """One case per ``model_type`` of ARCHITECTURES (``SPM_ONLY`` ones as ``-spm``), then :data:`EXTRA_CASES`."""
    from lorasave.formats.gguf.arch import ARCHITECTURES

    cases = [f"{m}-spm" if m in SPM_ONLY else m for m in ARCHITECTURES]
    return cases + [c for c in EXTRA_CASES if c.removesuffix("-spm") in ARCHITECTURES and c not in cases]


def tiny_config(model_type: str, vocab: int) -> Any:
    """transformers' default config of ``model_type`` with :data:`TINY`'s sizes and :data:`OVERRIDES`."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type).to_dict()
    extra = copy.deepcopy(OVERRIDES.get(model_type, {}))  # transformers rewrites rope dicts in place
    extra = {k: v(vocab) if callable(v) else v for k, v in extra.items()}

    def shrink(d: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in TINY.items() if k in d}
        for sub in ("text_config", "vision_config"):
            if isinstance(d.get(sub), dict):
                mine = {k: v for k, v in extra.items() if k in d[sub]} if sub == "text_config" else {}  # overrides are the language model's
                out[sub] = {**d[sub], **shrink(d[sub])}
                out[sub].pop("layer_types", None)  # regenerated for the new layer count
                out[sub].update(mine)
        for key in ("vocab_size", "vocab_size_per_layer_input"):
            if key in d:
                out[key] = vocab
        if "layer_types" in d:
            out["layer_types"] = None
        return out

    kwargs = shrink(default)
    subs = [k for k in ("text_config", "vision_config") if isinstance(kwargs.get(k), dict)]
    # an override goes where its key is: the top level, else the sub-configs that have it (done in shrink)
    kwargs.update({k: v for k, v in extra.items() if k in default or not any(k in kwargs[sub] for sub in subs if sub == "text_config")})
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, vocab: int) -> Any:
    """A tiny float32 model of ``model_type`` (seed 3): :func:`tiny_config`, causal LM head, else (and for
    :data:`IMAGE_TEXT`) image-text-to-text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = tiny_config(model_type, vocab)
    torch.manual_seed(3)
    try:
        if model_type in IMAGE_TEXT:
            raise ValueError(model_type)
        model = AutoModelForCausalLM.from_config(config)
    except ValueError:
        model = AutoModelForImageTextToText.from_config(config)
    return model.float().eval()


def build_case(name: str, root: Path, tokenizer_dir: Path | None, base_dtype: str = "float32") -> tuple[Path, Path]:
    """Tiny base (``base_dtype``, with tokenizer) and a LoRA on every linear layer trained a few steps (in float32); cached in ``root``."""
    base, lora = root / "base", root / "lora"
    if (lora / "adapter_config.json").is_file():
        return base, lora
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    import _models

    shutil.rmtree(root, ignore_errors=True)
    model_type = name.removesuffix("-spm")
    if name.endswith("-spm"):
        tiny_spm(base, _models.VOCAB)
        model = tiny_model(model_type, _models.VOCAB)
        bos, eos = 1, 2  # sentencepiece: <unk> 0, <s> 1, </s> 2
    elif model_type in HF_SPM and not tokenizer_dir:
        tok = _models.build_spm_tokenizer(base, "GemmaTokenizer", keep_model=False)  # <pad> 0, <s> 1, </s> 2
        model = tiny_model(model_type, len(tok))
        bos, eos = tok.bos_token_id, tok.eos_token_id
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else tiny_bpe(_models.VOCAB, SPECIALS.get(model_type, ("<|endoftext|>",)))
        model = tiny_model(model_type, len(tok) if tokenizer_dir else _models.VOCAB)
        bos, eos = tok.bos_token_id, tok.eos_token_id
        tok.save_pretrained(base)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None:
            cfg.bos_token_id, cfg.eos_token_id = bos, eos
    model.to(getattr(torch, base_dtype)).save_pretrained(base)
    model.float()
    # transformers 5 saves tokenizer_class "TokenizersBackend", unknown to the converter's
    # pinned transformers 4.57: name the class both versions load a tokenizer.json with; and it
    # saves added specials as a list "extra_special_tokens", which 4.57 reads as a dict (AttributeError):
    # write them as "additional_special_tokens", which both versions read.
    tok_config = base / "tokenizer_config.json"
    data = json.loads(tok_config.read_text()) if tok_config.is_file() else {}
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(data.get("extra_special_tokens"), list):
        data["additional_special_tokens"] = data.pop("extra_special_tokens")
    if data:
        tok_config.write_text(json.dumps(data, indent=2))
    # every linear layer of the language model (a vision tower gets no gradient from text)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", exclude_modules=VISION_MODULES,
        target_parameters=TARGET_PARAMETERS.get(model_type), task_type="CAUSAL_LM",
    )  # fmt: skip
    _models.train_lora(model, config, seed=5).save_pretrained(lora)
    return base, lora


@dataclass
class CaseResult:
    name: str
    rows: list[tuple[str, Comparison, bool, float, float]] = field(default_factory=list)  # type, cmp, patched, t_ours, t_ref
    error: str | None = None


def gguf_pre(path: Path) -> str:
    f = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return str(field_value(f)) if f is not None else "default"


def run_case(name: str, workdir: Path, conv: Converter, types: list[str], tokenizer_dir: Path | None, merge_dtype: str = "float32") -> CaseResult:
    """Merge, convert and export one case for every type; compare each pair."""
    case_root = workdir / f"{name}{'-smol' if tokenizer_dir else ''}{'' if merge_dtype == 'float32' else '-bf16base'}"
    result = CaseResult(f"{name}{'' if merge_dtype == 'float32' else ' bf16 base+merge'}")
    try:
        base, lora = build_case(name, case_root / "model", tokenizer_dir, merge_dtype)
    except Exception as exc:  # a case that cannot be built is reported, the others still run
        result.error = f"building the tiny model failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return result
    merged = case_root / f"merged-{merge_dtype}"
    run([*lorasave_cmd(), "merge", str(base), str(lora), "-o", str(merged), "--dtype", merge_dtype, "--overwrite", "--quiet"])
    for t in types:
        ours_dir = case_root / f"lorasave-{t}"
        start = time.perf_counter()
        proc = subprocess.run(
            [*lorasave_cmd(), "gguf", str(base), str(lora), "-o", str(ours_dir), "--type", t, "--name", "merged", "--overwrite", "--quiet"],
            capture_output=True,
            text=True,
            check=False,
        )
        t_ours = time.perf_counter() - start
        if proc.returncode != 0:
            result.error = (proc.stdout + proc.stderr).strip().splitlines()[-1]
            return result
        ours = next(ours_dir.glob("*.gguf"))
        ref = case_root / f"converter-{merge_dtype}-{t}.gguf"
        try:
            t_ref, patched = convert(conv, merged, ref, t, gguf_pre(ours), CONVERTER_ARGS.get(name.removesuffix("-spm"), ()))
        except LlamaCppConverterError as exc:
            result.error = str(exc)
            return result
        result.rows.append((t, compare_files(ours, ref), patched, t_ours, t_ref))
    return result


# --------------------------------------------------------------------------- report


def report(results: list[CaseResult]) -> bool:
    print()
    print(f"{'case':<26}{'type':<6}{'metadata':<12}{'layout':<9}{'tensor data identical':<40}{'pre shim':<10}{'s ours/conv'}")
    all_equal = True
    for r in results:
        if r.error:  # a case that did not run proves nothing: it fails the comparison
            print(f"{r.name:<26}{'-':<6}FAILED to run: {r.error}")
            all_equal = False
            continue
        for t, cmp, patched, t_ours, t_ref in r.rows:
            meta = "equal" if not cmp.meta_diffs else f"{len(cmp.meta_diffs)} diff"
            layout = "equal" if not cmp.layout_diffs else f"{len(cmp.layout_diffs)} diff"
            data = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in sorted(cmp.identical.items()))
            print(f"{r.name:<26}{t:<6}{meta:<12}{layout:<9}{data:<40}{'used' if patched else '-':<10}{t_ours:.1f}/{t_ref:.1f}")
            if "bf16 base" not in r.name:
                all_equal &= cmp.equal
    print()
    for r in results:
        for t, cmp, _, _, _ in r.rows:
            for line in cmp.meta_diffs + cmp.layout_diffs:
                print(f"  {r.name} {t}: {line}")
            if cmp.data_diffs:
                print(
                    f"  {r.name} {t}: data differs in {len(cmp.data_diffs)} tensors: {', '.join(cmp.data_diffs[:6])}{' ...' if len(cmp.data_diffs) > 6 else ''}"
                )
    extra = sorted({line for r in results for _, c, _, _, _ in r.rows for line in c.extra_keys})
    print(f"keys only lorasave writes, allowed ({', '.join(sorted(LORASAVE_ONLY_KEYS))}):")
    for line in extra:
        print(f"  {line}")
    order = sorted({f"{r.name}: {c.order}" for r in results for _, c, _, _, _ in r.rows if c.order})
    print(f"tensor order, allowed ({ORDER_NOTE}):")
    for line in order:
        print(f"  {line}")
    cut = sorted({f"{r.name}: {line}" for r in results for _, c, _, _, _ in r.rows for line in c.cut_keys})
    print(f"token lists cut to the converter's own token_embd rows, allowed ({', '.join(sorted(CUT_TOKEN_KEYS))}):")
    for line in cut:
        print(f"  {line}")
    stamps = sorted({line for r in results for _, c, _, _, _ in r.rows for line in c.stamp_diffs})
    print(f"stamp keys allowed to differ ({', '.join(sorted(STAMP_KEYS))}):")
    for line in stamps:
        print(f"  {line}")
    return all_equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorasave-gguf-equivalence"))
    parser.add_argument("--converter-dir", type=Path, default=None, help="the converter's folder (default: lorasave's, installed when missing)")
    parser.add_argument("--cases", default=None, help="comma-separated cases (default: every model_type of ARCHITECTURES, and " + ", ".join(EXTRA_CASES) + ")")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument(
        "--smollm2", type=Path, default=Path("/tmp/lorasave-real/smollm2-hf"), help="tokenizer for a second run of llama/qwen2 (skipped when missing)"
    )
    parser.add_argument("--no-bf16-path", action="store_true", help="skip the bf16-merge comparison")
    args = parser.parse_args()
    types = [t for t in args.types.split(",") if t]
    conv = ensure_converter(args.converter_dir.expanduser() if args.converter_dir else None)
    print(f"converter: {conv.source / 'convert_hf_to_gguf.py'} (llama.cpp v0.5.0 from node-llama-cpp@3.22.1; {conv.versions()})")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    for name in [c for c in args.cases.split(",") if c] if args.cases else default_cases():
        print(f"case {name} ...", flush=True)
        results.append(run_case(name, args.workdir, conv, types, None))
    if (args.smollm2 / "tokenizer.json").is_file():
        for name in ("llama", "qwen2"):
            print(f"case {name} with the SmolLM2 tokenizer ...", flush=True)
            r = run_case(name, args.workdir, conv, types, args.smollm2)
            r.name += " +smollm2 tok"
            results.append(r)
    if not args.no_bf16_path:
        print("case llama with a bf16 base, bf16 merge path ...", flush=True)
        results.append(run_case("llama", args.workdir, conv, types, None, merge_dtype="bfloat16"))
    ok = report(results)
    print(f"\nall float32-merge cases equivalent (metadata except stamps, layout, data bytes): {ok}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
