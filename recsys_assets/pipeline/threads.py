"""Threads a parallel kernel may use where it runs.

A shard step spreads its subjects over `pipeline.step_threads` blocks on as many threads
(`in_subject_blocks`). A kernel that has its own threads (faiss's OpenMP team, the
retrieval's rescoring pool) would otherwise start the process's full count in every block:
N blocks × N threads on N cores. Inside a block it takes the block's share instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

_SHARE: ContextVar[int | None] = ContextVar("recsys_thread_share", default=None)
T = TypeVar("T")
R = TypeVar("R")


def thread_share(default: int) -> int:
    """The threads a kernel called here may use: the share of the block it runs in, else
    `default` (the process's count)."""
    share = _SHARE.get()
    return default if share is None else share


@contextmanager
def sharing(threads: int) -> Iterator[None]:
    """Kernels called in this block (on this thread) use `threads` threads."""
    token = _SHARE.set(max(1, threads))
    try:
        yield
    finally:
        _SHARE.reset(token)


def with_share(threads: int, work: Callable[[T], R]) -> Callable[[T], R]:
    """`work`, run with `threads` as its kernels' share (for a thread pool's tasks, which
    start without the submitting thread's context)."""

    def run(argument: T) -> R:
        with sharing(threads):
            return work(argument)

    return run
