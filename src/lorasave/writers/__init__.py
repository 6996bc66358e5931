"""Output writers: one per format, behind one small interface (``begin``, ``write``, ``end``)."""

from .safetensors import SafetensorsShardWriter, WriterState

__all__ = ["SafetensorsShardWriter", "WriterState"]
