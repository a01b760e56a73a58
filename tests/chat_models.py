"""Chat models for the tests: the tiny model given a chat template (tests/test_chat.py,
tests/test_chaos.py)."""

import json
import shutil

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
