"""Where ``lorasave verify`` finds the sources an output was made from.

The base and the adapters come from ``--base`` / ``--adapter`` when given, else from what
``lorasave.json`` recorded: ``sources.base.path`` (or its ``hub_id`` in the local cache when the
folder is gone), ``sources.adapters[i].path``. An adapter output (``lorasave adapter``) records no
base: the source adapter's ``base_model_name_or_path`` names it. A merge written by
``save_pretrained_merged`` records the live model's base folder (its ``config._name_or_path``)
and, since its adapter lived only in memory, no adapter path: the tensors the adapter changed
(``result.merged``) are then reported as not probed unless ``--adapter`` gives the adapter saved
with ``model.save_pretrained(DIR)``, and every other tensor is still compared with the base.

A recorded path that no longer exists gives an error that says it came from ``lorasave.json``
and which option to pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorasave.errors import SourceNotFoundError

_MANIFEST = "lorasave.json"


def _gone(out: Path, what: str, path: str, option: str) -> SourceNotFoundError:
    return SourceNotFoundError(
        f"the {what} {path} recorded in {out / _MANIFEST} no longer exists: pass {option} DIR with where the {what} is now",
        path=Path(path),
    )


def _recorded(entry: Any) -> dict[str, Any]:
    return entry if isinstance(entry, dict) else {}


def live_adapter_unsaved(manifest: dict[str, Any], adapters: Any) -> bool:
    """The output was merged from a live PeftModel whose adapter has no folder, and ``--adapter`` was not given."""
    src = _recorded(manifest.get("sources"))
    recorded = src.get("adapters")
    return not adapters and "live_model" in src and isinstance(recorded, list) and bool(recorded) and not any(_recorded(a).get("path") for a in recorded)


def live_unprobed(manifest: dict[str, Any], adapters: Any) -> dict[str, str]:
    """``{tensor: reason}`` for the tensors a live adapter changed, when that adapter is not on disk (else empty)."""
    if not live_adapter_unsaved(manifest, adapters):
        return {}
    merged = _recorded(manifest.get("result")).get("merged") or []
    why = "changed by the live PeftModel's adapter, which was not saved: pass --adapter DIR (model.save_pretrained(DIR)) to probe it"
    return {str(n): why for n in merged if isinstance(n, str)}


def _open_base(out: Path, manifest: dict[str, Any], base: Any, ad_paths: list[Any]) -> Any:
    from lorasave.sources.checkpoint import open_checkpoint

    if base:
        return open_checkpoint(base)
    src = _recorded(manifest.get("sources"))
    recorded = _recorded(src.get("base"))
    path, hub_id = recorded.get("path"), recorded.get("hub_id")
    if path:
        if Path(str(path)).is_dir():
            return open_checkpoint(str(path))
        if hub_id:
            try:
                return open_checkpoint(str(hub_id))
            except SourceNotFoundError:
                pass
        raise _gone(out, "base", str(path), "--base")
    if manifest.get("command") == "adapter" and ad_paths:  # an adapter output: its config names the base
        from lorasave.sources.named_base import open_base

        try:
            return open_base(None, [ad_paths[0]])
        except SourceNotFoundError as e:
            raise SourceNotFoundError(f"{e.message}; or pass --base with the base model's folder", path=out) from None
    live = _recorded(src.get("live_model")).get("name_or_path")
    origin = f" (saved from a live PeftModel whose base was loaded from {live!r})" if live else ""
    raise SourceNotFoundError(f"{out / _MANIFEST} names no base path{origin}: pass --base with the base model's folder", path=out)


def sources(out: Path, manifest: dict[str, Any], base: Any, adapters: Any) -> tuple[Any, list[Any], list[float]]:
    """The base checkpoint, the adapters and their weights an output was made from.

    Args:
        out: the output folder.
        manifest: its ``lorasave.json``.
        base, adapters: ``--base`` / ``--adapter`` (None: what the manifest recorded).

    Returns:
        ``(checkpoint, adapters, weights)``; ``adapters`` is empty for a live merge whose
        adapter was not saved (see ``live_unprobed``).

    Raises:
        SourceNotFoundError: a recorded path is gone (the message names lorasave.json and the
            option to pass), or the manifest names no base / adapter.
        Whatever ``open_checkpoint`` / ``load_adapter`` raise for the sources themselves.
    """
    from lorasave.sources.adapter import load_adapter

    src = _recorded(manifest.get("sources"))
    settings = _recorded(manifest.get("settings"))
    recorded = src.get("adapters")
    if adapters:
        ad_paths = list(adapters)
    elif live_adapter_unsaved(manifest, adapters):
        ad_paths = []
    else:
        ad_paths = [_recorded(a).get("path") for a in recorded or []]
        if not isinstance(recorded, list) or any(not p for p in ad_paths):
            raise SourceNotFoundError(f"{out / _MANIFEST} names no adapter path: pass --adapter with the adapter's folder", path=out)
        for p in ad_paths:
            if not Path(str(p)).is_dir():
                raise _gone(out, "adapter", str(p), "--adapter")
    ckpt = _open_base(out, manifest, base, ad_paths)
    ads = [load_adapter(p, allow_pickle=bool(settings.get("allow_pickle"))) for p in ad_paths]
    weights = [float(w) for w in settings.get("weights") or [1.0] * len(ads)]
    return ckpt, ads, weights


def adapter_output_logits(base_root: Path, out: Path, ids: Any) -> Any:
    """Logits (batch, seq, vocab) float32 of the base under PEFT with the adapter output ``out`` as saved."""
    from lorasave.formats.bnb import preload_bnb

    preload_bnb()  # before transformers/PEFT import it: no Hub kernel is fetched (formats.bnb.preload_bnb)
    from peft import PeftModel

    from lorasave.plan.patterns import check_peft_patterns
    from lorasave.sources.hf_load import load_causal_lm
    from lorasave.util.jsonio import read_json

    model = load_causal_lm(base_root, dtype="float32")
    config = read_json(out / "adapter_config.json")  # PEFT would hang on a catastrophic regex: tried first under a budget
    check_peft_patterns(config, [n for n, _ in model.named_modules()], source=out / "adapter_config.json")
    peft = PeftModel.from_pretrained(model, out).eval()
    return peft(input_ids=ids).logits.float()
