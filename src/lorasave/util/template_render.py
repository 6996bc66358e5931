"""Chat templates rendered with bounded work, in a child process.

A chat template is Jinja from the model folder. transformers renders it in jinja2's sandbox, which
stops attribute tricks but not work: ``{% for i in range(99999) %}{% for j in range(99999) %}``
loops for hours and ``{{ 'x' * 10**10 }}`` asks for 10 GB. lorasave therefore renders templates
with transformers' own renderer (``transformers.utils.chat_template_utils.render_jinja_template``,
the one ``apply_chat_template`` calls, with the tokenizer's special tokens as variables, so the
text is the same) in a child ``python -I`` process under a budget:

* :data:`TIME_S` seconds of wall time for all the renders of one call (``setitimer`` in the
  child; ``RLIMIT_CPU`` a second or two later kills a child stuck in
  one C call; the parent kills it after :data:`STARTUP_S` + :data:`TIME_S`);
* :data:`OUTPUT_BYTES` bytes of rendered text (UTF-8, all renders together);
* :data:`MEMORY_BYTES` of address space beyond what the child holds after importing transformers
  (``RLIMIT_AS``; Linux).

Over budget: :class:`~lorasave.errors.ChatTemplateBudgetError`. A template that fails on a
conversation (``raise_exception``, a Jinja error) is not over budget: that render's result is its
error message.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lorasave.errors import ChatTemplateBudgetError

logger = logging.getLogger(__name__)

#: Wall-clock seconds for the renders of one :func:`render_chat_template` call.
TIME_S = 2.0
#: Bytes of rendered text (UTF-8) for the renders of one call.
OUTPUT_BYTES = 1_000_000
#: Address space the renders may add to the child process. jinja2 keeps every piece of output, even
#: an empty ``{{ '' }}``, in a list until the render ends, so a loop that prints nothing still grows
#: by about 160 MB/s here; 1 GiB leaves the :data:`TIME_S` limit to stop loops (with its own message)
#: and the memory limit to stop string bombs.
MEMORY_BYTES = 2**30
#: Seconds the child may take to start and import transformers before the budget starts.
STARTUP_S = 60.0

_CHILD = r"""
import json, os, resource, signal, sys, time

req = json.loads(sys.stdin.read())
out = sys.stdout


def reply(obj):
    out.write("\n" + json.dumps(obj))
    out.flush()
    os._exit(0)


try:
    from transformers.utils.chat_template_utils import render_jinja_template
except Exception as exc:
    reply({"setup_error": f"transformers' chat template renderer is not available: {type(exc).__name__}: {exc}"})


class OverBudget(BaseException):
    pass


def on_alarm(signum, frame):
    raise OverBudget("time")


try:
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + req["memory"], vm + req["memory"]))
except (OSError, ValueError, StopIteration):
    pass
try:
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = int(used.ru_utime + used.ru_stime + req["seconds"]) + 2
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
except (OSError, ValueError):
    pass
signal.signal(signal.SIGALRM, on_alarm)
results, size, over = [], 0, None
try:  # everything up to the reply, so that the one alarm is caught wherever it lands
    signal.setitimer(signal.ITIMER_REAL, req["seconds"])
    for conversation in req["conversations"]:
        try:
            text = render_jinja_template(
                conversations=[conversation],
                chat_template=req["template"],
                add_generation_prompt=req["add_generation_prompt"],
                **req["variables"],
            )[0][0]
        except (OverBudget, MemoryError):
            raise
        except Exception as exc:
            results.append({"error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        size += len(text.encode("utf-8", "surrogatepass"))
        if size > req["output"]:
            over = "output"
            break
        results.append({"text": text})
    signal.setitimer(signal.ITIMER_REAL, 0)
except OverBudget:
    over = "time"
except MemoryError:
    results = None
    over = "memory"
signal.setitimer(signal.ITIMER_REAL, 0)
reply({"over": over} if over else {"results": results})
"""


@dataclass(frozen=True)
class Rendered:
    """One conversation rendered: ``text``, or the template's ``error`` on it."""

    text: str | None
    error: str | None = None


def _over(limit: str, detail: str = "") -> ChatTemplateBudgetError:
    what = {
        "time": f"ran longer than {TIME_S:g} s",
        "memory": f"needed more than {MEMORY_BYTES // 2**20} MiB",
        "output": f"rendered more than {OUTPUT_BYTES // 1000} kB",
        "crash": "stopped the renderer",
    }.get(limit, f"stopped the renderer ({limit})")
    budget = f"{TIME_S:g} s, {OUTPUT_BYTES // 1000} kB of text, {MEMORY_BYTES // 2**20} MiB"
    return ChatTemplateBudgetError(f"the chat template {what}{detail}; it was not rendered (budget: {budget})", limit=limit)


def render_chat_template(
    template: str,
    conversations: Sequence[Sequence[Mapping[str, Any]]],
    variables: Mapping[str, Any] | None = None,
    *,
    add_generation_prompt: bool = True,
) -> list[Rendered]:
    """Render ``template`` on each conversation as ``apply_chat_template(..., tokenize=False)`` does, within the budget.

    Args:
        template: the Jinja chat template (``tokenizer.get_chat_template()``).
        conversations: lists of ``{"role", "content"}`` messages.
        variables: more template variables; pass ``tokenizer.special_tokens_map`` (``bos_token`` ...)
            for the text ``apply_chat_template`` renders.
        add_generation_prompt: as for ``apply_chat_template``.

    Returns:
        One :class:`Rendered` per conversation, in order.

    Raises:
        ChatTemplateBudgetError: the renders together ran past :data:`TIME_S`, :data:`OUTPUT_BYTES` or
            :data:`MEMORY_BYTES`, or the renderer died.
    """
    request = {
        "template": template,
        "conversations": [[dict(m) for m in c] for c in conversations],
        "variables": dict(variables or {}),
        "add_generation_prompt": add_generation_prompt,
        "seconds": TIME_S,
        "output": OUTPUT_BYTES,
        "memory": MEMORY_BYTES,
    }
    payload = json.dumps(request, default=str)
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD],
            input=payload.encode("utf-8", "surrogatepass"),
            capture_output=True,
            timeout=STARTUP_S + TIME_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise _over("time") from None
    try:
        reply = json.loads(proc.stdout.rsplit(b"\n", 1)[-1])
    except ValueError:
        tail = (proc.stderr.decode("utf-8", "replace").strip().splitlines() or [""])[-1]
        logger.debug("chat template renderer exited %s without a result: %s", proc.returncode, tail)
        # killed by RLIMIT_CPU (SIGXCPU) or a signal, out of memory while answering, or a crash
        limit = "time" if proc.returncode < 0 else "memory" if "MemoryError" in tail else "crash"
        raise _over(limit, f" (renderer exit {proc.returncode})") from None
    if reply.get("over"):
        raise _over(str(reply["over"]))
    if reply.get("setup_error"):
        return [Rendered(None, str(reply["setup_error"])) for _ in conversations]
    return [Rendered(r.get("text"), r.get("error")) for r in reply["results"]]
