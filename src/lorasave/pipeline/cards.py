"""Model cards (``README.md``) for every output, written with ``huggingface_hub.ModelCard``.

Front matter follows the Hub's model card metadata spec
(https://huggingface.co/docs/hub/model-cards): ``base_model`` only as a Hub id (never a local
path), ``library_name``, ``tags``, ``pipeline_tag``, and ``license`` copied from the base's own
card when it has one (never invented). Keys with no value are left out.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
#: Architecture-name suffixes -> the Hub's ``pipeline_tag``.
_PIPELINES = (
    ("ForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForImageClassification", "image-classification"),
    ("ForMaskedLM", "fill-mask"),
)


def hub_id(candidate: object) -> str | None:
    """``candidate`` if it looks like a Hub repo id (``org/name``) and is not a local path, else None."""
    if not isinstance(candidate, str) or not _HUB_ID.match(candidate) or Path(candidate).exists():
        return None
    return candidate


def pipeline_tag(architectures: list[str] | None) -> str | None:
    """The Hub pipeline of a transformers architecture name, when known."""
    for arch in architectures or []:
        for suffix, tag in _PIPELINES:
            if arch.endswith(suffix):
                return tag
    return None


def base_license(base_dir: Path | None) -> str | None:
    """The ``license`` in the base's own README.md front matter, if any."""
    if base_dir is None or not (base_dir / "README.md").is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        value = ModelCard.load(base_dir / "README.md").data.to_dict().get("license")
    except Exception as e:  # an unparsable card: no license rather than a failed save
        logger.info("could not read the license of %s: %s", base_dir, e)
        return None
    return value if isinstance(value, str) and value else None


def _settings_table(adapters: list[dict[str, Any]]) -> str:
    rows = ["| adapter | type | r | lora_alpha | targets |", "|---|---|---|---|---|"]
    for i, a in enumerate(adapters, 1):
        targets = a.get("target_modules") or a.get("target_parameters") or ""
        if isinstance(targets, list):
            targets = ", ".join(map(str, targets))
        name = hub_id(a.get("hub_id")) or Path(str(a.get("path", f"adapter {i}"))).name
        rows.append(f"| {name} | {a.get('peft_type', 'LORA')} | {a.get('r', '')} | {a.get('lora_alpha', '')} | {targets} |")
    return "\n".join(rows)


