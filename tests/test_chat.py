"""POST /v1/chat/completions: templates rendered as transformers renders them, the chat route as
the completions route on the rendered prompt (on both backends), the official `openai` client,
and every refusal's exact body."""

import json

import openai
import pytest
from fastapi.testclient import TestClient

import chat_models
from chat_models import CHATML, with_template
from conftest import served_engine
from fakes import FakeEngine
from service.app import create_app
from service.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from service.engine import GenerationRow

# A default system prompt, alternation enforced with raise_exception, and whitespace that only
# trim_blocks and lstrip_blocks remove.
SYSTEM_DEFAULT = """{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set system = 'You are a helpful assistant.' %}
    {% set loop_messages = messages %}
{% endif %}
{{ '<|im_start|>system\n' + system + '<|im_end|>\n' }}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 > 8 %}{% break %}{% endif %}
    {{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|im_start|>assistant\n' }}
{% endif %}
"""
# Llama 3's shape: the template writes the BOS itself; and transformers' tojson (no HTML escaping).
WITH_BOS = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
            "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% if message.name is defined %}"
            "{{ message | tojson }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}{{ eos_token | length }}")
TEMPLATES = {"chatml": CHATML, "system_default": SYSTEM_DEFAULT, "with_bos": WITH_BOS}

CONVERSATIONS = {
    **chat_models.CONVERSATIONS,
    "content parts": [{"role": "user", "content": [{"type": "text", "text": "first"},
                                                   {"type": "text", "text": "second"}]}],
    "unicode and html": [{"role": "user", "content": "日本語 🎉 é <b>&amp;</b> \"q\"", "name": "ünï"}],
}


def joined(conversation):
    """The conversation as the server hands it to the template: text parts joined by newlines."""
    return [{**m, "content": "\n".join(p["text"] for p in m["content"]) if isinstance(m["content"], list)
             else m["content"]} for m in conversation]


@pytest.fixture(scope="module")
def template_dirs(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-models")
    dirs = {name: with_template(model_dir, root / name, t) for name, t in TEMPLATES.items()}
    dirs["jinja_file"] = with_template(model_dir, root / "jinja_file", SYSTEM_DEFAULT, as_file=True)
    return dirs


# ---- the template, as transformers renders it ---------------------------------------------------


@pytest.mark.parametrize("shape", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", ["chatml", "system_default", "with_bos", "jinja_file"])
def test_rendering_equals_transformers_apply_chat_template(template_dirs, name, shape):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(template_dirs[name])
    template = load_chat_template(template_dirs[name])
    conversation = joined(CONVERSATIONS[shape])
    try:
        expected = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template refuses it (assistant last, under system_default)
        with pytest.raises(ChatTemplateError) as caught:
            template.render(conversation)
        assert str(exc) in str(caught.value)
        return
    assert template.render(conversation) == expected


@pytest.mark.parametrize("name", ["chatml", "with_bos"])
def test_prompt_tokens_equal_transformers_tokenized_chat(template_dirs, engine, name):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(template_dirs[name])
    template = load_chat_template(template_dirs[name])
    for conversation in map(joined, CONVERSATIONS.values()):
        expected = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
        assert engine.encode(template.render(conversation)) == expected
    # The BOS the template writes is the special token, once.
    bos = engine.encode(template.render(joined(CONVERSATIONS["one user turn"])))[0]
    assert (bos == engine.eos_id) == (name == "with_bos")


def test_special_tokens_and_sources(tmp_path):
    config = {"added_tokens_decoder": {}, "bos_token": {"content": "<s>", "__type": "AddedToken"},
              "eos_token": "</s>", "pad_token": None, "additional_special_tokens": ["<a>", {"content": "<b>"}],
              "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ bos_token }}D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<ignored>"}))
    template = load_chat_template(tmp_path)
    assert template.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["<a>", "<b>"]}
    assert template.render([]) == "<s>D"
    # Without added_tokens_decoder (an older save), special_tokens_map.json's values win.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}", "bos_token": "<s>"}))
    assert load_chat_template(tmp_path).render([]) == "<ignored>"
    # chat_template.jinja wins over the config's.
    (tmp_path / "chat_template.jinja").write_text("file")
    assert load_chat_template(tmp_path).render([]) == "file"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert load_chat_template(tmp_path) is None


