"""Every type of llama-quantize's table, with and without an importance matrix, byte for byte.

Each file ``lorasave gguf`` streams is compared tensor by tensor (GGML type and bytes) with what
llama.cpp's own ``llama_model_quantize`` writes from an f32 GGUF of the same merge, given the same
importance matrix through ``llama_model_quantize_params.imatrix`` (the values ``llama-quantize``
computes from the file: ``in_sum2 / counts``, computed here in numpy from the arrays written, not
by lorasave's reader). The importance matrix files are written here with gguf-py in llama-imatrix's
layout, independently of ``lorasave.formats.gguf.imatrix``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from lorasave.cli.main import main
from lorasave.errors import ImatrixMismatchError, ImatrixRequiredError, InvalidOptionError, LlamaCppError
from lorasave.formats.gguf import mix as gguf_mix
from lorasave.formats.gguf.export import export_gguf
from lorasave.formats.gguf.quant import ALIASES, GgufType
from lorasave.runtimes.llama_cpp import lib as llama_cpp

sys.path.insert(0, str(Path(__file__).parent))
from _llama import need_llama_cpp
from test_gguf_types import IMATRIX_TYPES, IQUANTS, KQUANTS, OTHER_TYPES, _file_type, _make, _make_kquant, _tensors

Q = gguf.GGMLQuantizationType
#: Every llama-quantize type lorasave writes (q8_0 is the converter's; f16/bf16/f32 are not quantized).
LLAMA_QUANTIZE = ["q4_0", "q4_1", "q5_0", "q5_1", *KQUANTS, *IQUANTS, *IMATRIX_TYPES, *OTHER_TYPES]


@pytest.fixture(scope="module", params=["untied", "tied"])
def tiny256(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """test_gguf_types's models with rows of 256: ``untied`` (8 layers, GQA 2), ``tied`` (4 layers, GQA 4)."""
    need_llama_cpp()
    return _make_kquant(tmp_path_factory.mktemp(f"im-{request.param}"), request.param)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """test_gguf_types's small-row Llama (ffn_down rows of 272: the fallbacks)."""
    need_llama_cpp()
    m = _make(tmp_path_factory.mktemp("im-small"), "llama")
    m["f32"] = export_gguf(m["base"], m["lora"], m["root"] / "out-f32", type="f32", modelfile=False)
    m["llama"] = {}
    return m


def _stem(m: dict[str, Any]) -> str:
    """The converter-style name every file of the model gets before its type (``Base-1.2M`` of ``Base-1.2M-F32.gguf``)."""
    return str(m["f32"].gguf_file.name.removesuffix("-F32.gguf"))


