"""PEFT's module-name regexes, matched with bounded work.

An ``adapter_config.json`` carries regular expressions that PEFT matches against module names:
``target_modules`` / ``exclude_modules`` given as one string (``re.fullmatch``, peft
``utils/other.py`` ``match_target_against_key``), the keys of ``rank_pattern`` / ``alpha_pattern``
(``re.match(rf"(.*\\.)?({key})$", name)``, ``get_pattern_key``), ``modules_to_save`` entries
(``re.match(rf"(^|.*\\.){m}($|\\..*)", name)``) and ``layers_pattern``. A hostile key such as
``([\\w.]+)+!`` makes Python's backtracking ``re`` run for hours on an ordinary module name.

Each regex is matched here with the same result as Python's ``re`` (what PEFT uses), in bounded time:

- **google-re2** (linear time) when the regex translates to it exactly: the pattern is parsed with
  Python's own parser and written out node by node in RE2 syntax, so both engines see the same
  expression; non-empty names of printable ASCII only, where the two engines' ``$``, ``\\w``,
  ``\\s``, ``\\B`` and case folding agree. Lookaround, backreferences, conditionals, possessive and
  atomic groups have no RE2 form.
- otherwise **Python's ``re`` in a child process** killed after :data:`BUDGET_S` seconds (a thread
  cannot interrupt ``re``): :class:`~lorasave.errors.PatternTimeoutError`.

Patterns longer than :data:`MAX_PATTERN_CHARS` characters are refused before any matching.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lorasave.errors import PatternError, PatternTimeoutError
from lorasave.util.printable import escape

try:  # Python 3.11+
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

#: Longest pattern (characters of the user's text) accepted.
MAX_PATTERN_CHARS = 8192
#: Seconds Python's ``re`` may take, in the child process, for all names of one call.
BUDGET_S = 2.0
#: Extra seconds allowed for the child interpreter to start.
_STARTUP_S = 3.0

Mode = Literal["match", "fullmatch"]


@dataclass(frozen=True)
class Rule:
    """One regex PEFT builds from a config value.

    Attributes:
        field: the config field (``rank_pattern``, ``target_modules``, ...), for messages.
        key: the user's text (the pattern key or value).
        regex: the full regex PEFT compiles (``key`` embedded in PEFT's template).
        mode: ``"match"`` (``re.match``) or ``"fullmatch"``.
    """

    field: str
    key: str
    regex: str
    mode: Mode


def _label(rule: Rule) -> str:
    return f"{rule.field} key" if rule.field in ("rank_pattern", "alpha_pattern") else rule.field


def _shown(key: str) -> str:
    text = key if len(key) <= 80 else key[:77] + "..."
    return repr(text)


def _where(source: Path | None) -> str:
    return f"{source}: " if source is not None else ""


def validate(rule: Rule, source: Path | None = None) -> re.Pattern[str]:
    """Check the pattern's length and that Python's ``re`` compiles it (as PEFT will).

    Raises:
        PatternError: longer than :data:`MAX_PATTERN_CHARS`, or not a valid regular expression.
    """
    if len(rule.key) > MAX_PATTERN_CHARS:
        raise PatternError(
            f"{_where(source)}{_label(rule)} {_shown(rule.key)} is {len(rule.key)} characters long; "
            f"patterns are limited to {MAX_PATTERN_CHARS} characters, shorten it",
            path=source,
        )
    try:
        return re.compile(rule.regex)
    except re.error as e:
        raise PatternError(f"{_where(source)}{_label(rule)} {_shown(rule.key)} is not a valid regular expression ({e}); fix the pattern", path=source) from None
    except (RecursionError, OverflowError, MemoryError):
        raise PatternError(
            f"{_where(source)}{_label(rule)} {_shown(rule.key)} is not a valid regular expression (nested too deeply); fix the pattern", path=source
        ) from None


# ------------------------------------------------------------------ Python parse tree -> RE2


class _NoRe2(Exception):
    """The regex has no exact RE2 form."""


_CATEGORIES = {
    _c.CATEGORY_DIGIT: r"\d",
    _c.CATEGORY_NOT_DIGIT: r"\D",
    _c.CATEGORY_SPACE: r"\s",
    _c.CATEGORY_NOT_SPACE: r"\S",
    _c.CATEGORY_WORD: r"\w",
    _c.CATEGORY_NOT_WORD: r"\W",
}
# Subjects are printable ASCII (no newline), so ^ and $ in any mode mean the ends of the string.
_AT = {
    _c.AT_BEGINNING: r"\A",
    _c.AT_BEGINNING_STRING: r"\A",
    _c.AT_END: r"\z",
    _c.AT_END_STRING: r"\z",
    _c.AT_BOUNDARY: r"\b",
    _c.AT_NON_BOUNDARY: r"\B",
}


def _char(code: int, ignorecase: bool) -> str:
    if ignorecase and code > 0x7F:  # Python and RE2 fold non-ASCII case differently
        raise _NoRe2
    return f"\\x{{{code:x}}}"


def _class_item(op: Any, av: Any, ignorecase: bool) -> str:
    if op is _c.LITERAL:
        return _char(av, ignorecase)
    if op is _c.RANGE:
        return f"{_char(av[0], ignorecase)}-{_char(av[1], ignorecase)}"
    if op is _c.CATEGORY and av in _CATEGORIES:
        return _CATEGORIES[av]
    raise _NoRe2


def _to_re2(items: Iterable[tuple[Any, Any]], ignorecase: bool) -> str:
    out = []
    for op, av in items:
        if op is _c.LITERAL:
            out.append(_char(av, ignorecase))
        elif op is _c.NOT_LITERAL:
            out.append(f"[^{_char(av, ignorecase)}]")
        elif op is _c.ANY:
            out.append(".")
        elif op is _c.IN:
            negate = bool(av) and av[0][0] is _c.NEGATE
            body = "".join(_class_item(o, a, ignorecase) for o, a in (av[1:] if negate else av))
            out.append(f"[{'^' if negate else ''}{body}]")
        elif op is _c.BRANCH:
            out.append("(?:" + "|".join(_to_re2(alt, ignorecase) for alt in av[1]) + ")")
        elif op is _c.SUBPATTERN:
            _, add, remove, sub = av
            ic = (ignorecase or bool(add & _c.SRE_FLAG_IGNORECASE)) and not remove & _c.SRE_FLAG_IGNORECASE
            out.append(f"(?{'i' if ic else '-i'}:{_to_re2(sub, ic)})")
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            lo, hi, sub = av
            count = f"{{{lo},}}" if hi is _c.MAXREPEAT else f"{{{lo},{hi}}}"
            out.append(f"(?:{_to_re2(sub, ignorecase)}){count}{'?' if op is _c.MIN_REPEAT else ''}")
        elif op is _c.AT and av in _AT:
            out.append(_AT[av])
        else:  # lookaround, backreference, conditional, possessive or atomic group
            raise _NoRe2
    return "".join(out)


def re2_form(regex: str, mode: Mode) -> str | None:
    """The RE2 regex whose search equals ``re.<mode>(regex, name)`` on printable-ASCII names, or None."""
    try:
        parsed = _sre_parse.parse(regex)
        body = _to_re2(parsed, bool(parsed.state.flags & _c.SRE_FLAG_IGNORECASE))
    except (_NoRe2, re.error, RecursionError):
        return None
    return rf"\A(?:{body})" + (r"\z" if mode == "fullmatch" else "")


def _re2_compile(regex: str, mode: Mode) -> Any | None:
    form = re2_form(regex, mode)
    if form is None:
        return None
    try:
        import re2
    except ImportError:
        return None
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(form, options)
    except re2.error:  # a repeat count over 1000, a program too large
        return None


def _re2_safe(name: str) -> bool:
    # printable ASCII: no newline for $ to stop before, no Unicode classes or case folding to differ;
    # not empty: Python before 3.14 never matches \B in an empty string, RE2 does
    return bool(name) and name.isascii() and name.isprintable()


# ------------------------------------------------------------------ Python re in a child process

_CHILD = """
import json, re, sys
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
except Exception:
    pass
job = json.load(sys.stdin)
res = []
for i, (rx, mode, names) in enumerate(job):
    sys.stdout.write(f"{i}\\n")
    sys.stdout.flush()
    fn = getattr(re.compile(rx), mode)
    res.append([fn(n) is not None for n in names])
sys.stdout.write(json.dumps(res) + "\\n")
"""


def _run_child(jobs: list[tuple[Rule, list[str]]], source: Path | None, budget: float) -> list[list[bool]]:
    payload = json.dumps([(rule.regex, rule.mode, names) for rule, names in jobs])
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _CHILD],
            input=payload,
            capture_output=True,
            text=True,
            encoding="ascii",
            errors="replace",
            timeout=budget + _STARTUP_S,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode("ascii", "replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        started = [int(x) for x in out.split() if x.isdigit()]
        rule = jobs[started[-1]][0] if started else jobs[0][0]
        raise PatternTimeoutError(
            f"{_where(source)}{_label(rule)} {_shown(rule.key)} did not finish matching module names within {budget:g} s "
            "(catastrophic backtracking); simplify the pattern, PEFT would hang on it too",
            path=source,
            pattern=rule.key,
            budget_s=budget,
        ) from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        started = [int(x) for x in lines if x.isdigit()]
        rule = jobs[started[-1]][0] if started else jobs[0][0]
        raise PatternError(f"{_where(source)}{_label(rule)} {_shown(rule.key)} could not be matched ({escape(last)}); simplify the pattern", path=source)
    result: list[list[bool]] = json.loads(lines[-1])
    return result


def match_table(
    rules: Sequence[Rule], names: Sequence[str], *, source: Path | None = None, budget: float | None = None, engine: str = "auto"
) -> list[list[bool]]:
    """For each rule, whether ``re.<mode>(rule.regex, name)`` matches each name.

    Args:
        rules: the regexes (validated here first).
        names: module names.
        source: the config file, named in messages.
        budget: seconds Python's ``re`` may run in the child process (default :data:`BUDGET_S`).
        engine: ``"auto"`` (RE2 where exact, else ``re`` in a child), or ``"re"`` (always ``re``
            in a child: to learn whether PEFT, which uses ``re``, finishes).

    Returns:
        ``table[i][j]``: rule ``i`` matches ``names[j]``.

    Raises:
        PatternError: a pattern too long or invalid.
        PatternTimeoutError: Python's ``re`` did not finish within ``budget``.
    """
    for rule in rules:
        validate(rule, source)
    table: list[list[bool]] = [[False] * len(names) for _ in rules]
    jobs: list[tuple[Rule, list[str]]] = []
    slots: list[tuple[int, list[int]]] = []
    for i, rule in enumerate(rules):
        compiled = _re2_compile(rule.regex, rule.mode) if engine == "auto" else None
        pending = []
        for j, name in enumerate(names):
            if compiled is not None and _re2_safe(name):
                table[i][j] = compiled.search(name) is not None
            else:
                pending.append(j)
        if pending:
            jobs.append((rule, [names[j] for j in pending]))
            slots.append((i, pending))
    if jobs:
        found_all = _run_child(jobs, source, BUDGET_S if budget is None else budget)
        for (i, pending), found in zip(slots, found_all, strict=True):
            for j, hit in zip(pending, found, strict=True):
                table[i][j] = hit
    return table


# ------------------------------------------------------------------ PEFT's uses


def pattern_rules(field: str, keys: Iterable[str]) -> list[Rule]:
    """``rank_pattern`` / ``alpha_pattern`` keys as PEFT's ``get_pattern_key`` matches them."""
    return [Rule(field, key, rf"(.*\.)?({key})$", "match") for key in keys]


def pattern_keys(field: str, patterns: Mapping[str, Any], names: Sequence[str], *, source: Path | None = None) -> dict[str, str | None]:
    """For each module name, the first key of ``patterns`` (dict order) that PEFT's ``get_pattern_key`` matches, or None.

    Raises:
        PatternError, PatternTimeoutError: see :func:`match_table`.
    """
    keys = list(patterns)
    found: dict[str, str | None] = dict.fromkeys(names)
    if not keys or not names:
        return found
    table = match_table(pattern_rules(field, keys), names, source=source)
    for j, name in enumerate(names):
        found[name] = next((keys[i] for i in range(len(keys)) if table[i][j]), None)
    return found


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any, keys: Mapping[str, str | None]) -> Any:
    """``patterns[get_pattern_key(patterns, module)]`` with PEFT's fallback, given :func:`pattern_keys`' result."""
    key = keys.get(module)
    return patterns[key] if key is not None else patterns.get(module, default)


