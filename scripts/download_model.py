"""Put the files the service needs into MODEL_DIR, once, and never leave a half-done model there.

    python scripts/download_model.py [--force]

Settings come from the environment, as for the service:

  MODEL_DIR         where the model ends up (required; the service reads the same variable)
  MODEL_ID          Hugging Face hub repository (default distilbert/distilgpt2)
  MODEL_REVISION    branch, tag or commit to fetch (default main; pin a commit for repeatable builds)
  MODEL_SOURCE      a local directory to copy the files from instead of the hub (air-gapped hosts)
  DOWNLOAD_RETRIES  attempts when the hub cannot be reached (default 5, with exponential backoff)
  HF_HUB_CACHE      an existing hub cache to download through and keep; without it the script
                    uses a private cache beside MODEL_DIR and removes it once the model is in place
  HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE ...  read by huggingface_hub itself

Contract: only the files the service reads are fetched: those of `service.model_files.SERVICE_FILES`
the repository has, and one kind of weights, the first it has of `tf_model.h5` (GPT-2),
`model.safetensors`, or `model.safetensors.index.json` with every shard it names; never the
PyTorch `.bin`, Flax, ONNX or GGUF weights. A repository (or MODEL_SOURCE) with none of the three
is an error. Files are gathered in `.<name>.download/` beside MODEL_DIR, the manifest is written
last, and the directory is renamed into place, so MODEL_DIR is either absent, the previous
complete model, or the new complete model. When MODEL_DIR already holds a model from the same
source whose files match the manifest's sizes, the script exits 0 at once without touching the
network; `--force` fetches again. Failures end with exit status 1 and one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

# Run as `python scripts/download_model.py` the script's own folder comes first on sys.path;
# the repository root (or /app in the image) holds the `service` package it shares.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.model_files import (  # noqa: E402
    MANIFEST,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    SERVICE_FILES,
    WEIGHTS,
    ModelDirError,
    check_model_dir,
    missing_files,
    read_manifest,
    weight_files,
    write_manifest,
)

DEFAULT_MODEL_ID = "distilbert/distilgpt2"
DEFAULT_REVISION = "main"
MAX_BACKOFF_S = 60.0
PROG = "download_model"


class DownloadError(Exception):
    """The model could not be put in place; the message is the one line shown to the user."""


def log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# ---- where the files come from ------------------------------------------------------------


NO_WEIGHTS = (
    f"has no supported weights: looked for {WEIGHTS}, {SAFETENSORS}, and {SAFETENSORS_INDEX} with its shards "
    "(PyTorch .bin, Flax, ONNX and GGUF weights are not used)"
)


def chosen_weights(src_dir: Path, where: str) -> list[str]:
    """The weights `weight_files` prefers in `src_dir`: tf_model.h5, else model.safetensors, else
    the index and the shards it names. `where` names the source in errors ("MODEL_SOURCE /x")."""
    try:
        weights = weight_files(src_dir)
    except ModelDirError as exc:
        raise DownloadError(f"{where}: unreadable {SAFETENSORS_INDEX} ({exc.__cause__})") from None
    if not weights:
        raise DownloadError(f"{where} {NO_WEIGHTS}")
    # An index is data from the repository: a shard named "../x" must not lead outside it.
    bad = [name for name in weights if Path(name).name != name or name in (".", "..")]
    if bad:
        raise DownloadError(f"{where}: {SAFETENSORS_INDEX} names shards outside its folder: {', '.join(bad)}")
    return weights


def files_to_take(src_dir: Path, where: str) -> list[str]:
    """The service's files in `src_dir`: the other SERVICE_FILES present, then `chosen_weights`."""
    others = [name for name in SERVICE_FILES if name != WEIGHTS and (src_dir / name).is_file()]
    return others + chosen_weights(src_dir, where)


