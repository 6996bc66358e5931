"""lorasave: save LoRA fine-tuned models for deployment, streaming, on CPU.

Public API::

    lorasave.merge(base, adapters, output, dtype="auto", max_shard_size="5GB")
    lorasave.save_adapter(adapter, output, dtype=None)
    lorasave.save_pretrained_merged(peft_model, "out", tokenizer, save_method="merged_16bit")
    lorasave.attach(peft_model)   # then peft_model.save_pretrained_merged(...), Unsloth-style

Errors raised on bad input are subclasses of ``lorasave.errors.LorasaveError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AdapterResult",
    "LorasaveError",
    "MergeResult",
    "PushResult",
    "__version__",
    "attach",
    "export_gguf",
    "export_gguf_adapter",
    "export_onnx",
    "merge",
    "push",
    "save_adapter",
    "save_pretrained_merged",
]

if TYPE_CHECKING:
    from .api import AdapterResult, MergeResult, merge, save_adapter
    from .errors import LorasaveError
    from .gguf_adapter import export_gguf_adapter
    from .gguf_export import export_gguf
    from .hub import PushResult, push
    from .live import attach, save_pretrained_merged
    from .onnx_export import export_onnx


def __getattr__(name: str) -> Any:
    # import torch lazily, so `lorasave --help` and `import lorasave` stay fast
    if name in ("merge", "save_adapter", "MergeResult", "AdapterResult"):
        from . import api

        return getattr(api, name)
    if name == "export_gguf":
        from .gguf_export import export_gguf

        return export_gguf
    if name == "export_gguf_adapter":
        from .gguf_adapter import export_gguf_adapter

        return export_gguf_adapter
    if name == "export_onnx":
        from .onnx_export import export_onnx

        return export_onnx
    if name in ("push", "PushResult"):
        from . import hub

        return getattr(hub, name)
    if name in ("save_pretrained_merged", "attach"):
        from . import live

        return getattr(live, name)
    if name == "LorasaveError":
        from .errors import LorasaveError

        return LorasaveError
    raise AttributeError(f"module 'lorasave' has no attribute {name!r}")
