"""The one progress display of a pass, used by every command that reads a base.

One bar per pass, advanced by the bytes of each tensor once every job of the pass has handed it to
its writers (the first plan's output bytes of the tensor, so a lone ``merge`` counts the bytes it
writes). Drawn by tqdm on stderr, only when asked (the CLI asks on a terminal without ``--quiet``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lorasave.plan.merge_plan import MergePlan


def pass_bar(plans: Sequence[MergePlan], *, enabled: bool, desc: str = "merge") -> tuple[Callable[[str], None], Callable[[], None]]:
    """A bar over the tensors of ``plans`` (one pass).

    Returns:
        ``(advance(tensor name), close())``; both do nothing when not ``enabled``.
    """
    if not enabled:
        return (lambda name: None), (lambda: None)
    from tqdm.auto import tqdm

    sizes: dict[str, int] = {}
    for plan in plans:
        for name, t in plan.tensors.items():
            sizes.setdefault(name, t.nbytes)
    bar: Any = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1000, desc=desc, leave=False)
    return (lambda name: bar.update(sizes.get(name, 0))), bar.close
