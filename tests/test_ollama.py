"""Ollama Modelfile: chat template family detection (by rendering the Hugging Face Jinja template
with transformers) and the stop tokens, on tokenizers carrying the chat templates of real model
families; unknown or missing templates.

The Go templates themselves cannot be rendered here (no Go toolchain), so the checks are the
family detected, the ``TEMPLATE`` / ``SYSTEM`` / ``PARAMETER stop`` lines, and that the stop tokens
are the family's end-of-turn token plus the EOS tokens that tokenizer and generation config name.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorasave.formats.gguf.ollama import FAMILIES, SAMPLE, ChatFamily, detect_family, render_sample, write_modelfile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models as M

# Chat templates as the model families ship them (tokenizer_config.json "chat_template").
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    '{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = "" -%}{%- set loop_messages = messages -%}{%- endif -%}'
    "{%- for message in loop_messages -%}{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
GEMMA2 = (  # refuses a system message
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL = (  # Mistral-7B-Instruct-v0.1: user/assistant only
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
ALPACA = "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n\n{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}"

SPECIALS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
]

#: template, expected family, expected stop tokens (the family's end of turn, then the EOS "</s>")
CASES = {
    "smollm2": (SMOLLM2, ChatFamily.CHATML, ["<|im_end|>", "</s>"]),
    "llama3": (LLAMA3, ChatFamily.LLAMA3, ["<|eot_id|>", "</s>"]),
    "gemma3": (GEMMA3, ChatFamily.GEMMA, ["<end_of_turn>", "</s>"]),
    "gemma2": (GEMMA2, ChatFamily.GEMMA, ["<end_of_turn>", "</s>"]),
    "phi3": (PHI3, ChatFamily.PHI3, ["<|end|>", "</s>"]),
    "mistral": (MISTRAL, ChatFamily.MISTRAL, ["</s>"]),
}


def _tokenizer_dir(root: Path, template: str | None, eos_ids: list[str] | None = None) -> Path:
    tok = M.build_tokenizer()
    tok.add_tokens(SPECIALS, special_tokens=True)
    if template is not None:
        tok.chat_template = template
    folder = root / "tok"
    tok.save_pretrained(folder)
    if eos_ids is not None:
        ids = [tok.convert_tokens_to_ids(t) for t in eos_ids]
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return folder


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.mark.parametrize("name", list(CASES))
def test_family_and_stops(tmp_path: Path, name: str) -> None:
    template, family, stops = CASES[name]
    tok_dir = _tokenizer_dir(tmp_path, template)
    res = write_modelfile(tmp_path, "model-q8_0.gguf", tok_dir)
    assert res.family is family and res.stops == stops and res.notes == []
    text = (tmp_path / "Modelfile").read_text()
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert f'TEMPLATE """{FAMILIES[family].template}"""' in text
    assert [ln for ln in _lines(tmp_path / "Modelfile") if ln.startswith("PARAMETER")] == [f'PARAMETER stop "{s}"' for s in stops]
    # the Go template names the same turn markers as the Jinja rendering
    rendered = AutoTokenizer.from_pretrained(tok_dir).apply_chat_template(
        [m for m in SAMPLE if m["role"] == "user"][:1], tokenize=False, add_generation_prompt=True
    )
    go = FAMILIES[family].template
    expanded = go + "".join(go.replace("{{ .Role }}", role) for role in ("user", "assistant"))
    for marker in re.findall(r"<[|a-z_]+\|?>|\[/?INST\]", rendered):
        if marker != "<s>":  # BOS: added by llama.cpp's tokenizer, not the template
            assert marker in expanded, marker


def test_default_system_prompt(tmp_path: Path) -> None:
    """SmolLM2's template inserts a system turn when there is none: the Modelfile carries it as SYSTEM."""
    res = write_modelfile(tmp_path, "m.gguf", _tokenizer_dir(tmp_path, SMOLLM2))
    assert res.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert f'SYSTEM """{res.system}"""' in _lines(tmp_path / "Modelfile")


def test_generation_config_eos_ids(tmp_path: Path) -> None:
    """Llama 3 style: several EOS ids in generation_config.json, each a stop, each once."""
    tok_dir = _tokenizer_dir(tmp_path, LLAMA3, eos_ids=["<|eot_id|>", "</s>", "<|end|>"])
    res = write_modelfile(tmp_path, "m.gguf", tok_dir)
    assert res.family is ChatFamily.LLAMA3 and res.stops == ["<|eot_id|>", "</s>", "<|end|>"]


def test_gemma2_renders_without_system(tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir(tmp_path, GEMMA2))
    with pytest.raises(Exception, match="System role"):
        tok.apply_chat_template(list(SAMPLE), tokenize=False)
    rendered = render_sample(tok)
    assert rendered is not None and "SYSTEM_TEXT" not in rendered and detect_family(rendered) is ChatFamily.GEMMA


def test_unknown_template(tmp_path: Path) -> None:
    res = write_modelfile(tmp_path, "m.gguf", _tokenizer_dir(tmp_path, ALPACA))
    lines = _lines(tmp_path / "Modelfile")
    assert res.family is None and lines[0] == "FROM ./m.gguf" and not any(ln.startswith("TEMPLATE") for ln in lines)
    assert lines[1:] == ['PARAMETER stop "</s>"']
    assert len(res.notes) == 1 and "no TEMPLATE" in res.notes[0]


def test_no_chat_template(tmp_path: Path) -> None:
    res = write_modelfile(tmp_path, "m.gguf", _tokenizer_dir(tmp_path, None))
    assert res.path is None and not (tmp_path / "Modelfile").exists()
