"""Where compiled kernels live: a folder only this user can write, so that no one else can put a library there for
lm2 to load.

`~/.cache/lm2` (or `$XDG_CACHE_HOME/lm2`) when it and its parent belong to this user and no one else may write to
them; else a private temporary folder of this process (made 0700, removed at exit); else none, and the caller runs
without compiled kernels. A shared, predictable folder such as `/tmp/lm2-cache` is never used: another user could
create it first and plant a library in it. The key of a build includes the CPU's features (`flags` on x86,
`Features` on aarch64), so a cache on a shared home never hands one machine a library built for another's CPU.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

_temporary: tempfile.TemporaryDirectory | None = None
"""This process's private folder, when the user's cache cannot be used (kept here: removed at exit)."""


def is_private(path: Path) -> bool:
    """Owned by this user, not a symlink, and writable by no one else."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return not stat.S_ISLNK(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lm2"


def folder() -> Path | None:
    """The folder to build and load kernels in (see the module's docstring), or None."""
    global _temporary
    cache = user_cache()
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        if is_private(cache) and is_private(cache.parent):
            return cache
    except OSError:  # a read-only or missing home
        pass
    if _temporary is None:
        try:
            _temporary = tempfile.TemporaryDirectory(prefix="lm2-kernels-")  # mkdtemp: 0700, an unguessable name
        except OSError:
            return None
    return Path(_temporary.name)


def cpu_key(cpuinfo: str) -> str:
    """The CPU's feature line of /proc/cpuinfo's text: `flags` (x86) or `Features` (aarch64); "" if neither."""
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return line
    return ""


def this_cpu() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    return cpu_key(cpuinfo.read_text()) if cpuinfo.exists() else ""
