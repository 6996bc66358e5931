"""Issue 18, points 2-4: BASE optional (the adapter names it), `lorasave adapter` keeps the tokenizer and chat
template, GGUF names as llama.cpp's converter gives them, notes that say the same on every run under --verbose.

Everything runs on the bundled example (a 107K-parameter Llama and its LoRA), copied so that the adapter's
``base_model_name_or_path`` can be set per test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import gguf
import pytest
from click.testing import CliRunner, Result

import lorasave
from lorasave.cli.main import main
from lorasave.errors import AdapterMismatchError, SourceNotFoundError, UnsafePathError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE = EXAMPLES / "tiny-llama"
LORA = EXAMPLES / "tiny-llama-lora"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _adapter(dst: Path, base_name: object = None, **config: Any) -> Path:
    """A copy of the example adapter whose adapter_config.json names ``base_name`` (unchanged when None)."""
    shutil.copytree(LORA, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    if base_name is not None:
        cfg["base_model_name_or_path"] = base_name
    cfg.update(config)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def _weights(out: Path) -> bytes:
    return (out / "model.safetensors").read_bytes()


def _hf_cache(root: Path, repo_id: str, src: Path, rev: str = "c" * 40) -> Path:
    """``src`` laid out as the Hugging Face cache holds ``repo_id`` (refs/main, snapshots/<rev>/x -> ../../blobs/<sha256>)."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap, blobs = repo / "snapshots" / rev, repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir(exist_ok=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for p in sorted(src.iterdir()):
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copyfile(p, blobs / sha)
        (snap / p.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    return snap


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`lorasave merge BASE ADAPTER`, BASE given."""
    return lorasave.merge(BASE, LORA, tmp_path_factory.mktemp("ref") / "merged").output


# --------------------------------------------------------------------------------------- 2. BASE optional


def test_merge_takes_the_base_the_adapter_names(reference: Path, tmp_path: Path) -> None:
    """`lorasave merge ADAPTER -o OUT`: the base is adapter_config.json's, the note names it, the output is the same."""
    ad = _adapter(tmp_path / "lora", str(BASE))
    r = _cli("merge", ad, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert f"note: base: {BASE}, named by {ad / 'adapter_config.json'} (base_model_name_or_path)" in r.stderr
    assert _weights(tmp_path / "out") == _weights(reference)
    manifest = json.loads((tmp_path / "out" / "lorasave.json").read_text())
    assert manifest["sources"]["base"]["path"] == str(BASE) and any(n.startswith("base: ") for n in manifest["result"]["notes"])
    doc = json.loads(_cli("merge", ad, "-o", tmp_path / "json", "--json").stdout)  # the result says it too
    assert any(f"base: {BASE}" in n for n in doc["notes"])
    res = lorasave.merge(None, ad, tmp_path / "api")  # Python: base=None
    assert _weights(res.output) == _weights(reference) and any(n.startswith("base: ") for n in res.notes)


def test_relative_base_is_taken_from_the_current_folder_as_peft_does(reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's AutoPeftModel hands base_model_name_or_path to from_pretrained: a relative path is the current folder's.
    Elsewhere the error names the exact folder and Hub id looked for, in one line."""
    shutil.copytree(BASE, tmp_path / "work" / "models" / "tiny")
    ad = _adapter(tmp_path / "lora", "models/tiny")
    monkeypatch.chdir(tmp_path / "work")
    assert _cli("merge", ad, "-o", tmp_path / "out").exit_code == 0
    assert _weights(tmp_path / "out") == _weights(reference)
    monkeypatch.chdir(tmp_path)
    r = _cli("gguf", ad, "-o", tmp_path / "g")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert f"no folder {tmp_path / 'models' / 'tiny'}" in r.stderr and "no Hub id 'models/tiny'" in r.stderr
    assert str(ad / "adapter_config.json") in r.stderr and "give BASE first" in r.stderr
    assert not (tmp_path / "g").exists()


def test_hub_id_from_the_local_cache(reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id is looked up in the local Hugging Face cache (huggingface_hub, offline), at the adapter's revision."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    snap = _hf_cache(cache, "org/Tiny-Llama-107K-Chat", BASE)
    ad = _adapter(tmp_path / "lora", "org/Tiny-Llama-107K-Chat")
    r = _cli("merge", ad, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert f"base: org/Tiny-Llama-107K-Chat in the local Hugging Face cache ({snap})" in r.stderr
    assert _weights(tmp_path / "out") == _weights(reference)
    manifest = json.loads((tmp_path / "out" / "lorasave.json").read_text())
    assert manifest["sources"]["base"]["hub_id"] == "org/Tiny-Llama-107K-Chat"
    assert "base_model: org/Tiny-Llama-107K-Chat" in (tmp_path / "out" / "README.md").read_text()
    # GGUF names: the repo's name stands for the folder's (a snapshot folder is named by its commit)
    g = lorasave.export_gguf(None, ad, tmp_path / "g", type="q8_0")
    assert g.gguf_file.name == "Tiny-Llama-107K-Chat-Q8_0.gguf"
    # the adapter's revision
    ad2 = _adapter(tmp_path / "lora-rev", "org/Tiny-Llama-107K-Chat", revision="c" * 40)
    assert _weights(lorasave.merge(None, ad2, tmp_path / "rev").output) == _weights(reference)
    ad3 = _adapter(tmp_path / "lora-bad-rev", "org/Tiny-Llama-107K-Chat", revision="d" * 40)
    with pytest.raises(
        SourceNotFoundError, match=rf"no Hub id 'org/Tiny-Llama-107K-Chat' at revision '{'d' * 40}' in the local Hugging Face cache \({cache}\)"
    ):
        lorasave.merge(None, ad3, tmp_path / "bad")
    ad4 = _adapter(tmp_path / "lora-missing", "org/not-downloaded")
    r = _cli("merge", ad4, "-o", tmp_path / "missing")
    assert r.exit_code == 2 and "hf download org/not-downloaded" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_adapters_must_agree_on_the_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _adapter(tmp_path / "a", str(BASE))
    monkeypatch.chdir(EXAMPLES)
    b = _adapter(tmp_path / "b", "tiny-llama")  # the same folder, relative to the current one
    res = lorasave.merge(None, [a, b], tmp_path / "two", weights=[0.5, 0.5])
    assert res.n_merged == 14
    other = tmp_path / "other-base"
    shutil.copytree(BASE, other)
    c = _adapter(tmp_path / "c", str(other))
    r = _cli("merge", a, c, "-o", tmp_path / "out")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "the adapters name different bases" in r.stderr and str(a / "adapter_config.json") in r.stderr and str(other) in r.stderr
    assert _cli("merge", BASE, a, c, "-o", tmp_path / "given").exit_code == 0  # BASE given: the adapters' names are not read


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (str(BASE) + "\n/etc", "contains NUL or a control character"),
        ("x\x00y", "contains NUL or a control character"),
        ("\x1b[31mred", "contains NUL or a control character"),
        (["a", "b"], "must be a string, got list"),
        ("a" * 5000, "5000 characters long"),
        ("", "names no base"),
    ],
    ids=["newline", "nul", "escape", "list", "long", "empty"],
)
def test_hostile_base_names_refused(tmp_path: Path, value: object, message: str) -> None:
    """base_model_name_or_path is user data: control characters, NUL, non-strings, very long values are not followed."""
    ad = _adapter(tmp_path / "lora", value)
    with pytest.raises(AdapterMismatchError, match=message):
        lorasave.merge(None, ad, tmp_path / "out")
    r = _cli("gguf-adapter", ad, "-o", tmp_path / "out")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and "\x1b" not in r.stderr and "\x00" not in r.stderr, r.output
    assert list(tmp_path.iterdir()) == [tmp_path / "lora"]


def test_first_folder_rule(tmp_path: Path) -> None:
    """adapter_config.json and no model weights: an adapter; with model weights: a base (gguf X: X as it is)."""
    from lorasave.sources.named_base import is_adapter_folder, split_sources

    ad = _adapter(tmp_path / "lora", str(BASE))
    assert is_adapter_folder(ad) and not is_adapter_folder(BASE)
    both = tmp_path / "both"  # a model folder that also holds an adapter_config.json
    shutil.copytree(BASE, both)
    shutil.copyfile(ad / "adapter_config.json", both / "adapter_config.json")
    assert not is_adapter_folder(both)
    assert split_sources([str(ad)]) == (None, [str(ad)])
    assert split_sources([str(both)], adapter_required=False) == (str(both), [])
    g = _cli("gguf", both, "-o", tmp_path / "g", "--type", "f32", "--json")
    assert g.exit_code == 0 and json.loads(g.stdout)["n_merged"] == 0, g.output
    r = _cli("merge", BASE, "-o", tmp_path / "m")
    assert r.exit_code == 2 and "is a base, not an adapter" in r.stderr and "lorasave merge [BASE] ADAPTER" in r.stderr
    assert "[BASE] ADAPTER..." in _cli("merge", "--help").output and "[BASE] [ADAPTER]..." in _cli("gguf", "--help").output


def test_every_merging_command_without_base(tmp_path: Path) -> None:
    """gguf, gguf-adapter, onnx, onnx-adapter and imatrix take the adapter alone too, and write what they write with BASE."""
    ad = _adapter(tmp_path / "lora", str(BASE))
    cases = (("gguf", ["--type", "q8_0"]), ("gguf-adapter", ["--type", "f16"]), ("onnx", []), ("onnx-adapter", ["--name", "a"]))
    for cmd, extra in cases:
        with_base = _cli(cmd, BASE, ad, "-o", tmp_path / f"{cmd}-given", *extra)
        without = _cli(cmd, ad, "-o", tmp_path / f"{cmd}-named", *extra)
        assert with_base.exit_code == 0 and without.exit_code == 0, (cmd, with_base.output, without.output)
        assert "note: base: " in without.stderr, cmd
        produced = sorted(p.name for p in (tmp_path / f"{cmd}-given").iterdir() if p.suffix in (".gguf", ".data", ".onnx", ".onnx_adapter"))
        assert produced, cmd
        for name in produced:
            assert (tmp_path / f"{cmd}-given" / name).read_bytes() == (tmp_path / f"{cmd}-named" / name).read_bytes(), (cmd, name)
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a tiny model that learned a few words. " * 20)
    r = _cli("imatrix", ad, "--text", text, "-o", tmp_path / "imatrix", "--chunk-size", "32", "--chunks", "2")
    assert r.exit_code == 0 and (tmp_path / "imatrix" / "imatrix.gguf").is_file(), r.output


def test_batch_job_without_base(reference: Path, tmp_path: Path) -> None:
    ad = _adapter(tmp_path / "lora", str(BASE))
    (tmp_path / "jobs.yaml").write_text(f"jobs:\n  - adapters: [{ad}]\n    outputs: [{{format: safetensors, path: out}}]\n")
    r = _cli("batch", tmp_path / "jobs.yaml")
    assert r.exit_code == 0, r.output
    assert f"job 1: base: {BASE}" in r.stderr and _weights(tmp_path / "out") == _weights(reference)
    bad = _adapter(tmp_path / "lora-bad", "nowhere/at-all")
    (tmp_path / "bad.yaml").write_text(f"jobs:\n  - adapters: [{bad}]\n    outputs: [{{format: safetensors, path: out2}}]\n")
    r = _cli("batch", tmp_path / "bad.yaml")
    assert r.exit_code == 2 and "job 1 names no base" in r.stderr and "'nowhere/at-all'" in r.stderr and not (tmp_path / "out2").exists()


# ------------------------------------------------------------------- 3. `lorasave adapter` keeps the tokenizer


def _adapter_with_tokenizer(dst: Path, *, inline_template: bool = False) -> Path:
    ad = _adapter(dst, str(BASE))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(BASE / name, ad / name)
    if inline_template:
        cfg = json.loads((ad / "tokenizer_config.json").read_text())
        cfg["chat_template"] = TEMPLATE
        (ad / "tokenizer_config.json").write_text(json.dumps(cfg))
    else:
        (ad / "chat_template.jinja").write_text(TEMPLATE)
    return ad


def test_adapter_carries_tokenizer_and_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ad = _adapter_with_tokenizer(tmp_path / "lora")
    r = _cli("adapter", ad, "-o", tmp_path / "out", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    assert "with its tokenizer and chat template" in r.stdout
    out = tmp_path / "out"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (ad / name).read_bytes(), name
    manifest = json.loads((out / "lorasave.json").read_text())
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(manifest["files"])
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE
    assert _cli("verify", out, "--level", "files").exit_code == 0
    res = lorasave.save_adapter(_adapter_with_tokenizer(tmp_path / "inline", inline_template=True), tmp_path / "out2")
    assert res.chat_template and "tokenizer_config.json" in res.tokenizer_files and res.manifest == res.output / "lorasave.json"
    assert res.to_dict()["manifest"] == str(res.output / "lorasave.json") and "chat template" in res.summary()
    plain = lorasave.save_adapter(_adapter(tmp_path / "plain"), tmp_path / "out3")  # no tokenizer: none invented
    assert plain.tokenizer_files == [] and "with its tokenizer" not in plain.summary()


def test_adapter_tokenizer_link_leaving_the_folder_refused(tmp_path: Path) -> None:
    ad = _adapter_with_tokenizer(tmp_path / "lora")
    outside = tmp_path / "elsewhere" / "tokenizer.json"
    outside.parent.mkdir()
    shutil.move(ad / "tokenizer.json", outside)
    (ad / "tokenizer.json").symlink_to(outside)
    with pytest.raises(UnsafePathError, match=r"tokenizer\.json links to"):
        lorasave.save_adapter(ad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_live_lora_save_returns_a_result(tmp_path: Path) -> None:
    """save_pretrained_merged(save_method="lora") returns an AdapterResult like every other save."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorasave.api import AdapterResult

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(BASE), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    tok = AutoTokenizer.from_pretrained(BASE)
    tok.chat_template = TEMPLATE
    res = lorasave.save_pretrained_merged(model, tmp_path / "lora", tok, save_method="lora")
    assert isinstance(res, AdapterResult) and res.output == tmp_path / "lora"
    assert res.n_tensors == 4 and res.chat_template and "tokenizer_config.json" in res.tokenizer_files
    assert res.manifest.is_file() and json.loads(res.manifest.read_text())["command"] == "adapter"
    assert res.to_dict()["output"] == str(tmp_path / "lora") and "saved adapter (4 tensors" in res.summary()


# ---------------------------------------------------------------------------------- 4. GGUF names, --verbose


def _named_base(root: Path, name: str, card: str | None = None) -> Path:
    base = root / name
    shutil.copytree(BASE, base)
    if card is not None:
        (base / "README.md").write_text(card)
    return base


def _kv(path: Path) -> dict[str, Any]:
    fields = gguf.GGUFReader(path).fields
    keys = ("general.name", "general.basename", "general.finetune", "general.version", "general.size_label")
    return {k: fields[k].contents() for k in keys if k in fields}


def _converter_names(folder: Path, gguf_file: Path, output_type: str) -> dict[str, Any]:
    """What llama.cpp v0.5.0's converter (its own gguf-py, in its own environment) names a conversion of ``folder`` whose
    tensors are ``gguf_file``'s: ``ModelBase.prepare_metadata`` and ``TextModel.prepare_metadata``'s steps."""
    from lorasave.runtimes.llama_cpp import converter

    if not converter.is_installed():
        if os.environ.get("CI"):
            pytest.fail(f"llama.cpp's converter is not installed; {converter.INSTALL_COMMAND}")
        pytest.skip("llama.cpp's converter is not installed")
    conv = converter.find_converter()
    code = f"""
import json, math, sys
from pathlib import Path
sys.path.insert(0, {str(conv.source / "gguf-py")!r})
import gguf
assert Path(gguf.__file__).is_relative_to({str(conv.source)!r})
total = sum(math.prod(int(x) for x in t.shape) for t in gguf.GGUFReader({str(gguf_file)!r}).tensors)
meta = gguf.Metadata.load(None, Path({str(folder)!r}), None, total)
if meta.name is None:
    meta.name = Path({str(folder)!r}).name
if meta.size_label is None and total > 0:
    meta.size_label = gguf.size_label(total, total, 0, 0)
name = gguf.naming_convention(meta.name, meta.basename, meta.finetune, meta.version, meta.size_label, {output_type!r})
print(json.dumps({{"file": name + ".gguf", "general.name": meta.name, "general.basename": meta.basename,
                  "general.finetune": meta.finetune, "general.version": meta.version, "general.size_label": meta.size_label}}))
"""
    proc = subprocess.run([str(conv.python), "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return {k: v for k, v in json.loads(proc.stdout).items() if v is not None}


@pytest.mark.parametrize(
    ("folder", "card", "file"),
    [
        ("Tiny-Llama-107K-Chat", None, "Tiny-Llama-107K-Chat-Q8_0.gguf"),
        ("tiny-llama", None, "Tiny-Llama-107K-Q8_0.gguf"),
        ("SmolLM2-135M-Instruct", None, "SmolLM2-107K-135m-Instruct-Q8_0.gguf"),  # 135M is far from 107K: a "context length"
        ("base", "---\nmodel_name: Qwen2.5-Coder-0.5B\nbasename: Qwen2.5-Coder\nfinetune: Math\nlicense: mit\n---\n", "Qwen2.5-Coder-107K-Math-Q8_0.gguf"),
    ],
    ids=["folder", "ambiguous", "size-mismatch", "card"],
)
def test_gguf_names_as_the_converter_gives_them(tmp_path: Path, folder: str, card: str | None, file: str) -> None:
    base = _named_base(tmp_path, folder, card)
    res = lorasave.export_gguf(base, LORA, tmp_path / "out", type="q8_0", modelfile=False)
    assert res.gguf_file.name == file
    ours = {"file": res.gguf_file.name, **_kv(res.gguf_file)}
    assert ours == _converter_names(base, res.gguf_file, "Q8_0")


def test_name_option_wins_and_adapter_files(tmp_path: Path) -> None:
    base = _named_base(tmp_path, "Tiny-Llama-107K-Chat")
    res = lorasave.export_gguf(base, LORA, tmp_path / "named", type="f16,Q4_0", name="my-model", modelfile=False)
    assert [p.name for p in res.gguf_files] == ["my-model-F16.gguf", "my-model-Q4_0.gguf"]
    assert _kv(res.gguf_files[0]) == {"general.name": "my-model", "general.basename": "Tiny-Llama", "general.finetune": "Chat", "general.size_label": "107K"}
    ad = _adapter(tmp_path / "Tiny-Llama-Lora-v2", str(base))
    g = lorasave.export_gguf_adapter(None, ad, tmp_path / "ga", type="q8_0")
    # convert_lora_to_gguf.py: named from the adapter folder ("lora" dropped for an adapter), no size label, -LoRA
    assert g.gguf_file.name == "Tiny-Llama-v2-Q8_0-LoRA.gguf"
    assert _kv(g.gguf_file) == {"general.name": "Tiny Llama Lora v2", "general.basename": "Tiny-Llama", "general.version": "v2"}
    assert lorasave.export_gguf_adapter(None, ad, tmp_path / "gb", name="x").gguf_file.name == "x-F16-LoRA.gguf"


def test_modelfile_and_card_use_the_file_name(tmp_path: Path) -> None:
    base = _named_base(tmp_path, "Tiny-Llama-107K-Chat")
    ad = _adapter_with_tokenizer(tmp_path / "lora")
    res = lorasave.export_gguf(base, ad, tmp_path / "out", type="q8_0")
    assert res.gguf_file.name == "Tiny-Llama-107K-Chat-Q8_0.gguf"
    assert (res.output / "Modelfile").read_text().startswith("FROM ./Tiny-Llama-107K-Chat-Q8_0.gguf\n")
    assert "llama-cli -m Tiny-Llama-107K-Chat-Q8_0.gguf" in (res.output / "README.md").read_text()


def test_same_every_run_notes_only_with_verbose(tmp_path: Path) -> None:
    quiet = _cli("gguf", BASE, LORA, "-o", tmp_path / "a", "--type", "q8_0")
    assert quiet.exit_code == 0 and "add_bos_token" not in quiet.stderr and "add_eos_token" not in quiet.stderr, quiet.stderr
    assert "pre-tokenizer" in quiet.stderr  # a fallback worth knowing stays
    loud = _cli("gguf", BASE, LORA, "-o", tmp_path / "b", "--type", "q8_0", "--verbose")
    assert "note: tokenizer.ggml.add_bos_token = False" in loud.stderr and "note: tokenizer.ggml.add_eos_token = False" in loud.stderr
    assert "add_bos_token" in _cli("--verbose", "gguf", BASE, LORA, "-o", tmp_path / "c", "--type", "q8_0").stderr
    doc = json.loads(_cli("gguf", BASE, LORA, "-o", tmp_path / "d", "--type", "q8_0", "--json").stdout)
    assert any("add_bos_token" in n for n in doc["notes"])  # still recorded


def test_type_names_case_insensitive_with_aliases() -> None:
    from lorasave.cli.gguf import GgufTypeList
    from lorasave.formats.gguf.export import parse_types

    assert [t.value for t in parse_types("Q4_K,q5_K,Q3_k,Q8_0,F16,Q4_K_M")] == ["q4_k_m", "q5_k_m", "q3_k_m", "q8_0", "f16"]
    assert GgufTypeList().convert("Q4_K, IQ4_XS", None, None) == "q4_k,iq4_xs"
