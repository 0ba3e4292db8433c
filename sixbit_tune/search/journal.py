"""The journal file storage of one host's searches, recovering from a process killed in the middle of a write.

Optuna's ``JournalFileBackend`` appends each batch of operations as JSON lines under its lock file. A process
killed in the middle of that write leaves a last line without its newline (or without its end). Optuna skips such
a last line when reading, but the next append is glued to it, and from then on every read of the journal fails
(``JSONDecodeError``) — the study is unreadable for good.

:class:`RecoveringJournalBackend` prevents and repairs that:

* before each append (under the journal's lock), a last line without a newline is moved aside: its bytes are
  appended to ``<journal>.damaged-<time>-<pid>`` and the journal is truncated to its last whole line;
* when the storage is opened, the journal is checked; a damaged tail (a partial last line, or lines at the end
  that are not JSON) is moved aside the same way. A damaged line with whole lines after it (a partial write
  with a later append glued to it) is repaired: the glued operation is kept, the partial one dropped, and the
  whole original file is copied to the backup first.

Each repair emits a :class:`JournalRepairedWarning` naming the backup file. An operation cut by the crash was
never acknowledged to its writer (that process died), so nothing a live process wrote is lost.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file

#: Every operation the journal holds is a JSON object whose first key is ``op_code``.
_OP_START = b'{"op_code"'


class JournalRepairedWarning(UserWarning):
    """A damaged Optuna journal file was repaired; the message names the backup of what was removed."""


def _parse(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return False


def _salvage(line: bytes) -> bytes | None:
    """The whole operation glued after a partial one in ``line`` (without its newline), or None."""
    start = line.find(_OP_START, 1)
    while start != -1:
        if _parse(line[start:]):
            return line[start:]
        start = line.find(_OP_START, start + 1)
    return None


def scan(data: bytes) -> tuple[int, bytes | None]:
    """Check journal bytes. Returns ``(good, repaired)``.

    ``good`` is the length of the longest prefix made of whole, valid lines. ``repaired`` is None when every line
    after that prefix is damaged (a damaged tail: truncating at ``good`` repairs it) or there is none; else the
    repaired content (valid lines kept, glued operations salvaged, the rest dropped).
    """
    lines = data.split(b"\n")
    lines.pop()  # bytes after the last newline ('' when the file ends with one): never a whole line
    offset = 0
    good = None
    for i, line in enumerate(lines):
        if not _parse(line):
            good = offset
            rest = lines[i:]
            break
        offset += len(line) + 1
    else:
        return offset, None
    if not any(_parse(x) or _salvage(x) is not None for x in rest):
        return good, None
    kept = [x if _parse(x) else _salvage(x) for x in rest]
    repaired = data[:good] + b"".join(x + b"\n" for x in kept if x is not None)
    return good, repaired


def _backup_path(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S")
    return path.with_name(f"{path.name}.damaged-{stamp}-{os.getpid()}")


class RecoveringJournalBackend(JournalFileBackend):
    """``JournalFileBackend`` that repairs a journal damaged by a killed writer (see the module docstring)."""

    def __init__(self, file_path: str) -> None:
        super().__init__(file_path)
        self._path = Path(file_path)
        self.repair()

    def repair(self) -> Path | None:
        """Check the whole journal; move a damaged tail aside or repair damaged lines. Returns the backup, if any.

        The check reads without the lock; only a damaged journal is locked, checked again and rewritten. A journal
        that cannot be written (a read-only store) is left as it is, with a warning saying so.
        """
        data = self._path.read_bytes()
        good, repaired = scan(data)
        if good == len(data):
            return None
        try:
            with get_lock_file(self._lock):
                data = self._path.read_bytes()
                good, repaired = scan(data)
                if good == len(data):
                    return None
                backup = _backup_path(self._path)
                if repaired is None:
                    self._move_tail_aside(good, data[good:], backup)
                    what = f"its last {len(data) - good} byte(s) (a write cut short)"
                else:
                    backup.write_bytes(data)
                    tmp = self._path.with_name(self._path.name + f".repair-{os.getpid()}")
                    with open(tmp, "wb") as f:
                        f.write(repaired)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self._path)
                    what = (f"{len(data) - len(repaired)} byte(s) of damaged lines (a write cut short, with later "
                            "writes glued to it); the original journal is copied")
        except (OSError, RuntimeError) as e:  # the lock cannot be taken (Optuna's lock raises RuntimeError then)
            warnings.warn(
                f"the Optuna journal {self._path} is damaged after byte {good} (a write cut short) and cannot be "
                f"repaired here ({type(e).__name__}: {e}); open it once with write access to repair it",
                JournalRepairedWarning, stacklevel=2,
            )
            return None
        warnings.warn(
            f"the Optuna journal {self._path} was damaged by a process killed while writing: {what} moved aside "
            f"to {backup}; the study goes on from the intact journal",
            JournalRepairedWarning, stacklevel=2,
        )
        return backup

    def _move_tail_aside(self, good: int, tail: bytes, backup: Path) -> None:
        with open(backup, "ab") as f:
            f.write(tail)
            f.flush()
            os.fsync(f.fileno())
        os.truncate(self._path, good)

    def append_logs(self, logs: list[dict]) -> None:
        what_to_write = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
        with get_lock_file(self._lock):
            with open(self._file_path, "ab+") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                if size:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        # a writer died in the middle of its line: set that part aside, never glue to it
                        f.seek(0)
                        data = f.read()
                        good = data.rfind(b"\n") + 1
                        backup = _backup_path(self._path)
                        self._move_tail_aside(good, data[good:], backup)
                        warnings.warn(
                            f"the Optuna journal {self._path} ended in a partial line (a process killed while "
                            f"writing): its last {len(data) - good} byte(s) moved aside to {backup}",
                            JournalRepairedWarning, stacklevel=2,
                        )
                f.write(what_to_write.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
