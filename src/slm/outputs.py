"""Where commands write: a new directory or file that cannot destroy what is already there.

An output is made in a hidden sibling (``.NAME.XXXX.partial``) and renamed into place only when it is
complete, so a failure leaves nothing half made and no empty directory. A path that already holds
something is replaced only when asked (``force``, the CLI's --force), and never when it holds the
command's own input.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from slm.errors import SlmError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NO_ROOM = (*DISK_FULL, errno.EFBIG)  # and a file-size limit (ulimit -f)


class OutputError(SlmError):
    """An output path that would destroy something, or that cannot be written."""


def free_space(path: Path) -> str:
    """Free space on the filesystem that holds ``path`` (or its nearest existing parent), for messages."""
    for folder in (path, *path.parents):
        if folder.exists():
            free = shutil.disk_usage(folder).free
            return f"{free / 2**20:,.1f} MiB free" if free < 2**30 else f"{free / 2**30:,.1f} GiB free"
    return "free space unknown"


def write_error(e: OSError, path: Path) -> str:
    """One line for an OSError met while writing ``path``: what failed, where, and for a full disk how much
    room is left."""
    where = e.filename or path
    if e.errno in DISK_FULL:
        return f"no space left on the device writing {where} ({free_space(Path(where))})"
    if e.errno == errno.EFBIG:
        return f"cannot write {where}: larger than this process may write (ulimit -f)"
    return f"cannot write {where}: {e.strerror or e}"


def os_error_line(e: OSError) -> str:
    """An OSError the user can act on (a full disk, a read-only filesystem, a permission) in one line."""
    if e.errno in NO_ROOM:
        return write_error(e, Path.cwd())
    return f"{e.filename}: {e.strerror}" if e.filename else str(e.strerror or e)


def describe(path: Path) -> str:
    """What a directory or file holds, in a few words, for the message that refuses to replace it."""
    if not path.is_dir():
        return f"a file of {path.stat().st_size:,} bytes"
    names = sorted(p.name for p in path.iterdir())
    listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{kind_of_directory(path)} ({listed})"


def kind_of_directory(path: Path) -> str:
    config = path / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            data = {}
        if isinstance(data, dict) and data.get("format") == "slm-checkpoint":
            return "an slm checkpoint"
        if isinstance(data, dict) and "model_type" in data:
            return "a Hugging Face model"
    if (path / "meta.json").is_file() and (path / "train.bin").is_file():
        return "an earlier `slm prepare` output"
    if (path / "metrics.jsonl").is_file() or (path / "last").is_dir():
        return "a training run"
    return "files"


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_sources(out: Path, sources: Iterable[str | Path], flag: str = "--out") -> None:
    """Refuse an output that is one of the command's inputs, holds one, or already exists inside one."""
    target = out.resolve()
    for source in sources:
        src = Path(source).resolve()
        if target == src or target in src.parents or (out.exists() and src in target.parents):
            raise OutputError(f"{flag} {out} would overwrite {source}, which this command reads; choose another "
                              f"{flag}")


def check_replaceable(out: Path, force: bool, flag: str = "--out") -> None:
    """An output path must be free (missing, or an empty directory) unless ``force`` says to replace it."""
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{flag} {out} is a broken symbolic link (to {os.readlink(out)}); remove it first")
    if force or not out.exists() or is_empty_dir(out):
        return
    raise OutputError(f"{flag} {out} already holds {describe(out)}; choose another {flag}, or add --force to "
                      "replace it")


def missing_ancestor(path: Path) -> Path | None:
    """The highest parent of ``path`` that does not exist yet (what making ``path`` would create)."""
    top = None
    for folder in path.parents:
        if folder.exists():
            break
        top = folder
    return top


def put_in_place(made: Path, out: Path) -> None:
    """Rename ``made`` onto ``out``; an existing ``out`` is moved aside first and deleted after."""
    if not out.exists() and not out.is_symlink():
        made.rename(out)
        return
    if is_empty_dir(out):
        out.rmdir()
        made.rename(out)
        return
    old = out.with_name(f".{out.name}.{os.getpid()}.replaced")
    out.rename(old)
    made.rename(out)
    remove(old)


@contextmanager
def made_in_place(out: Path, make_temp, sources: Iterable[str | Path], force: bool, flag: str) -> Iterator[Path]:
    """The shared part of new_directory and new_file: checks, a temporary sibling, the rename, the clean-up."""
    given, out = out, Path(os.path.abspath(out))  # "." or "a/..": their real parent holds the temporary
    if out == Path.cwd() or out in Path.cwd().parents or out == Path.home() or out in Path.home().parents:
        raise OutputError(f"{flag} {given} is the current or the home directory, or holds one; give a directory "
                          "of its own")
    check_sources(out, sources, flag)
    check_replaceable(out, force, flag)
    created = missing_ancestor(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temp = make_temp(out)
    except OSError as e:
        raise OutputError(f"{flag} {out}: {write_error(e, out)}") from e
    try:
        yield temp
        put_in_place(temp, out)
    except BaseException as e:
        remove(temp)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(e, OSError) and writing(e, temp):
            raise OutputError(f"{write_error(e, out)}; nothing was written to {out}") from e
        raise


def writing(e: OSError, temp: Path) -> bool:
    """Whether an error met while making an output came from writing it (not from reading an input)."""
    if e.errno in (*NO_ROOM, errno.EROFS) or not e.filename:
        return True
    return Path(e.filename).resolve().is_relative_to(temp.resolve())


def remove(path: Path) -> None:
    """Delete a file, a link or a whole directory."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _temp_dir(out: Path) -> Path:
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    temp.chmod(0o755)  # mkdtemp makes it private; an output is for others to read too
    return temp


def _temp_file(out: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    Path(name).chmod(0o644)
    return Path(name)


def new_directory(out: str | Path, sources: Iterable[str | Path] = (), force: bool = False,
                  flag: str = "--out"):
    """``with new_directory(out) as tmp:`` fill ``tmp``; it becomes ``out`` when the block ends without error."""
    return made_in_place(Path(out), _temp_dir, sources, force, flag)


def new_file(out: str | Path, sources: Iterable[str | Path] = (), force: bool = False, flag: str = "--out"):
    """``with new_file(out) as tmp:`` write ``tmp``; it becomes ``out`` when the block ends without error. A
    directory is never replaced by the file."""
    if Path(out).is_dir():
        raise OutputError(f"{flag} {out} is a directory; give the path of the file to write")
    return made_in_place(Path(out), _temp_file, sources, force, flag)
