"""Reading the files users name on the command line and in the API, and writing the outputs
they name (`write_output`).

Every reader of a user-named input goes through `read_bytes`/`read_text`, so that an input
that never ends (``/dev/zero``, ``/dev/urandom``, a producer that keeps writing) is refused
after `STREAM_LIMIT` bytes instead of read forever. A pipe nobody writes to blocks, as it does
for ``cat``: process substitution (``<(...)``) is a pipe and must keep working.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

from fpstate.errors import BlobError

#: The most bytes read from an input that is not a regular file.
STREAM_LIMIT = 256 << 20


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The contents of ``path``: all of a regular file; at most `STREAM_LIMIT` bytes of
    anything else (a device, a pipe), else OSError(EFBIG) naming it."""
    with open(path, "rb") as f:
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return f.read()
        data = f.read(STREAM_LIMIT + 1)
    if len(data) > STREAM_LIMIT:
        size = (f"{STREAM_LIMIT >> 20} MiB" if STREAM_LIMIT % (1 << 20) == 0
                else f"{STREAM_LIMIT} bytes")
        raise OSError(errno.EFBIG, f"not a regular file, and more than {size}", os.fspath(path))
    return data


def read_text(path: str | os.PathLike[str]) -> str:
    """`read_bytes` decoded as UTF-8 (UnicodeDecodeError when it is not)."""
    return read_bytes(path).decode("utf-8")


def reason(e: OSError | UnicodeDecodeError) -> str:
    """Why `read_bytes`/`read_text` failed, in the words of a one-line error."""
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (byte {e.start}: {e.object[e.start]:#04x})"
    return e.strerror or str(e)


def write_output(text_or_bytes: str | bytes, output: str | None) -> None:
    """Write a command's result to the file ``output`` names (text or bytes), else to
    standard output; BlobError naming the file when it cannot be written."""
    if output:
        mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
        try:
            with open(output, mode) as f:
                f.write(text_or_bytes)
        except OSError as e:
            raise BlobError(f"cannot write {output}: {e.strerror or e}") from None
    elif isinstance(text_or_bytes, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(text_or_bytes)
    else:
        sys.stdout.write(text_or_bytes)


__all__ = ["STREAM_LIMIT", "read_bytes", "read_text", "reason", "write_output"]
