"""``lorasave imatrix``: the importance matrix of a merged model, computed as llama-imatrix computes it.

llama-imatrix (``tools/imatrix/imatrix.cpp``, llama.cpp v0.5.0) tokenizes the calibration text
(BOS first when the vocabulary adds one; special-token text is not parsed as special), cuts it into
chunks of ``-c`` tokens (512 by default), sets the first token of each chunk to BOS, evaluates each
chunk on its own (KV cache cleared) and, from the ggml evaluation callback, collects every matrix
multiplication whose weight is named ``blk.*`` (``output.weight`` too with ``--process-output``):
``in_sum2[j] += x_j²`` over every token row ``x`` of the multiplication's input and ``counts +=``
the number of rows. It saves ``chunk_count`` (chunks evaluated) and ``chunk_size``.

Here the same is done in torch on the float32 merge (``lorasave``'s own merge of BASE and the
adapters, loaded into the transformers model built from the config: no code from the folder runs):
a forward pre-hook on every ``nn.Linear`` whose weight GGUF export names ``blk.*`` (names from
gguf-py's ``TensorNameMap``, the names the GGUF file of the same merge has) adds the squares of its
input rows, accumulated in float64. The input of a Linear is the input of llama.cpp's matmul of the
same weight (``attn_q``: the attention norm's output; ``ffn_down``: ``act(gate(x)) * up(x)``), so
the sums agree with llama-imatrix on the GGUF of the merge up to float rounding. Two differences:
llama-imatrix needs at least two chunks of text, one is enough here; and it evaluates micro-batches
of at most 512 tokens and skips a micro-batch of fewer than 16 (so ``--chunk-size`` must be at least
16; with a chunk size that is a power of two, no micro-batch is skipped there either).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorasave.errors import ImatrixError, InvalidOptionError, UnsupportedModelError
from lorasave.formats.gguf.imatrix import IMATRIX_FILE, write_imatrix
from lorasave.formats.gguf.model import GgufModel
from lorasave.merging.stream import ExecContext, Timings, check_finite, tensor_blocks
from lorasave.pipeline.manifest import MANIFEST_NAME, result_dict, sha256_file, sources_record, write_manifest
from lorasave.pipeline.output import check_output_path, tokenizer_source
from lorasave.pipeline.run import PlannedOutput, single_output
from lorasave.sources import stamp as source_stamp
from lorasave.sources.adapter import Adapter, load_adapters
from lorasave.sources.checkpoint import TensorReader
from lorasave.sources.named_base import open_base
from lorasave.util.notes import log_notes
from lorasave.util.textfile import read_utf8

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: llama-imatrix's default ``-c``.
DEFAULT_CHUNK_SIZE = 512
#: llama-imatrix skips the matrix multiplications of fewer than 16 token rows.
MIN_CHUNK_SIZE = 16


@dataclass
class ImatrixResult:
    """What ``compute_imatrix`` wrote.

    Attributes:
        output: the output folder.
        file: the importance matrix, ``OUT/imatrix.gguf``.
        files: names of the files written, manifest included.
        n_entries: weights in the file.
        chunks: chunks evaluated (``imatrix.chunk_count``).
        chunk_size: tokens per chunk (``imatrix.chunk_size``).
        tokens: tokens the text gave (BOS included), of which ``chunks * chunk_size`` were evaluated.
        seconds: wall time.
        notes: facts worth knowing.
    """

    output: Path
    file: Path
    files: list[str]
    n_entries: int
    chunks: int
    chunk_size: int
    tokens: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``)."""
        return result_dict(self)

    def summary(self) -> str:
        """One line for humans."""
        return (
            f"importance matrix of {self.n_entries} weights from {self.chunks} chunk(s) of {self.chunk_size} tokens "
            f"({self.tokens} in the text) written to {self.file} in {self.seconds:.1f} s"
        )


def imatrix_targets(model: GgufModel, process_output: bool = False) -> dict[str, str]:
    """The weights llama-imatrix records for the GGUF file of ``model``'s merge: HF name -> GGUF name.

    Every 2-D ``*.weight`` the file has whose GGUF name starts with ``blk.``, and ``output.weight``
    with ``process_output`` (only when the file has one: a tied model multiplies by
    ``token_embd.weight``, which llama-imatrix never records).
    """
    import gguf

    from lorasave.formats.gguf.arch import Hparams

    names = gguf.get_tensor_name_map(model.rules.arch, Hparams.of(model.config).n_layer)
    out = {}
    for t in model.plan.tensors.values():
        text = model.rules.text_name(t.name)
        if text is None or text in model.rules.drop or not text.endswith(".weight") or len(t.shape) != 2:
            continue
        gname = names.get_name(text, try_suffixes=(".weight", ".bias"))
        if gname is not None and (gname.startswith("blk.") or (process_output and gname == "output.weight")):
            out[t.name] = gname
    return out


