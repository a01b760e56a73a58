"""Builds libkvattn.so from kvattn.c with the system's C compiler.

`python -m service.engine.native.build [OUT]` writes OUT (default: libkvattn.so next to
kvattn.c). Plain flags only: the AVX2 path is enabled per function in the source and chosen at
run time, so the library runs on any x86-64 (and builds, portable path only, on aarch64).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "kvattn.c"
DEFAULT_LIBRARY = SOURCE.with_name("libkvattn.so")
FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror"]


class BuildError(RuntimeError):
    """The compiler is missing or failed; the message is one line saying which and why."""


def compiler() -> str | None:
    """The C compiler to use: `cc`, else `gcc`, else None."""
    for name in ("cc", "gcc"):
        path = shutil.which(name)
        if path:
            return path
    return None


def build(out: Path = DEFAULT_LIBRARY, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compiles kvattn.c into `out` and returns it. The library is written to a temporary file in
    the same directory and renamed over `out`, so a process loading it never sees half of it."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler (cc or gcc) on PATH")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [cc, *FLAGS, *extra_flags, "-o", tmp, str(SOURCE), "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip())
            raise BuildError(f"{' '.join(cmd)} failed: {first}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m service.engine.native.build [OUT]", file=sys.stderr)
        return 2
    try:
        print(build(Path(args[0]) if args else DEFAULT_LIBRARY))
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
