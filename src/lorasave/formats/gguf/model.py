"""The GGUF model file of a merge: its tensors, types, metadata, and a writer for one type.

What llama.cpp's ``convert_hf_to_gguf.py`` does to a merged checkpoint, done on the merge's
float32 values directly (no 16-bit intermediate checkpoint):

* tensor names through gguf-py's ``TensorNameMap`` (``gguf/tensor_mapping.py``);
* Llama-family Q/K rows permuted from HF rotate-half order to interleaved RoPE pairs
  (``conversion/llama.py`` ``LlamaModel.permute``), ``n_head_kv`` for ``k_proj``;
* per-tensor GGML types as ``ModelBase.prepare_tensors`` (``conversion/base.py``) picks them:
  1-D tensors, ``*_norm.weight`` and anything not ending in ``.weight`` (biases) are F32, the rest
  follow the requested type, and Q8_0 falls back to F16 when a row is not a multiple of 32; for
  the types ``llama-quantize`` makes, its choice (``formats.gguf.quant``: the k-quant mix too);
* Gemma's RMSNorm weights ``+1`` and generated tensors such as Llama 3.1's ``rope_freqs``
  (``formats.gguf.arch.ARCHITECTURES``);
* the ``general.*`` (``gguf.Metadata``) / ``{arch}.*`` keys of ``set_gguf_parameters`` (``arch/``);
* the tokenizer: SentencePiece, SentencePiece-style or byte-level BPE (``vocab.py``).

:class:`GgufModel` holds what every type of one export shares (plan, config, tokenizer, name) and
builds one :class:`~lorasave.formats.gguf.output.GgufOutput` writer per streamed type; the header,
metadata and tensor infos are written at the writer's ``begin``, then each tensor's data as the
pass merges it. :func:`write_gguf_file` writes one file to a path with no staging or manifest
(``verify`` uses it for the base GGUF a GGUF adapter is applied to). The command, its staging,
side files and manifest are ``formats.gguf.export``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from lorasave.errors import UnsupportedModelError
from lorasave.formats.gguf import mix as gguf_mix
from lorasave.formats.gguf import quant as gguf_quant
from lorasave.formats.gguf.arch import GgufArch, Hparams, gguf_arch_for
from lorasave.formats.gguf.experts import Piece, Source, gguf_sources
from lorasave.formats.gguf.naming import gguf_file_name, model_metadata
from lorasave.formats.gguf.output import GgufOutput
from lorasave.formats.gguf.quant import GgufType, tensor_nbytes
from lorasave.formats.gguf.vocab import add_tokenizer, embedding_rows
from lorasave.plan.merge_plan import MergePlan, OutputTensor, build_plan
from lorasave.sources.adapter import Adapter
from lorasave.sources.architecture import inspect_architecture
from lorasave.sources.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

#: ``model.layers.<N>.``: a decoder layer's tensor.
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
#: Qwen3.5's multi-token-prediction block (``mtp.fc.weight``, ``mtp.layers.0...``), beside the decoder layers.
MTP_PREFIX = ("mtp.", "model.mtp.")


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the GGUF file.

    Attributes:
        src: the planned (HF-named) output tensor (the first piece's when there are several).
        name: GGUF name (``blk.0.attn_q.weight``).
        qtype: GGML type written.
        nbytes: bytes of its data (without alignment padding).
        permute_heads: ``(n_head, n_head_kv)`` for a Q/K permute, or None.
        shift: added to every element after the merge (Gemma's RMSNorm ``+1``), or 0.
        rows: only the first ``rows`` rows are written (Gemma 3's ``token_embd`` cut to the
            tokenizer's size, ``gguf_vocab.embedding_rows``), or None for all of them.
        importance: float32 ``(n_mat, ne0)``: the ``--imatrix`` entry its blocks are encoded with
            (``ggml_quantize_chunk``'s ``imatrix``, one row per expert), or None.
        pieces: where the values come from when not simply ``src``: the experts of a stacked
            ``ffn_*_exps`` (one planned tensor each, in expert order), or a part of a fused one.
        full_shape: the written shape when ``pieces`` is set (``(n_expert, rows, ne0)``) or ``transform``
            changes it.
        transform: the whole-tensor value transform of each piece (``GgufArch.transforms``, its config
            bound): float32 values of the complete piece -> the values written, or None (each row block
            is encoded as it comes).
    """

    src: OutputTensor
    name: str
    qtype: gguf.GGMLQuantizationType
    nbytes: int
    permute_heads: tuple[int, int] | None
    shift: float = 0.0
    rows: int | None = None
    importance: np.ndarray | None = field(default=None, compare=False, repr=False)
    pieces: tuple[Piece, ...] = ()
    full_shape: tuple[int, ...] | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The written shape, rows first: ``src.shape`` with the first dimension cut to ``rows``."""
        if self.full_shape is not None:
            return self.full_shape
        shape = tuple(self.src.shape)
        return shape if self.rows is None else (self.rows, *shape[1:])

    @property
    def parts(self) -> tuple[Piece, ...]:
        """Its pieces, in writing order (``(Piece(src),)`` for a tensor of one planned tensor)."""
        return self.pieces or (Piece(self.src),)


@dataclass(frozen=True)
class ExtraTensor:
    """A tensor the architecture generates rather than the checkpoint holds (``rope_freqs.weight``).

    Attributes:
        name: GGUF name.
        data: float32 values, numpy shape (rows first).
        qtype: GGML type written.
        nbytes: bytes of its data.
    """

    name: str
    data: np.ndarray
    qtype: gguf.GGMLQuantizationType
    nbytes: int


def permute_qk(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp ``LlamaModel.permute`` (``conversion/llama.py``): rotate-half rows -> interleaved pairs.

    Args:
        w: ``(n_head * head_dim, in)`` weight or ``(n_head * head_dim,)`` bias (or their encoded rows).
        n_head: attention heads; replaced by ``n_head_kv`` when given and different (``k_proj``).

    Returns:
        Same shape; within each head, row ``j`` of the first half and row ``j`` of the second half
        become rows ``2j`` and ``2j + 1``.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def ggml_type(gguf_name: str, shape: tuple[int, ...], type: str) -> gguf.GGMLQuantizationType:
    """The GGML type of one tensor, as ``ModelBase.prepare_tensors`` (``conversion/base.py``) picks it.

    Args:
        gguf_name: the tensor's GGUF name.
        shape: its numpy/torch shape (rows first); ``shape[-1]`` is the ggml row length ``ne0``.
        type: requested output type, a streamed :class:`GgufType` value (``"q8_0"``...).

    Returns:
        For the converter's types (``GgufType.converter``): F32 for 1-D tensors, ``*_norm.weight`` and
        non-``.weight`` tensors (biases); otherwise the requested type, with Q8_0 falling back to
        F16 when ``ne0`` is not a multiple of 32 (the converter catches ``gguf.QuantError`` and does
        the same). For q4_0..q5_1, ``llama-quantize``'s choice for a model with ``output.weight``
        (:func:`gguf_tensors` applies the tied-embedding rule). See ``gguf_quant``.
    """
    t = GgufType.parse(type)
    if t.converter:
        return gguf_quant.converter_type(gguf_name, shape, t.default_qtype)
    if t.kquant:  # one tensor alone: no layer counters (the generated tensors are 1-D, never quantized)
        return gguf_mix.tensor_types([(gguf_name, shape)], t)[0].qtype
    want = gguf_quant.llama_cpp_type(gguf_name, shape, t, tied=False)
    return gguf_quant.K_SUBSTITUTE.get(want, want)


def gguf_tensors(
    plan: MergePlan,
    config: dict[str, Any],
    rules: GgufArch,
    type: str | GgufType,
    tok_dir: Path | None = None,
    notes: list[str] | None = None,
    options: gguf_quant.QuantOptions | None = None,
) -> tuple[list[GgufTensor], list[str]]:
    """Name, type, size and transform of every GGUF tensor from the checkpoint, in plan order.

    A mixture of experts' per-expert tensors become one stacked ``ffn_*_exps`` tensor each (its
    ``pieces``, in expert order) and fused ones are split as the architecture says
    (``formats.gguf.experts.gguf_sources``); the tensor takes the place of its first planned tensor.

    Tensors in ``rules.drop`` are left out (Gemma's ``lm_head.weight``, as the converter's
    ``filter_tensors``); ``*norm.weight`` get ``rules.norm_shift`` (``Gemma3Model.norm_shift``).
    With ``tok_dir`` (the tokenizer the file gets), ``token_embd.weight`` keeps the rows
    ``gguf_vocab.embedding_rows`` says the converter keeps (Gemma 3 cuts the rows past the
    tokenizer's size; ``GgufTensor.rows``), with a note appended to ``notes``. Every tensor gets
    the type llama.cpp would give it in a streamed file of ``type`` (``gguf_mix.tensor_types``,
    which needs the whole list: whether ``output.weight`` exists decides the tied-embedding rule),
    with llama-quantize's ``options`` (``--pure``...) when given.

    Returns:
        The tensors, and notes on the F16 fallbacks and the K-type substitutions.

    Raises:
        UnsupportedModelError: a tensor has no GGUF name (``ValueError("Can not map tensor")`` in
            llama.cpp), e.g. a vision tower or an unknown extra module; incomplete experts.
        ImatrixRequiredError, ImatrixMismatchError: see ``gguf_mix.importances``.
    """
    hp = Hparams.of(config)
    names = gguf.get_tensor_name_map(rules.arch, hp.n_layer)
    n_head, n_kv = hp.heads
    n_expert = int(hp.find(("num_local_experts", "num_experts", "n_routed_experts"), 0) or 0)
    kept = []  # (text-model name, planned tensor)
    left_out = []  # not the language model's (a vision tower's)
    mtp = []  # multi-token-prediction layers (``GgufArch.mtp_layers``)
    for t in plan.tensors.values():
        text_name = rules.text_name(t.name)
        layer = LAYER.match(text_name or "")
        if rules.mtp_layers and ((layer is not None and int(layer[1]) >= hp.n_layer) or (text_name or "").startswith(MTP_PREFIX)):
            mtp.append(t)
        elif text_name is None:
            left_out.append(t)
        elif text_name not in rules.drop:
            kept.append((text_name, t))
    mapped = []  # (source, GGUF name, permute heads, shift, rows, transform)
    for s, fn in transformed(gguf_sources(kept, rules.fused, n_expert), rules, hp):
        t = s.src
        hf = s.hf if s.hf.endswith((".weight", ".bias")) or not s.pieces else s.hf + ".weight"
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModelError(f"cannot map tensor {t.name!r} to a GGUF {rules.name} tensor name")
        heads = None
        if rules.permute_qk and hf.endswith(("q_proj.weight", "q_proj.bias")):
            heads = (n_head, n_head)
        elif rules.permute_qk and hf.endswith(("k_proj.weight", "k_proj.bias")):
            heads = (n_head, n_kv)
        shift = rules.shift(hf)
        rows = None
        if tok_dir is not None and name == "token_embd.weight" and t.shape and not s.pieces:
            keep = embedding_rows(tok_dir, rules, int(t.shape[0]), notes if notes is not None else [])
            rows = keep if keep < t.shape[0] else None
        mapped.append((s, name, heads, shift, rows, fn))
    if mtp and notes is not None:
        notes.append(f"{len(mtp)} multi-token-prediction (nextn) layer tensors left out, as llama.cpp's converter does with --no-mtp")
    if left_out and notes is not None:
        notes.extend(multimodal_notes(left_out, [p.src for s, *_ in mapped for p in (s.pieces or [Piece(s.src)]) if p is not None], rules))
    shapes = [(name, s.shape or (tuple(s.src.shape) if rows is None else (rows, *s.src.shape[1:]))) for s, name, _, _, rows, _ in mapped]
    gtype = GgufType.parse(type)
    facts = gguf_mix.ModelFacts(rules.name, hp.n_layer, n_head, n_kv, n_expert)
    types = gguf_mix.tensor_types(shapes, gtype, facts, options)
    weights = gguf_mix.importances(shapes, types, gtype, options) if gguf_mix.uses_ggml(gtype, options) else [None] * len(types)
    out = [
        GgufTensor(s.src, name, tt.qtype, tensor_nbytes(shape, tt.qtype), heads, shift, rows, w, tuple(p for p in s.pieces if p is not None), s.shape, fn)
        for (s, name, heads, shift, rows, fn), (_, shape), tt, w in zip(mapped, shapes, types, weights, strict=True)
    ]
    return out, gguf_mix.type_notes(shapes, types, gtype)


def transformed(sources: list[Source], rules: GgufArch, hp: Hparams) -> list[tuple[Source, Callable[[torch.Tensor], torch.Tensor] | None]]:
    """``sources`` with each one a ``rules.transforms`` entry matches replaced by its GGUF tensors, in its place.

    Each gets the transform's HF name (``prefix + name`` for the matched ``suffix``), the shape of its
    function run on a meta tensor of the piece's shape, and the function with ``hp`` bound.
    """
    out: list[tuple[Source, Callable[[torch.Tensor], torch.Tensor] | None]] = []
    for s in sources:
        rule = next((r for r in rules.transforms if r.matches(s.hf)), None)
        if rule is None:
            out.append((s, None))
            continue
        pieces = [p for p in s.pieces if p is not None] or [Piece(s.src)]
        piece_shape = tuple(pieces[0].take.shape(tuple(pieces[0].src.shape)) if pieces[0].take else pieces[0].src.shape)
        stack = (len(pieces),) if len(pieces) > 1 else ()  # a stacked tensor: the transform of each expert
        prefix = s.hf[: len(s.hf) - len(rule.suffix)]
        for name, fn in rule.into:
            bound = functools.partial(fn, hp)
            shape = (*stack, *bound(torch.empty(piece_shape, device="meta")).shape)
            out.append((Source(prefix + name, s.src, list(s.pieces), shape), bound))
    return out


def multimodal_notes(left_out: list[OutputTensor], kept: list[OutputTensor], rules: GgufArch) -> list[str]:
    """What the user should know when a multimodal checkpoint's GGUF holds its language model only.

    Args:
        left_out: the vision / audio / projector tensors (``rules.text_name`` None).
        kept: the language model's tensors written.

    Returns:
        One note on what is left out, and one more when an adapter changes left-out tensors (all of
        its changes when it changes none of the language model's).
    """
    out = [f"{rules.name} GGUF of the language model only: {len(left_out)} vision/audio/projector tensors left out, as llama.cpp's converter does"]
    changed = [t.name for t in left_out if t.changed]
    if changed and not any(t.changed for t in kept):
        out.append(f"the adapter changes only vision/audio/projector tensors ({len(changed)}), none of which this GGUF holds: it is the base's language model")
    elif changed:
        out.append(f"the adapter's changes to {len(changed)} vision/audio/projector tensors are not in this GGUF (it holds the language model)")
    return out


def extra_tensors(config: dict[str, Any], rules: GgufArch, type: str) -> list[ExtraTensor]:
    """The architecture's generated tensors (``generate_extra_tensors`` in the converter), typed as the rest."""
    out = []
    for name, data in rules.extra_tensors(Hparams.of(config)):
        qtype = ggml_type(name, data.shape, type)
        out.append(ExtraTensor(name, data, qtype, tensor_nbytes(data.shape, qtype)))
    return out


def add_model_params(writer: gguf.GGUFWriter, config: dict[str, Any], rules: GgufArch, meta: gguf.Metadata, type: str) -> None:
    """``general.*`` and ``{arch}.*`` keys (``ModelBase.prepare_metadata`` + ``set_gguf_parameters``).

    Args:
        meta: the model's names and card facts (``naming.model_metadata``: ``general.name``,
            ``basename``, ``finetune``, ``size_label``...).
    """
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    for key, value, vtype in rules.params(Hparams.of(config)):
        writer.add_key_value(key.format(arch=rules.name), value, vtype)
    writer.add_file_type(GgufType.parse(type).file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def vocab_size(ckpt: Checkpoint, plan: MergePlan, tensors: list[GgufTensor]) -> int:
    """Rows of the token embedding (the config's ``vocab_size``, updated when an adapter resized it)."""
    for g in tensors:
        if g.name == "token_embd.weight":
            return int(g.shape[0])
    v = plan.config_updates.get("vocab_size", ckpt.config.get("vocab_size"))
    return int(v)  # type: ignore[arg-type]


@dataclass
class GgufModel:
    """What every GGUF type of one export shares, and the writer of each type.

    Attributes:
        ckpt: the base.
        adapters: the adapters merged (may be empty).
        plan: the float32 merge plan (one "shard", every tensor).
        config: the base's config with the adapters' updates (``vocab_size``...).
        rules: the architecture's GGUF rules.
        tok_dir: the tokenizer folder the files get.
        name: ``--name`` (``general.name`` and the file stem), or None: the converter's names (``naming``).
        notes: the plan's notes and the tokenizer's, appended to as writers are built.
        meta: the names (``naming.model_metadata``), set by the first :meth:`writer`.
    """

    ckpt: Checkpoint
    adapters: list[Adapter]
    plan: MergePlan
    config: dict[str, Any]
    rules: GgufArch
    tok_dir: Path
    name: str | None
    notes: list[str] = field(default_factory=list)
    meta: gguf.Metadata | None = None

    @classmethod
    def build(cls, ckpt: Checkpoint, ads: list[Adapter], tok_dir: Path, name: str | None = None) -> GgufModel:
        """Plan the merge of ``ads`` into ``ckpt`` for GGUF (float32 values, one block stream).

        Raises:
            UnsupportedModelError: a ``model_type`` the export does not handle (``arch.ARCHITECTURES``).
            LorasaveError subclasses from planning (AdapterMismatchError...).
        """
        rules = gguf_arch_for(ckpt.config)
        plan = build_plan(ckpt, ads, inspect_architecture(ckpt.config), out_dtype=torch.float32, max_shard_size=1 << 62)
        config = json.loads(json.dumps(ckpt.config))
        for key, value in plan.config_updates.items():
            if "." not in key:
                config[key] = value
        return cls(ckpt, ads, plan, config, rules, tok_dir, name, list(plan.notes))

    def metadata(self, tensors: list[GgufTensor], extras: list[ExtraTensor]) -> gguf.Metadata:
        """The file's names (the same for every type): ``naming.model_metadata`` of the base folder with the parameter count of ``tensors``."""
        if self.meta is None:
            w = gguf.GGUFWriter(None, self.rules.name)
            for e in extras:
                w.add_tensor_info(e.name, e.data.shape, np.dtype(np.float32), e.nbytes, raw_dtype=e.qtype)
            for g in tensors:
                w.add_tensor_info(g.name, g.shape, np.dtype(np.float32), g.nbytes, raw_dtype=g.qtype)
            self.meta = model_metadata(self.ckpt.root, hub_id=self.ckpt.hub_id, name=self.name, counts=w.get_total_parameter_count())
        return self.meta

    def file_name(self, stream: GgufType) -> str:
        """The file name of type ``stream`` (``naming.gguf_file_name``); call :meth:`writer` (or :meth:`metadata`) first."""
        assert self.meta is not None
        return gguf_file_name(self.meta, stream, chosen=self.name)

    def writer(
        self,
        stream: GgufType,
        filename: str | None = None,
        permute: Callable[[torch.Tensor, int, int | None], torch.Tensor] = permute_qk,
        options: gguf_quant.QuantOptions | None = None,
    ) -> tuple[GgufOutput, list[str]]:
        """The writer of ``filename`` (default :meth:`file_name`): this model with per-tensor types of streamed type ``stream``
        (and llama-quantize's ``options``: ``--pure``, ``--output-tensor-type``, ``--token-embedding-type``).

        Returns:
            ``(writer, type notes)``: the notes on F16 fallbacks and K-type substitutions.

        Raises:
            UnsupportedModelError: a tensor with no GGUF name (a vision tower, an unknown module).
        """
        tok_notes: list[str] = []
        tensors, type_notes = gguf_tensors(self.plan, self.config, self.rules, stream, tok_dir=self.tok_dir, notes=tok_notes, options=options)
        for n in tok_notes:
            if n not in self.notes:
                self.notes.append(n)
        extras = extra_tensors(self.config, self.rules, stream.value)
        exps = sorted({g.qtype.name for g in tensors if "_exps." in g.name and g.name.endswith(".weight")})
        if self.rules.expert_note and exps:
            type_notes = [*type_notes, self.rules.expert_note.format(types="/".join(exps))]
        meta = self.metadata(tensors, extras)
        filename = filename if filename is not None else self.file_name(stream)

        def start(path: Path) -> gguf.GGUFWriter:  # header, metadata, tensor infos
            w = gguf.GGUFWriter(None, self.rules.name)
            for e in extras:  # generated first, as the converter's prepare_tensors
                w.add_tensor_info(e.name, e.data.shape, np.dtype(np.float32), e.nbytes, raw_dtype=e.qtype)
            for g in tensors:  # infos first (kept apart from the KV data): the size label counts them
                w.add_tensor_info(g.name, g.shape, np.dtype(np.float32), g.nbytes, raw_dtype=g.qtype)
            add_model_params(w, self.config, self.rules, meta, stream.value)
            said: list[str] = []
            add_tokenizer(w, self.tok_dir, vocab_size(self.ckpt, self.plan, tensors), self.rules, self.config, said)
            self.notes.extend(n for n in said if n not in self.notes)  # every type's file says the same
            w.write_header_to_file(path)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            return w

        out = GgufOutput(filename, start, tensors, extras, permute, ggml=gguf_mix.uses_ggml(stream, options))
        return out, type_notes


def write_gguf_file(base: Path, folder: Path, type: GgufType) -> Path:
    """Write ``base`` (no adapter) as ``folder/<folder name>-<type>.gguf``; no staging, card or manifest.

    For helpers (``verify`` applies a GGUF adapter to the base's f32 GGUF). ``folder`` is created.

    Raises:
        LorasaveError subclasses from opening and planning; write errors.
    """
    from lorasave.pipeline.execute import PassJob, execute_pass, raise_first
    from lorasave.pipeline.output import tokenizer_source
    from lorasave.sources.checkpoint import open_checkpoint

    ckpt = open_checkpoint(base)
    model = GgufModel.build(ckpt, [], tokenizer_source(None, [], ckpt.root), folder.name)
    out, _ = model.writer(type, f"{folder.name}-{type.value}.gguf")
    folder.mkdir(parents=True, exist_ok=False)
    job = PassJob(model.plan, [], [(out, folder)])
    execute_pass([job])
    raise_first(job)
    return folder / out.filename
