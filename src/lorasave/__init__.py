"""lorasave: save LoRA fine-tuned models for deployment, streaming, on CPU.

Public API::

    lorasave.merge(base, adapters, output, dtype="auto", max_shard_size="5GB")
    lorasave.save_adapter(adapter, output, dtype=None)
    lorasave.save_pretrained_merged(peft_model, "out", tokenizer, save_method="merged_16bit")
    lorasave.save_pretrained_gguf(peft_model, "out", tokenizer, quantization_method=["q4_k_m", "q8_0"])
    lorasave.attach(peft_model)   # then peft_model.save_pretrained_merged(...), push_to_hub_gguf(...): Unsloth's names
    lorasave.export_gguf(base, adapters, output, type="q8_0")
    lorasave.export_gguf_adapter(base, adapter, output, type="f16")
    lorasave.export_onnx(base, adapters, output)   # lora_inputs="all-linear": LoRA weights as graph inputs
    lorasave.export_onnx_adapter(onnx_base, adapter, output)   # an .onnx_adapter for that graph
    lorasave.compute_imatrix(base, adapters, output, text="calib.txt")   # llama-imatrix's GGUF
    lorasave.load_imatrix("imatrix.gguf").importances()   # what llama_model_quantize takes
    from lorasave.verify.run import verify; verify(output, level="tensors"
    lorasave.push(output, repo_id)

Errors raised on bad input are subclasses of ``lorasave.errors.LorasaveError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it, imported on first use (so `lorasave --help` and
#: `import lorasave` do not import torch).
_LAZY = {
    "merge": "api",
    "save_adapter": "api",
    "MergeResult": "api",
    "AdapterResult": "api",
    "export_gguf": "formats.gguf.export",
    "GgufResult": "formats.gguf.export",
    "export_gguf_adapter": "formats.gguf.adapter",
    "GgufAdapterResult": "formats.gguf.adapter",
    "export_onnx": "formats.onnx.export",
    "OnnxResult": "formats.onnx.export",
    "export_onnx_adapter": "formats.onnx.adapter",
    "OnnxAdapterResult": "formats.onnx.adapter",
    "compute_imatrix": "formats.gguf.calibrate",
    "ImatrixResult": "formats.gguf.calibrate",
    "load_imatrix": "formats.gguf.imatrix",
    "Imatrix": "formats.gguf.imatrix",
    "push": "hub.push",
    "PushResult": "hub.push",
    "save_pretrained_merged": "unsloth",
    "push_to_hub_merged": "unsloth",
    "save_pretrained_gguf": "unsloth",
    "push_to_hub_gguf": "unsloth",
    "save_pretrained_ggml": "unsloth",
    "push_to_hub_ggml": "unsloth",
    "SavedAndPushed": "unsloth",
    "attach": "unsloth",
    "VerifyReport": "verify.run",
    "inspect_path": "verify.inspect",
    "LorasaveError": "errors",
}

__all__ = [
    "AdapterResult",
    "GgufAdapterResult",
    "GgufResult",
    "Imatrix",
    "ImatrixResult",
    "LorasaveError",
    "MergeResult",
    "OnnxAdapterResult",
    "OnnxResult",
    "PushResult",
    "SavedAndPushed",
    "VerifyReport",
    "__version__",
    "attach",
    "compute_imatrix",
    "export_gguf",
    "export_gguf_adapter",
    "export_onnx",
    "export_onnx_adapter",
    "inspect_path",
    "load_imatrix",
    "merge",
    "push",
    "push_to_hub_ggml",
    "push_to_hub_gguf",
    "push_to_hub_merged",
    "save_adapter",
    "save_pretrained_ggml",
    "save_pretrained_gguf",
    "save_pretrained_merged",
]  # = sorted(_LAZY) + __version__ (tests/test_cli_usage.py checks it)

if TYPE_CHECKING:
    from lorasave.api import AdapterResult, MergeResult, merge, save_adapter
    from lorasave.errors import LorasaveError
    from lorasave.formats.gguf.adapter import GgufAdapterResult, export_gguf_adapter
    from lorasave.formats.gguf.calibrate import ImatrixResult, compute_imatrix
    from lorasave.formats.gguf.export import GgufResult, export_gguf
    from lorasave.formats.gguf.imatrix import Imatrix, load_imatrix
    from lorasave.formats.onnx.adapter import OnnxAdapterResult, export_onnx_adapter
    from lorasave.formats.onnx.export import OnnxResult, export_onnx
    from lorasave.hub.push import PushResult, push
    from lorasave.unsloth import (
        SavedAndPushed,
        attach,
        push_to_hub_ggml,
        push_to_hub_gguf,
        push_to_hub_merged,
        save_pretrained_ggml,
        save_pretrained_gguf,
        save_pretrained_merged,
    )
    from lorasave.verify.inspect import inspect_path
    from lorasave.verify.run import VerifyReport


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        from lorasave.unsloth import NOT_OFFERED, not_offered

        if name in NOT_OFFERED:  # another tool's name: say what to use instead
            raise not_offered(name)
        raise AttributeError(f"module 'lorasave' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