def test_template_errors_say_why():
    with pytest.raises(ChatTemplateError, match="does not compile: Unexpected end of template"):
        ChatTemplate("{% for m in messages %}", {}).render([])
    with pytest.raises(ChatTemplateError, match="'dict object' has no attribute 'nope'"):
        ChatTemplate("{{ messages[0].nope.deeper }}", {}).render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="TypeError"):
        ChatTemplate("{{ 'a' + messages }}", {}).render([])
    # The sandbox is immutable: a template cannot change what it is given.
    with pytest.raises(ChatTemplateError, match="unsafe|cannot|not safely"):
        ChatTemplate("{{ messages.append(1) }}", {}).render([])


# ---- the route, against the completions route on both backends -------------------------------


@pytest.fixture(scope="module")
def live(engine, template_dirs):
    with served_engine(engine, template_dirs["chatml"], "tiny-chat", max_tokens_limit=1000) as url:
        yield url


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("shape", ["system and user", "several turns", "content parts", "unicode and html"])
def test_greedy_chat_is_the_greedy_completion_of_the_rendered_prompt(client, engine, template_dirs, shape):
    messages = CONVERSATIONS[shape]
    prompt = engine.encode(load_chat_template(template_dirs["chatml"]).render(joined(messages)))
    chat = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=12, temperature=0)
    plain = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=12, temperature=0)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.model == "tiny-chat"
    assert [(c.index, c.message.role, c.message.content, c.finish_reason) for c in chat.choices] == [
        (0, "assistant", plain.choices[0].text, plain.choices[0].finish_reason)]
    assert chat.usage == plain.usage and chat.usage.prompt_tokens == len(prompt)


def test_max_completion_tokens_wins_and_the_default_is_the_rest_of_the_window(client, engine):
    messages = CONVERSATIONS["one user turn"]
    both = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=9,
                                          max_completion_tokens=3, temperature=0)
    assert both.usage.completion_tokens <= 3
    unbounded = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0)
    if unbounded.choices[0].finish_reason == "length":
        assert unbounded.usage.total_tokens == engine.context_window


def test_without_a_bound_a_chat_gets_what_the_memory_budget_holds_for_it(client, engine, template_dirs):
    """Under a budget too small for the rest of the window, a chat without max_tokens is given
    the most new tokens a batch holding it alone can take (not refused); one that asks for more
    than that is refused with over_memory_budget."""
    messages = CONVERSATIONS["one user turn"]
    ids = engine.encode(load_chat_template(template_dirs["chatml"]).render(joined(messages)))
    engine.set_memory_budget(engine.batch_bytes([GenerationRow(tuple(ids), 40)]))
    try:
        most = engine.most_tokens_within_budget(ids, engine.context_window - len(ids))
        assert 40 <= most < engine.context_window - len(ids)
        assert engine.batch_bytes([GenerationRow(tuple(ids), most + 1)]) > engine.memory_budget
        chat = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0)
        finish = chat.choices[0].finish_reason
        assert (finish, chat.usage.completion_tokens) == ("length", most) or (
            finish == "stop" and chat.usage.completion_tokens < most)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, max_tokens=most + 1)
        assert refused.value.code == "over_memory_budget"
    finally:
        engine.set_memory_budget(None)


