"""The `phantom-hf` console script, and what must happen before torch loads.

It lives outside the `phantom_hf` package because importing that package registers Phantom with transformers'
Auto classes, which loads torch, and two things must happen before torch loads: libgomp reads `OMP_WAIT_POLICY`
only then (`prepare_openmp_environment`), and `phantom-hf --help` should not pay for importing torch. While
`running` is set, `import phantom_hf` leaves the registration to `phantom_hf.cli.main`, which does it once the
arguments name a sub-command to run. The thread count itself is chosen by `phantom_hf.threads`.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

running = False


def prepare_openmp_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Set `OMP_WAIT_POLICY=PASSIVE` unless the environment sets it: threads that wait at the end of an OpenMP
    parallel region sleep instead of spinning on a core that the thread they wait for needs.

    libgomp (torch's OpenMP on Linux) reads the variable once, when torch loads: the `phantom-hf` command and the
    test suite call this before they import torch; in a process where torch is loaded it changes nothing (library
    users who want it set `OMP_WAIT_POLICY=PASSIVE` before starting Python). Child processes inherit it."""
    environ = os.environ if environ is None else environ
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> int:
    """Run the `phantom-hf` command line; returns its exit status (130 after Ctrl-C, as shells report it)."""
    global running
    running = True
    prepare_openmp_environment()
    from phantom_hf.cli import main as cli_main

    try:
        return cli_main()
    except KeyboardInterrupt:
        return 130
