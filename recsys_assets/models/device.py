"""Where torch work runs, and how it is made repeatable.

The pipeline scores on CUDA when the machine has it and on the CPU otherwise; an operator
can pin either with `RECSYS_DEVICE=cpu|cuda` (e.g. to keep a shared GPU free, or to
reproduce a CPU run bit for bit).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

DEVICE_ENV_VAR = "RECSYS_DEVICE"
_CHOICES = ("cpu", "cuda")


def pick_device(prefer: str | None = None) -> torch.device:
    """`prefer`, else `RECSYS_DEVICE`, else CUDA when available, else the CPU.

    Asking for CUDA on a machine without it is an error rather than a silent CPU run, so a
    misconfigured GPU worker fails loudly instead of running 50× slower.
    """
    choice = prefer if prefer is not None else os.environ.get(DEVICE_ENV_VAR)
    if choice is None or choice == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choice = choice.strip().lower()
    if choice not in _CHOICES:
        source = "pick_device(prefer=...)" if prefer is not None else f"${DEVICE_ENV_VAR}"
        raise ValueError(f"{source} is {choice!r}; use one of {list(_CHOICES)}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"CUDA was requested ({DEVICE_ENV_VAR} or prefer='cuda') but torch sees no GPU; "
            f"unset {DEVICE_ENV_VAR} or set it to 'cpu'"
        )
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch; on CUDA also ask for deterministic kernels.

    The CPU kernels the models use (embedding lookups, matmul, softmax, Adam) are
    deterministic for a fixed thread count, so on the CPU a seed fixes the result. On
    CUDA, `use_deterministic_algorithms` (warn_only: ops without a deterministic variant
    stay usable) and cuDNN's deterministic mode make runs repeatable as far as CUDA allows.
    It is not called on CPU-only machines because it imports torch's compiler stack
    (seconds of start-up) for no effect there.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
