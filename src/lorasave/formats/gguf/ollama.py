"""An Ollama ``Modelfile`` beside a GGUF: ``FROM``, a Go ``TEMPLATE`` and ``PARAMETER stop`` lines.

Hugging Face chat templates are Jinja; Ollama's are Go ``text/template``. A general translation
is not possible, so the template's *family* is detected instead: the Jinja template is rendered
(transformers' renderer, in a child process within the ``template_render`` budget) on a fixed
system / user / assistant / user conversation and the text is matched against the turn markers of known families; each family's
Go template is data (:data:`FAMILIES`), written to produce the same text as the Hugging Face
template for the same messages (the BOS token is left to llama.cpp's tokenizer, as Ollama's own
templates do). An unknown family gets a Modelfile without ``TEMPLATE`` and a note saying so.

Stop parameters: the family's end-of-turn token and every EOS token (the tokenizer's
``eos_token`` and ``generation_config.json``'s ``eos_token_id``), each once.

Modelfile syntax: https://github.com/ollama/ollama/blob/main/docs/modelfile.md; the Go templates
follow the conventions of Ollama's ``template/*.gotmpl`` (``.Messages`` with system messages in
it, ``$last`` from ``slice``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from lorasave.errors import ChatTemplateBudgetError
from lorasave.util.jsonio import read_json
from lorasave.util.template_render import render_chat_template

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
MODELFILE_NAME = "Modelfile"

#: Sample conversation rendered with the Jinja template to recognise its family.
SYSTEM, USER_1, ASSISTANT_1, USER_2 = "SYSTEM_TEXT_7", "USER_TEXT_1", "ASSISTANT_TEXT_1", "USER_TEXT_2"
SAMPLE = (
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": USER_1},
    {"role": "assistant", "content": ASSISTANT_1},
    {"role": "user", "content": USER_2},
)


class ChatFamily(Enum):
    """Chat template families with a known Go equivalent."""

    CHATML = "chatml"
    LLAMA3 = "llama3"
    GEMMA = "gemma"
    PHI3 = "phi3"
    MISTRAL = "mistral"


@dataclass(frozen=True)
class FamilySpec:
    """How to recognise one family and what to write for it.

    Attributes:
        markers: regular expressions that must all match the rendered sample conversation.
        end_of_turn: tokens closing a turn (stop parameters when the tokenizer has them).
        template: the Go template (Ollama ``TEMPLATE``).
        system_re: a regex whose group 1 is a system text the template adds when the conversation
            has none (then written as ``SYSTEM``), or None.
    """

    markers: tuple[str, ...]
    end_of_turn: tuple[str, ...]
    template: str
    system_re: str | None = None


_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 }}"


def _turns_template(header: str, close: str, *, trim: bool = False) -> str:
    """The Go template of a family whose every message is ``header`` (``{role}`` in it), the content and ``close``.

    After the last message, unless it is the assistant's, the assistant's header opens the reply
    (the generation prompt). ``trim`` writes that prompt's action as ``{{-``, dropping the newline
    after ``close`` (Llama 3 renders none).
    """
    turn = header.format(role="{{ .Role }}") + "{{ .Content }}" + close
    prompt = ("{{-" if trim else "{{") + ' if and $last (ne .Role "assistant") }}' + header.format(role="assistant")
    lines = ["{{- range $i, $_ := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 -}}", turn, prompt + "{{ end }}", "{{- end }}"]
    return "\n".join(lines)


def _turns_family(
    header: str, close: str, *, trim: bool = False, reply: str = "", anchored: bool = True, end_of_turn: tuple[str, ...] | None = None
) -> FamilySpec:
    """The spec of a family whose every message is ``header`` (``{role}`` in it), the content and ``close``.

    The markers and ``system_re`` match those turns in the rendered sample; a turn ends with
    ``close`` and, unless ``trim``, a newline (see :func:`_turns_template`). ``reply`` is a regex the
    assistant's content may start with; ``anchored``: the system turn opens the rendered text (no BOS
    rendered before it). ``end_of_turn`` defaults to ``close``.
    """

    def head(role: str) -> str:
        return re.escape(header.format(role=role)).replace("\\\n", r"\n")

    end = re.escape(close) + ("" if trim else r"\n")
    return FamilySpec(
        markers=(rf"{head('user')}{USER_1}{end}", rf"{head('assistant')}{reply}{ASSISTANT_1}{end}", rf"{head('assistant')}$"),
        end_of_turn=end_of_turn or (close,),
        template=_turns_template(header, close, trim=trim),
        system_re=("^" if anchored else "") + rf"{head('system')}(.*?){end}",
    )


#: Family -> markers, end-of-turn tokens and Go template. Checked in this order.
FAMILIES: dict[ChatFamily, FamilySpec] = {
    # Qwen2 / Qwen2.5 / Qwen3 / SmolLM2: <|im_start|>role\ncontent<|im_end|>\n
    ChatFamily.CHATML: _turns_family("<|im_start|>{role}\n", "<|im_end|>", reply=r"(?:<think>\s*</think>\s*)?"),
    # Llama 3 / 3.1 / 3.2: <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>, after <|begin_of_text|>
    ChatFamily.LLAMA3: _turns_family(
        "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", trim=True, anchored=False, end_of_turn=("<|eot_id|>", "<|eom_id|>")
    ),
    # Gemma / Gemma 2 / Gemma 3: <start_of_turn>user|model\ncontent<end_of_turn>\n, system folded
    # into the first user turn
    ChatFamily.GEMMA: FamilySpec(
        markers=(
            rf"<start_of_turn>user\n(?:{SYSTEM}\n\n)?{USER_1}<end_of_turn>\n",
            rf"<start_of_turn>model\n{ASSISTANT_1}<end_of_turn>\n",
            r"<start_of_turn>model\n$",
        ),
        end_of_turn=("<end_of_turn>",),
        template=(
            '{{- $system := "" }}\n'
            "{{- range $i, $_ := .Messages }}\n"
            f"{_LAST}\n"
            '{{- if eq .Role "system" }}\n'
            "{{- $system = .Content }}\n"
            '{{- else if eq .Role "user" }}<start_of_turn>user\n'
            '{{ if $system }}{{ $system }}\n\n{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>\n'
            '{{ else if eq .Role "assistant" }}<start_of_turn>model\n'
            "{{ .Content }}<end_of_turn>\n"
            "{{ end }}\n"
            '{{- if and $last (ne .Role "assistant") }}<start_of_turn>model\n'
            "{{ end }}\n"
            "{{- end }}"
        ),
    ),
    # Phi-3 / Phi-3.5: <|role|>\ncontent<|end|>\n
    ChatFamily.PHI3: _turns_family("<|{role}|>\n", "<|end|>"),
    # Mistral instruct: [INST] (system\n\n)user [/INST]assistant</s>, system on the last user turn
    ChatFamily.MISTRAL: FamilySpec(
        markers=(
            rf"\[INST\]\s*(?:{SYSTEM}\s*)?{USER_1}\s*\[/INST\]\s*{ASSISTANT_1}\s*</s>",
            rf"\[INST\]\s*(?:{SYSTEM}\s*)?{USER_2}\s*\[/INST\]$",
        ),
        end_of_turn=("</s>",),
        template=(
            "{{- range $i, $_ := .Messages }}\n"
            f"{_LAST}\n"
            '{{- if eq .Role "user" }}[INST] {{ if and $.System $last }}{{ $.System }}\n\n'
            "{{ end }}{{ .Content }} [/INST]\n"
            '{{- else if eq .Role "assistant" }}{{ .Content }}</s>\n'
            "{{- end }}\n"
            "{{- end }}"
        ),
    ),
}


@dataclass
class ModelfileResult:
    """What :func:`write_modelfile` did.

    Attributes:
        path: the Modelfile written, or None (no chat template).
        family: the detected chat template family, or None (unknown: no ``TEMPLATE`` line).
        stops: the ``PARAMETER stop`` values, in order.
        system: the default system prompt written as ``SYSTEM``, if any.
        notes: what could not be carried over.
    """

    path: Path | None
    family: ChatFamily | None
    stops: list[str] = field(default_factory=list)
    system: str | None = None
    notes: list[str] = field(default_factory=list)


def render_samples(tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]]) -> list[str | None]:
    """The chat template rendered (not tokenized) on each conversation with the generation prompt.

    Rendered by ``template_render`` (transformers' renderer in a child process, within the budget),
    with the tokenizer's special tokens as variables, as ``apply_chat_template`` does.

    Returns:
        The text per conversation, or None where the template fails on it (``raise_exception``...).

    Raises:
        ChatTemplateBudgetError: the template needs more time, memory or output than the budget.
    """
    try:
        template = tokenizer.get_chat_template()
    except ValueError as e:  # several named templates and no "default"
        logger.debug("no chat template to render: %s", e)
        return [None for _ in conversations]
    results = render_chat_template(template, conversations, tokenizer.special_tokens_map)
    for conv, res in zip(conversations, results, strict=True):
        if res.error is not None:
            logger.debug("chat template failed on %d messages: %s", len(conv), res.error)
    return [res.text for res in results]


def _without_system(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    return [m for m in messages if m["role"] != "system"]


def render_sample(tokenizer: Any, messages: Sequence[dict[str, str]] = SAMPLE) -> str | None:
    """The chat template rendered on ``messages`` with the generation prompt (:func:`render_samples`).

    A template that refuses a system message (Gemma 2, Mistral v0.1 raise) is rendered again without it.

    Returns:
        The text, or None when the template fails on both.

    Raises:
        ChatTemplateBudgetError: as :func:`render_samples`.
    """
    full, bare = render_samples(tokenizer, [list(messages), _without_system(messages)])
    return full if full is not None else bare


def detect_family(rendered: str) -> ChatFamily | None:
    """The first family of :data:`FAMILIES` whose markers all match ``rendered``, else None."""
    for family, spec in FAMILIES.items():
        if all(re.search(m, rendered, flags=re.DOTALL) for m in spec.markers):
            return family
    return None


def _eos_ids(folders: Sequence[Path]) -> list[int]:
    """``eos_token_id`` values (int or list) of ``generation_config.json`` / ``config.json`` in ``folders``."""
    ids: list[int] = []
    for folder in folders:
        for name in ("generation_config.json", "config.json"):
            path = folder / name
            if not path.is_file():
                continue
            value = read_json(path).get("eos_token_id")
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, int) and v not in ids:
                    ids.append(v)
    return ids


def stop_tokens(tokenizer: Any, family: ChatFamily | None, config_dirs: Sequence[Path] = ()) -> list[str]:
    """End-of-turn tokens of ``family`` the tokenizer knows, then every EOS token, each once.

    Args:
        tokenizer: a transformers tokenizer.
        family: the detected family, or None.
        config_dirs: folders whose ``generation_config.json`` / ``config.json`` ``eos_token_id``
            count too (the tokenizer's folder first).
    """
    vocab = tokenizer.get_vocab()
    out: list[str] = []
    candidates = list(FAMILIES[family].end_of_turn) if family else []
    candidates.append(tokenizer.eos_token)
    candidates += [tokenizer.convert_ids_to_tokens(i) for i in _eos_ids(config_dirs) if 0 <= i < len(tokenizer)]
    for tok in candidates:
        if isinstance(tok, str) and tok and tok in vocab and tok not in out:
            out.append(tok)
    return out


def _quote(value: str) -> str | None:
    """A Modelfile double-quoted string, or None when the value cannot be written as one."""
    if '"' in value or "\n" in value or "\\" in value:
        return None
    return f'"{value}"'


def write_modelfile(
    folder: PathLike,
    gguf_file: str,
    tokenizer_dir: PathLike,
    *,
    config_dirs: Sequence[PathLike] = (),
) -> ModelfileResult:
    """Write ``folder/Modelfile`` for ``ollama create NAME -f Modelfile`` when the model has a chat template.

    Args:
        folder: the output folder (the GGUF is in it).
        gguf_file: the GGUF file name (``FROM ./<gguf_file>``).
        tokenizer_dir: the folder the GGUF's tokenizer and chat template came from.
        config_dirs: more folders with ``generation_config.json`` (EOS ids), e.g. the base's.

    Returns:
        ModelfileResult; ``path`` is None when the tokenizer has no chat template (nothing written).

    Raises:
        UnsupportedModelError: only the folder's own code (``auto_map``) could load the tokenizer.
    """
    from lorasave.sources.hf_load import load_tokenizer

    out = Path(folder)
    tok_dir = Path(tokenizer_dir)
    tok = load_tokenizer(tok_dir)
    if not getattr(tok, "chat_template", None):
        return ModelfileResult(path=None, family=None, notes=["no chat template: no Modelfile written"])
    notes: list[str] = []
    over: str | None = None
    try:  # the sample, and the sample without its system message (templates that refuse one; default system texts)
        full, bare = render_samples(tok, [list(SAMPLE), _without_system(SAMPLE)])
    except ChatTemplateBudgetError as e:
        full = bare = None
        over = str(e)
    rendered = full if full is not None else bare
    family = detect_family(rendered) if rendered is not None else None
    system = None
    if family is None:
        known = ", ".join(f.value for f in FAMILIES)
        why = over or ("the chat template could not be rendered" if rendered is None else f"the chat template is not one of {known}")
        notes.append(f"Modelfile has no TEMPLATE: {why}; Ollama will use the raw prompt (add a TEMPLATE by hand)")
    else:
        system = _default_system(bare, family)
    stops = stop_tokens(tok, family, [tok_dir, *(Path(d) for d in config_dirs)])
    lines = [f"FROM ./{gguf_file}"]
    if family is not None:
        lines.append(f'TEMPLATE """{FAMILIES[family].template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    written = []
    for s in stops:
        q = _quote(s)
        if q is None:
            notes.append(f"stop token {s!r} left out of the Modelfile (quotes, backslashes or newlines)")
            continue
        written.append(s)
        lines.append(f"PARAMETER stop {q}")
    path = out / MODELFILE_NAME
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.debug("wrote %s (family %s, stops %s)", path, family, written)
    return ModelfileResult(path=path, family=family, stops=written, system=system, notes=notes)


def _default_system(rendered: str | None, family: ChatFamily) -> str | None:
    """A system text the template inserts when the conversation has none (Qwen2.5's, Llama 3.1's date lines).

    Args:
        rendered: the template rendered on the sample without its system message.
        family: the detected family.
    """
    pattern = FAMILIES[family].system_re
    if pattern is None or rendered is None:
        return None
    m = re.search(pattern, rendered, flags=re.DOTALL)
    text = m.group(1).strip() if m else None
    return text if text and '"""' not in text else None
