"""A model directory's chat template, rendered as transformers' `apply_chat_template` renders it.

transformers 4.57.6 (`utils/chat_template_utils.py`, `_compile_jinja_template` and
`render_jinja_template`; `tokenization_utils_base.py`, `apply_chat_template`) compiles the
template in a sandboxed Jinja2 environment with `trim_blocks`, `lstrip_blocks` and the
`loopcontrols` extension, replaces Jinja's `tojson` filter with `json.dumps` (no HTML escaping),
adds the globals `raise_exception` and `strftime_now`, and renders it with `messages`,
`tools=None`, `documents=None`, `add_generation_prompt` and the tokenizer's special tokens
(`special_tokens_map`: `bos_token`, `eos_token`, ... as strings). The same is done here without
importing transformers (the LiteRT image does not carry it). The rendered text is then encoded
with `add_special_tokens=False`: the template writes a BOS itself if the model wants one.

Where the template comes from, as transformers loads it: `chat_template.jinja` if present, else
`chat_template` in `tokenizer_config.json` (a string, or a list of named templates of which
`default` is used). Special tokens come from `tokenizer_config.json`, and from
`special_tokens_map.json` when the config has no `added_tokens_decoder` (transformers' legacy
path); a tokenizer class's built-in defaults are not known here.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# transformers' SpecialTokensMixin.SPECIAL_TOKENS_ATTRIBUTES, in its order.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                  "additional_special_tokens")


class ChatTemplateError(ValueError):
    """The template could not render these messages (its own `raise_exception`, an undefined
    variable, a syntax error, a type error): the message says why."""


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with.

    `render(messages)` returns the prompt text with the generation prompt added, or raises
    `ChatTemplateError`; it is cheap and may be called from the event loop."""

    def __init__(self, source: str, special_tokens: dict[str, str | list[str]]):
        self.source = source
        self.special_tokens = special_tokens
        try:
            self._template = _environment().from_string(source)
            self._broken: str | None = None
        except Exception as exc:  # a syntax error is the template's, said on every request
            self._template, self._broken = None, _why(exc)
            log.warning("the model's chat template does not compile: %s", self._broken)

    def render(self, messages: list[dict]) -> str:
        if self._template is None:
            raise ChatTemplateError(f"the model's chat template does not compile: {self._broken}")
        try:
            # transformers: {**special_tokens_map, **kwargs}, then messages, tools, documents and
            # add_generation_prompt as keywords.
            return self._template.render(**self.special_tokens, messages=messages, tools=None, documents=None,
                                         add_generation_prompt=True)
        except Exception as exc:
            raise ChatTemplateError(f"the model's chat template failed on these messages: {_why(exc)}") from None


def load_chat_template(model_dir: Path) -> ChatTemplate | None:
    """The directory's chat template, or None when it has none (a base model such as GPT-2)."""
    config = _read_json(model_dir / TOKENIZER_CONFIG)
    source = None
    if (model_dir / TEMPLATE_FILE).is_file():
        source = (model_dir / TEMPLATE_FILE).read_text(encoding="utf-8")
    else:
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: transformers' get_chat_template takes "default"
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"),
                          None)
    if not isinstance(source, str) or not source:
        return None
    return ChatTemplate(source, special_tokens(config, _read_json(model_dir / SPECIAL_TOKENS_MAP)))


def special_tokens(config: dict, legacy_map: dict) -> dict[str, str | list[str]]:
    """transformers' `special_tokens_map` for a tokenizer loaded from these files: each set
    special token as its string (an AddedToken is saved as a dict with its `content`)."""
    found = {key: config.get(key) for key in SPECIAL_TOKENS if key in config}
    if "added_tokens_decoder" not in config:
        # The legacy load (tokenization_utils_base `_from_pretrained`): the map's values win,
        # its additional tokens are added to the config's.
        for key, value in legacy_map.items():
            if key == "additional_special_tokens" and isinstance(value, list):
                known = list(found.get("additional_special_tokens") or [])
                found[key] = known + [t for t in value if t not in known]
            elif key in SPECIAL_TOKENS:
                found[key] = value
    tokens = {}
    for key, value in found.items():
        if key == "additional_special_tokens":
            value = [_content(t) for t in value or []]
        else:
            value = _content(value)
        if value:
            tokens[key] = value
    return tokens


def _content(token) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        log.warning("%s is not JSON (%s): no chat template or special tokens from it", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _why(exc: Exception) -> str:
    import jinja2

    return str(exc) if isinstance(exc, jinja2.TemplateError) else f"{type(exc).__name__}: {exc}"


def _environment():
    """transformers' environment (see the module docstring). Its `{% generation %}` tag, which
    marks assistant text for training masks, renders its body unchanged here."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
