"""Unsloth's saving names through lorasave (``lorasave.unsloth``): a session typed as an Unsloth user would.

The fine-tune is the bundled example's base (loaded in float32, as on a CPU) with a LoRA trained a few
Adam steps, its tokenizer given a ChatML template (as Unsloth's ``get_chat_template`` does). Every call
of an Unsloth script runs one after the other on that live model, and each output is compared with
what lorasave's own functions write from the base folder and the adapter PEFT saves (same bytes), and,
where it applies, with PEFT itself (the merged checkpoint's logits against the unmerged PeftModel's,
the saved adapter against ``model.save_pretrained``). Pushes go to the Hub stand-in on 127.0.0.1
(``tests/hub_server.py``) with the token given as ``token=``, which must appear nowhere.

Run with ``pytest -s`` to see the session's transcript.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import _parity as P
import lorasave
import test_hub
from hub_server import USER, WRITE_TOKEN, HubStandIn
from lorasave.errors import InvalidChoiceError, InvalidOptionError, LorasaveError, NotOfferedError, UnknownArgumentError, UnsupportedModelError
from lorasave.unsloth import SAVE_METHOD_ALIASES, SAVE_METHODS, gguf_types, sixteen_bit_type
from lorasave.verify.run import verify

hub = test_hub.hub  # the Hub stand-in fixture
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BASE = EXAMPLES / "tiny-llama"
VOCAB = 128
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def model() -> PeftModel:
    """The fine-tune still in memory: LoRA on every projection, 4 Adam steps, left in train mode."""
    torch.set_num_threads(1)
    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    torch.manual_seed(18)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft = get_peft_model(base, config)
    P.train(peft, "llama", VOCAB, seed=18, steps=4, lr=2e-2)
    return peft.train()


@pytest.fixture(scope="module")
def adapter_dir(model: PeftModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapter as PEFT saves it: the reference's source."""
    out = tmp_path_factory.mktemp("ref") / "adapter"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok_dir(tok: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "tokenizer"
    tok.save_pretrained(out)
    return out


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one call of the session and print it as typed, with what it returned (the transcript)."""

    def typed(v: Any) -> str:
        if isinstance(v, PeftModel):
            return "model"
        if isinstance(v, PreTrainedTokenizerBase):
            return "tokenizer"
        return "token" if v == WRITE_TOKEN else repr(v)

    owner = "model" if getattr(fn, "__self__", None) is not None else "lorasave"
    text = f"{owner}.{fn.__name__}({', '.join([*map(typed, args), *(f'{k}={typed(v)}' for k, v in kwargs.items())])})"
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    lines = result.summary().splitlines() if hasattr(result, "summary") else [repr(result)]
    print(f">>> {text}   # {time.perf_counter() - t0:.1f} s\n" + "\n".join("    " + line for line in lines))
    return result


def _same_bytes(a: Path, b: Path, names: list[str]) -> None:
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), f"{n} differs from lorasave's own output"


def _weights(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))


def _config(folder: Path) -> dict[str, object]:
    """config.json without ``transformers_version`` (the live model's is the running transformers')."""
    config = P.read_json(folder / "config.json")
    config.pop("transformers_version")
    return config


def _state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def test_unsloth_session(model: PeftModel, tok: PreTrainedTokenizerBase, adapter_dir: Path, tok_dir: Path, hub: HubStandIn, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.delenv("HF_TOKEN")  # the token comes from token=, as in Unsloth scripts
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG, logger="lorasave")
    token = WRITE_TOKEN
    ref = tmp_path / "ref"
    before, training = _state(model), model.training
    with torch.no_grad():
        peft_logits = P.logits(model, P.eval_inputs("llama"))
    model.train(training)
    print()

    lorasave.attach(model)

    # --- model.save_pretrained_merged(..., save_method="merged_16bit") == lorasave.merge(BASE, ADAPTER)
    res = _call(model.save_pretrained_merged, "model", tok, save_method="merged_16bit")
    own = lorasave.merge(BASE, adapter_dir, ref / "model", dtype="float32", tokenizer=tok_dir)
    assert res.dtype == "float32" and _weights(res.output) == _weights(own.output)
    _same_bytes(res.output, own.output, [*_weights(own.output), "tokenizer.json"])
    assert _config(res.output) == _config(own.output)
    merged = P.load_merged(res.output, AutoModelForCausalLM)
    P.assert_logits_match(P.logits(merged, P.eval_inputs("llama")), peft_logits)  # the PEFT reference
    assert AutoTokenizer.from_pretrained(res.output).chat_template == CHATML

    # --- save_method="lora": PEFT's own adapter files
    res = _call(model.save_pretrained_merged, "lora_model", tok, save_method="lora")
    assert isinstance(res, lorasave.AdapterResult) and res.n_tensors == 2 * 7 * 2
    _same_bytes(res.output, adapter_dir, ["adapter_model.safetensors", "adapter_config.json"])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32), res.output)
    P.assert_logits_match(P.logits(reloaded, P.eval_inputs("llama")), peft_logits)

    # --- merged_4bit (Unsloth: "merged_4bit_forced") and a compressed-tensors preset by Unsloth's name
    for method, own_method in (("merged_4bit_forced", "merged_4bit"), ("fp8", "fp8_dynamic")):
        res = _call(model.save_pretrained_merged, f"model_{method}", tok, save_method=method)
        own = lorasave.merge(BASE, adapter_dir, ref / f"model_{method}", dtype="float32", save_method=own_method, tokenizer=tok_dir)
        assert res.quantization == own.quantization and res.quantization
        _same_bytes(res.output, own.output, _weights(own.output))
        assert _config(res.output) == _config(own.output)

    # --- model.save_pretrained_gguf(..., quantization_method=[aliases]): one pass, == lorasave.export_gguf
    res = _call(model.save_pretrained_gguf, "model_gguf", tok, quantization_method=["not_quantized", "fast_quantized", "quantized"])
    assert res.types == ["f16", "q8_0", "q4_k_m"]  # not_quantized: the float32 model's 16-bit type is f16, as Unsloth picks
    own = lorasave.export_gguf(BASE, adapter_dir, ref / "model_gguf", type="f16,q8_0,q4_k_m", tokenizer=tok_dir)
    assert [p.name for p in res.gguf_files] == [p.name for p in own.gguf_files]
    _same_bytes(res.output, own.output, [p.name for p in own.gguf_files])
    assert res.modelfile is not None and (res.output / "Modelfile").read_bytes() == (own.output / "Modelfile").read_bytes()
    manifest = json.loads((res.output / "lorasave.json").read_text())
    assert manifest["sources"]["base"]["path"] == str(BASE.resolve()) and "live_model" in manifest["sources"]
    rep = verify(res.output)  # the base from lorasave.json; the live adapter's tensors not checkable without it
    assert rep.ok and rep.not_probed and all("--adapter" in why for why in rep.not_probed.values())
    rep = verify(res.output, adapters=[adapter_dir])
    assert rep.ok and not rep.not_probed and rep.tensors_probed > 0

    # --- model.save_pretrained_ggml: the GGUF LoRA adapter == lorasave.export_gguf_adapter
    res = _call(model.save_pretrained_ggml, "lora_gguf", tok)
    # GGUF adapters are named from the adapter folder (convert_lora_to_gguf.py); the live adapter's folder is the output's
    named = ref / "src" / "lora_gguf"
    shutil.copytree(adapter_dir, named, ignore=shutil.ignore_patterns("README.md"))  # PEFT's card: no card in memory
    own = lorasave.export_gguf_adapter(BASE, named, ref / "lora_gguf", type="f16")
    assert res.gguf_file.name == own.gguf_file.name == "Lora_Gguf-F16-LoRA.gguf"
    _same_bytes(res.output, own.output, [own.gguf_file.name])
    assert verify(res.output, adapters=[adapter_dir]).tensors_probed == 2 * 7 * 2

    # --- pushes, the token given as token=
    res = _call(model.push_to_hub_merged, "tiny-lora", tok, save_method="lora", token=token)
    got = hub.files(f"{USER}/tiny-lora")
    assert got["adapter_model.safetensors"] == (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert "lorasave.json" in got and "tokenizer.json" in got and res.kept is None and not res.saved.output.exists()

    res = _call(model.push_to_hub_gguf, "tiny-gguf", tok, quantization_method=["q8_0", "quantized"], token=token, max_shard_size="5GB")
    own = lorasave.export_gguf(BASE, adapter_dir, ref / "tiny-gguf", type="q8_0,q4_k_m", tokenizer=tok_dir, modelfile=False)
    got = hub.files(f"{USER}/tiny-gguf")
    assert all(got[p.name] == p.read_bytes() for p in own.gguf_files) and "Modelfile" in got

    res = _call(model.push_to_hub_ggml, tok, "tiny-lora-gguf", token=token)
    shutil.copytree(adapter_dir, ref / "src" / "tiny-lora-gguf", ignore=shutil.ignore_patterns("README.md"))
    own = lorasave.export_gguf_adapter(BASE, ref / "src" / "tiny-lora-gguf", ref / "tiny-lora-gguf", type="f16")
    assert hub.files(f"{USER}/tiny-lora-gguf")[own.gguf_file.name] == own.gguf_file.read_bytes()

    # --- Unsloth's push_to_hub=True: save_directory is the repo id, the local folder is kept
    res = _call(model.save_pretrained_merged, f"{USER}/tiny-merged", tok, push_to_hub=True, token=token)
    assert (
        res.kept == tmp_path / USER / "tiny-merged" and hub.files(f"{USER}/tiny-merged")["model.safetensors"] == (res.kept / "model.safetensors").read_bytes()
    )

    # --- the same names as functions; Unsloth's default quantization_method ("fast_quantized")
    res = _call(lorasave.save_pretrained_gguf, model, "fn_gguf", tok, maximum_memory_usage=0.5, max_shard_size="5GB", first_conversion="f16")
    assert res.types == ["q8_0"]
    own = lorasave.export_gguf(BASE, adapter_dir, ref / "fn_gguf", type="q8_0", tokenizer=tok_dir, modelfile=False)
    _same_bytes(res.output, own.output, [own.gguf_file.name])

    # the model is the one trained: unchanged, still in train mode
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert model.training == training
    # the token appears in no log line, no output and no file
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    assert "not needed by lorasave: maximum_memory_usage" in log_text and "first_conversion" in log_text  # the ignored arguments are named
    transcript = capsys.readouterr().out
    test_hub._assert_token_nowhere(hub, token, log_text, transcript)
    with capsys.disabled():
        print(transcript, end="")
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert token.encode() not in p.read_bytes(), f"token written into {p}"


def test_wrong_values_list_every_valid_one(model: PeftModel, tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    lorasave.attach(model)
    with pytest.raises(InvalidChoiceError) as ei:
        model.save_pretrained_merged(tmp_path / "a", tok, save_method="merged_8bit")
    err = ei.value
    assert isinstance(err, ValueError) and isinstance(err, LorasaveError) and err.option == "save_method"
    assert "use one of lora, merged_16bit, merged_4bit" in str(err) and all(m in str(err) for m in (*SAVE_METHODS, *SAVE_METHOD_ALIASES))
    with pytest.raises(InvalidChoiceError, match="calibration data"):
        lorasave.push_to_hub_merged(model, "x", tok, save_method="nvfp4")
    with pytest.raises(InvalidChoiceError) as ei:
        model.save_pretrained_gguf(tmp_path / "b", tok, quantization_method=["q4_k_m", "q3_k_xs", "Q9_X"])
    msg = str(ei.value)
    assert "'q3_k_xs', 'Q9_X'" in msg and all(t in msg for t in ("not_quantized", "fast_quantized", "quantized", "q4_k_m", "iq2_xxs", "f32"))
    with pytest.raises(InvalidChoiceError, match="f32, f16, bf16, q8_0"):
        model.save_pretrained_ggml(tmp_path / "c", tok, outtype="q4_k_m")
    with pytest.raises(InvalidChoiceError, match="own"):
        model.save_pretrained_gguf(tmp_path / "d", tok, quantization_method=["q2_k_l", "q8_0"])
    with pytest.raises(UnknownArgumentError, match="maximum_memory_usage") as ei2:  # the accepted names are listed
        model.save_pretrained_gguf(tmp_path / "e", tok, quantisation_method="q8_0")
    assert isinstance(ei2.value, TypeError) and ei2.value.argument == "quantisation_method"
    with pytest.raises(InvalidOptionError, match="state_dict"):
        model.save_pretrained_merged(tmp_path / "f", tok, state_dict={})
    with pytest.raises(InvalidOptionError, match="compute_imatrix"):
        model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method="iq2_xxs", imatrix_file=True)
    with pytest.raises(InvalidOptionError, match="lorasave push") as ei3:  # push_to_hub=True: save_directory is no repo id
        model.save_pretrained_gguf(tmp_path / "h", tok, push_to_hub=True, token="hf_x")
    assert "nothing was written" in str(ei3.value)
    assert not any(tmp_path.iterdir())  # nothing written by any of them


def test_other_unsloth_names_point_elsewhere(model: PeftModel, tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    lorasave.attach(model)
    with pytest.raises(AttributeError, match="save_method='fp8_dynamic'") as ei:
        model.save_pretrained_torchao(tmp_path / "t", tok)  # type: ignore[operator]
    assert isinstance(ei.value, NotOfferedError) and "save_pretrained_merged" in str(ei.value)
    assert not hasattr(model, "push_to_hub_torchao")
    with pytest.raises(NotOfferedError, match="save_pretrained_merged"):
        lorasave.save_pretrained_torchao  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'frobnicate'"):  # other names: the usual error
        model.frobnicate  # noqa: B018
    # attached once, a plain PeftModel for pickle
    assert type(lorasave.attach(model)) is type(model) and isinstance(model, PeftModel)
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone) is type(model).__mro__[1] and not hasattr(clone, "save_pretrained_gguf")
    with pytest.raises(UnsupportedModelError, match=r"peft\.PeftModel"):
        lorasave.attach(AutoModelForCausalLM.from_pretrained(BASE))


def test_not_quantized_is_the_base_16_bit_type(tmp_path: Path) -> None:
    """bf16 for a bfloat16 base (the bundled example loaded as it is), f16 otherwise; Unsloth's other aliases fixed."""
    base = AutoModelForCausalLM.from_pretrained(BASE)  # bfloat16, as config.json says
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    assert sixteen_bit_type(peft) == "bf16"
    res = lorasave.save_pretrained_gguf(peft, tmp_path / "bf16", quantization_method="not_quantized")  # the base folder's tokenizer
    assert res.types == ["bf16"] and res.tensor_types.get("BF16")
    assert gguf_types([None, "Quantized", "q4_k", "fast_quantized"], "f16").types == ["q8_0", "q4_k_m"]
    q2kl = gguf_types("q2_k_l", "f16")
    assert q2kl.types == ["q2_k"] and q2kl.output_tensor_type == q2kl.token_embedding_type == "q8_0"
