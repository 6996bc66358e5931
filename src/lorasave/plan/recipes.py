"""What each output tensor is made of: a source for W0 and the operations applied to it, in order.

Pure data, decided by ``plan.py`` and carried out by ``merge_math.py``. Each operation cites the
PEFT code whose forward (or merge) it reproduces.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lorasave.util.dtypes import StDtype


@dataclass(frozen=True)
class _AdapterKey:
    """What names one tensor of an adapter: the adapter's index and the tensor's key in it (the first fields of its subclasses)."""

    adapter: int
    key: str


@dataclass(frozen=True)
class AdapterTensor(_AdapterKey):
    """A full tensor stored in an adapter (``modules_to_save``, ``base_layer`` weights) used as W0."""

    shape: tuple[int, ...]
    dtype: StDtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.bits // 8


class Axis(enum.Enum):
    """Which dimension of a weight an operation's per-channel values run along."""

    ROWS = "rows"  # one value per row (dim 0): Linear out features, conv out channels
    COLS = "cols"  # one value per column (dim 1): Conv1D (in, out) outputs, embedding dims


@dataclass(frozen=True)
class LoraDelta:
    """``+ weight * scaling * (B @ A)`` (``.T`` when ``transpose``).

    peft ``lora.Linear.get_delta_weight`` / ``Embedding.get_delta_weight`` / ``_ConvNd`` (conv
    factors flattened: ``(B.flatten(1) @ A.flatten(1)).view(W.shape)``). ``transpose`` is set for
    GPT-2 ``Conv1D`` weights stored ``(in, out)`` and for embeddings (A is ``(r, vocab)``).
    """

    adapter: int
    lora_A: str
    lora_B: str
    scaling: float
    transpose: bool
    weight: float = 1.0


class Lycoris(enum.Enum):
    """LyCORIS-family additive tuners."""

    LOHA = "loha"  # (w1a @ w1b) * (w2a @ w2b) * scale   (peft tuners/loha/layer.py HadaWeight)
    LOKR = "lokr"  # kron(w1, w2) * scale                 (peft tuners/lokr/layer.py make_kron)


@dataclass(frozen=True)
class LycorisDelta:
    """``+ weight * ΔW`` with ΔW built whole from LoHa / LoKr factors and reshaped to W's shape."""

    adapter: int
    kind: Lycoris
    keys: tuple[tuple[str, str], ...]  # (role, key) pairs
    scaling: float
    weight: float = 1.0


@dataclass(frozen=True)
class VectorDelta(_AdapterKey):
    """``+ weight * scaling * v`` for a 1-D tensor: ``lora_bias`` (peft ``lora.Linear``, lora_B's bias)."""

    scaling: float
    weight: float = 1.0


@dataclass(frozen=True)
class Scale(_AdapterKey):
    """``* l`` broadcast over the weight: IA3 (peft ``tuners/ia3/layer.py``: ``(out, 1)`` rows, ``(1, in)`` columns)."""

    axis: Axis


@dataclass(frozen=True)
class SetRows(_AdapterKey):
    """Rows ``indices`` replaced by the adapter's values: trainable tokens (peft ``TrainableTokensLayer``)."""

    indices: tuple[int, ...]


@dataclass(frozen=True)
class DoraNorm(_AdapterKey):
    """DoRA: ``W' = m / ||W + ΔW|| * (W + ΔW)``, the norm along ``axis`` (Liu et al. 2024, arXiv:2402.09353).

    peft ``tuners/lora/variants.py`` ``DoraLinearVariant.merge`` (norm of each output row),
    GPT-2 ``Conv1D`` and ``DoraEmbeddingVariant`` (norm of each column), ``_DoraConvNdVariant``
    (norm of each output channel). Applied after the LoRA delta of the same adapter.
    """

    axis: Axis


@dataclass(frozen=True)
class ExpertDelta:
    """``+ weight * ΔP`` mapped onto one checkpoint tensor, for LoRA on a fused 3-D runtime parameter.

    peft ``lora.ParamWrapper.get_delta_weight``: ``A`` is ``(E*r, in)``, ``B`` is ``(out, r*E)`` with
    experts the fastest index; ``ΔP = einsum("o r e, e r i -> e o i", B, A) * scaling`` for a
    parameter stored ``(E, out, in)`` (``"e i o"`` when stored ``(E, in, out)``). ``ΔP`` is then
    split into the checkpoint's per-expert tensors with transformers' reverse weight conversion for
    the architecture, and ``target`` names the piece this tensor receives.
    """

    adapter: int
    lora_A: str
    lora_B: str
    scaling: float
    param: str
    shape: tuple[int, ...]
    transposed: bool
    target: str
    weight: float = 1.0


Operation = LoraDelta | LycorisDelta | VectorDelta | Scale | SetRows | DoraNorm | ExpertDelta