def _write_imatrix(path: Path, sums: dict[str, np.ndarray], counts: dict[str, float]) -> dict[str, np.ndarray]:
    """An importance matrix in llama-imatrix's GGUF layout (``<name>.in_sum2`` F32 ``[ne0, n_mat]``,
    ``<name>.counts`` F32 ``[1, n_mat]``, ``imatrix.*`` keys); returns what llama-quantize hands
    ``llama_model_quantize`` for it (``load_imatrix``: ``in_sum2 / count``, float32)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["test.txt"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 64)
    for name, s in sums.items():
        w.add_tensor(f"{name}.in_sum2", s.reshape(1, -1).astype(np.float32))
        w.add_tensor(f"{name}.counts", np.array([[counts[name]]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {name: (s.astype(np.float32) / np.float32(counts[name])).astype(np.float32) for name, s in sums.items()}


def _imatrix(m: dict[str, Any], seed: int = 0, drop: tuple[str, ...] = (), ncols: dict[str, int] | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """An importance matrix for every matrix of ``m``'s f32 GGUF but token_embd (llama-imatrix sees no
    matmul for it), random positive sums over 192 token rows; cached per (seed, drop, ncols)."""
    key = ("imatrix", seed, drop, tuple(sorted((ncols or {}).items())))
    if key not in m["llama"]:
        rng = np.random.default_rng(seed)
        sums, counts = {}, {}
        for t in gguf.GGUFReader(m["f32"].gguf_file).tensors:
            if len(t.shape) >= 2 and t.name != "token_embd.weight" and t.name not in drop:
                n = (ncols or {}).get(t.name, int(t.shape[0]))
                sums[t.name] = (rng.random(n) * rng.integers(1, 50) * 192).astype(np.float32)
                counts[t.name] = 192.0
        path = m["root"] / f"imatrix-{len(m['llama'])}.gguf"
        m["llama"][key] = (path, _write_imatrix(path, sums, counts))
    return m["llama"][key]


def _reference(m: dict[str, Any], type: str, imatrix: dict[str, np.ndarray] | None) -> Path:
    key = ("ref", type, imatrix is not None and id(imatrix))
    if key not in m["llama"]:
        dst = m["root"] / f"ref-{type}-{len(m['llama'])}.gguf"
        llama_cpp.quantize(m["f32"].gguf_file, dst, type, imatrix=imatrix)
        m["llama"][key] = dst
    return m["llama"][key]


def _same(ours: Path, theirs: Path, what: Any) -> dict[str, int]:
    a, b = _tensors(ours), _tensors(theirs)
    assert set(a) == set(b)
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, (what, name, t.tensor_type.name, b[name].tensor_type.name)
        assert np.asarray(t.data).tobytes() == np.asarray(b[name].data).tobytes(), (what, name, t.tensor_type.name)
    assert _file_type(ours) == _file_type(theirs)
    counts: dict[str, int] = {}
    for t in a.values():
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


@pytest.mark.parametrize("type", LLAMA_QUANTIZE)
def test_every_type_with_imatrix_bit_identical(tiny256: dict[str, Any], type: str) -> None:
    """Rows of 256 (every block type used, not only fallbacks), tied and untied: with an importance
    matrix every tensor's type (the has_imatrix rules: iq3_xxs's attn_v, iq4_*'s and q4_0/q5_0's
    ffn_down...) and every byte as llama_model_quantize writes them with the same matrix."""
    path, values = _imatrix(tiny256)
    res = export_gguf(tiny256["base"], tiny256["lora"], tiny256["root"] / f"im-{type}", type=type, modelfile=False, imatrix=path)
    counts = _same(res.gguf_file, _reference(tiny256, type, values), type)
    assert GgufType(type).default_qtype.name in counts or type == "mxfp4_moe", counts  # dense: no expert tensor, all Q8_0
    manifest = json.loads((res.output / "lorasave.json").read_text())
    imx = f"{_stem(tiny256)}.imatrix"  # beside the GGUF file, named like it (without the type)
    assert manifest["sources"]["imatrix"]["file"] == imx and (res.output / imx).read_bytes() == path.read_bytes()
    assert manifest["settings"]["imatrix_sha256"] == manifest["sources"]["imatrix"]["sha256"]


def test_imatrix_changes_the_bytes(tiny256: dict[str, Any]) -> None:
    """Control: the importance is used (two matrices give two encodings; q4_0 with one is not q4_0 without)."""
    (p0, _), (p1, _) = _imatrix(tiny256, 0), _imatrix(tiny256, 1)
    a = export_gguf(tiny256["base"], tiny256["lora"], tiny256["root"] / "ctl-a", type="iq3_s", modelfile=False, imatrix=p0)
    b = export_gguf(tiny256["base"], tiny256["lora"], tiny256["root"] / "ctl-b", type="iq3_s", modelfile=False, imatrix=p1)
    c = export_gguf(tiny256["base"], tiny256["lora"], tiny256["root"] / "ctl-c", type="q4_0", modelfile=False, imatrix=p0)
    d = export_gguf(tiny256["base"], tiny256["lora"], tiny256["root"] / "ctl-d", type="q4_0", modelfile=False)
    name = "blk.1.attn_q.weight"
    assert np.asarray(_tensors(a.gguf_file)[name].data).tobytes() != np.asarray(_tensors(b.gguf_file)[name].data).tobytes()
    assert np.asarray(_tensors(c.gguf_file)[name].data).tobytes() != np.asarray(_tensors(d.gguf_file)[name].data).tobytes()


@pytest.mark.parametrize("type", OTHER_TYPES)
def test_other_types_without_imatrix_bit_identical(tiny256: dict[str, Any], type: str) -> None:
    """tq1_0, tq2_0, mxfp4_moe (a dense model: every matrix Q8_0), q1_0: no importance matrix needed."""
    res = export_gguf(tiny256["base"], tiny256["lora"], tiny256["root"] / f"o-{type}", type=type, modelfile=False)
    _same(res.gguf_file, _reference(tiny256, type, None), type)


@pytest.mark.parametrize("type", ["iq2_xxs", "iq1_s", "iq3_xs", "q2_k_s", "tq1_0"])
def test_fallbacks_with_imatrix_bit_identical(tiny: dict[str, Any], type: str) -> None:
    """Rows of 272 (ffn_down): tensor_type_fallback of the low-bit types (IQ* -> IQ4_NL -> F16, TQ* -> Q4_0 -> F16)."""
    path, values = _imatrix(tiny)
    res = export_gguf(tiny["base"], tiny["lora"], tiny["root"] / f"imf-{type}", type=type, modelfile=False, imatrix=path)
    _same(res.gguf_file, _reference(tiny, type, values), type)
    assert _tensors(res.gguf_file)["blk.0.ffn_down.weight"].tensor_type == Q.F16


def test_q1_0_without_a_fallback_is_refused_as_llama_cpp_does(tiny: dict[str, Any], tmp_path: Path) -> None:
    """Q1_0's block is 128 and llama.cpp defines no fallback for it: rows of 272 stop both, before any work."""
    with pytest.raises(InvalidOptionError, match=r"rows of 272 values, not a multiple of the Q1_0 block \(128\).*no fallback"):
        export_gguf(tiny["base"], tiny["lora"], tmp_path / "q1", type="q1_0", modelfile=False)
    assert not (tmp_path / "q1").exists()
    with pytest.raises(LlamaCppError):
        llama_cpp.quantize(tiny["f32"].gguf_file, tmp_path / "ref.gguf", "q1_0")


