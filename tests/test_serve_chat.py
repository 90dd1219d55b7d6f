"""Chat: templates rendered as transformers renders them, and ``/v1/chat/completions`` through the
official ``openai`` client equal to the completions it stands for."""

import json

import pytest
import torch

from griffon import Griffon
from griffon.align.chat import GEMMA_TEMPLATE, GRIFFON_TEMPLATE, ChatTemplate, ChatTemplateError, template_for
from griffon.config import ModelConfig
from griffon.data.tokenizers import ByteTokenizer, load_tokenizer
from griffon.engine import Engine

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from griffon.serve.server import BackgroundServer, create_app  # noqa: E402

CONVERSATION = [
    {"role": "user", "content": "  Who is there?  "},
    {"role": "assistant", "content": "Nay, answer me."},
    {"role": "user", "content": "Long live the King!"},
]
# loop controls, whitespace control and tojson, as real templates use them
TRICKY = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}\n"
    "  [{{ m['role'] | upper }}] {{ m['content'] | tojson }}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ eos_token }}>>{% endif %}"
)


class Client(TestClient):
    """A test client that, once in, waits until the app is ready (warmed up)."""

    def __enter__(self):
        client = super().__enter__()
        self.app.state.server.ready.wait()
        return client


def _model() -> Griffon:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, width=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_width=48,
                      attention_window=8)  # fmt: skip
    return Griffon(cfg).double().eval()


@pytest.mark.parametrize("source", [GEMMA_TEMPLATE, GRIFFON_TEMPLATE, TRICKY])
def test_templates_render_as_transformers_renders_them(tmp_path, source):
    transformers = pytest.importorskip("transformers")
    ByteTokenizer().save_hf(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text()) | {"chat_template": source}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = template_for(load_tokenizer(tmp_path / "tokenizer.json"))
    messages = CONVERSATION if source != TRICKY else [{"role": "system", "content": "x"}, *CONVERSATION]
    for prompt in (True, False):
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert ours.render(messages, add_generation_prompt=prompt) == want
    assert ours.source == source


def test_the_default_templates_and_what_they_refuse():
    assert (
        template_for(ByteTokenizer()).render(CONVERSATION[:1]) == "<|user|>\n  Who is there?  <|end|>\n<|assistant|>\n"
    )
    gemma = ChatTemplate(GEMMA_TEMPLATE, "<end_of_turn>")
    assert gemma.render(CONVERSATION[:1]) == "<start_of_turn>user\nWho is there?<end_of_turn>\n<start_of_turn>model\n"
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        gemma.render([CONVERSATION[0], CONVERSATION[0]])
    with pytest.raises(ChatTemplateError, match="message 1 has role 'king'"):
        gemma.render([CONVERSATION[0], {"role": "king", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="message 0's content must be a string"):
        gemma.render([{"role": "user", "content": 3}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}", "<|end|>").render(CONVERSATION)


def test_chat_completions_are_the_completions_of_the_rendered_conversation():
    openai = pytest.importorskip("openai")
    template = template_for(ByteTokenizer())
    prompt = template.render(CONVERSATION)
    engine = Engine(_model(), ByteTokenizer(), prefill_chunk=16, step="model")
    with BackgroundServer(create_app(engine, "tiny")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=7, seed=3,
                                              logprobs=True, top_logprobs=2)  # fmt: skip
        plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=7, seed=3, logprobs=2,
                                          stop=["<|end|>"])  # fmt: skip
        chunks = list(client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=7, seed=3,
                                                     stream=True))  # fmt: skip
        two = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=5, n=2, seed=1)
    choice = chat.choices[0]
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == plain.choices[0].text
    assert choice.finish_reason == plain.choices[0].finish_reason
    assert [c.logprob for c in choice.logprobs.content] == plain.choices[0].logprobs.token_logprobs
    for entry in choice.logprobs.content:
        assert len(entry.top_logprobs) <= 2 and entry.bytes == list(entry.token.encode())
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert chat.usage.prompt_tokens == len(prompt.encode())
    # streamed: the role first, then the content, which adds up to the whole answer
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert [c.index for c in two.choices] == [0, 1]


def test_a_reply_stops_at_the_end_of_its_turn():
    model = _model()
    engine = Engine(model, ByteTokenizer(), prefill_chunk=16, step="model")
    with Client(create_app(engine, "tiny")) as client:
        body = {"messages": CONVERSATION, "max_tokens": 6, "temperature": 0.0}
        free = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    # the same model, whose template ends a turn at the reply's second character
    turn = ChatTemplate(GRIFFON_TEMPLATE, end_of_turn=free[1])
    engine = Engine(model, ByteTokenizer(), prefill_chunk=16, step="model")
    with Client(create_app(engine, "tiny", chat_template=turn)) as client:
        cut = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert cut["message"]["content"] == free[: free.index(free[1])] and cut["finish_reason"] == "stop"


def test_bad_chat_requests_get_one_clear_400():
    engine = Engine(_model(), ByteTokenizer(), prefill_chunk=16, step="model")
    with Client(create_app(engine, "tiny")) as client:
        for body, message in (
            ({"messages": [{"role": "king", "content": "x"}]}, "role"),
            ({"messages": []}, "messages"),
            ({"messages": CONVERSATION, "suffix": "x"}, "suffix"),
            ({"messages": CONVERSATION, "top_logprobs": 2}, "top_logprobs needs logprobs: true"),
            ({"messages": CONVERSATION, "max_tokens": 3, "max_completion_tokens": 3}, "not both"),
        ):
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and message in r.json()["error"]["message"], (body, r.text)
    engine = Engine(_model(), None, prefill_chunk=16, step="model")
    with Client(create_app(engine, "tiny")) as client:
        r = client.post("/v1/chat/completions", json={"messages": CONVERSATION})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_sample_chat_prints_the_reply_to_a_users_turn(tmp_path, capsys):
    from griffon.checkpoint import save_pretrained
    from griffon.cli import main
    from griffon.decode.generate import generate

    model = _model().float()
    save_pretrained(model, tmp_path)
    ByteTokenizer().save(tmp_path)
    argv = ["sample", str(tmp_path), "--chat", "--prompt", "Who is there?", "--temperature", "0",
            "--max-new-tokens", "12", "--step", "model"]  # fmt: skip
    assert main(argv) == 0
    rendered = template_for(ByteTokenizer()).render([{"role": "user", "content": "Who is there?"}])
    want = ByteTokenizer().decode(generate(model, [list(rendered.encode())], 12, temperature=0.0, step="model")[0])
    assert capsys.readouterr().out == want.split("<|end|>")[0] + "\n"
    (tmp_path / "turns.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert main([*argv, "--chat-template", str(tmp_path / "turns.jinja")]) == 0
    plain = ByteTokenizer().decode(generate(model, [list(b"Who is there?")], 12, temperature=0.0, step="model")[0])
    assert capsys.readouterr().out == plain.split("<|end|>")[0] + "\n"
