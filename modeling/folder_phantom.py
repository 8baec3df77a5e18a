"""Writing a model folder atomically: the one writer of `save_pretrained` and `phantom-hf convert` (docs/design.md).

Hub remote code: imports only the standard library.

`write_folder(folder, write)` lets `write` fill a new hidden folder beside `folder` (a staging name unique to the
host, process and call), then swaps it in with one rename. Readers and concurrent writers therefore see the old
folder or a new one whole, never a mix: two saves into one folder at once end as one model or the other, and a
process killed at any point leaves the old folder as it was (or, after the swap, the new one complete). On Linux
the swap of an existing folder is one atomic exchange (`renameat2(RENAME_EXCHANGE)`); elsewhere the old folder is
renamed aside and the new one renamed in, and a process killed between those two renames leaves the old folder
under its aside name, which the next write into the same folder renames back.

Leftovers of killed writers (`.{name}.staging-*`, `.{name}.old-*` beside the folder, named with a hash of the
host name and the process id) are cleaned by the next write into the same folder once their process is gone; on
systems where a process cannot be probed safely (not POSIX) they are only reported.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

# Weight files a model save replaces as a set: one file, or shards and their index (with an optional variant).
WEIGHT_FILE = re.compile(r"model(\.[\w-]+)?(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(r"\.(?P<kind>staging|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}")


def _sibling(folder: Path, kind: str) -> Path:
    """A new hidden name beside `folder` for a staging ("staging") or set-aside ("old") folder of this process."""
    return folder.parent / f".{folder.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def clear_leftovers(folder: str | Path) -> list[Path]:
    """Clean what killed writers into `folder` left beside it: a set-aside old folder is renamed back when `folder`
    is missing (the writer died between its two renames), other leftovers are removed. Leftovers of live processes,
    or of other hosts (a shared file system), are kept. Returns the leftovers handled."""
    folder = Path(folder)
    prefix = f".{folder.name}."
    if not folder.parent.is_dir():
        return []
    found = []
    for path in folder.parent.iterdir():
        match = _LEFTOVER.fullmatch(path.name[len(prefix) - 1 :]) if path.name.startswith(prefix) else None
        if match and path.is_dir() and not path.is_symlink():
            found.append((path, match))
    if found and os.name != "posix":
        logger.warning("folders left by interrupted writes into %s, safe to delete once none runs: %s", folder, [p for p, _ in found])
        return []
    stale = [(path, match) for path, match in found if match["host"] == _HOST and not _owner_alive(int(match["pid"]))]
    for path, match in sorted(stale, key=lambda item: item[1]["kind"] != "old"):
        if match["kind"] == "old" and not os.path.lexists(folder):
            try:
                os.rename(path, folder)
                logger.warning("restored %s from %s, set aside by a write that was killed", folder, path.name)
                continue
            except OSError:  # another writer put a folder there meanwhile
                pass
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        logger.warning("cleaned up %d folder(s) left by interrupted writes into %s", len(stale), folder)
    return [path for path, _ in stale]


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (no data copied, the same file under a second name), or a copy where links are not supported."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _carry_over(old: Path, new: Path) -> None:
    """Give `new` the entries of the existing folder `old` that the new save did not write (a tokenizer, a model card,
    checkpoints of a training run), except the earlier weight files of the variant the new save replaced. Files are
    hard-linked, so carrying them costs no copy; they are never written in place afterwards."""
    written = {path.name for path in new.iterdir()}
    variants = {match.group(1) for match in map(WEIGHT_FILE.fullmatch, written) if match}
    try:
        entries = list(old.iterdir())
    except FileNotFoundError:  # swapped out meanwhile by another writer
        return
    for entry in entries:
        match = WEIGHT_FILE.fullmatch(entry.name)
        if entry.name in written or (match and match.group(1) in variants):
            continue
        target = new / entry.name
        try:
            if entry.is_symlink():
                os.symlink(os.readlink(entry), target)
            elif entry.is_dir():
                shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(entry), str(target))
        except FileNotFoundError:  # removed meanwhile (another writer swapped the folder out)
            shutil.rmtree(target, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool | None:
    """Swap two existing paths atomically (Linux `renameat2(RENAME_EXCHANGE)`): True when swapped, False where the
    system or file system cannot, None when `second` is gone (another writer set it aside)."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.ENOENT:
        return None
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _not_an_empty_folder(folder: Path) -> ValueError:
    return ValueError(f"destination {str(folder)!r} exists and is not an empty folder; choose a new one")


