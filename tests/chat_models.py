"""Chat models for the tests: the tiny model given a chat template (tests/test_chat.py,
tests/test_chaos.py), and the conversations they render. Plain Python: tests/torch_reference.py
imports it in the PyTorch venv."""

import json
import shutil

# Conversations both the renderer's tests (tests/test_chat.py) and the Llama-family references
# (tests/torch_reference.py) render, each adding shapes of its own.
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hello!"}],
    "system and user": [{"role": "system", "content": "You answer in haiku."},
                        {"role": "user", "content": "def add(a, b):"}],
    "several turns": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello. "}, {"role": "user", "content": "  import os\n"}],
    "assistant last": [{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "Yes"}],
}

# Qwen2's template (ChatML).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def with_template(model_dir, out, template: str, as_file: bool = False):
    """A copy of the tiny model with `template` in its tokenizer_config.json or chat_template.jinja."""
    shutil.copytree(model_dir, out)
    if as_file:
        (out / "chat_template.jinja").write_text(template)
    else:
        config = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return out