def write_card(
    folder: Path,
    *,
    kind: str,
    base_model: str | None,
    architectures: list[str] | None,
    adapters: list[dict[str, Any]],
    settings: dict[str, Any],
    base_dir: Path | None,
    load_snippet: str,
    verification: str | None = None,
    title: str | None = None,
) -> Path:
    """Write ``folder/README.md``.

    Args:
        folder: the staging folder of the output.
        kind: what the output is: ``"merged"``, ``"merged-4bit"``, ``"merged-compressed"``, ``"adapter"``, ``"onnx"`` or ``"onnx-adapter"``.
        base_model: the base's Hub id when known (else omitted from the metadata).
        architectures: ``config.json`` architectures (for ``pipeline_tag``).
        adapters: descriptions of the adapters (``peft_type``, ``r``, ``lora_alpha``, targets, path).
        settings: the options used (dtype, quantization...), shown in the body.
        base_dir: the base's folder, to copy its license from.
        load_snippet: Python code showing how to load the output.
        verification: a line saying how the output was checked, when it was.
        title: the card's heading (the output folder's final name).

    Returns:
        The card's path.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from lorasave import __version__

    merged = kind not in ("adapter", "onnx-adapter")
    library = {"adapter": "peft", "onnx": "onnx", "onnx-adapter": "onnx"}.get(kind, "transformers")
    data: dict[str, Any] = {
        "base_model": hub_id(base_model),
        "library_name": library,
        "tags": [
            "lorasave",
            "lora",
            "merged" if merged else "adapter",
            *(["4-bit", "bitsandbytes"] if "4bit" in kind else []),
            *(["compressed-tensors", "vllm"] if kind == "merged-compressed" else []),
            *(["onnx", "onnxruntime"] if kind in ("onnx", "onnx-adapter") else []),
        ],
        "pipeline_tag": pipeline_tag(architectures),
        "license": base_license(base_dir),
    }
    card_data = ModelCardData(**{k: v for k, v in data.items() if v not in (None, [], "")})
    lines = [
        f"# {title or folder.name}",
        "",
        f"{'A merged checkpoint' if merged else 'A LoRA adapter'} written by [lorasave](https://pypi.org/project/lorasave/) {__version__}.",
        "",
        "## How it was made",
        "",
        f"- Base model: {hub_id(base_model) or 'a local checkpoint'}",
        *(f"- {k}: {v}" for k, v in settings.items() if v not in (None, "", [])),
        "",
        _settings_table(adapters),
        "",
        "## How to load it",
        "",
        "```python",
        load_snippet.strip(),
        "```",
        "",
        "## Verification",
        "",
        verification or "Every file's sha256 is recorded in `lorasave.json`.",
        "",
    ]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = folder / "README.md"
    card.save(path)
    return path


def card_kind(save_method: str, quantizer: object = None) -> str:
    """The card ``kind`` of a merge's ``save_method``: ``"merged"``, ``"merged-4bit"`` or ``"merged-compressed"``.

    An output that keeps a quantized base's own layout (``quantizer.base_layout``: gpt-oss MXFP4, an FP8
    base's blocks) loads with a plain ``from_pretrained``: ``"merged"``.
    """
    if save_method == "merged_4bit":
        return "merged-4bit"
    return "merged" if save_method == "merged_16bit" or getattr(quantizer, "base_layout", False) else "merged-compressed"


def merged_snippet(repo_or_path: str, save_method: str = "merged_16bit", quantizer: object = None) -> str:
    """How to load a merged output: transformers; vLLM too for a compressed-tensors output."""
    if card_kind(save_method, quantizer) == "merged-compressed":
        return (
            "# vLLM / SGLang load the compressed-tensors weights as they are (GPU):\n"
            "from vllm import LLM\n\n"
            f'llm = LLM("{repo_or_path}")\n\n'
            "# transformers, decompressed to 16-bit while loading (works on CPU):\n"
            "from transformers import AutoModelForCausalLM, CompressedTensorsConfig\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_or_path}", quantization_config=CompressedTensorsConfig(dequantize=True))'
        )
    extra = '  # 4-bit (bitsandbytes) weights load as such, device_map="cpu" works' if save_method == "merged_4bit" else ""
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_or_path}"){extra}\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_or_path}")'
    )


def adapter_snippet(base: str, repo_or_path: str) -> str:
    """How to load an adapter output with PEFT."""
    return (
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo_or_path}")'
    )


def write_gguf_card(
    folder: Path,
    *,
    title: str,
    gguf_file: str,
    type: str,
    tensor_types: dict[str, int],
    base_model: str | None,
    architectures: list[str] | None,
    adapters: list[dict[str, Any]],
    base_dir: Path | None,
    modelfile: bool,
    notes: list[str] | None = None,
    lora_adapter: bool = False,
    more_files: list[tuple[str, str, dict[str, int]]] | None = None,
) -> Path:
    """Write ``folder/README.md`` for a GGUF output (``lorasave gguf``, or ``gguf-adapter`` with ``lora_adapter``).

    Same front matter rules as :func:`write_card` (``library_name: gguf``, tags ``gguf`` and
    ``llama.cpp``); the body names the base, the adapters, the type and the count of tensors of
    each GGML type, and how to run the file with llama.cpp (``llama-cli -m``) and, when a
    ``Modelfile`` was written, with Ollama (``ollama create -f Modelfile``).

    Args:
        folder: the staging folder of the output.
        title: the card's heading (the output folder's final name).
        gguf_file: the ``.gguf`` file name inside ``folder``.
        type: the output type (``"q4_k_m"``...).
        tensor_types: GGML type name -> number of tensors.
        base_model: the base's Hub id when known.
        architectures: ``config.json`` architectures (for ``pipeline_tag``).
        adapters: descriptions of the merged adapters (``peft_type``, ``r``, ``lora_alpha``, targets, path).
        base_dir: the base's folder, to copy its license from.
        modelfile: whether ``folder/Modelfile`` exists.
        notes: facts worth knowing (fallbacks, the k-quant route), listed in the body.
        lora_adapter: the file is a GGUF LoRA adapter (run with ``--lora`` on the base's GGUF).
        more_files: ``(file name, type, tensor_types)`` of the other files of a multi-type output
            (``--type q8_0,q4_k_m``), listed in a table after the first file's.

    Returns:
        The card's path.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from lorasave import __version__

    data: dict[str, Any] = {
        "base_model": hub_id(base_model),
        "library_name": "gguf",
        "tags": ["lorasave", "lora", "adapter" if lora_adapter else "merged", "gguf", "llama.cpp", *(["ollama"] if modelfile else [])],
        "pipeline_tag": pipeline_tag(architectures),
        "license": base_license(base_dir),
    }
    card_data = ModelCardData(**{k: v for k, v in data.items() if v not in (None, [], "")})
    what = "LoRA adapter" if lora_adapter else "merged model"
    type_rows = ["| GGML type | tensors |", "|---|---|", *(f"| {k} | {n} |" for k, n in sorted(tensor_types.items()))]
    files_line, types_line = f"`{gguf_file}`, type `{type}`", type
    if more_files:
        files_line = "one file per type: " + ", ".join(f"`{f}`" for f in [gguf_file, *(m[0] for m in more_files)])
        types_line = ", ".join([type, *(m[1] for m in more_files)])
        files = [(gguf_file, type, tensor_types), *more_files]
        type_rows += [
            "",
            "All the files of this folder, written from one read of the base and one merge:",
            "",
            "| file | type | tensors by GGML type |",
            "|---|---|---|",
            *(f"| `{f}` | {t} | {', '.join(f'{n} {k}' for k, n in sorted(c.items()))} |" for f, t, c in files),
        ]
    run = ["```sh", f"llama-cli -m BASE.gguf --lora {gguf_file} -cnv" if lora_adapter else f"llama-cli -m {gguf_file} -cnv", "```"]
    if lora_adapter:
        run += ["", "`BASE.gguf` is the base model as GGUF, e.g. `lorasave gguf BASE -o base-gguf --type f16`."]
    if modelfile:
        run += ["", "With [Ollama](https://ollama.com), from this folder:", "", "```sh", f"ollama create {title} -f Modelfile", f"ollama run {title}", "```"]
    lines = [
        f"# {title}",
        "",
        f"A {what} in GGUF format ({files_line}) written by [lorasave](https://pypi.org/project/lorasave/) {__version__}.",
        "",
        "## How it was made",
        "",
        f"- Base model: {hub_id(base_model) or 'a local checkpoint'}",
        f"- Type: {types_line}",
        "",
        _settings_table(adapters),
        "",
        *type_rows,
        "",
        *(f"- {n}" for n in notes or []),
        *([""] if notes else []),
        "## How to run it",
        "",
        "With [llama.cpp](https://github.com/ggml-org/llama.cpp):",
        "",
        *run,
        "",
        "## Verification",
        "",
        "Every file's sha256 is recorded in `lorasave.json`; `lorasave verify` checks them.",
        "",
    ]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = folder / "README.md"
    card.save(path)
    return path