def check_new_or_empty(folder: str | Path) -> None:
    """`ValueError` unless `folder` is absent or an empty folder: where `write_folder(..., replace=False)` may write."""
    folder = Path(folder)
    if os.path.lexists(folder) and (not folder.is_dir() or any(folder.iterdir())):
        raise _not_an_empty_folder(folder)


def _swap_in(staging: Path, folder: Path, replace: bool) -> None:
    """Make the complete `staging` folder `folder` in one rename; with `replace`, an existing folder is swapped out
    (deleted, or left in `staging`'s place by an exchange for the caller to delete). Another writer swapping in between is retried."""
    for _ in range(100):
        try:
            os.rename(staging, folder)  # `folder` absent, or (POSIX) an empty folder
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if not replace:
            raise _not_an_empty_folder(folder)
        swapped = _exchange(staging, folder)
        if swapped:
            return
        if swapped is None:
            continue
        aside = _sibling(folder, "old")
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            continue  # another writer set it aside first
        try:
            os.rename(staging, folder)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                os.rename(aside, folder)
                raise
            shutil.rmtree(aside, ignore_errors=True)  # another writer's folder went in first: swap again
            continue
        shutil.rmtree(aside, ignore_errors=True)
        return
    raise OSError(errno.EBUSY, "other writers kept replacing the folder", str(folder))


def write_folder(
    folder: str | Path,
    write: Callable[[Path], None],
    *,
    replace: bool = True,
    complete: Callable[[Path], None] | None = None,
) -> Path:
    """Run `write(staging)` into a new staging folder beside `folder`, then swap it in as `folder` with one rename.

    `replace=False`: `folder` must be absent or empty (`ValueError` otherwise, before or after writing; nothing is
    changed). `replace=True`: an existing folder is replaced as a whole; the entries of it that the new save did not
    write are carried over (hard links), except earlier weight files of the variant the save replaced (old shards).
    `complete(staging)` then runs before the swap (to add files that depend on what was carried over). If `write`
    or `complete` fails, the staging folder is removed and `folder` is untouched. Where no folder can be made beside
    `folder` (a read-only parent), or `folder` holds the working directory (a swap would strand it in the old
    folder), `replace=True` writes into `folder` itself, without these guarantees (logged).
    Returns the resolved `folder`."""
    folder = Path(folder).resolve()
    if os.path.lexists(folder) and not folder.is_dir():
        raise ValueError(f"{str(folder)!r} exists and is not a folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(folder)
    if not replace:
        check_new_or_empty(folder)
    staging = _sibling(folder, "staging")
    try:
        if replace and Path.cwd().resolve().is_relative_to(folder):
            raise OSError(errno.EBUSY, "it holds the working directory, which a swap would leave behind")
        staging.mkdir()
    except OSError as error:
        if not replace:
            raise
        logger.warning("cannot write beside %s (%s): writing into it directly, not atomically", folder, error)
        folder.mkdir(exist_ok=True)
        write(folder)
        if complete is not None:
            complete(folder)
        return folder
    try:
        write(staging)
        if replace and folder.is_dir():
            _carry_over(folder, staging)
        if complete is not None:
            complete(staging)
        _swap_in(staging, folder, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


__all__ = ["WEIGHT_FILE", "check_new_or_empty", "clear_leftovers", "write_folder"]
