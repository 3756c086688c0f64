"""Pinning how many cores a thread's torch work uses.

torch's thread count is per thread, and a thread takes the count last set anywhere in the process when
it first does torch work. The server has one thread that should use every core (the engine's worker)
and a few that should use one (the head cache's loader and materialiser: a second OpenMP team of every
core, spinning after each load, took the cores from the engine's steps, 20-60% slower decoding on 2
cores). Reading the count first makes torch initialise this thread's setting, so setting it afterwards
holds whatever other threads set later.
"""

from __future__ import annotations

import torch


def pin_threads(count: int) -> None:
    """From now on, this thread's torch work uses `count` threads, whatever other threads set."""
    torch.get_num_threads()  # initialises this thread's count (from the process-wide last setting) ...
    torch.set_num_threads(count)  # ... so that this one is not overwritten at the thread's first parallel op


def pin_one_thread() -> None:
    """A thread pool initializer: helper threads compute on one core and leave the rest to the engine."""
    pin_threads(1)