def test_n_seed_stop_and_logprobs_through_the_openai_client(client):
    ask = dict(model="tiny-chat", messages=CONVERSATIONS["several turns"], max_tokens=10, temperature=1.0, n=3,
               seed=11)
    first, again = client.chat.completions.create(**ask), client.chat.completions.create(**ask)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1  # each choice its own random stream
    text = first.choices[0].message.content
    stop = next((text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip()
                 and text[i:i + 2] not in text[:i + 1]), None)
    if stop is not None:
        stopped = client.chat.completions.create(**(ask | {"n": 1}), stop=[stop])
        assert stopped.choices[0].message.content == text[:text.index(stop)]
        assert stopped.choices[0].finish_reason == "stop"
    greedy = ask | {"n": 1, "temperature": 0}
    text = client.chat.completions.create(**greedy).choices[0].message.content
    scored = client.chat.completions.create(**greedy, logprobs=True, top_logprobs=2)
    content = scored.choices[0].logprobs.content
    assert scored.choices[0].message.content == text
    assert len(content) >= scored.usage.completion_tokens  # end-of-text, if generated, has its entry
    assert "".join(t.token for t in content)[:len(text)] == text
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
        assert bytes(entry.bytes).decode("utf-8") == entry.token
    no_top = client.chat.completions.create(**greedy, logprobs=True)
    assert [t.logprob for t in no_top.choices[0].logprobs.content] == [t.logprob for t in content]
    assert all(t.top_logprobs == [] for t in no_top.choices[0].logprobs.content)
    assert first.choices[0].logprobs is None


