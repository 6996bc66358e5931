"""How many worker threads a pass uses (``--threads N``).

Of ``N`` threads (default: the machine's cores), one's share goes to the writers, which convert,
hash and write behind on threads of their own, and ``N - 1`` compute the merged row blocks: the
pass thread alone for 1, a pool a few blocks ahead of the writers (in order) for more.
Torch runs one intra-op thread in each (``execute_pass``): the pool is the parallelism, so cores
are not oversubscribed by OpenMP threads spinning beside the workers. Block boundaries and the
arithmetic of a block do not depend on ``N``: the output bytes are the same for every ``N``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar

from lorasave.errors import InvalidOptionError

_THREADS: ContextVar[int | None] = ContextVar("lorasave_threads", default=None)


def machine_threads() -> int:
    """The cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def requested_threads() -> int | None:
    """The value set by :func:`use_threads` (None: not set)."""
    return _THREADS.get()


def worker_threads() -> int:
    """Threads that compute merged blocks: ``N - 1`` of ``N`` threads (:func:`use_threads`, default the
    machine's cores), at least 1; one thread's share is left to the writers, which hash and write
    behind on threads of their own. Never more than the cores minus one: CPU-bound threads beyond
    the cores only time-slice (measured: 2 merge threads on 2 cores are 5-20 % slower than 1).
    """
    n = _THREADS.get()
    cores = machine_threads()
    return max(1, min(cores if n is None else n, cores) - 1)


@contextlib.contextmanager
def use_threads(n: int | None) -> Iterator[None]:
    """Run passes with ``n`` worker threads inside the block (None: the machine's cores).

    Raises:
        InvalidOptionError: ``n`` < 1.
    """
    if n is not None and n < 1:
        raise InvalidOptionError(f"threads must be at least 1, not {n}")
    token = _THREADS.set(n)
    try:
        yield
    finally:
        _THREADS.reset(token)