def tokenize_chunks(tokenizer: Any, text: str, chunk_size: int, chunks: int | None, add_bos: bool, bos: int | None) -> tuple[list[list[int]], int]:
    """llama-imatrix's chunks of ``text``: ``([token ids of each chunk], tokens in the text)``.

    The text is tokenized whole without parsing special-token text (``common_tokenize(...,
    parse_special=false)``), BOS first when ``add_bos``; chunk ``i`` is tokens ``[i*c, (i+1)*c)``
    with its first token set to BOS when ``add_bos``; at most ``chunks`` of them.

    Raises:
        InvalidOptionError: the text gives fewer tokens than one chunk.
    """
    ids = list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    use_bos = add_bos and bos is not None
    tokens = [int(bos), *ids] if use_bos else ids  # type: ignore[arg-type]
    n = len(tokens) // chunk_size
    if chunks is not None:
        n = min(n, chunks)
    if n < 1:
        raise InvalidOptionError(f"the text gives {len(tokens)} tokens, fewer than one chunk of {chunk_size}; give more text or a smaller --chunk-size")
    out = []
    for i in range(n):
        chunk = tokens[i * chunk_size : (i + 1) * chunk_size]
        if use_bos:
            chunk[0] = int(bos)  # type: ignore[arg-type]
        out.append(chunk)
    return out, len(tokens)


def adds_bos(tok_dir: Path, tokenizer: Any) -> bool:
    """Whether llama.cpp adds BOS with the GGUF of this tokenizer: ``tokenizer.ggml.add_bos_token``
    as gguf-py's ``SpecialVocab`` reads it from the files, else as the tokenizer does (``gguf.vocab``'s rule)."""
    import gguf

    flag = gguf.SpecialVocab(tok_dir, load_merges=False).add_special_token.get("bos")
    if flag is not None:
        return bool(flag)
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a", add_special_tokens=True)
    return len(full) > len(plain) and tokenizer.bos_token_id is not None and full[0] == tokenizer.bos_token_id


def merged_model(model: GgufModel, timings: Timings) -> torch.nn.Module:
    """The transformers model of ``model``'s config holding the float32 merge (``merging.stream``), in eval mode.

    Raises:
        UnsupportedModelError: transformers does not build the model from the config, or a tensor
            of the merge does not fit the model, or the model has a weight the merge lacks.
        NonFiniteResultError: a merged value is NaN or Inf.
    """
    from lorasave.formats.bnb import preload_bnb

    preload_bnb()  # before transformers imports bitsandbytes: no Hub kernel is fetched
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with warnings.catch_warnings():  # transformers' deprecation notices are not the user's business
            warnings.simplefilter("ignore", FutureWarning)
            config = AutoConfig.for_model(**model.config)  # built-in classes only: nothing from the folder runs
            net = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=torch.float32)
    except (ValueError, KeyError, TypeError) as e:
        raise UnsupportedModelError(f"{model.ckpt.root}: transformers cannot build this model from its config ({e})", path=model.ckpt.root) from None
    state = net.state_dict()
    filled: set[int] = set()
    with torch.no_grad(), TensorReader() as reader:
        ctx = ExecContext(reader, model.adapters, timings, model.plan.converter)
        for t in model.plan.tensors.values():
            dst = state.get(t.name)
            if dst is None:
                logger.debug("%s: not a parameter of %s; left out", t.name, type(net).__name__)
                continue
            if tuple(dst.shape) != tuple(t.shape):
                raise UnsupportedModelError(f"{t.name}: the merge is {tuple(t.shape)} but {type(net).__name__} has {tuple(dst.shape)}", path=model.ckpt.root)
            for block in tensor_blocks(t, ctx):
                if block.merged:
                    check_finite(t, block.values, block.start, block.stop)
                if dst.dim() == 0:
                    dst.copy_(block.values.reshape(()))
                else:
                    dst[block.start : block.stop].copy_(block.values)
            filled.add(dst.data_ptr())
    missing = [n for n, v in state.items() if v.data_ptr() not in filled and v.numel()]
    if missing:
        raise UnsupportedModelError(f"{model.ckpt.root}: the checkpoint has no value for {missing[0]} (+{len(missing) - 1} more)", path=model.ckpt.root)
    return net.eval()


