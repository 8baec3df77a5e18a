"""How many CPU threads torch runs phantom-hf's CPU work on: decided here, for the demo, the trainer, the command line
and the tests.

Why: torch's bundled GNU OpenMP runs an intra-op team of one thread per core, and at the end of every parallel region
the first thread spins, waiting for the others. On a 2-core machine with one other busy process, the partner thread
cannot be scheduled while the waiter spins, and a training step of the demo's 0.77M-parameter model took 3-45 s
instead of 0.1-0.3 s (about 80 % of a step's samples were inside libgomp's waits). With one thread nothing waits
for a partner, so small models run on one thread. For larger ones (and for a count the user chose) the command line and the test suite also
set a passive OpenMP wait policy before torch loads (`phantom_hf_launch.prepare_openmp_environment`: waiting threads
sleep instead of spinning).
"""

from __future__ import annotations

import os
from typing import Any

# Below this many parameters a model runs on one intra-op thread (the demo's has 0.77M, the tests' fewer;
# Phantom-0.5B has 0.5B, where a second core speeds every matrix product up).
SMALL_MODEL_PARAMETERS = 100_000_000

# The environment variables with which a user chooses torch's CPU thread count (torch reads both).
THREAD_COUNT_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def user_chose_thread_count() -> bool:
    """Whether the user chose torch's intra-op thread count: `OMP_NUM_THREADS` or `MKL_NUM_THREADS` is set, or
    `torch.set_num_threads` changed it from torch's own default (one thread per physical core, the default size of
    torch's inter-op pool, which `set_num_threads` leaves alone)."""
    import torch

    if any(os.environ.get(name, "").strip() for name in THREAD_COUNT_VARIABLES):
        return True
    return torch.get_num_threads() != torch.get_num_interop_threads()


def use_cpu_thread_policy(model: Any | None = None) -> int:
    """Run torch's CPU work on one intra-op thread when the work is small and the user chose no thread count.

    `model`: the model about to run; the policy applies when its parameters are on the CPU and fewer than
    `SMALL_MODEL_PARAMETERS`. None: the caller's work is small (the demo, the tests). A chosen count
    (`OMP_NUM_THREADS`, `MKL_NUM_THREADS`, `torch.set_num_threads`) is kept. Returns the intra-op thread count
    in force afterwards.
    """
    import torch

    if model is not None:
        parameters = list(model.parameters())
        on_cpu = all(parameter.device.type == "cpu" for parameter in parameters)
        if not on_cpu or sum(parameter.numel() for parameter in parameters) >= SMALL_MODEL_PARAMETERS:
            return torch.get_num_threads()
    if not user_chose_thread_count():
        torch.set_num_threads(1)
    return torch.get_num_threads()


__all__ = [
    "SMALL_MODEL_PARAMETERS",
    "THREAD_COUNT_VARIABLES",
    "use_cpu_thread_policy",
    "user_chose_thread_count",
]