def target_rules(config: Mapping[str, Any]) -> list[Rule]:
    """The regexes PEFT builds from ``target_modules``, ``exclude_modules``, ``modules_to_save`` and ``layers_pattern``."""
    rules: list[Rule] = []
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if isinstance(value, str):
            rules.append(Rule(field, value, value, "fullmatch"))
    for m in config.get("modules_to_save") or []:
        if isinstance(m, str):
            rules.append(Rule("modules_to_save", m, rf"(^|.*\.){m}($|\..*)", "match"))
    layers = config.get("layers_pattern")
    for p in [layers] if isinstance(layers, str) else (layers if isinstance(layers, list) else []):
        if isinstance(p, str) and p:
            rules.append(Rule("layers_pattern", p, rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", "match"))
    return rules


def target_matches(target_modules: str | Sequence[str], names: Sequence[str], *, source: Path | None = None) -> list[bool]:
    """Whether PEFT's ``check_target_module_exists`` finds each name in ``target_modules`` (before exclusions).

    A string is ``re.fullmatch``-ed; a list matches a name equal to an entry or ending in ``.entry``.

    Raises:
        PatternError, PatternTimeoutError: see :func:`match_table`.
    """
    if isinstance(target_modules, str):
        return match_table([Rule("target_modules", target_modules, target_modules, "fullmatch")], names, source=source)[0]
    entries = set(target_modules)
    return [n in entries or any(n.endswith(f".{t}") for t in target_modules) for n in names]


def check_peft_patterns(config: Mapping[str, Any], names: Sequence[str], *, source: Path | None = None, budget: float | None = None) -> None:
    """Make sure PEFT's own ``re`` matching of this config's patterns over ``names`` finishes.

    ``PeftModel.from_pretrained`` matches the patterns with Python's ``re`` in the calling process
    and cannot be interrupted, so they are tried first, with ``re``, in a child process under ``budget``.

    Raises:
        PatternError: a pattern too long or invalid.
        PatternTimeoutError: ``re`` did not finish within ``budget``: PEFT would hang.
    """
    rules = target_rules(config)
    for field in ("rank_pattern", "alpha_pattern"):
        value = config.get(field)
        if isinstance(value, Mapping):
            rules += pattern_rules(field, [k for k in value if isinstance(k, str)])
    if rules and names:
        match_table(rules, names, source=source, budget=budget, engine="re")
