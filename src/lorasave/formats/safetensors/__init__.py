"""Output writers: one per format, behind one small interface (``begin``, ``write``, ``end``)."""

from lorasave.formats.safetensors.deferred import DeferredShardWriter
from lorasave.formats.safetensors.writer import SafetensorsShardWriter, WriterState

__all__ = ["DeferredShardWriter", "SafetensorsShardWriter", "WriterState"]
