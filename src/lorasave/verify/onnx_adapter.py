"""``verify`` of an ``.onnx_adapter`` output (``lorasave onnx-adapter``).

Tensors level: each ``<module>.lora_A.weight`` / ``.lora_B.weight`` pair read back with
``onnxruntime.AdapterFormat.read_adapter`` is probed against the source adapter's module: with
random vectors ``x``, ``B_onnx.T @ (A_onnx.T @ x)`` must equal PEFT's ``scaling * B @ (A @ x)``
within the rounding of the stored dtype (A cast once, ``scaling * B`` rounded in float32 then cast)
plus float32 accumulation. Every LoRA module of the source must be there, nothing else.

Logits level (``judge.check_logits``): onnxruntime runs the ONNX base with LoRA inputs and the file
active (``onnxruntime.LoraAdapter``, ``RunOptions.add_active_adapter``): the base recorded in
``lorasave.json`` when it is still there unchanged, else one exported from the Hugging Face base into
a hidden folder beside OUT (``export_onnx(base, [], lora_inputs=...)``) and removed afterwards.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorasave.verify.report import VerifyReport

#: Unit roundoff of the stored dtype.
_UNIT = {"float32": 2.0**-24, "float16": 2.0**-11}


def adapter_file(out: Path, manifest: dict[str, Any]) -> Path:
    """The ``.onnx_adapter`` file of OUT (the one its manifest lists)."""
    return out / next(n for n in manifest.get("files", {}) if n.endswith(".onnx_adapter"))


def read_parameters(path: Path) -> dict[str, np.ndarray]:
    """``{name: array}`` of an ``.onnx_adapter`` file, read with onnxruntime's own reader."""
    import onnxruntime as ort

    return {name: np.array(value.numpy()) for name, value in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}


def check_onnx_adapter(out: Path, manifest: dict[str, Any], report: VerifyReport, ads: list[Any], seed: int) -> None:
    """Probe every LoRA pair of OUT's ``.onnx_adapter`` against the source adapter (module docstring)."""
    from lorasave.formats.onnx.graph import LORA_SUFFIXES
    from lorasave.sources.checkpoint import TensorReader
    from lorasave.verify.probes import PROBES, TINY

    if len(ads) != 1:
        report.skipped = "an ONNX LoRA adapter is checked against exactly one source adapter"
        return
    ad = ads[0]
    unit = _UNIT.get(str(manifest.get("settings", {}).get("dtype")), 2.0**-11)
    params = read_parameters(adapter_file(out, manifest))
    gen = torch.Generator().manual_seed(seed)
    seen: set[str] = set()
    with TensorReader() as reader:
        for name in sorted(params):
            if not name.endswith(LORA_SUFFIXES[0]):
                if not name.endswith(LORA_SUFFIXES[1]):
                    report.fail(name, "not a <module>.lora_A.weight / .lora_B.weight parameter")
                continue
            module = name.removesuffix(LORA_SUFFIXES[0])
            b_name = module + LORA_SUFFIXES[1]
            part = ad.lora.get(module)
            if b_name not in params or part is None:
                report.fail(module, "a lora_A without its lora_B, or for no LoRA module of the source adapter", tensors=2 if b_name in params else 1)
                continue
            seen.add(module)
            a_o = torch.from_numpy(params[name].astype(np.float32)).T  # (r, in)
            b_o = torch.from_numpy(params[b_name].astype(np.float32)).T  # (out, r)
            a = ad.tensor(part.lora_A, reader).float()
            b = ad.tensor(part.lora_B, reader).float()
            if a_o.shape != a.shape or b_o.shape != b.shape:
                shapes = f"{tuple(params[name].shape)}/{tuple(params[b_name].shape)}"
                report.fail(module, f"lora_A/lora_B shapes {shapes}, source A {tuple(a.shape)}, B {tuple(b.shape)}", tensors=2)
                continue
            s = float(part.scaling)
            x = torch.randn(a.shape[1], PROBES, generator=gen)
            ax = x.abs()
            got = b_o @ (a_o @ x)
            want = s * (b @ (a @ x))
            err_a = unit * a_o.abs()
            err_b = (unit + 2.0**-24) * b_o.abs()  # the float32 product scaling * B, then the cast
            bound = err_b @ (a_o.abs() @ ax) + (b_o.abs() + err_b) @ (err_a @ ax)
            bound = bound + 1e-5 * (b_o.abs() @ (a_o.abs() @ ax) + abs(s) * (b.abs() @ (a.abs() @ ax))) + TINY
            worst = float(((got - want).abs() / bound).max())
            if worst <= 1.0:
                report.probed(worst, tensors=2)
            else:
                why = f"B_onnx·A_onnx differs from the source's scaling·B·A by {worst:.1f}× the rounding bound (wrong scaling, layout or bytes)"
                report.fail(module, why, tensors=2)
    for module in sorted(set(ad.lora) - seen):
        report.fail(module, "LoRA module of the source adapter missing from the .onnx_adapter", tensors=0)


def _recorded_base(manifest: dict[str, Any]) -> Path | None:
    """The ONNX base recorded in the manifest, when it is still there with the same ``model.onnx``."""
    from lorasave.formats.onnx.run import ONNX_NAME
    from lorasave.pipeline.manifest import sha256_file

    entry = (manifest.get("sources") or {}).get("onnx_base") or {}
    path = Path(str(entry.get("path") or ""))
    want = (entry.get("files") or {}).get(ONNX_NAME)
    if not entry.get("path") or not (path / ONNX_NAME).is_file():
        return None
    return path if want is None or sha256_file(path / ONNX_NAME) == want else None


def onnx_adapter_logits(out: Path, manifest: dict[str, Any], base_dir: Path, ids: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Logits (batch, seq, vocab) float32 of the ONNX base with OUT's adapter active in onnxruntime (module docstring)."""
    from lorasave.formats.onnx.lora import adapter_run_options, projection_of
    from lorasave.formats.onnx.run import OnnxDecoder

    path = adapter_file(out, manifest)
    tmp: Path | None = None
    base = _recorded_base(manifest)
    try:
        if base is None:
            from lorasave.formats.onnx.export import export_onnx

            projections = sorted({projection_of(n) for n in read_parameters(path)})
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.lorasave-verify-", dir=out.parent))
            export_log = logging.getLogger("lorasave.formats.onnx.export")
            level = export_log.level
            export_log.setLevel(logging.WARNING)
            try:
                dtype = str(manifest.get("settings", {}).get("dtype") or "float32")
                base = export_onnx(base_dir, [], tmp / "base", dtype=dtype, lora_inputs=projections).output
            finally:
                export_log.setLevel(level)
        options, adapter = adapter_run_options(path)
        dec = OnnxDecoder(base)
        got, _ = dec(ids.numpy(), np.ones_like(ids.numpy()), dec.empty_past(ids.shape[0]), run_options=options)
        del adapter
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return torch.from_numpy(got), "onnxruntime"