def test_a_stream_joins_to_the_unstreamed_answer_and_ends_with_usage(client):
    ask = dict(model="tiny-chat", messages=CONVERSATIONS["unicode and html"], max_tokens=20, temperature=0.9,
               seed=3, n=2, logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    texts, finish, tokens, firsts = [""] * 2, [None] * 2, [[], []], {}
    for chunk in chunks[:-1]:
        assert chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id and len(chunk.choices) == 1
        assert chunk.usage is None
        choice = chunk.choices[0]
        firsts.setdefault(choice.index, choice.delta)
        assert finish[choice.index] is None  # nothing after the finish_reason
        texts[choice.index] += choice.delta.content or ""
        finish[choice.index] = choice.finish_reason
        if choice.logprobs:
            tokens[choice.index] += choice.logprobs.content
    assert all(d.role == "assistant" and d.content == "" for d in firsts.values())
    assert texts == [c.message.content for c in whole.choices]
    assert finish == [c.finish_reason for c in whole.choices]
    assert tokens == [c.logprobs.content for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_unknown_fields_and_harmless_values_are_accepted(client):
    r = client.chat.completions.create(model="tiny-chat", messages=CONVERSATIONS["one user turn"], max_tokens=2,
                                       user="someone", logit_bias={}, presence_penalty=0, tool_choice="none",
                                       response_format={"type": "text"}, modalities=["text"],
                                       extra_body={"whatever": [1, 2]})
    assert len(r.choices) == 1


@pytest.mark.parametrize("ask, param", [
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (dict(tool_choice="auto"), "tool_choice"),
    (dict(functions=[{"name": "f"}]), "functions"),
    (dict(function_call="auto"), "function_call"),
    (dict(response_format={"type": "json_object"}), "response_format"),
    (dict(audio={"voice": "alloy", "format": "wav"}), "audio"),
    (dict(modalities=["text", "audio"]), "modalities"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(frequency_penalty=-1), "frequency_penalty"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=6), "top_logprobs"),
    (dict(n=33), "n"),  # MAX_PROMPTS_PER_REQUEST is 32
    (dict(max_tokens=5000), "max_tokens"),
    (dict(max_completion_tokens=1001), "max_completion_tokens"),
    (dict(max_completion_tokens=1000), "messages"),  # prompt + 1000 passes the window
    (dict(temperature=9.0), "temperature"),
    (dict(stop=[""]), "stop"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "messages"),
    (dict(messages=[{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]), "messages"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "messages"),
])
def test_a_field_that_cannot_be_honoured_is_a_400_naming_it(client, ask, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**({"model": "tiny-chat", "messages": CONVERSATIONS["one user turn"],
                                           "max_tokens": 2} | ask))
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param, caught.value.body
    assert caught.value.body["type"] == "invalid_request_error"


def test_another_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=CONVERSATIONS["one user turn"])
    assert caught.value.body == {"message": "The model 'gpt-4o' does not exist; this server serves 'tiny-chat'",
                                 "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


# ---- exact bodies, on a fake engine -----------------------------------------------------------


def fake_client(model_dir):
    from service.config import Settings

    app = create_app(Settings(model_dir=model_dir, served_model_name="fake"), engine_factory=lambda s: FakeEngine())
    return TestClient(app)


def post(http, **body):
    return http.post("/v1/chat/completions", json={"model": "fake", **body})


def test_a_model_without_a_chat_template_is_a_400(model_dir):
    with fake_client(model_dir) as http:
        r = post(http, messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == 400
    assert r.json() == {"error": {
        "message": "this model has no chat template (no chat_template in its tokenizer_config.json and no "
                   "chat_template.jinja), so messages cannot be turned into its prompt; use /v1/completions with a "
                   "prompt", "type": "invalid_request_error", "param": "messages", "code": "no_chat_template"}}


def test_exact_bodies_of_refusals(template_dirs):
    with fake_client(template_dirs["system_default"]) as http:
        raising = post(http, messages=[{"role": "assistant", "content": "first"}])
        part = post(http, messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "input_audio", "input_audio": {}}]}])
        tools = post(http, messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}])
        role = post(http, messages=[{"role": "tool", "content": "x"}])
    assert (raising.status_code, raising.json()) == (400, {"error": {
        "message": "the model's chat template failed on these messages: Conversation roles must alternate "
                   "user/assistant/user/assistant/...",
        "type": "invalid_request_error", "param": "messages", "code": "chat_template_error"}})
    assert (part.status_code, part.json()) == (400, {"error": {
        "message": "messages[0].content[1]: content parts of type 'input_audio' are not supported; only 'text' "
                   "parts are", "type": "invalid_request_error", "param": "messages",
        "code": "unsupported_content_part"}})
    assert (tools.status_code, tools.json()) == (400, {"error": {
        "message": "tools are not supported (this server does not call functions)", "type": "invalid_request_error",
        "param": "tools", "code": "unsupported_parameter"}})
    assert role.status_code == 400 and role.json()["error"]["param"] == "messages"
    assert role.json()["error"]["message"].startswith("messages.0.role: Input should be 'system', 'user' or")


def test_a_template_that_does_not_compile_is_a_400_not_a_500(model_dir, tmp_path):
    with fake_client(with_template(model_dir, tmp_path / "m", "{% if %}")) as http:
        r = post(http, messages=[{"role": "user", "content": "hi"}])
    assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_error"
    assert r.json()["error"]["message"].startswith("the model's chat template does not compile: ")


def test_on_the_fake_engine_the_answer_is_the_rendered_prompt_reversed(template_dirs):
    """The fake engine answers a prompt reversed: the whole path, template to text, in one look.
    Without max_tokens the choice may use the rest of the fake's 128-token window."""
    messages = [{"role": "user", "content": "hi"}]
    prompt = load_chat_template(template_dirs["chatml"]).render(messages)
    with fake_client(template_dirs["chatml"]) as http:
        r = post(http, messages=messages)
        streamed = http.post("/v1/chat/completions", json={"model": "fake", "messages": messages, "max_tokens": 3,
                                                           "stream": True})
    body = r.json()
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": prompt[::-1],
                                                        "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(prompt),
                             "total_tokens": 2 * len(prompt)}
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    choices = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert choices[0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}
    assert "".join(c["delta"].get("content", "") for c in choices[1:]) == prompt[::-1][:3]
    assert choices[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
