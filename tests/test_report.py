"""The quality report (``lorasave compare``, ``lorasave gguf --report``): figures recomputed here from
logits taken independently (llama.cpp through ``LlamaCppModel``, the PeftModel through transformers +
peft), a file against itself, the order of the quantizations, the card, the chart and ``verify``
afterwards, equal figures run to run, and one-line errors.

Model: a tiny Llama (hidden 64, so q8_0/q4_0 rows are whole blocks) with a byte-level BPE and a
LoRA trained a few steps; the text is short, so each run takes well under a second.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import _models as M
from lorasave.cli.main import main
from lorasave.formats.gguf.export import export_gguf
from lorasave.runtimes.llama_cpp import lib as llama_cpp
from lorasave.verify import quality, quality_report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _llama import need_llama_cpp

TEXT = "A lamp by the window, a cat on the chair, and rain on the roof all night long. " * 6
EVAL = "The rain stopped at dawn; the cat woke by the window and the lamp went out. " * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Base + trained LoRA, and one ``lorasave gguf`` output of f32, q8_0 and q4_0 (with a report)."""
    need_llama_cpp()
    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    tok = M.build_byte_bpe_tokenizer(TEXT, 300)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    base, lora = root / "base", root / "lora"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :128]
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(10):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(lora)
    text = root / "eval.txt"
    text.write_text(EVAL)
    res = export_gguf(base, lora, root / "out", type="f32,q8_0,q4_0", report=True, report_text=text)
    return {"root": root, "base": base, "lora": lora, "text": text, "res": res}


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    with llama_cpp.LlamaCppModel(path, n_ctx=512, n_threads=2) as m:
        return m.logits(ids)


def _ids(path: Path, text: str) -> list[int]:
    with llama_cpp.LlamaCppModel(path, n_ctx=8) as m:
        return m.tokenize(text)


def _kl_top1_ppl(ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> tuple[float, float, float]:
    """Independent float64 KL(P_ref || P_got), top-1 and perplexity of ``got`` (rows predict ``targets``)."""
    r = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    g = torch.log_softmax(torch.from_numpy(got).double(), -1)
    kl = float((r.exp() * (r - g)).sum(-1).mean())
    top1 = float((r.argmax(-1) == g.argmax(-1)).double().mean())
    ppl = float(torch.exp(-g[torch.arange(len(targets)), torch.from_numpy(targets)].mean()))
    return kl, top1, ppl


def test_report_figures_are_recomputed_from_logits(tiny: dict[str, Any]) -> None:
    """Every figure of the written report equals one computed here from llama.cpp's and PEFT's logits."""
    rep = tiny["res"].quality
    out = tiny["res"].output
    files = {p.name: p for p in tiny["res"].gguf_files}
    ids = _ids(files[next(iter(files))], EVAL)
    assert rep.n_tokens == len(ids) and rep.n_scored == len(ids) - 1 < quality.N_CTX  # one chunk
    targets = np.asarray(ids[1:])
    f32 = _llama_logits(out / next(n for n in files if n.endswith("-F32.gguf")), ids)[:-1]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, tiny["lora"]).eval()
        peft_logits = peft(input_ids=torch.tensor([ids])).logits[0, :-1].numpy()
    assert [r.label for r in rep.rows] == ["PeftModel", "f32", "q8_0", "q4_0"]
    assert [r.key for r in rep.references] == ["merge", "peft"]
    for row in rep.rows[1:]:
        got = _llama_logits(files[row.file], ids)[:-1]
        kl, top1, ppl = _kl_top1_ppl(f32, got, targets)
        assert row.perplexity == pytest.approx(ppl, rel=1e-9)
        assert row.against["merge"].kl_divergence == pytest.approx(kl, rel=1e-6, abs=1e-12)
        assert row.against["merge"].top1 == top1
        kl, top1, _ = _kl_top1_ppl(peft_logits, got, targets)
        assert row.against["peft"].kl_divergence == pytest.approx(kl, rel=1e-6, abs=1e-12)
        assert row.against["peft"].top1 == top1
        assert row.bytes == files[row.file].stat().st_size
    _, _, ppl = _kl_top1_ppl(f32, peft_logits, targets)
    assert rep.rows[0].perplexity == pytest.approx(ppl, rel=1e-9)


