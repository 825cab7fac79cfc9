"""Writing files that several processes share: atomically, under names no other process uses.

Any number of supervisors, workers and commands may write the same file at once (the last good
pipeline, a server's record, an artifact). Each writes a temporary file of its own, made by
``tempfile`` in the target's directory, and renames it over the target: a reader sees the old
file or the new one, never half of one, and no writer can remove another's temporary file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
STATE_GITIGNORE = (
    b"# levers' local state (servers, artifacts, locks): none of it belongs in version control\n*\n"
)


def write_atomically(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Replace ``path`` with ``data`` in one rename; the file gets ``mode`` (owner only by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_private(directory: Path) -> None:
    """Create ``directory`` if needed and make it and everything in it the owner's alone.

    What an earlier version left readable by others (0755 directories, 0644 files) is closed too.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    os.chmod(directory, PRIVATE_DIR)
    for root, dirs, names in os.walk(directory):
        for name, mode in [*((d, PRIVATE_DIR) for d in dirs), *((n, PRIVATE_FILE) for n in names)]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def make_state_dir(directory: Path) -> Path:
    """Create levers' state directory (``.levers/`` beside a pipeline file) with a .gitignore that
    keeps everything in it out of version control, whatever levers writes there later."""
    directory.mkdir(parents=True, exist_ok=True)
    ignore = directory / ".gitignore"
    if not ignore.exists():
        write_atomically(ignore, STATE_GITIGNORE, mode=0o644)
    return directory
