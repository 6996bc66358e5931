"""Output writers: one per format, behind one small interface (``begin``, ``write``, ``end``)."""

from .deferred import DeferredShardWriter
from .safetensors import SafetensorsShardWriter, WriterState

__all__ = ["DeferredShardWriter", "SafetensorsShardWriter", "WriterState"]