def gguf_columns(model: GgufModel, targets: dict[str, str], sums: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``sums`` in the GGUF tensor's column order where an architecture's ``ValueTransform`` permutes a weight's
    columns (Qwen3.5's ``out_proj``: value heads tiled), as llama.cpp's matmul then takes its inputs.

    The order is read off the transform of a matrix whose every row holds the column indices; an entry whose
    transform does more than permute rows and columns is left as it is.
    """
    from lorasave.formats.gguf.arch import Hparams

    hp = Hparams.of(model.config)
    out = dict(sums)
    for hf, gname in targets.items():
        text = model.rules.text_name(hf)
        rule = None if text is None else next((r for r in model.rules.transforms if r.matches(text)), None)
        if rule is None or len(rule.into) != 1 or gname not in out:
            continue
        shape = tuple(model.plan.tensors[hf].shape)
        index = torch.arange(shape[-1], dtype=torch.float32).expand(shape).contiguous()
        got = rule.into[0][1](hp, index)
        if tuple(got.shape) == shape and bool((got == got[:1]).all()) and sorted(got[0].tolist()) == list(range(shape[-1])):
            out[gname] = out[gname][got[0].long().numpy()]
    return out


def collect(net: torch.nn.Module, targets: dict[str, str], chunks: Sequence[Sequence[int]]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Evaluate each chunk and sum the squared inputs of the Linear modules of ``targets``.

    Args:
        net: a causal LM.
        targets: HF weight name (``model.layers.0.self_attn.q_proj.weight``) -> GGUF name.
        chunks: token ids of each chunk, each evaluated on its own.

    Returns:
        ``(sums, counts)`` by GGUF name: float64 ``(in_features,)`` Σ x² over every input row, and
        the number of rows.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(gname: str) -> Any:
        def pre(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["input"]
            rows = x.detach().reshape(-1, x.shape[-1]).double()
            sums[gname] += (rows * rows).sum(0)
            counts[gname] += rows.shape[0]

        return pre

    handles = []
    for name, module in net.named_modules():
        gname = targets.get(f"{name}.weight")
        if gname is not None and isinstance(module, torch.nn.Linear):
            sums[gname] = torch.zeros(module.in_features, dtype=torch.float64)
            counts[gname] = 0
            handles.append(module.register_forward_pre_hook(hook(gname), with_kwargs=True))
    try:
        with torch.no_grad():
            for ids in chunks:
                net(input_ids=torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {g: s.numpy() for g, s in sums.items()}, counts


def _read_text(text: PathLike) -> str:
    return read_utf8(text, "calibration text")


def plan_imatrix(
    base: PathLike | None,
    adapters: PathLike | Sequence[PathLike] | Sequence[Adapter] | None,
    output: PathLike,
    *,
    text: PathLike,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunks: int | None = None,
    process_output: bool = False,
    tokenizer: PathLike | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> PlannedOutput:
    """Plan ``compute_imatrix``: the importance matrix of BASE merged with the adapters, from calibration text.

    OUT (a folder, created atomically) gets ``imatrix.gguf`` in llama-imatrix's GGUF layout
    (``formats.gguf.imatrix``; ``lorasave gguf --imatrix OUT`` and ``llama-quantize --imatrix
    OUT/imatrix.gguf`` take it) and ``lorasave.json``. The definition is llama-imatrix's (module
    docstring); its weights are the GGUF file's names (``blk.0.attn_q.weight``...).

    Args:
        base: base folder or a Hub id in the local HF cache; a model GGUF export supports.
        adapters: PEFT adapter folder(s) merged into it (float32, ``lorasave``'s merge), or none.
        output: the folder to create.
        text: the calibration text file (UTF-8); its name is stored in ``imatrix.datasets``.
        chunk_size: tokens per chunk (llama-imatrix's ``-c``), at least 16.
        chunks: evaluate at most this many chunks (llama-imatrix's ``--chunks``); default all.
        process_output: also record ``output.weight`` (llama-imatrix's ``--process-output``).
        tokenizer: tokenizer folder; default the first adapter's, else the base's (as ``gguf``).
        overwrite: replace an existing lorasave output at ``output``.
        allow_pickle: accept ``adapter_model.bin``.

    Raises:
        InvalidOptionError: ``chunk_size`` below 16, ``chunks`` below 1, a text that is not UTF-8
            or gives fewer tokens than one chunk.
        SourceNotFoundError: the text (or a source) does not exist.
        UnsupportedModelError: a model GGUF export does not handle, or transformers cannot build.
        ImatrixError: the activations are not finite.
        LorasaveError subclasses from loading the sources, the merge and the output checks.
    """
    t_start = time.perf_counter()
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < MIN_CHUNK_SIZE:
        raise InvalidOptionError(f"chunk_size {chunk_size!r}: give at least {MIN_CHUNK_SIZE} tokens (llama-imatrix skips smaller batches)")
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise InvalidOptionError(f"chunks {chunks!r}: give a number of chunks of at least 1, or none for all")
    body = _read_text(text)
    ckpt = open_base(base, adapters)
    ads = load_adapters(adapters, allow_pickle=allow_pickle)
    tok_dir = tokenizer_source(tokenizer, [a.root for a in ads], ckpt.root)
    final = check_output_path(Path(output), [ckpt.root, *(a.root for a in ads), tok_dir], overwrite)
    model = GgufModel.build(ckpt, ads, tok_dir, final.name)
    targets = imatrix_targets(model, process_output)
    from lorasave.sources.hf_load import load_tokenizer

    tok = load_tokenizer(tok_dir)
    add_bos = adds_bos(tok_dir, tok)
    bos = tok.bos_token_id if tok.bos_token_id is not None else model.config.get("bos_token_id")
    token_chunks, n_tokens = tokenize_chunks(tok, body, chunk_size, chunks, add_bos, bos)
    notes = list(model.notes)
    ctx_train = model.config.get("max_position_embeddings")
    if isinstance(ctx_train, int) and chunk_size > ctx_train:
        notes.append(f"the model was trained on {ctx_train} context tokens, fewer than a chunk of {chunk_size} (llama-imatrix warns too)")
    needed = 4096 + sum(4 * int(model.plan.tensors[n].shape[-1]) + 4 + 160 for n in targets)

    def finish(folder: Path, timings: Timings) -> ImatrixResult:
        net = merged_model(model, timings)
        sums, counts = collect(net, targets, token_chunks)
        del net
        sums = gguf_columns(model, targets, sums)
        bad = next((g for g, s in sums.items() if not np.isfinite(s).all()), None)
        if bad is not None:
            raise ImatrixError(f"non-finite activations in {bad}: the merged model overflows on this text", path=final)
        if not sums:
            raise UnsupportedModelError(f"{ckpt.root}: no weight llama-imatrix records (blk.*) was found in the model", path=ckpt.root)
        dataset = os.fspath(text)
        path = write_imatrix(
            folder / IMATRIX_FILE,
            {g: s.astype(np.float32) for g, s in sums.items()},
            {g: np.array([c]) for g, c in counts.items()},
            datasets=[dataset],
            chunk_count=len(token_chunks),
            chunk_size=chunk_size,
        )
        files = {IMATRIX_FILE: sha256_file(path)}
        sources = {
            **sources_record(ckpt, ads),
            "tokenizer": str(tok_dir.resolve()),
            "text": {"path": str(Path(text).resolve()), "sha256": sha256_file(Path(text))},
        }
        settings = {"chunk_size": chunk_size, "chunks": chunks, "process_output": process_output, "add_bos": add_bos, "allow_pickle": allow_pickle}
        summary = {"n_entries": len(sums), "chunk_count": len(token_chunks), "tokens": n_tokens, "notes": notes}
        write_manifest(folder, command="imatrix", sources=sources, settings=settings, result=summary, files=files)
        result = ImatrixResult(
            output=final,
            file=final / IMATRIX_FILE,
            files=sorted([*files, MANIFEST_NAME]),
            n_entries=len(sums),
            chunks=len(token_chunks),
            chunk_size=chunk_size,
            tokens=n_tokens,
            seconds=round(time.perf_counter() - t_start, 3),
            notes=notes,
        )
        logger.debug("%s", result.summary())
        return result

    log_notes(logger, notes)
    return PlannedOutput(
        command="imatrix",
        final=final,
        overwrite=overwrite,
        stamps=source_stamp.record(ckpt, ads),
        needed_bytes=math.ceil(needed),
        finish=finish,
    )


compute_imatrix = single_output(
    plan_imatrix,
    "compute_imatrix",
    "Compute the importance matrix (llama-imatrix's GGUF layout) of BASE merged with the adapters, from calibration text.",
    "ImatrixResult",
)
