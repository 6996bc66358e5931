"""What a model card says about an output's sources: the base's Hub id, architectures, adapters, license folder.

``pipeline.cards.write_card`` and ``write_gguf_card`` take the same four keyword arguments about
the sources; :func:`card_sources` builds them once for the format writers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorasave.sources.checkpoint import Checkpoint


def card_sources(ckpt: Checkpoint, adapters: list[dict[str, Any]]) -> dict[str, Any]:
    """``base_model``, ``architectures``, ``adapters`` and ``base_dir`` for a card of an output made from ``ckpt``.

    Args:
        ckpt: the base checkpoint.
        adapters: descriptions of the adapters (``base_model_name_or_path`` among their keys).

    Returns:
        The keyword arguments; ``base_model`` is the base's Hub id, else the first adapter
        ``base_model_name_or_path`` that looks like one (``cards.hub_id``), else None.
    """
    from lorasave.pipeline.cards import hub_id

    named = (hub_id(a.get("base_model_name_or_path")) for a in adapters)
    return {
        "base_model": ckpt.hub_id or next((name for name in named if name), None),
        "architectures": ckpt.config.get("architectures"),
        "adapters": adapters,
        "base_dir": ckpt.root,
    }
