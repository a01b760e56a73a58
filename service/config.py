"""The service's settings: read from the environment once, here, and nowhere else."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.memory import parse_bytes
from service.model_files import (LITERT_FORMAT, ModelDirError, check_model_dir, describe_model, has_litert_files,
                                 litert_format, model_type, unread_files, verify_manifest)


class Settings(BaseSettings):
    """Every setting with its environment variable (the field name in upper case) and default."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", protected_namespaces=())

    # Each field's description is its documentation: scripts/config_docs.py writes
    # docs/configuration.md from them, and tests/test_docs.py fails when the page differs.
    model_dir: Path = Field(
        description="Directory with the model: `config.json`, the weights (`tf_model.h5`, or `model.safetensors`, "
        "or `model.safetensors.index.json` and its shards) and the tokenizer (`tokenizer.json`, or `vocab.json` + "
        "`merges.txt`), plus the LiteRT files `scripts/convert_model.py` adds. If it holds a `manifest.json`, every "
        "file is checked against its size, and each file the backend reads against its sha256, at start; a "
        "mismatch stops the server.")
    backend: Literal["auto", "litert", "tf"] = Field(
        "auto", description="`litert`: TensorFlow Lite's runtime on the converted files; `tf`: TensorFlow with XLA, "
        "GPT-2 models only (`model_type` `gpt2` in `config.json`); `auto`: `litert` when the model directory holds "
        "a finished conversion or a model other than GPT-2, else `tf`. `litert` without the files, or `tf` with "
        "another model, stops the server with what to do.")
    litert_precision: Literal["auto", "int8", "fp32"] = Field(
        "auto", description="LiteRT weights. `auto`: `int8` if the conversion's quality gate passed it on these "
        "weights, else `fp32`. Forcing `int8` past a failed gate logs a warning.")
    num_threads: int = Field(0, ge=0, le=256, description="LiteRT CPU threads; `0`: one per core the process may use.")
    short_lane: bool = Field(
        True, description="LiteRT: a short request (at most 64 new tokens, prompt and answer within 256 tokens) "
        "that joins much longer running rows also gets decode calls of its own between theirs, so it is not slowed "
        "to their pace; the running rows keep at least half their speed. `false`: every row moves at the batch's pace.")
    served_model_name: str | None = Field(
        None, description="The model's name on `/v1` (`GET /v1/models`, and what a request's `model` must say). "
        "Unset: the model directory's name.")
    host: str = Field("127.0.0.1", description="Address `python -m service` listens on (the container sets `0.0.0.0`).")
    port: int = Field(8000, ge=1, le=65535, description="Port `python -m service` listens on.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="The least severe log level written.")
    log_format: Literal["text", "json"] = Field(
        "text", description="`text`: one readable line per record; `json`: one JSON object per line (every logger, "
        "and one access line per request).")

    api_key: SecretStr | None = Field(
        None, description="API keys, comma-separated. With any key set (here or in `API_KEY_FILE`), `/generate` and "
        "`/v1/*` (and `/metrics` with `METRICS_REQUIRE_KEY`) need `Authorization: Bearer <key>`. Never logged.")
    api_key_file: Path | None = Field(
        None, description="A file with one key per line (blank lines and lines starting with `#` are skipped), "
        "e.g. a Docker secret; its keys are accepted beside `API_KEY`'s. A missing, unreadable or empty file stops "
        "the server at start.")
    metrics_require_key: bool = Field(False, description="`GET /metrics` needs a key too (when keys are set).")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins browsers may call the API from, comma-separated (`*`: any). "
        "Unset: no CORS headers.")
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Largest request body in bytes; a larger one gets 413 before it is read.")
    max_total_tokens: int = Field(
        16384, ge=1, description="Most new tokens one request may ask for: prompts × `max_tokens` (× `n` on `/v1`).")

    context_tokens: int = Field(
        2048, ge=16, description="LiteRT: most tokens a prompt and its answer span together; the model's own "
        "window where that is smaller (DistilGPT2: 1,024; SmolLM2: 8,192; Qwen2.5: 32,768). Warm-up scores a "
        "prompt this long, and the memory a prompt's prefill takes grows with its square.")
    max_batch_size: int = Field(
        8, ge=1, le=64, description="Most prompts decoded together. `tf` compiles batch shapes 1, then powers of two "
        "from 4 up to it; LiteRT runs any batch size.")
    batch_timeout_ms: float = Field(
        0.0, ge=0, le=1000, description="With the batch empty, how long its first prompt waits for others before "
        "decoding starts. Prompts that arrive while the batch runs join it at the next decode call anyway.")
    stream_interval_ms: float = Field(
        50.0, ge=0, le=1000, description="Streaming: a prompt's first tokens are sent at once, then once per tick of "
        "a clock of this many milliseconds shared by all streams, with every token made meanwhile (`0`: after every "
        "decode call). Each write costs CPU time that decoding shares.")
    max_queue_size: int = Field(
        256, ge=1, description="Most prompts waiting to join the batch; a request that would pass it gets 503.")
    max_prompts_per_request: int = Field(32, ge=1, description="Most prompts in one request (× `n` on `/v1`).")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest `max_tokens` a request may ask for.")
    max_temperature: float = Field(2.0, gt=0, description="Largest `temperature` a request may ask for.")

    prefill_chunk: int = Field(16, ge=1, le=1024, description="`tf` only: prompt tokens per compiled prefill call.")
    decode_chunk: int = Field(
        16, ge=1, le=256, description="`tf` only: decode steps per compiled call (a finished batch stops early).")
    min_cache_size: int = Field(
        128, ge=16, description="Smallest key/value cache bucket, in tokens. `tf`: a batch takes the smallest bucket "
        "that holds its longest row, buckets doubling up to the context window (each one compiled at warm-up); "
        "LiteRT: the batch's shared pool of slots is sized in multiples of it.")
    xla_cache_dir: Path | None = Field(
        None, description="`tf` only: a directory where compiled programs persist, so a restart skips most of warm-up.")

    memory_limit: int | None = Field(
        None, gt=0, json_schema_extra={"values": "bytes: an integer, or `1g`, `512m`, `1536Mi`"}, description="Bytes the process may hold: an integer, or with a binary suffix as Docker writes "
        "it (`1g`, `512m`, `1536Mi`). Unset: the container's limit (cgroup v2 or v1), else none. After warm-up, "
        "what is left under it less a margin of max(64 MiB, 8%) is the key/value budget: a prompt joins the batch "
        "only while the batch's worst case fits it, and one that could never fit alone gets 422 `over_memory_budget`.")

    # Operating it: shutdown and queue waits.
    max_queue_wait_seconds: float = Field(
        60.0, ge=0, description="A request none of whose prompts has joined the batch after this long leaves the "
        "queue and gets 503 with `Retry-After` (`/v1`: 429) instead of waiting on; one already decoding is never "
        "timed out. `0`: no bound.")
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM (`python -m service`), how long running and queued prompts may take to "
        "finish while new requests get 503; then (or on a second signal) the rest get 503 and the server exits. Keep "
        "Compose's `stop_grace_period` (`API_STOP_GRACE_PERIOD`) 5 s above it.")

    # Set by load_settings once the sha256 of every file the backend reads matched the manifest,
    # so the server does not read those bytes twice.
    _manifest_verified: bool = PrivateAttr(False)

    _api_keys: tuple[str, ...] = PrivateAttr(())

    # config.json's model_type and architectures, read once by _backend_available.
    _model_type: tuple[str, tuple[str, ...]] = PrivateAttr(("gpt2", ()))

    @field_validator("model_dir")
    @classmethod
    def _model_dir_complete(cls, value: Path) -> Path:
        check_model_dir(value)
        return value

    @model_validator(mode="after")
    def _backend_available(self) -> Settings:
        self._model_type = model_type(self.model_dir)
        kind = describe_model(*self._model_type)
        if self.backend == "tf" and not self._is_gpt2:
            raise ValueError(f"BACKEND=tf serves the GPT-2 family only; MODEL_DIR holds {kind}: use BACKEND=litert "
                             "(or auto)")
        if self.serving_backend == "litert" and not has_litert_files(self.model_dir):
            why = ("BACKEND=litert" if self.backend == "litert"
                   else f"BACKEND=auto serves {kind} with litert (tf serves the GPT-2 family only)")
            raise ValueError(f"{why}, but {self.model_dir} holds no finished LiteRT conversion; "
                             f"run: python scripts/convert_model.py --model-dir {self.model_dir}")
        if self.serving_backend == "litert" and (found := litert_format(self.model_dir)) != LITERT_FORMAT:
            raise ValueError(f"the LiteRT files in {self.model_dir} are converter version {found}, this service "
                             f"reads version {LITERT_FORMAT}; run: python scripts/convert_model.py "
                             f"--model-dir {self.model_dir}")
        return self

    @field_validator("memory_limit", mode="before")
    @classmethod
    def _size(cls, value):
        if isinstance(value, str):
            return parse_bytes(value) if value.strip() else None
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _read_api_keys(self) -> Settings:
        keys = []
        if self.api_key is not None:
            keys += [k.strip() for k in self.api_key.get_secret_value().split(",") if k.strip()]
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"API_KEY_FILE {self.api_key_file} cannot be read: {exc.strerror or exc}") from None
            file_keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not file_keys:
                raise ValueError(f"API_KEY_FILE {self.api_key_file} holds no key")
            keys += file_keys
        # A bearer token is visible ASCII without spaces; the message never shows the key itself.
        if any(not k.isascii() or not k.isprintable() or " " in k for k in keys):
            raise ValueError("an API key may hold only visible ASCII characters (no spaces)")
        if (self.api_key is not None or self.api_key_file is not None) and not keys:
            raise ValueError("API_KEY is set but holds no key")
        self._api_keys = tuple(dict.fromkeys(keys))
        return self

    @property
    def api_keys(self) -> tuple[str, ...]:
        """Every accepted key (API_KEY's and API_KEY_FILE's); empty: no key is required."""
        return self._api_keys

    @property
    def manifest_verified(self) -> bool:
        return self._manifest_verified

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model_dir.resolve().name

    @property
    def _is_gpt2(self) -> bool:
        return self._model_type[0] == "gpt2"

    @property
    def unread_files(self) -> set[str]:
        """The model directory's files the serving backend never reads (their sums go unchecked)."""
        return unread_files(self.model_dir, self.serving_backend, self.litert_precision)

    @property
    def serving_backend(self) -> str:
        """The backend that serves: `backend`, with auto resolved against the model directory
        (litert where it is converted, and for every model but GPT-2, which tf alone serves)."""
        if self.backend != "auto":
            return self.backend
        return "litert" if not self._is_gpt2 or has_litert_files(self.model_dir) else "tf"

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value


def load_settings() -> Settings:
    """Settings from the environment, or exit with one line saying what is wrong: a setting, or
    a model directory whose files do not match their manifest (every byte of the files the
    backend reads is read)."""
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise SystemExit(f"service: invalid settings: {problems}") from None
    try:
        verify_manifest(settings.model_dir, skip=settings.unread_files)
    except ModelDirError as exc:
        raise SystemExit(f"service: refusing to start: {exc}; fetch the model again "
                         "(scripts/download_model.py --force; docs/operations.md: Faults)") from None
    settings._manifest_verified = True
    return settings


def _describe(error: dict) -> str:
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ModelDirError) or not error["loc"]:
        # The model directory's problem (the path and what is missing), or one across settings.
        return str(cause or error["msg"])
    name = ".".join(str(part) for part in error["loc"]).upper() or "settings"
    message = "is required (set it in the environment)" if error["type"] == "missing" else error["msg"]
    return f"{name} {message}"
