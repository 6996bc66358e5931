"""The decoder graph, written node by node from a :class:`~lorasave.formats.onnx.spec.DecoderSpec`.

Interface (optimum's layout, which onnxruntime-genai also runs with ``past_present_share_buffer``
false): inputs ``input_ids`` (batch, seq) int64, ``attention_mask`` (batch, past_seq + seq) int64
(1 = token, 0 = left padding), ``position_ids`` (batch, seq) int64, ``past_key_values.N.key/value``
(batch, num_kv_heads, past_seq, head_dim); outputs ``logits`` (batch, seq, vocab) and
``present.N.key/value`` (batch, num_kv_heads, past_seq + seq, head_dim).

The arithmetic is transformers' eager path in standard ONNX ops, so float32 matches it to rounding:
the hidden state is kept 2-D (batch * seq, hidden); a Linear is ``Gemm(x, W, b, transB=1)`` on the
checkpoint's (out, in) weight, so weights stream row block by row block with no transpose, or
``MatMulNBits`` (com.microsoft) on the quantized (out, in) blocks; RMSNorm is computed in float32;
RoPE is ``q * cos + rotate_half(q) * sin`` with cos/sin from float32 ``position_ids * inv_freq``;
grouped-query attention folds the query heads of one KV head into the sequence axis, so keys and
values are never repeated; the mask (causal on cache slots, left padding from ``attention_mask``,
the sliding window where a layer has one: key slot > query slot - window, as transformers'
``sliding_window_overlay``) adds the dtype's lowest value, and the softmax is float32.

LoRA inputs (``lora``: projection names such as ``q_proj``): each such Linear of every layer gets
``y + (x @ A) @ B`` with ``A = <module>.lora_A.weight`` (in, lora_r) and ``B = <module>.lora_B.weight``
(lora_r, out) as graph inputs, the names and layout of Olive's ``ExtractAdapters`` (``make_inputs``)
and ``convert-adapters``: PEFT's ``A.T`` and ``(scaling * B).T``, the scaling folded into B as
onnxruntime-genai's builder (``make_matmul_lora``) and Olive do, so adapters of any rank and alpha
share one graph. Each input has a default initializer with ``lora_r = 0`` (Olive's
``optional_inputs``), so the base runs alone; onnxruntime-genai feeds an inactive adapter's inputs
as such empty tensors too.
The op patterns follow onnxruntime-genai's model builder (``onnxruntime_genai/models/builders``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorasave.formats.onnx.spec import DecoderSpec, embed_scale

#: Default opset of the ONNX domain (Gelu with approximate="tanh" needs 20).
OPSET = 21
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class QuantSpec:
    """Weight-only ``MatMulNBits`` settings (onnxruntime's ``MatMulNBitsQuantizer`` QOperator format).

    Attributes:
        bits: 4 or 8.
        block_size: elements of K per scale (32 or 128...).
        symmetric: no zero points (``is_symmetric``).
        accuracy_level: the node attribute (onnxruntime-genai's CPU default 4: int8 compute).
    """

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int = 4


def input_names(n_layers: int) -> list[str]:
    """Graph input names in order: ``input_ids``, ``attention_mask``, ``position_ids``, then ``past_key_values.N.key/value``."""
    return ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value"))]


def output_names(n_layers: int) -> list[str]:
    """Graph output names in order: ``logits``, then ``present.N.key/value``."""
    return ["logits", *(f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value"))]


#: Suffixes of a Linear's two LoRA inputs after its module name (Olive's ``ExtractAdapters`` names).
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
#: The symbolic rank dimension of every LoRA input.
LORA_RANK_DIM = "lora_r"


def lora_input_names(module: str) -> tuple[str, str]:
    """``(<module>.lora_A.weight, <module>.lora_B.weight)``: the graph inputs of a Linear's LoRA branch."""
    return module + LORA_SUFFIXES[0], module + LORA_SUFFIXES[1]


def quantized_names(weight: str, q: QuantSpec) -> list[str]:
    """Initializer names of one quantized weight: packed, scales, and zero points unless symmetric."""
    names = [f"{weight}_Q{q.bits}", f"{weight}_scales"]
    return names if q.symmetric else [*names, f"{weight}_zero_points"]


#: The name the quantized lm_head's tensors derive from, even when it is tied to the embeddings.
LM_HEAD = "lm_head.weight"


class _Graph:
    """Nodes and small constants, named uniquely."""

    def __init__(self, dtype: int) -> None:
        from onnx import TensorProto

        self.T = TensorProto
        self.dtype = dtype
        self.nodes: list[Any] = []
        self.consts: list[Any] = []
        self._n = 0

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any) -> Any:
        from onnx import helper

        self._n += 1
        name = f"/{op_type}_{self._n}"
        outs = [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value: np.ndarray, hint: str = "c") -> str:
        from onnx import numpy_helper

        self._n += 1
        name = f"/const/{hint}_{self._n}"
        self.consts.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def i64(self, *values: int) -> str:
        return self.const(np.asarray(values, dtype=np.int64), "i64")

    def scalar(self, value: float, dtype: int | None = None) -> str:
        from onnx import helper

        np_dtype = helper.tensor_dtype_to_np_dtype(self.dtype if dtype is None else dtype)
        return self.const(np.asarray(value, dtype=np_dtype), "s")


class DecoderGraph:
    """Builds the nodes of one decoder; ``weights`` holds the initializer names the graph reads.

    Args:
        spec: the architecture.
        dtype: ``onnx.TensorProto.FLOAT`` or ``FLOAT16`` (activations, cache, logits).
        quant: MatMulNBits settings for every Linear (lm_head included), or None for Gemm.
        has: whether the checkpoint holds a tensor (biases).
        lora: projection names (``q_proj``...) whose Linears take LoRA inputs (module docstring).
    """

    def __init__(self, spec: DecoderSpec, dtype: int, quant: QuantSpec | None, has: Callable[[str], bool], lora: Collection[str] = ()) -> None:
        self.spec = spec
        self.g = _Graph(dtype)
        self.quant = quant
        self.has = has
        self.lora_targets = frozenset(lora)
        self.weights: list[str] = []  # checkpoint tensors read (float initializers)
        self.quantized: dict[str, list[str]] = {}  # weight -> its MatMulNBits initializers
        self.lora: dict[str, tuple[int, int]] = {}  # module with LoRA inputs -> (in, out)

    # ----------------------------------------------------------------------------------- pieces

    def _w(self, name: str) -> str:
        if name not in self.weights:
            self.weights.append(name)
        return name

    def _bias(self, name: str) -> str | None:
        return name if self.has(name) else None

    def linear(self, x: str, weight: str, out_features: int, in_features: int, bias: str | None = None) -> str:
        """``x`` (rows, in) -> (rows, out): Gemm on the (out, in) weight, or MatMulNBits."""
        g = self.g
        if self.quant is None:
            inputs = [x, self._w(weight)] + ([self._w(bias)] if bias else [])
            y = g.op("Gemm", inputs, transB=1)
        else:
            q = self.quant
            names = quantized_names(weight, q)
            self.quantized[weight] = names
            attrs = {"K": in_features, "N": out_features, "bits": q.bits, "block_size": q.block_size}
            if q.accuracy_level:
                attrs["accuracy_level"] = q.accuracy_level
            y = g.op("MatMulNBits", [x, *names], domain=MS_DOMAIN, **attrs)
            y = g.op("Add", [y, self._w(bias)]) if bias else y
        module = weight.removesuffix(".weight")
        if weight == LM_HEAD or module.rsplit(".", 1)[-1] not in self.lora_targets:
            return y
        # PEFT: result + lora_B(lora_A(x)) * scaling; here (x @ A) @ B with B = (scaling * B_peft).T
        self.lora[module] = (in_features, out_features)
        a, b = lora_input_names(module)
        return g.op("Add", [y, g.op("MatMul", [g.op("MatMul", [x, a]), b])])

    def rms_norm(self, x: str, weight: str, *, plus_one: bool = False) -> str:
        """RMSNorm over the last axis in float32: ``w * (x * rsqrt(mean(x²) + eps))`` (Gemma: ``(1 + w)``), cast back."""
        g, T = self.g, self.g.T
        xf = g.op("Cast", [x], to=T.FLOAT) if g.dtype != T.FLOAT else x
        var = g.op("ReduceMean", [g.op("Mul", [xf, xf]), g.i64(-1)], keepdims=1)
        inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.scalar(self.spec.eps, T.FLOAT)])])])
        normed = g.op("Mul", [xf, inv])
        if plus_one:  # Gemma3RMSNorm: output * (1.0 + weight.float()), then cast
            w = g.op("Add", [g.op("Cast", [self._w(weight)], to=T.FLOAT), g.scalar(1.0, T.FLOAT)])
            out = g.op("Mul", [normed, w])
            return g.op("Cast", [out], to=g.dtype) if g.dtype != T.FLOAT else out
        # LlamaRMSNorm: weight * hidden_states.to(input_dtype)
        normed = g.op("Cast", [normed], to=g.dtype) if g.dtype != T.FLOAT else normed
        return g.op("Mul", [self._w(weight), normed])

    def norm(self, x: str, weight: str) -> str:
        return self.rms_norm(x, weight, plus_one=self.spec.family == "gemma3")

    def rope_tables(self, position_ids: str) -> dict[str, tuple[str, str]]:
        """Per layer type: cos, sin (batch, 1, seq, head_dim) in the graph dtype."""
        g, T = self.g, self.g.T
        pos = g.op("Unsqueeze", [g.op("Cast", [position_ids], to=T.FLOAT), g.i64(-1)])  # (B, S, 1)
        tables = {}
        for kind, (inv_freq, scaling) in self.spec.rope.items():
            freqs = g.op("Mul", [pos, g.const(inv_freq.astype(np.float32).reshape(1, 1, -1), "inv_freq")])
            emb = g.op("Concat", [freqs, freqs], axis=-1)
            pair = []
            for fn in ("Cos", "Sin"):
                t = g.op(fn, [emb])
                if scaling != 1.0:
                    t = g.op("Mul", [t, g.scalar(scaling, T.FLOAT)])
                if g.dtype != T.FLOAT:
                    t = g.op("Cast", [t], to=g.dtype)
                pair.append(g.op("Unsqueeze", [t, g.i64(1)]))
            tables[kind] = (pair[0], pair[1])
        return tables

    def apply_rope(self, x: str, cos: str, sin: str) -> str:
        """``x * cos + rotate_half(x) * sin`` on (B, H, S, D)."""
        g = self.g
        half = self.spec.head_dim // 2
        x1, x2 = g.op("Split", [x, g.i64(half, half)], n_out=2, axis=-1)
        rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    def masks(self, input_ids: str, attention_mask: str) -> dict[int | None, str]:
        """Additive masks (B, 1, S, T) in float32, one per distinct window (None: full causal)."""
        g, T = self.g, self.g.T
        s_len = g.op("Gather", [g.op("Shape", [input_ids]), g.i64(1)], axis=0)  # (1,)
        t_len = g.op("Gather", [g.op("Shape", [attention_mask]), g.i64(1)], axis=0)
        zero, one = g.const(np.asarray(0, np.int64)), g.const(np.asarray(1, np.int64))
        t_scalar, s_scalar = g.op("Squeeze", [t_len]), g.op("Squeeze", [s_len])
        kv = g.op("Range", [zero, t_scalar, one])  # (T,) key slots
        q = g.op("Range", [g.op("Sub", [t_scalar, s_scalar]), t_scalar, one])  # (S,) query slots
        q_col = g.op("Unsqueeze", [q, g.i64(1)])  # (S, 1)
        causal = g.op("LessOrEqual", [kv, q_col])  # (S, T)
        pad = g.op("Cast", [g.op("Unsqueeze", [attention_mask, g.i64(1, 2)])], to=T.BOOL)  # (B, 1, 1, T)
        lowest = g.const(np.asarray(np.finfo(np.float32 if g.dtype == T.FLOAT else np.float16).min, np.float32), "lowest")
        zero_f = g.scalar(0.0, T.FLOAT)
        out: dict[int | None, str] = {}
        for window in sorted({layer.window for layer in self.spec.layers}, key=lambda w: -1 if w is None else w):
            allowed = causal
            if window is not None:
                allowed = g.op("And", [allowed, g.op("Greater", [kv, g.op("Sub", [q_col, g.const(np.asarray(window, np.int64))])])])
            allowed = g.op("And", [g.op("Unsqueeze", [allowed, g.i64(0, 1)]), pad])
            out[window] = g.op("Where", [allowed, zero_f, lowest])
        return out

    def attention(self, i: int, x: str, mask: str, cos: str, sin: str, shapes: dict[str, str], past: tuple[str, str]) -> tuple[str, str, str]:
        """Layer ``i``'s self-attention on normed ``x`` (B*S, hidden); returns (output (B*S, hidden), present key, present value)."""
        s, g, T = self.spec, self.g, self.g.T
        p = f"{s.prefix}layers.{i}.self_attn."
        nq, nkv, d = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.head_dim
        if s.family == "phi3":
            qkv = self.linear(x, p + "qkv_proj.weight", nq + 2 * nkv, s.hidden)
            q, k, v = g.op("Split", [qkv, g.i64(nq, nkv, nkv)], n_out=3, axis=-1)
        else:
            q = self.linear(x, p + "q_proj.weight", nq, s.hidden, self._bias(p + "q_proj.bias"))
            k = self.linear(x, p + "k_proj.weight", nkv, s.hidden, self._bias(p + "k_proj.bias"))
            v = self.linear(x, p + "v_proj.weight", nkv, s.hidden, self._bias(p + "v_proj.bias"))
        q = g.op("Reshape", [q, shapes["q"]])  # (B, S, H, D)
        k = g.op("Reshape", [k, shapes["kv"]])
        v = g.op("Reshape", [v, shapes["kv"]])
        if s.qk_norm:
            q = self.norm(q, p + "q_norm.weight")
            k = self.norm(k, p + "k_norm.weight")
        q = self.apply_rope(g.op("Transpose", [q], perm=[0, 2, 1, 3]), cos, sin)  # (B, H, S, D)
        k = self.apply_rope(g.op("Transpose", [k], perm=[0, 2, 1, 3]), cos, sin)
        v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
        present_k = g.op("Concat", [past[0], k], axis=2)  # (B, KV, T, D)
        present_v = g.op("Concat", [past[1], v], axis=2)
        grouped = g.op("Reshape", [q, g.i64(0, s.n_kv_heads, -1, d)])  # (B, KV, rep*S, D): heads of one KV head
        scores = g.op("MatMul", [grouped, g.op("Transpose", [present_k], perm=[0, 1, 3, 2])])
        scores = g.op("Mul", [scores, g.scalar(s.scale)])  # matmul(q, k^T) * scaling, as eager attention
        scores = g.op("Reshape", [scores, g.i64(0, s.n_heads, -1, 0)])  # (B, H, S, T)
        if g.dtype != T.FLOAT:
            scores = g.op("Cast", [scores], to=T.FLOAT)
        probs = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1)
        if g.dtype != T.FLOAT:
            probs = g.op("Cast", [probs], to=g.dtype)
        probs = g.op("Reshape", [probs, g.i64(0, s.n_kv_heads, -1, 0)])
        ctx = g.op("Reshape", [g.op("MatMul", [probs, present_v]), g.i64(0, s.n_heads, -1, d)])  # (B, H, S, D)
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), g.i64(-1, nq)])
        out = self.linear(ctx, p + "o_proj.weight", s.hidden, nq, self._bias(p + "o_proj.bias"))
        return out, present_k, present_v

    def mlp(self, i: int, x: str) -> str:
        s, g = self.spec, self.g
        p = f"{s.prefix}layers.{i}.mlp."
        if s.family == "phi3":
            gate_up = self.linear(x, p + "gate_up_proj.weight", 2 * s.intermediate, s.hidden)
            gate, up = g.op("Split", [gate_up, g.i64(s.intermediate, s.intermediate)], n_out=2, axis=-1)
        else:
            gate = self.linear(x, p + "gate_proj.weight", s.intermediate, s.hidden)
            up = self.linear(x, p + "up_proj.weight", s.intermediate, s.hidden)
        if s.family == "gemma3":
            act = g.op("Gelu", [gate], approximate="tanh")  # gelu_pytorch_tanh
        else:
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])  # SiLU
        return self.linear(g.op("Mul", [act, up]), p + "down_proj.weight", s.hidden, s.intermediate)

    # ------------------------------------------------------------------------------------ model

    def build(self) -> Any:
        """The ``onnx.GraphProto`` without weight initializers (the writer adds them, as external data)."""
        from onnx import helper, numpy_helper

        s, g, T = self.spec, self.g, self.g.T
        ids, mask_in, pos_in = "input_ids", "attention_mask", "position_ids"
        bs = g.op("Shape", [ids])  # (2,) = B, S
        shapes = {"q": g.op("Concat", [bs, g.i64(s.n_heads, s.head_dim)], axis=0), "kv": g.op("Concat", [bs, g.i64(s.n_kv_heads, s.head_dim)], axis=0)}
        h = g.op("Gather", [self._w(f"{s.prefix}embed_tokens.weight"), ids], axis=0)  # (B, S, hidden)
        scale = embed_scale(s)
        if scale is not None:
            h = g.op("Mul", [h, g.scalar(np.float32(scale))])  # embed_scale.to(weight dtype)
        h = g.op("Reshape", [h, g.i64(-1, s.hidden)])
        masks = self.masks(ids, mask_in)
        ropes = self.rope_tables(pos_in)
        presents = []
        for i, layer in enumerate(s.layers):
            p = f"{s.prefix}layers.{i}."
            past = (f"past_key_values.{i}.key", f"past_key_values.{i}.value")
            cos, sin = ropes[layer.rope]
            attn, pk, pv = self.attention(i, self.norm(h, p + "input_layernorm.weight"), masks[layer.window], cos, sin, shapes, past)
            presents += [pk, pv]
            if s.family == "gemma3":
                h = g.op("Add", [h, self.norm(attn, p + "post_attention_layernorm.weight")])
                mlp = self.mlp(i, self.norm(h, p + "pre_feedforward_layernorm.weight"))
                h = g.op("Add", [h, self.norm(mlp, p + "post_feedforward_layernorm.weight")])
            else:
                h = g.op("Add", [h, attn])
                h = g.op("Add", [h, self.mlp(i, self.norm(h, p + "post_attention_layernorm.weight"))])
        h = self.norm(h, f"{s.prefix}norm.weight")
        if self.quant is None:
            head = self._w(f"{s.prefix}embed_tokens.weight" if s.tied else "lm_head.weight")
            logits = g.op("Gemm", [h, head], transB=1)
        else:
            logits = self.linear(h, LM_HEAD, s.vocab, s.hidden)
        if s.final_softcap:
            cap = g.scalar(s.final_softcap)
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap])]), cap])
        logits = g.op("Reshape", [logits, g.op("Concat", [bs, g.i64(s.vocab)], axis=0)])
        # name the outputs
        out_names = output_names(s.n_layers)
        for src, dst in zip([logits, *presents], out_names, strict=True):
            g.nodes.append(helper.make_node("Identity", [src], [dst], name=f"/output/{dst}"))
        dyn_b, dyn_s, dyn_t, dyn_p = "batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"
        inputs = [
            helper.make_tensor_value_info(ids, T.INT64, [dyn_b, dyn_s]),
            helper.make_tensor_value_info(mask_in, T.INT64, [dyn_b, dyn_t]),
            helper.make_tensor_value_info(pos_in, T.INT64, [dyn_b, dyn_s]),
        ]
        outputs = [helper.make_tensor_value_info("logits", g.dtype, [dyn_b, dyn_s, s.vocab])]
        for i in range(s.n_layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", g.dtype, [dyn_b, s.n_kv_heads, dyn_p, s.head_dim]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", g.dtype, [dyn_b, s.n_kv_heads, dyn_t, s.head_dim]))
        defaults = []
        for module, (n_in, n_out) in self.lora.items():  # optional inputs: lora_r = 0 unless fed
            for name, dims, empty in zip(lora_input_names(module), ([n_in, LORA_RANK_DIM], [LORA_RANK_DIM, n_out]), ((n_in, 0), (0, n_out)), strict=True):
                inputs.append(helper.make_tensor_value_info(name, g.dtype, dims))
                defaults.append(numpy_helper.from_array(np.zeros(empty, helper.tensor_dtype_to_np_dtype(g.dtype)), name))
        return helper.make_graph(g.nodes, "lorasave_decoder", inputs, outputs, initializer=[*g.consts, *defaults])