@pytest.mark.parametrize("type", IMATRIX_TYPES)
def test_types_that_need_an_imatrix_refuse_without_one(tiny256: dict[str, Any], type: str, tmp_path: Path) -> None:
    """The types llama-quantize refuses without an importance matrix are refused before any work, naming --imatrix."""
    with pytest.raises(ImatrixRequiredError, match=rf"^{type} needs an importance matrix .*--imatrix FILE"):
        export_gguf(tiny256["base"], tiny256["lora"], tmp_path / "x", type=type, modelfile=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())
    with pytest.raises(LlamaCppError):  # the reference agrees
        llama_cpp.quantize(tiny256["f32"].gguf_file, tmp_path / "ref.gguf", type)


def test_needs_imatrix_is_the_per_tensor_rule() -> None:
    """GgufType.needs_imatrix (the README's table) is what tensor_requires_imatrix says of some tensor
    of the type's mix on a dense model with rows of 256, for every type."""
    shapes = [("token_embd.weight", (512, 256)), ("output.weight", (512, 256))]
    for i in range(8):
        shapes += [(f"blk.{i}.{n}.weight", (256, 256)) for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")]
        shapes += [(f"blk.{i}.ffn_down.weight", (256, 512)), (f"blk.{i}.attn_norm.weight", (256,))]
    facts = gguf_mix.ModelFacts("llama", 8, 4, 2)
    for t in GgufType:
        if t.converter:
            continue
        types = gguf_mix.kquant_types(shapes, t, facts)
        assert any(gguf_mix.imatrix_required(n, q, t) for (n, _), q in zip(shapes, types, strict=True)) == t.needs_imatrix, t


def test_entries_checked_as_llama_cpp_does(tiny256: dict[str, Any], tmp_path: Path) -> None:
    """A missing entry: refused where the tensor needs one, encoded without it elsewhere (as llama.cpp);
    an entry of the wrong size: refused (another model's matrix)."""
    path, values = _imatrix(tiny256, drop=("blk.0.attn_k.weight",))
    with pytest.raises(ImatrixRequiredError, match=r"no entry for blk\.0\.attn_k\.weight, which iq2_xxs writes as IQ2_XXS"):
        export_gguf(tiny256["base"], tiny256["lora"], tmp_path / "a", type="iq2_xxs", modelfile=False, imatrix=path)
    with pytest.raises(LlamaCppError):
        llama_cpp.quantize(tiny256["f32"].gguf_file, tmp_path / "ref-a.gguf", "iq2_xxs", imatrix=values)
    res = export_gguf(tiny256["base"], tiny256["lora"], tmp_path / "b", type="q4_k_m", modelfile=False, imatrix=path)
    llama_cpp.quantize(tiny256["f32"].gguf_file, tmp_path / "ref-b.gguf", "q4_k_m", imatrix=values)
    _same(res.gguf_file, tmp_path / "ref-b.gguf", "q4_k_m partial imatrix")
    bad, _ = _imatrix(tiny256, ncols={"blk.1.ffn_down.weight": 256})
    with pytest.raises(ImatrixMismatchError, match=r"256 values for blk\.1\.ffn_down\.weight, whose rows have 512 values"):
        export_gguf(tiny256["base"], tiny256["lora"], tmp_path / "c", type="q4_k_m", modelfile=False, imatrix=bad)
    assert not any((tmp_path / n).exists() for n in "ac")


@pytest.mark.parametrize("tiny256", ["untied"], indirect=True)
def test_type_list_with_imatrix_in_one_pass(tiny256: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """--type q8_0,q6_k,q4_k_m,iq4_xs,iq2_xxs --imatrix F: one read and one merge, every file as llama.cpp
    writes it (q8_0, the converter's type, does not use the matrix), verify passes from OUT alone."""
    from lorasave.pipeline import run as pipeline_run

    passes = []
    real = pipeline_run.execute_pass
    monkeypatch.setattr(pipeline_run, "execute_pass", lambda *a, **k: passes.append(1) or real(*a, **k))
    path, values = _imatrix(tiny256)
    out = tiny256["root"] / "ladder"
    types = ["q8_0", "q6_k", "q4_k_m", "iq4_xs", "iq2_xxs"]
    r = CliRunner().invoke(main, ["gguf", str(tiny256["base"]), str(tiny256["lora"]), "-o", str(out), "--type", ",".join(types), "--imatrix", str(path)])
    assert r.exit_code == 0, r.output
    assert len(passes) == 1
    for t in types[1:]:
        _same(out / f"{_stem(tiny256)}-{t.upper()}.gguf", _reference(tiny256, t, values), t)
    q8 = export_gguf(tiny256["base"], tiny256["lora"], tiny256["root"] / "ladder-q8", type="q8_0", modelfile=False)
    ours_q8 = out / f"{_stem(tiny256)}-Q8_0.gguf"
    assert _tensors(ours_q8).keys() == _tensors(q8.gguf_file).keys()
    assert all(np.asarray(t.data).tobytes() == np.asarray(_tensors(q8.gguf_file)[n].data).tobytes() for n, t in _tensors(ours_q8).items())
    v = CliRunner().invoke(main, ["verify", str(out)])
    assert v.exit_code == 0 and "FAIL" not in v.output, v.output
    imx = out / f"{_stem(tiny256)}.imatrix"
    imx.chmod(0o644)
    data = bytearray(imx.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # a NaN in the last value: the file no longer matches its sha256
    imx.write_bytes(bytes(data))
    assert CliRunner().invoke(main, ["verify", str(out)]).exit_code != 0


def test_cli_refusals_and_aliases(tiny256: dict[str, Any], tmp_path: Path) -> None:
    """iq2_xxs without --imatrix: exit 2, one line naming the option, nothing written; --imatrix with only
    converter types refused; llama-quantize's aliases (q4_k = q4_k_m)."""
    args = ["gguf", str(tiny256["base"]), str(tiny256["lora"])]
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a"), "--type", "iq2_xxs"])
    assert r.exit_code == 2 and "--imatrix FILE" in r.output and len(r.output.strip().splitlines()) == 1 and not (tmp_path / "a").exists(), r.output
    path, _ = _imatrix(tiny256)
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b"), "--type", "q8_0,f16", "--imatrix", str(path)])
    assert r.exit_code == 2 and "--imatrix" in r.output and not (tmp_path / "b").exists(), r.output
    assert {k: v.value for k, v in ALIASES.items()} == {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "c"), "--type", "Q4_K", "--no-modelfile"])  # case-insensitive too
    assert r.exit_code == 0, r.output
    _same(tmp_path / "c" / f"{_stem(tiny256)}-Q4_K_M.gguf", _reference(tiny256, "q4_k_m", None), "q4_k alias")


@pytest.mark.parametrize("tiny256", ["tied"], indirect=True)
def test_batch_takes_imatrix_beside_the_jobs_file(tiny256: dict[str, Any], tmp_path: Path) -> None:
    """A JOBS file's imatrix option is a path resolved beside the file, like the others."""
    path, values = _imatrix(tiny256)
    (tmp_path / "m.imatrix").write_bytes(path.read_bytes())
    jobs = {
        "jobs": [
            {
                "base": str(tiny256["base"]),
                "adapters": [str(tiny256["lora"])],
                "outputs": [{"format": "gguf", "path": "out", "type": "iq2_xs,q3_k_m", "imatrix": "m.imatrix", "modelfile": False}],
            }
        ]
    }
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    r = CliRunner().invoke(main, ["batch", str(tmp_path / "jobs.json")])
    assert r.exit_code == 0, r.output
    for t in ("iq2_xs", "q3_k_m"):
        _same(tmp_path / "out" / f"{_stem(tiny256)}-{t.upper()}.gguf", _reference(tiny256, t, values), t)


@pytest.mark.parametrize("tiny256", ["untied"], indirect=True)
def test_lorasave_imatrix_output_feeds_gguf(tiny256: dict[str, Any], tmp_path: Path) -> None:
    """`lorasave imatrix` -> `lorasave gguf --imatrix OUT`: the folder is taken as it is, and iq2_xxs
    equals llama_model_quantize given the same file's importances (quantize.cpp's in_sum2 / counts)."""
    from lorasave.formats.gguf.imatrix import load_imatrix
    from test_gguf_types import TEXT

    text = tmp_path / "calibration.txt"
    text.write_text(TEXT * 6)
    args = [str(tiny256["base"]), str(tiny256["lora"])]
    r = CliRunner().invoke(main, ["imatrix", *args, "--text", str(text), "-o", str(tmp_path / "im"), "--chunk-size", "64"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["gguf", *args, "-o", str(tmp_path / "g"), "--type", "iq2_xxs", "--imatrix", str(tmp_path / "im"), "--no-modelfile"])
    assert r.exit_code == 0, r.output
    ref = tmp_path / "ref.gguf"
    llama_cpp.quantize(tiny256["f32"].gguf_file, ref, "iq2_xxs", imatrix=load_imatrix(tmp_path / "im").importances())
    _same(tmp_path / "g" / f"{_stem(tiny256)}-IQ2_XXS.gguf", ref, "lorasave imatrix")
