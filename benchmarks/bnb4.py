"""Time lorasave's 4-bit encoder against bitsandbytes' ``quantize_4bit`` on one matrix, side by side.

Run::

    python benchmarks/bnb4.py [--rows 5632] [--cols 2048] [--runs 5] [--dtype bfloat16]

On a random ``(rows, cols)`` matrix (default the 1.1B benchmark model's MLP shape) it times,
alternating, bitsandbytes' ``functional.quantize_4bit`` (nf4 and fp4, block size 64, double
quant: the CPU path ``merged_4bit`` used before) and ``lorasave.formats.bnb_encode.quantize_4bit_state``,
checks that the packed codes and every quant-state tensor are identical, and prints the median
wall time of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lorasave.formats.bnb import import_bnb
from lorasave.formats.bnb_encode import quantize_4bit_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=5632)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args()
    F = import_bnb().functional
    w = (torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)) * 0.02).to(getattr(torch, args.dtype))
    print(f"{args.rows}x{args.cols} {args.dtype}, block 64, double quant, median of {args.runs}; torch threads {torch.get_num_threads()}")
    for qt in ("nf4", "fp4"):
        ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=qt)
        packed, state = quantize_4bit_state(w, 64, qt, True)
        ref, ours = ref_state.as_dict(packed=True), state.as_dict(packed=True)
        same = torch.equal(packed, ref_packed) and ref.keys() == ours.keys() and all(torch.equal(ref[k], ours[k]) for k in ref)
        times: dict[str, list[float]] = {"bitsandbytes": [], "lorasave": []}
        for _ in range(args.runs):
            for name, fn in (
                ("bitsandbytes", lambda qt=qt: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=qt)),
                ("lorasave", lambda qt=qt: quantize_4bit_state(w, 64, qt, True)),
            ):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        b, o = statistics.median(times["bitsandbytes"]), statistics.median(times["lorasave"])
        print(f"{qt}: bitsandbytes {b * 1e3:8.1f} ms   lorasave {o * 1e3:8.1f} ms   speed-up {b / o:5.1f}x   identical: {same}")


if __name__ == "__main__":
    main()