def describe_source(model_id: str, revision: str, model_source: str | None) -> dict:
    """What the manifest records as the origin; the same value on a second run means "done".

    A local source is identified by its path and each file's size and mtime, so new files
    copied into the same folder are noticed without hashing them.
    """
    if not model_source:
        return {"model_id": model_id, "revision": revision}
    root = Path(model_source)
    files = {}
    if root.is_dir():
        for name in files_to_take(root, f"MODEL_SOURCE {model_source}"):
            path = root / name
            if path.is_file():
                st = path.stat()
                files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"model_source": str(root), "files": files}


def is_complete(model_dir: Path, source: dict) -> bool:
    """True when `model_dir` holds a model from `source` whose files match its manifest."""
    try:
        manifest = read_manifest(model_dir) if model_dir.is_dir() else None
        if manifest is None or manifest.get("source") != source:
            return False
        check_model_dir(model_dir)
    except ModelDirError:
        return False
    return True


def is_transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed: network trouble, not a wrong name or revision."""
    import requests
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, LocalEntryNotFoundError):
        # snapshot_download reports an unreachable hub as "not in the local cache", raised
        # from the network error; without such a cause the files are simply not there.
        return exc.__cause__ is not None and is_transient(exc.__cause__)
    if isinstance(exc, (OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)):
        return False
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is None or status >= 500 or status == 429
    if isinstance(exc, requests.exceptions.SSLError):
        return False  # a certificate problem does not fix itself
    return isinstance(
        exc,
        (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
            ConnectionError,
            TimeoutError,
        ),
    )


def one_line(exc: BaseException) -> str:
    """The innermost cause's first line: the part that says what actually went wrong."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    # requests wraps urllib3's MaxRetryError, whose `reason` names what failed (DNS, refusal...).
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    if isinstance(reason, BaseException):
        exc = reason
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}"[:400]