def test_file_against_itself_and_the_order_of_types(tiny: dict[str, Any]) -> None:
    """The f32 file is the float32 merge: KL exactly 0, top-1 100%; q8_0 loses less than q4_0, and the f32
    merge agrees with the unmerged PeftModel far better than q4_0 does."""
    rows = {r.label: r for r in tiny["res"].quality.rows}
    assert rows["f32"].against["merge"].kl_divergence == 0.0 and rows["f32"].against["merge"].top1 == 1.0
    assert 0 < 4 * rows["q8_0"].against["merge"].kl_divergence < rows["q4_0"].against["merge"].kl_divergence
    assert rows["f32"].against["peft"].kl_divergence < rows["q8_0"].against["peft"].kl_divergence
    assert rows["f32"].bits_per_weight == 32.0
    assert 8.0 < rows["q8_0"].bits_per_weight < rows["f32"].bits_per_weight and rows["q4_0"].bits_per_weight < rows["q8_0"].bits_per_weight


def test_report_in_card_chart_and_verify(tiny: dict[str, Any]) -> None:
    """--report writes the table into README.md and quality.png, both listed in lorasave.json; verify passes."""
    from lorasave.verify.run import verify

    out = tiny["res"].output
    card = (out / "README.md").read_text()
    assert "## Quality" in card and tiny["res"].quality.table() in card and "![file size against KL divergence](quality.png)" in card
    assert card.index("## Quality") < card.index("## How to run it")
    png = (out / "quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"Software" not in png
    manifest = json.loads((out / "lorasave.json").read_text())
    assert {"quality.png", "README.md"} <= set(manifest["files"])
    assert manifest["result"]["quality"] == tiny["res"].quality.figures()
    assert verify(out).ok and verify(out, level="files").files_checked == len(manifest["files"])


def test_numbers_and_files_equal_run_to_run(tiny: dict[str, Any]) -> None:
    """A second run gives the same figures, the same chart bytes and the same card."""
    again = export_gguf(tiny["base"], tiny["lora"], tiny["root"] / "2" / "out", type="f32,q8_0,q4_0", report=True, report_text=tiny["text"])
    assert again.quality.figures() == tiny["res"].quality.figures()
    for name in ("quality.png", "README.md", *(p.name for p in again.gguf_files)):
        assert (tiny["res"].output / name).read_bytes() == (again.output / name).read_bytes(), name


def test_compare_cli_on_the_output_and_on_plain_files(tiny: dict[str, Any]) -> None:
    """compare OUT takes the references from lorasave.json (same figures as --report); plain files are
    measured against the highest-precision one, and the report says so."""
    out = tiny["res"].output
    r = CliRunner().invoke(main, ["compare", str(out), "--text", str(tiny["text"]), "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    got.pop("seconds")
    assert got == tiny["res"].quality.figures()
    q8, q4 = (p for p in tiny["res"].gguf_files if "-Q8_0" in p.name or "-Q4_0" in p.name)
    r = CliRunner().invoke(main, ["compare", str(q4), str(q8), "--text", str(tiny["text"]), "--chart", str(tiny["root"] / "c.png")])
    assert r.exit_code == 0, r.output
    assert f"KL vs {q8.name}" in r.stdout and "highest-precision file given" in r.stdout
    assert (tiny["root"] / "c.png").read_bytes()[:4] == b"\x89PNG"
    rep = quality_report.compare([q4, q8], text_file=tiny["text"])
    assert [r.label for r in rep.rows] == ["q4_0", "q8_0"] and rep.rows[1].against["file"].kl_divergence == 0.0
    by = {r.label: r for r in tiny["res"].quality.rows}
    assert rep.rows[0].against["file"].kl_divergence > by["q8_0"].against["merge"].kl_divergence


def test_compare_errors_are_one_line(tiny: dict[str, Any], tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    for args, want in (
        ([str(tmp_path / "missing.gguf")], "does not exist"),
        ([str(not_gguf)], "is not a GGUF file"),
        ([str(tiny["res"].gguf_files[0]), "--text", str(tmp_path / "nope.txt")], "does not exist"),
    ):
        r = CliRunner().invoke(main, ["compare", *args])
        assert r.exit_code in (1, 2), r.output
        assert r.output.count("\n") == 1 and r.output.startswith("error: ") and want in r.output, r.output


def test_cli_report_without_matplotlib(tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gguf --report prints the table; without matplotlib the card still gets it, the chart is skipped
    with a line naming the extra, and the output verifies."""
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["gguf", str(tiny["base"]), str(tiny["lora"]), "-o", str(out), "--type", "q8_0", "--report"])
    assert r.exit_code == 0, r.output
    assert f"| **q8_0** | `{next(out.glob('*-Q8_0.gguf')).name}` |" in r.stdout and "KL vs f32 merge" in r.stdout and "the built-in text" in r.stdout
    assert "pip install lorasave[report]" in r.stderr
    assert not (out / "quality.png").exists() and "| **q8_0** |" in (out / "README.md").read_text()
    assert CliRunner().invoke(main, ["verify", str(out), "--level", "files"]).exit_code == 0