def with_retries(
    fn: Callable[[], str],
    attempts: int,
    backoff_s: float = 2.0,
) -> str:
    """Call `fn`, retrying transient errors with exponential backoff (2 s, 4 s, ... up to 60 s)."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
            log(f"attempt {attempt}/{attempts} failed ({one_line(exc)}); retrying in {delay:g} s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def fetch_from_hub(model_id: str, revision: str, cache_dir: Path, attempts: int) -> Path:
    """Download the service's files of `model_id` into `cache_dir`; return the snapshot folder.

    The weights are asked for in order of preference, each only when the repository lacks the one
    before: tf_model.h5 with the other SERVICE_FILES (one call, as GPT-2 repositories have always
    been fetched), then model.safetensors (or its index), then the shards the index names. Each
    call lists the repository at the revision and takes what the patterns match; the later calls
    ask for the commit the first resolved (its snapshot folder's name), so a push in between
    cannot mix two commits. Offline, each call answers with the cached snapshot as it is.
    """
    from huggingface_hub import snapshot_download

    def fetch(rev: str, patterns: list[str]) -> Path:
        def attempt() -> str:
            return snapshot_download(
                repo_id=model_id,
                revision=rev,
                cache_dir=str(cache_dir),
                allow_patterns=patterns,
            )

        return Path(with_retries(attempt, attempts))

    snapshot = fetch(revision, list(SERVICE_FILES))
    if (snapshot / WEIGHTS).is_file():
        return snapshot
    commit = snapshot.name
    snapshot = fetch(commit, [SAFETENSORS, SAFETENSORS_INDEX])
    if not (snapshot / SAFETENSORS).is_file() and (snapshot / SAFETENSORS_INDEX).is_file():
        fetch(commit, chosen_weights(snapshot, f"{model_id}@{revision}")[1:])
    return snapshot


def gather(src_dir: Path, dest: Path, link: bool, where: str) -> list[str]:
    """Put the service's files found in `src_dir` (`files_to_take`) into `dest`; return their names.

    Hub snapshots are symlinks into the cache's blobs: with `link`, the blob is hard-linked
    (no second copy on disk while the private cache and the model share the volume), else copied.
    """
    names = []
    for name in files_to_take(src_dir, where):
        src = src_dir / name
        if not src.is_file():
            continue
        target = dest / name
        if link:
            try:
                os.link(src.resolve(), target)
            except OSError:
                shutil.copyfile(src, target)
        else:
            shutil.copyfile(src, target)
        names.append(name)
    missing = missing_files(dest)
    if missing:
        raise DownloadError(f"{src_dir} lacks {', '.join(missing)}")
    return names


# ---- putting the files in place ----------------------------------------------------------


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`, so two init containers never interleave."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def swap_into_place(new_dir: Path, model_dir: Path) -> None:
    """Rename the complete `new_dir` to `model_dir`, replacing a previous model if any."""
    old = model_dir.with_name(f".{model_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if model_dir.exists():
        model_dir.rename(old)
    new_dir.rename(model_dir)
    shutil.rmtree(old, ignore_errors=True)


def install(
    model_dir: Path,
    model_id: str,
    revision: str,
    model_source: str | None,
    hub_cache: str | None,
    attempts: int,
    force: bool = False,
) -> str:
    """Make `model_dir` hold the complete model; return what was done, for the log."""
    source = describe_source(model_id, revision, model_source)
    if not force and is_complete(model_dir, source):
        return f"{model_dir} is complete ({MANIFEST} matches); nothing to do"
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = model_dir.with_name(f".{model_dir.name}.download")
    with locked(model_dir.with_name(f".{model_dir.name}.lock")):
        if not force and is_complete(model_dir, source):  # another run finished meanwhile
            return f"{model_dir} is complete ({MANIFEST} matches); nothing to do"
        # Whatever an interrupted run left in staging/model is suspect and is redone; the
        # private hub cache beside it is kept, so huggingface_hub resumes from it.
        new_dir = staging / "model"
        shutil.rmtree(new_dir, ignore_errors=True)
        new_dir.mkdir(parents=True)
        if model_source:
            if not Path(model_source).is_dir():
                raise DownloadError(f"MODEL_SOURCE {model_source} is not a directory")
            names = gather(Path(model_source), new_dir, link=False, where=f"MODEL_SOURCE {model_source}")
            origin = f"from {model_source}"
        else:
            cache = Path(hub_cache) if hub_cache else staging / "hub-cache"
            snapshot = fetch_from_hub(model_id, revision, cache, attempts)
            # Hard links only from the private cache, which goes away: files shared with a
            # cache the user keeps would carry any later change of one into the other.
            names = gather(snapshot, new_dir, link=not hub_cache, where=f"{model_id}@{revision}")
            origin = f"from {model_id}@{revision}"
        write_manifest(new_dir, extra={"source": source})
        swap_into_place(new_dir, model_dir)
        shutil.rmtree(staging, ignore_errors=True)
    return f"installed {', '.join(names)} {origin} into {model_dir}"


def main(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="fetch again even if the model is complete")
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ

    model_dir = env.get("MODEL_DIR")
    if not model_dir:
        log("error: MODEL_DIR is not set (the directory the model is written to)")
        return 1
    model_id = env.get("MODEL_ID") or DEFAULT_MODEL_ID
    revision = env.get("MODEL_REVISION") or DEFAULT_REVISION
    try:
        attempts = int(env.get("DOWNLOAD_RETRIES") or 5)
        if attempts < 1:
            raise ValueError
    except ValueError:
        log(f"error: DOWNLOAD_RETRIES must be a positive integer, got {env.get('DOWNLOAD_RETRIES')!r}")
        return 1
    try:
        log(
            install(
                Path(model_dir),
                model_id,
                revision,
                model_source=env.get("MODEL_SOURCE") or None,
                hub_cache=env.get("HF_HUB_CACHE") or None,
                attempts=attempts,
                force=args.force,
            )
        )
    except DownloadError as exc:
        log(f"error: {exc}")
        return 1
    except Exception as exc:
        where = env.get("MODEL_SOURCE") or f"{model_id}@{revision}"
        tries = f" after {attempts} attempts" if is_transient(exc) else ""
        log(f"error: cannot fetch {where}{tries}: {one_line(exc)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
