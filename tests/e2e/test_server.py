"""`quill serve` end to end, through real clients: the official `openai` Python client, `requests`
and curl.

Two models are served. The random tiny-qwen3 (conftest's `tiny_model`) exercises real compute:
batched greedy requests must give exactly the tokens each gives alone, and a client that hangs up
must have its sequence and KV blocks freed. A *crafted* checkpoint with tiny-qwen3's shapes makes
the expected output known in advance: every layer's output projection is zero, so the residual
stream is the token's embedding, and the untied lm_head maps the embedding slot of token t onto
the token chosen to follow it. The model is therefore a bigram machine whose greedy continuations
are fixed chains of real Qwen3 tokens (reasoning, a tool call, a sentence) and whose logprobs have
a closed form: log_softmax over logits that are `a` for the successor and 0 elsewhere,
a = 1/sqrt(1/128 + eps) (the final RMSNorm of a one-hot vector). Tokens outside the chains have a
zero embedding, hence uniform logprobs -log(vocab)."""
import concurrent.futures
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import requests

from json_prefix import json_prefix  # noqa: E402
openai = pytest.importorskip("openai")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 151936
HIDDEN = 128
EPS = 1e-6
A = 1.0 / math.sqrt(1.0 / HIDDEN + EPS)
LP_NEXT = A - math.log(math.exp(A) + VOCAB - 1)  # the chain successor
LP_OTHER = -math.log(math.exp(A) + VOCAB - 1)    # anything else after a chain token
LP_UNIFORM = -math.log(VOCAB)                    # anything after a token outside the chains

TOOL_JSON = '{"name":"get_weather","arguments":{"city": "Paris"}}'
# Greedy chains, as token texts. A: after "assistant\n" (thinking on); B: after the empty think
# block of enable_thinking=false; C: plain text for /v1/completions.
CHAIN_A = ["\n", "<think>", "Hmm", " okay", "</think>", "Hello", " there", "<|im_end|>"]
CHAIN_B = ["\n\n", "<tool_call>", '{"', "name", '":"', "get", "_weather", '","', "arguments", '":{"', "city",
           '":', ' "', "Paris", '"}}', "</tool_call>", "<|im_end|>"]
CHAIN_C = [" is", " forty", "-two", ".", "<|endoftext|>"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def hf_tok(shared_dir):
    return tokenizers.Tokenizer.from_file(str(shared_dir / "tokenizer" / "qwen3" / "tokenizer.json"))


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def one_token(tok, text):
    ids = encode(tok, text)
    assert len(ids) == 1, f"{text!r} is {len(ids)} tokens"
    return ids[0]


def write_bf16_safetensors(path, tensors):
    """tensors: name -> float32 array; written as BF16 (the values used here are exact in bf16)."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype=np.float32)
        b = (a.view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


@pytest.fixture(scope="module")
def crafted_model(tiny_model, hf_tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "crafted-qwen3"
    out.mkdir(exist_ok=True)
    for name in os.listdir(tiny_model):
        if name != "model.safetensors":
            shutil.copy(tiny_model / name, out / name)
    cfg = json.loads((tiny_model / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg, indent=2))

    with open(tiny_model / "model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = (np.ones if name.endswith("norm.weight") else np.zeros)(info["shape"], np.float32)
    embed = tensors["model.embed_tokens.weight"]
    lm_head = np.zeros_like(embed)
    nxt = {}
    for chain in (CHAIN_A, CHAIN_B, CHAIN_C):
        ids = [one_token(hf_tok, t) for t in chain]
        for a, b in zip(ids, ids[1:]):
            assert a not in nxt, f"token {a} is in two chains"
            nxt[a] = b
    for slot, (a, b) in enumerate(nxt.items()):
        embed[a, slot] = 1.0
        lm_head[b, slot] = 1.0
    tensors["lm_head.weight"] = lm_head
    write_bf16_safetensors(out / "model.safetensors", tensors)
    return out


class Server:
    """`quill serve` on a free port (--port 0); stderr is collected in self.lines. model is a
    directory, or a list of arguments that stand for one (--random-weights ...)."""

    def __init__(self, quill_bin, model, *args):
        model_args = list(map(str, model)) if isinstance(model, (list, tuple)) else [str(model)]
        self.proc = subprocess.Popen([str(quill_bin), "serve", *model_args, "--port", "0", *map(str, args)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines, self.url = [], None
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        self.reader = threading.Thread(target=pump, daemon=True)
        self.reader.start()
        ready.wait(120)
        if not self.url:
            self.proc.kill()
            raise RuntimeError("quill serve did not start:\n" + "\n".join(self.lines))

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.reader.join(10)
        return rc

    def metrics(self):
        text = requests.get(self.url + "/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            key, value = line.rsplit(" ", 1)
            key = re.sub(r'model_name="[^"]*",?', "", key).replace("{}", "")
            out[key] = float(value)
        return out

    def client(self, api_key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def craft(quill_bin, crafted_model):
    s = Server(quill_bin, crafted_model, "--max-num-seqs", 16, "--served-model-name", "crafted")
    yield s
    assert s.stop() == 0, "\n".join(s.lines[-30:])


@pytest.fixture(scope="module")
def rand(quill_bin, tiny_model):
    s = Server(quill_bin, tiny_model, "--max-num-seqs", 32, "--max-model-len", 4096, "--served-model-name", "tiny")
    yield s
    assert s.stop() == 0, "\n".join(s.lines[-30:])


def chat_prompt_tokens(tok, user, thinking=True):
    text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if not thinking:
        text += "<think>\n\n</think>\n\n"
    return len(encode(tok, text))


# ------------------------------------------------------------------ chat

def test_models_and_health(craft):
    assert requests.get(craft.url + "/health", timeout=30).status_code == 200
    models = craft.client().models.list()
    assert [m.id for m in models.data] == ["crafted"]


def test_chat_reasoning_split(craft, hf_tok):
    r = craft.client().chat.completions.create(model="crafted", messages=[{"role": "user", "content": "hi"}],
                                               temperature=0, max_tokens=64)
    m = r.choices[0].message
    assert m.content == "Hello there"
    assert m.reasoning_content == "Hmm okay" and m.reasoning == "Hmm okay"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(CHAIN_A) - 1  # <|im_end|> counts, as in vLLM
    assert r.usage.prompt_tokens == chat_prompt_tokens(hf_tok, "hi")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream(craft):
    stream = craft.client().chat.completions.create(
        model="crafted", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=64, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert reasoning == "Hmm okay" and content == "Hello there"
    # no delta mixes the two: "</think>" splits them exactly
    for c in chunks:
        if c.choices and c.choices[0].delta.content:
            assert not getattr(c.choices[0].delta, "reasoning_content", None)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(CHAIN_A) - 1


def test_enable_thinking_false(craft):
    r = craft.client().chat.completions.create(
        model="crafted", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=64,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    m = r.choices[0].message
    # without tools the tool call is plain content, tags included
    assert m.content == f"<tool_call>{TOOL_JSON}</tool_call>"
    assert m.reasoning_content is None and not m.tool_calls
    assert r.choices[0].finish_reason == "stop"


def test_json_mode_crafted(craft):
    """response_format json_object: the crafted model's logits are 0 but for its chains, so greedy
    takes the lowest allowed id among ties, steered by biases ('"' 2, '}' 1, <|im_end|> 3): the only
    output is {"":""}, after the free reasoning with thinking on, then the end."""
    bias = {"1": 2, "92": 1, "151645": 3}  # '"', '}', <|im_end|>
    client = craft.client()
    for thinking in (True, False):
        kw = dict(model="crafted", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=32,
                  response_format={"type": "json_object"}, logit_bias=bias,
                  extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        assert m.content == '{"":""}' and r.choices[0].finish_reason == "stop", (thinking, m)
        assert (m.reasoning_content == "Hmm okay") if thinking else m.reasoning_content is None
        chunks = list(client.chat.completions.create(stream=True, **kw))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == '{"":""}'
    # without JSON mode the same request follows the chain
    r = client.chat.completions.create(model="crafted", messages=[{"role": "user", "content": "hi"}], temperature=0,
                                       max_tokens=32, logit_bias={"151645": 3})
    assert r.choices[0].message.content != '{"":""}'


def test_json_mode_random_model(rand):
    """Sampled output of a random model under JSON mode is always a JSON object's prefix, and a
    whole object when it ends by itself."""
    rng = np.random.default_rng(11)
    # '"' and '}' up, the ends far up, a few whitespace tokens down (random models pad a lot)
    bias = {"1": 5, "92": 4, "151643": 30, "151645": 30, "198": -5, "220": -5, "197": -5, "256": -5}
    ended, keyed = 0, 0
    for seed in range(8):
        prompt = rng.integers(0, 151000, size=12).tolist()
        r = rand.client().completions.create(model="tiny", prompt=prompt, max_tokens=48, temperature=1.0, seed=seed,
                                             logit_bias=bias,
                                             extra_body={"response_format": {"type": "json_object"}})
        text, finish = r.choices[0].text, r.choices[0].finish_reason
        ok, whole = json_prefix(text)
        assert ok and text.strip().startswith("{"), (seed, text)
        if finish == "stop":
            ended += 1
            assert whole and isinstance(json.loads(text), dict), (seed, text)
            keyed += len(json.loads(text)) > 0
        else:
            assert finish == "length" and r.usage.completion_tokens == 48
    assert ended >= 4 and keyed >= 1, f"objects should close, some with members ({ended}, {keyed})"


@pytest.mark.parametrize("rf", [{"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x"}},
                                {"type": "xml"}, "json_object"])
def test_json_mode_bad_response_format(craft, rf):
    body = {"model": "crafted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "response_format": rf}
    err = error_of(requests.post(craft.url + "/v1/chat/completions", json=body, timeout=60), 400)
    assert err["param"] == "response_format"


SCHEMA_PERSON = {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "ok"],
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"},
                   "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                   "ok": {"type": "boolean"},
                   "kind": {"anyOf": [{"type": "null"}, {"type": "number"}, {"const": "x"}]}}}
SCHEMA_TREE = {  # recursion through $defs, a type list, oneOf
    "$defs": {"node": {"type": "object", "required": ["v"], "properties": {
        "v": {"type": ["integer", "null"]},
        "label": {"oneOf": [{"type": "string", "minLength": 1, "maxLength": 3}, {"enum": [1, 2.5, False]}]},
        "kids": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}}}},
    "$ref": "#/$defs/node"}
SCHEMA_LIST = {"type": "array", "minItems": 1, "maxItems": 3, "items": {
    "type": "object", "required": ["id", "v"],
    "properties": {"id": {"type": "integer"}, "v": {"type": ["string", "null"], "maxLength": 4}}}}


def test_json_schema_crafted(craft):
    """response_format json_schema, guided_json and structured_outputs.json on the crafted model:
    its logits tie (0) outside the chains, so greedy takes the lowest allowed id each time ('"'
    before letters, 'n' before 'y', '-' before digits), and the schema leaves one path: the first
    enum value, then the integer -0, '}' once n is given, the end (biased up) once whole."""
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer"}},
              "required": ["answer", "n"], "additionalProperties": False}
    client = craft.client()
    forms = [dict(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}),
             dict(extra_body={"guided_json": json.dumps(schema)}),
             dict(extra_body={"structured_outputs": {"json": schema}})]
    for form in forms:
        for thinking in (True, False):
            extra = {**form.get("extra_body", {}), "chat_template_kwargs": {"enable_thinking": thinking}}
            kw = dict(model="crafted", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=40,
                      logit_bias={"151645": 3}, response_format=form.get("response_format", openai.NOT_GIVEN),
                      extra_body=extra)
            r = client.chat.completions.create(**kw)
            m = r.choices[0].message
            assert m.content == '{"answer":"no","n":-0}' and r.choices[0].finish_reason == "stop", (form, thinking, m)
            assert (m.reasoning_content == "Hmm okay") if thinking else m.reasoning_content is None
            chunks = list(client.chat.completions.create(stream=True, **kw))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == m.content


@pytest.mark.parametrize("schema", [SCHEMA_PERSON, SCHEMA_TREE, SCHEMA_LIST], ids=["person", "tree", "list"])
def test_json_schema_random_model(rand, schema):
    """Sampled output of a random model under a schema: whatever ends by itself parses with
    Python's json and validates with the jsonschema package (an independent validator); most end."""
    validator = jsonschema.Draft202012Validator(schema)
    # the ends far up, a few whitespace tokens down (random models pad a lot)
    bias = {"151643": 30, "151645": 30, "198": -5, "220": -5, "197": -5, "256": -5}
    ended = 0
    for seed in range(8):
        form = [{"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}},
                {"guided_json": schema}, {"structured_outputs": {"json": schema}}][seed % 3]
        r = rand.client().completions.create(model="tiny", prompt=[5, 6, 7, seed], max_tokens=160, temperature=1.0,
                                             seed=seed, logit_bias=bias, extra_body=form)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
        if finish == "stop":
            ended += 1
            validator.validate(json.loads(text))
        else:
            assert finish == "length" and r.usage.completion_tokens == 160, (seed, r.choices[0])
    assert ended >= 5, f"most values should end ({ended} of 8)"


@pytest.mark.parametrize("patch,param,needles", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "string", "pattern": "a+"}}}}, "response_format", ["'pattern'", "#/pattern"]),
    ({"guided_json": {"type": "object", "properties": {"when": {"type": "string", "format": "date"}}}}, "guided_json",
     ["'format'", "#/properties/when/format"]),
    ({"structured_outputs": {"json": {"type": "integer", "minimum": 1}}}, "structured_outputs", ["'minimum'", "#/minimum"]),
    ({"guided_json": {"anyOf": [{"type": "object"}, {"type": "object", "properties": {"a": {}}}]}}, "guided_json",
     ["#/anyOf/0", "#/anyOf/1"]),
    ({"guided_json": "{not json"}, "guided_json", ["not valid JSON"]),
    ({"guided_json": {"$ref": "#/$defs/missing"}}, "guided_json", ["#/$defs/missing"]),
])
def test_json_schema_refused(craft, patch, param, needles):
    """A schema beyond the subset is refused with a 400 naming the field, the keyword and where it
    is; the server goes on serving."""
    body = {"model": "crafted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **patch}
    err = error_of(requests.post(craft.url + "/v1/chat/completions", json=body, timeout=60), 400)
    assert err["param"] == param and all(n in err["message"] for n in needles), err
    r = craft.client().chat.completions.create(model="crafted", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_guided_choice(craft, rand):
    """vLLM's guided_choice and structured_outputs.choice: the crafted model's greedy picks the
    lowest allowed id among its tied logits ('n' before 'y'), a bias flips it; a random model's
    sampled answers are always one of the choices."""
    client = craft.client()
    msgs = [{"role": "user", "content": "hi"}]
    for extra in ({"guided_choice": ["yes", "no"]}, {"structured_outputs": {"choice": ["yes", "no"]}}):
        for thinking in (True, False):
            kw = dict(model="crafted", messages=msgs, temperature=0, max_tokens=16,
                      extra_body={**extra, "chat_template_kwargs": {"enable_thinking": thinking}})
            r = client.chat.completions.create(**kw)
            assert r.choices[0].message.content == "no" and r.choices[0].finish_reason == "stop", (extra, thinking)
            assert (r.choices[0].message.reasoning_content == "Hmm okay") == thinking
            r = client.chat.completions.create(logit_bias={"88": 1}, **kw)  # 'y'
            assert r.choices[0].message.content == "yes"
    words = ["alpha", "beta", "gamma delta", "beta-2"]
    seen = set()
    for seed in range(6):
        r = rand.client().completions.create(model="tiny", prompt=[1, 2, 3, seed], max_tokens=16, temperature=1.0,
                                             seed=seed, extra_body={"guided_choice": words})
        assert r.choices[0].text in words and r.choices[0].finish_reason == "stop", r.choices[0]
        seen.add(r.choices[0].text)
    assert len(seen) >= 2, seen


@pytest.mark.parametrize("patch,param", [
    ({"guided_json": {"type": "object", "minProperties": 1}}, "guided_json"), ({"guided_regex": "a+"}, "guided_regex"),
    ({"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}}, "guided_json"),
    ({"structured_outputs": {"regex": "a+"}}, "structured_outputs"), ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", ""]}, "guided_choice"), ({"guided_choice": "a"}, "guided_choice"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice"),
    ({"guided_choice": ["a"], "structured_outputs": {"choice": ["b"]}}, "structured_outputs")])
def test_structured_outputs_refused(craft, patch, param):
    body = {"model": "crafted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **patch}
    err = error_of(requests.post(craft.url + "/v1/chat/completions", json=body, timeout=60), 400)
    assert err["param"] == param, err


def test_tokenize_and_detokenize(craft, hf_tok):
    """vLLM's /tokenize (a prompt, or messages rendered as /v1/chat/completions renders them) and
    /detokenize, against the reference tokenizer."""
    u = craft.url
    text = "Hello world, ça va? 日本語 <think>"
    r = requests.post(u + "/tokenize", json={"model": "crafted", "prompt": text}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == encode(hf_tok, text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] > 0 and body["token_strs"] is None
    assert requests.post(u + "/tokenize", json={"prompt": ""}, timeout=60).json()["count"] == 0
    msgs = [{"role": "user", "content": "hi"}]
    for thinking in (True, False):
        chat = requests.post(u + "/tokenize", json={"messages": msgs, "chat_template_kwargs": {
            "enable_thinking": thinking}}, timeout=60).json()
        assert chat["count"] == chat_prompt_tokens(hf_tok, "hi", thinking)
        usage = craft.client().chat.completions.create(
            model="crafted", messages=msgs, max_tokens=1,
            extra_body={"chat_template_kwargs": {"enable_thinking": thinking}}).usage
        assert usage.prompt_tokens == chat["count"]
    bare = requests.post(u + "/tokenize", json={"messages": msgs, "add_generation_prompt": False}, timeout=60).json()
    assert hf_tok.decode(bare["tokens"], skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>\n"
    back = requests.post(u + "/detokenize", json={"tokens": body["tokens"]}, timeout=60).json()
    assert back == {"prompt": text}
    for path, bad, param in [("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": 5}, "prompt"),
                             ("/tokenize", {"prompt": "x", "messages": msgs}, "prompt"),
                             ("/tokenize", {"messages": []}, "messages"), ("/detokenize", {"tokens": "1"}, "tokens"),
                             ("/detokenize", {"tokens": [1, 10 ** 7]}, "tokens")]:
        assert error_of(requests.post(u + path, json=bad, timeout=60), 400)["param"] == param, (path, bad)
    assert error_of(requests.post(u + "/tokenize", json={"model": "gpt-4", "prompt": "x"}, timeout=60), 404)
    assert error_of(requests.get(u + "/tokenize", timeout=60), 405)


def test_tool_call_round_trip(craft):
    client = craft.client()
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model="crafted", messages=msgs, tools=TOOLS, temperature=0, max_tokens=64,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content is None
    [call] = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id.startswith("chatcmpl-tool-")
    msgs.append(c.message.model_dump(exclude_none=True))
    msgs.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21})})
    r2 = client.chat.completions.create(model="crafted", messages=msgs, tools=TOOLS, temperature=0, max_tokens=64)
    assert r2.choices[0].message.content == "Hello there"
    assert r2.choices[0].finish_reason == "stop"
    # the tool result reached the prompt: it is longer than the first one by at least its tokens
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens + 10


def test_tool_call_streamed_and_tool_choice_none(craft):
    client = craft.client()
    kw = dict(model="crafted", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, temperature=0,
              max_tokens=64, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    chunks = list(client.chat.completions.create(stream=True, **kw))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    r = client.chat.completions.create(tool_choice="none", **kw)
    assert not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == f"<tool_call>{TOOL_JSON}</tool_call>"


# ------------------------------------------------------------------ forced tool calls (tool_choice)

NAMED_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
TOOLS_R = [  # for the random model: parameters with bounds, a $ref, none at all
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city", "days"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer"},
                       "unit": {"enum": ["c", "f"]}}}}},
    {"type": "function", "function": {"name": "get_time", "description": "no parameters"}},
    {"type": "function", "function": {"name": "set_alarm", "parameters": {
        "$defs": {"hm": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}},
        "type": "object", "properties": {"at": {"$ref": "#/$defs/hm"}, "label": {"type": ["string", "null"]}},
        "required": ["at"]}}},
]
# the ends far up, whitespace tokens down (random models pad a lot)
BIAS_R = {"151643": 30, "151645": 30, "198": -5, "220": -5, "197": -5, "256": -5}


def check_call_against_tools(call, tools):
    """A tool call's name is one of the tools' and its arguments (a JSON object) are valid for it,
    by the jsonschema package; returns the parsed arguments."""
    fns = {t["function"]["name"]: t["function"] for t in tools}
    assert call.type == "function" and call.function.name in fns, call
    assert call.id.startswith("chatcmpl-tool-")
    args = json.loads(call.function.arguments)
    schema = fns[call.function.name].get("parameters") or {"type": "object"}
    jsonschema.Draft202012Validator(schema).validate(args)
    assert isinstance(args, dict)
    return args


def streamed_calls(chunks):
    """Tool calls of a streamed chat, rebuilt from their deltas: {index: [id, name, arguments]};
    checks that the id, type and name come once, in a call's first delta."""
    calls = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            if d.index not in calls:
                assert d.id and d.id.startswith("chatcmpl-tool-") and d.type == "function" and d.function.name, d
                calls[d.index] = [d.id, d.function.name, d.function.arguments or ""]
            else:
                assert d.id is None and d.function.name is None, d
                calls[d.index][2] += d.function.arguments or ""
    return calls


def test_tool_choice_named_random_model(rand):
    """tool_choice naming a function: sampled output of a random model is one call to it whose
    arguments validate against its parameters (any object when it has none), finish_reason "stop";
    streamed, the same call (same seed) in deltas, the arguments in pieces."""
    client = rand.client()
    ended, pieces = 0, []
    for seed in range(6):
        tool = TOOLS_R[seed % 3]["function"]["name"]
        thinking = seed >= 4  # </think> biased up, so the call comes after (empty) reasoning
        kw = dict(model="tiny", messages=[{"role": "user", "content": "call it"}], tools=TOOLS_R,
                  tool_choice={"type": "function", "function": {"name": tool}}, max_tokens=120, temperature=1.0,
                  seed=seed, logit_bias={**BIAS_R, **({"151668": 40} if thinking else {})},
                  extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
        r = client.chat.completions.create(**kw)
        c = r.choices[0]
        [call] = c.message.tool_calls
        assert call.function.name == tool and not c.message.content, c
        if c.finish_reason == "stop":
            ended += 1
            check_call_against_tools(call, TOOLS_R)
        else:
            assert c.finish_reason == "length" and r.usage.completion_tokens == 120, c
        chunks = list(client.chat.completions.create(stream=True, **kw))
        calls = streamed_calls(chunks)
        assert list(calls) == [0] and calls[0][1:] == [tool, call.function.arguments], (calls, call)
        assert not any(ch.choices[0].delta.content for ch in chunks if ch.choices)
        pieces.append(sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls))
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
            [c.finish_reason]
    assert ended >= 4, f"most calls should end ({ended} of 6)"
    assert max(pieces) > 5, f"the arguments stream in pieces ({pieces} deltas)"


def test_tool_choice_required_random_model(rand):
    """tool_choice "required": sampled output of a random model is one or more calls, each to one
    of the tools with arguments valid for that tool, finish_reason "tool_calls"; streamed, the same
    calls."""
    client = rand.client()
    ended, names = 0, set()
    for seed in range(8):
        kw = dict(model="tiny", messages=[{"role": "user", "content": "call"}], tools=TOOLS_R, tool_choice="required",
                  max_tokens=160, temperature=1.0, seed=seed, logit_bias={**BIAS_R, "60": 3},  # ']' up
                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        r = client.chat.completions.create(**kw)
        c = r.choices[0]
        assert not c.message.content, c
        if c.finish_reason == "tool_calls":
            ended += 1
            assert c.message.tool_calls
            for call in c.message.tool_calls:
                check_call_against_tools(call, TOOLS_R)
                names.add(call.function.name)
        else:
            assert c.finish_reason == "length" and r.usage.completion_tokens == 160, c
        calls = streamed_calls(client.chat.completions.create(stream=True, **kw))
        assert [v[1:] for _, v in sorted(calls.items())] == \
            [[t.function.name, t.function.arguments] for t in c.message.tool_calls or []]
        assert len({v[0] for v in calls.values()}) == len(calls), "call ids differ"
    assert ended >= 5 and len(names) >= 2, f"most arrays should end, calling several tools ({ended}, {names})"


def test_tool_choice_crafted(craft):
    """Forced calls on the crafted model: its logits tie (0) outside the chains, so greedy takes the
    lowest allowed id, steered by biases ('"' 2, '}' and ']' 1, <|im_end|> 3). Named: the call's
    arguments are {"city":""}, after the reasoning when thinking; "required" with one tool: the
    array of that one call; with two: the lowest name byte wins ('t' of get_time before 'w'), whose
    parameters are any object: {"":""}."""
    bias = {"1": 2, "92": 1, "60": 1, "151645": 3}
    client = craft.client()
    time_tool = {"type": "function", "function": {"name": "get_time"}}
    cases = [(NAMED_WEATHER, TOOLS, "stop", [("get_weather", '{"city":""}')]),
             ("required", TOOLS, "tool_calls", [("get_weather", '{"city":""}')]),
             ("required", TOOLS + [time_tool], "tool_calls", [("get_time", '{"":""}')])]
    for tool_choice, tools, finish, want in cases:
        for thinking in (True, False):
            kw = dict(model="crafted", messages=[{"role": "user", "content": "weather?"}], tools=tools,
                      tool_choice=tool_choice, temperature=0, max_tokens=64, logit_bias=bias,
                      extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
            r = client.chat.completions.create(**kw)
            c = r.choices[0]
            got = [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
            assert got == want and c.finish_reason == finish and not c.message.content, (tool_choice, thinking, c)
            assert (c.message.reasoning_content == "Hmm okay") if thinking else c.message.reasoning_content is None
            chunks = list(client.chat.completions.create(stream=True, **kw))
            calls = streamed_calls(chunks)
            assert [v[1:] for _, v in sorted(calls.items())] == [list(w) for w in want]
            reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks
                                if ch.choices)
            assert reasoning == ("Hmm okay" if thinking else "")
            assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
                [finish]
    # the same request without tool_choice follows the chain: a hermes call, parsed
    r = client.chat.completions.create(model="crafted", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS,
                                       temperature=0, max_tokens=64,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}


BAD_PARAMS_TOOL = {"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"s": {"type": "string", "pattern": "a+"}}}}}


@pytest.mark.parametrize("patch,param,needle", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice", "'nope'"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tool_choice": NAMED_WEATHER}, "tool_choice", "tools"),
    ({"tool_choice": "auto"}, "tool_choice", "tools"),
    ({"tool_choice": "required", "tools": []}, "tool_choice", "empty"),
    ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice", "required"),
    ({"tool_choice": 5, "tools": TOOLS}, "tool_choice", "required"),
    ({"tool_choice": {"function": {"name": "get_weather"}}, "tools": TOOLS}, "tool_choice", "type"),
    ({"tool_choice": {"type": "function", "function": "get_weather"}, "tools": TOOLS}, "tool_choice", "name"),
    ({"tool_choice": {"type": "function", "function": {"name": ""}}, "tools": TOOLS}, "tool_choice", "name"),
    ({"tool_choice": "required", "tools": TOOLS, "response_format": {"type": "json_object"}}, "tool_choice",
     "one output form"),
    ({"tool_choice": NAMED_WEATHER, "tools": TOOLS, "guided_choice": ["a"]}, "tool_choice", "one output form"),
    ({"tool_choice": "required", "tools": [BAD_PARAMS_TOOL]}, "tools", "'pattern'"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}, "tools": [BAD_PARAMS_TOOL]}, "tools",
     "tools[0].function.parameters"),
    ({"tool_choice": "required", "tools": TOOLS + TOOLS}, "tools", "'get_weather'"),
    ({"tool_choice": NAMED_WEATHER, "tools": [{"type": "function", "function": {"name": "get_weather",
                                                                                 "parameters": "x"}}]},
     "tools", "parameters"),
])
def test_tool_choice_refused(craft, patch, param, needle):
    """A tool_choice that cannot be honoured gets a 400 naming the field; the server goes on."""
    body = {"model": "crafted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **patch}
    err = error_of(requests.post(craft.url + "/v1/chat/completions", json=body, timeout=60), 400)
    assert err["param"] == param and needle in err["message"] and err["type"] == "BadRequestError", err
    r = craft.client().chat.completions.create(model="crafted", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, tool_choice="none")  # "none" needs no tools (vLLM)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_logprobs_and_n(craft, hf_tok):
    r = craft.client().chat.completions.create(model="crafted", messages=[{"role": "user", "content": "hi"}],
                                               temperature=0, max_tokens=64, logprobs=True, top_logprobs=2, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.message.content == "Hello there"
        entries = c.logprobs.content
        assert [e.token for e in entries] == CHAIN_A[1:]  # <|im_end|> counts, though not in the text
        for e in entries:
            assert e.logprob == pytest.approx(LP_NEXT, abs=1e-3)
            assert e.top_logprobs[0].token == e.token and len(e.top_logprobs) == 2
            assert e.top_logprobs[1].logprob == pytest.approx(LP_OTHER, abs=1e-3)
        assert bytes(entries[1].bytes) == b"Hmm"
    assert r.usage.completion_tokens == 3 * (len(CHAIN_A) - 1)


def test_model_card_example_with_curl(craft):
    body = {"model": "crafted", "messages": [{"role": "user", "content": "Give me a short introduction."}],
            "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 32768}
    out = subprocess.run(["curl", "-sS", craft.url + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps(body)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["model"] == "crafted" and r["object"] == "chat.completion"
    # at temperature 0.6 the successor's probability is 1 - 1e-7: sampling follows the chain
    assert r["choices"][0]["message"]["content"] == "Hello there"
    assert r["choices"][0]["message"]["reasoning_content"] == "Hmm okay"


# ------------------------------------------------------------------ completions

def test_completions_echo_logprobs_for_lm_eval(craft, hf_tok):
    """The request lm-eval's local-completions sends for loglikelihood, and its parse_logprobs."""
    full = [encode(hf_tok, "The answer is forty-two."), encode(hf_tok, "The answer is forty.")]
    ctxlen = len(encode(hf_tok, "The answer is"))
    r = requests.post(craft.url + "/v1/completions", timeout=120, json={
        "model": "crafted", "prompt": full, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
        "echo": True}).json()
    choices = sorted(r["choices"], key=lambda c: c["index"])
    assert len(choices) == 2
    results = []
    for ch, ids in zip(choices, full):
        lp = ch["logprobs"]
        assert len(lp["tokens"]) == len(ids) + 1  # the prompt, then the one generated token
        assert lp["tokens"][:len(ids)] == [hf_tok.decode([i]) for i in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert ch["text"].startswith(hf_tok.decode(ids))
        offsets = [0]
        for t in lp["tokens"][:-1]:
            offsets.append(offsets[-1] + len(t))
        assert lp["text_offset"] == offsets
        # lm-eval's parse_logprobs
        results.append((sum(lp["token_logprobs"][ctxlen:-1]),
                        all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                                       lp["top_logprobs"][ctxlen:-1]))))
        # every prompt position against the closed form
        for i in range(1, len(ids)):
            prev, cur = hf_tok.decode([ids[i - 1]]), ids[i]
            follows = {CHAIN_C[k]: CHAIN_C[k + 1] for k in range(len(CHAIN_C) - 1)}
            if prev in follows:
                want = LP_NEXT if hf_tok.decode([cur]) == follows[prev] else LP_OTHER
            else:
                want = LP_UNIFORM
            assert lp["token_logprobs"][i] == pytest.approx(want, abs=1e-3), (i, prev)
    assert results[0][0] == pytest.approx(3 * LP_NEXT, abs=3e-3) and results[0][1] is True
    assert results[1][0] == pytest.approx(LP_NEXT + LP_OTHER, abs=3e-3) and results[1][1] is False


def test_completions_stream_echo_logprobs(craft, hf_tok):
    body = {"model": "crafted", "prompt": "The answer is", "temperature": 0, "max_tokens": 8, "echo": True,
            "logprobs": 2}
    whole = requests.post(craft.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]
    chunks = list(craft.client().completions.create(stream=True, **body))
    assert "".join(ch.choices[0].text for ch in chunks) == whole["text"] == "The answer is forty-two."
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for ch in chunks:
        if ch.choices[0].logprobs:
            for k in merged:
                merged[k] += getattr(ch.choices[0].logprobs, k)
    assert merged == whole["logprobs"]
    assert merged["token_logprobs"][3] == pytest.approx(LP_NEXT, abs=1e-3)  # " forty" after " is"


def test_completions_text_stop_and_length(craft):
    c = craft.client()
    r = c.completions.create(model="crafted", prompt="The answer is", temperature=0, max_tokens=16)
    assert r.choices[0].text == " forty-two." and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 4  # " forty", "-two", ".", <|endoftext|>
    r = c.completions.create(model="crafted", prompt="The answer is", temperature=0, max_tokens=2)
    assert r.choices[0].text == " forty-two" and r.choices[0].finish_reason == "length"
    # a stop string spanning the " forty" / "-two" boundary; the output stops before it
    r = c.completions.create(model="crafted", prompt="The answer is", temperature=0, max_tokens=16, stop=["zzz", "rty-t"])
    assert r.choices[0].text == " fo" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == "rty-t"
    chunks = list(c.completions.create(model="crafted", prompt="The answer is", temperature=0, max_tokens=16,
                                       stop="rty-t", stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == " fo"
    assert chunks[-1].choices[0].finish_reason == "stop"
    r = c.completions.create(model="crafted", prompt="The answer is", temperature=0, max_tokens=16,
                             extra_body={"stop_token_ids": [37402]})  # "-two": not in the output
    assert r.choices[0].text == " forty" and r.choices[0].model_extra["stop_reason"] == 37402
    r = c.completions.create(model="crafted", prompt="The answer is", temperature=0, max_tokens=6,
                             extra_body={"ignore_eos": True, "min_tokens": 6})
    assert r.choices[0].text.startswith(" forty-two.") and r.usage.completion_tokens == 6
    # stop strings count only after min_tokens (vLLM): "-two" is the 2nd token
    for min_tokens, text in [(1, " forty"), (3, " forty-two.")]:
        r = c.completions.create(model="crafted", prompt="The answer is", temperature=0, max_tokens=16, stop="-two",
                                 extra_body={"min_tokens": min_tokens})
        assert r.choices[0].text == text and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model="crafted", prompt=["The answer is", "x"], temperature=0, max_tokens=3, echo=True)
    assert [ch.text for ch in sorted(r.choices, key=lambda x: x.index)] == ["The answer is forty-two.", "x!!!"]


# ------------------------------------------------------------------ batching, disconnects

def test_concurrent_greedy_equals_alone(rand):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, 151000, size=int(n)).tolist() for n in rng.integers(3, 60, size=16)]

    def run(p):
        r = requests.post(rand.url + "/v1/completions", timeout=600, json={
            "model": "tiny", "prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "logprobs": 0,
            "return_tokens_as_token_ids": True}).json()
        return [int(t.split(":")[1]) for t in r["choices"][0]["logprobs"]["tokens"]]

    alone = [run(p) for p in prompts]
    assert len({tuple(a) for a in alone}) >= 5, "the prompts should not all continue the same way"
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone


def test_logit_bias(rand):
    """OpenAI's logit_bias through the official client: +100 forces a token (greedy and sampled),
    -100 bans tokens; the reported logprobs stay the model's own (vLLM's raw logprobs)."""
    c = rand.client()
    prompt = [9707, 11, 1879, 0, 17, 42]

    def ids_of(**kw):
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=8, logprobs=0,
                                 extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True}, **kw)
        lp = r.choices[0].logprobs
        return [int(t.split(":")[1]) for t in lp.tokens], lp.token_logprobs

    free, free_lp = ids_of(temperature=0)
    forced = 1000 if 1000 not in free else 1001
    got, got_lp = ids_of(temperature=0, logit_bias={str(forced): 100})
    assert got == [forced] * 8
    assert all(lp < 0 for lp in got_lp), "logprobs are the model's own, before the bias"
    got, _ = ids_of(temperature=1.0, seed=3, logit_bias={str(forced): 100})
    assert got == [forced] * 8
    banned = set(free)
    got, _ = ids_of(temperature=0, logit_bias={str(t): -100 for t in banned})
    assert len(got) == 8 and not banned & set(got)
    again, again_lp = ids_of(temperature=0)
    assert again == free and again_lp == free_lp, "a bias must not leak into later requests"


def test_random_weights_serve_like_the_checkpoint(quill_bin, rand):
    """--random-weights builds the preset in memory (vLLM's --load-format dummy): bf16 tiny-qwen3
    is bit-identical to `quill random-model tiny-qwen3`, so greedy tokens match the served files."""
    s = Server(quill_bin, ["--random-weights", "tiny-qwen3", "--dtype", "bf16"], "--max-model-len", 4096)
    try:
        assert [m.id for m in s.client().models.list().data] == ["tiny-qwen3"]
        prompt = [9707, 11, 1879, 0, 151000, 42]

        def greedy(server, model):
            r = requests.post(server.url + "/v1/completions", timeout=600, json={
                "model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "logprobs": 0, "return_tokens_as_token_ids": True}).json()
            return r["choices"][0]["logprobs"]["tokens"]

        assert greedy(s, "tiny-qwen3") == greedy(rand, "tiny")
    finally:
        assert s.stop() == 0, "\n".join(s.lines[-30:])


def test_random_weights_bad_arguments(quill_bin, tiny_model):
    def run(*args):
        return subprocess.run([str(quill_bin), "serve", *map(str, args)], capture_output=True, text=True, timeout=60)

    p = run(tiny_model, "--random-weights", "tiny-qwen3")
    assert p.returncode == 2 and "MODEL_DIR or --random-weights" in p.stderr
    p = run("--random-weights", "tiny-qwen3", "--dtype", "fp8")
    assert p.returncode == 2 and "--dtype must be int4 or bf16" in p.stderr
    p = run("--random-weights", "no-such-preset", "--port", "0")
    assert p.returncode == 1 and "no-such-preset" in p.stderr


def test_step_budget_and_memory_flags(quill_bin, tiny_model):
    """The CPU keeps 512-token steps (a GPU of 70 GiB or more gets vLLM's 8192, a smaller one 2048)
    and an explicit budget wins; --gpu-memory-utilization, which sizes the KV cache on a GPU, is
    accepted on the CPU and refused outside (0, 1], naming the flag."""
    for bad in ("0", "1.5", "most"):
        p = subprocess.run([str(quill_bin), "serve", str(tiny_model), "--gpu-memory-utilization", bad, "--port", "0"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and "--gpu-memory-utilization" in p.stderr, p.stderr
    for args, budget in (((), 512), (("--max-num-batched-tokens", 64, "--gpu-memory-utilization", 0.5), 64)):
        s = Server(quill_bin, tiny_model, "--device", "cpu", *args)
        try:
            assert any(f"max_num_batched_tokens {budget}," in line for line in s.lines), s.lines
        finally:
            assert s.stop() == 0


def test_prefix_cache_shared_system_prompt(rand):
    """A long shared system prompt is prefilled once: later requests take its KV blocks from the
    cache (hit counters in /metrics), and the cached path gives the same greedy tokens."""
    system = "You are a careful assistant. " * 40

    def ask(user):
        r = requests.post(rand.url + "/v1/chat/completions", timeout=600, json={
            "model": "tiny", "temperature": 0, "max_tokens": 8, "ignore_eos": True,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}).json()
        return r["choices"][0]["message"], r["usage"]["prompt_tokens"]

    before = rand.metrics()
    first, n_prompt = ask("Question one?")
    mid = rand.metrics()
    again, _ = ask("Question one?")
    other, _ = ask("A different question")
    after = rand.metrics()
    assert again == first
    hits = after["quill:prefix_cache_hits_total"] - mid["quill:prefix_cache_hits_total"]
    # the repeat hits every full block but the one holding its last token; the other question at
    # least the system prompt's full blocks (about 240 tokens)
    assert hits >= (n_prompt - 1) // 16 * 16 + 200
    assert after["quill:prefix_cache_queries_total"] - before["quill:prefix_cache_queries_total"] >= 3 * 200
    assert 0 < after["quill:prefix_cache_hit_rate"] <= 1


def wait_idle(server, timeout=30):
    deadline = time.time() + timeout
    while True:
        m = server.metrics()
        idle = (m["quill:num_requests_running"] == 0 and m["quill:num_requests_waiting"] == 0 and
                m["quill:kv_cache_blocks_used"] == 0 and m["quill:num_http_requests_active"] == 0)
        if idle or time.time() > deadline:
            return m
        time.sleep(0.1)


def test_disconnect_frees_resources(rand):
    before = rand.metrics()
    r = requests.post(rand.url + "/v1/completions", stream=True, timeout=600, json={
        "model": "tiny", "prompt": "Tell me everything.", "max_tokens": 3000, "ignore_eos": True, "stream": True})
    lines = r.iter_lines()
    got = 0
    for line in lines:
        if line.startswith(b"data: {"):
            got += 1
            if got == 5:
                break
    during = rand.metrics()
    assert during["quill:num_requests_running"] == 1
    assert during["quill:kv_cache_blocks_used"] > 0
    assert during["quill:num_http_requests_active"] == 1
    r.close()
    after = wait_idle(rand)
    assert after["quill:num_requests_running"] == 0 and after["quill:num_requests_waiting"] == 0
    assert after["quill:kv_cache_blocks_used"] == 0 and after["quill:num_http_requests_active"] == 0
    key = 'quill:request_success_total{finished_reason="abort"}'
    assert after[key] == before[key] + 1
    # it stopped early: far fewer than 3000 tokens were generated
    assert after["quill:generation_tokens_total"] - before["quill:generation_tokens_total"] < 2000

    # the same for a non-streaming request whose client gives up waiting
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(rand.url + "/v1/completions", timeout=(10, 1.0), json={
            "model": "tiny", "prompt": "Tell me everything.", "max_tokens": 3000, "ignore_eos": True})
    final = wait_idle(rand)
    assert final["quill:kv_cache_blocks_used"] == 0 and final["quill:num_http_requests_active"] == 0
    assert final[key] == after[key] + 1


def test_metrics_exposition(craft):
    craft.client().completions.create(model="crafted", prompt="The answer is", temperature=0, max_tokens=4)
    text = requests.get(craft.url + "/metrics", timeout=30).text
    for name in ["quill:num_requests_running", "quill:num_requests_waiting", "quill:kv_cache_usage_perc",
                 "quill:prompt_tokens_total", "quill:generation_tokens_total", "quill:http_requests_total",
                 "quill:time_to_first_token_seconds", "quill:inter_token_latency_seconds"]:
        assert f"# TYPE {name} " in text
    m = craft.metrics()
    assert m['quill:http_requests_total{code="200"}'] >= 1
    assert m["quill:time_to_first_token_seconds_count"] >= 1
    assert m['quill:time_to_first_token_seconds_bucket{le="+Inf"}'] == m["quill:time_to_first_token_seconds_count"]


# ------------------------------------------------------------------ errors

def error_of(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    return err


BAD_CHAT = [
    ("temperature", {"temperature": "hot"}),
    ("temperature", {"temperature": -1}),
    ("top_p", {"top_p": 0}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": -5}),
    ("min_p", {"min_p": 2}),
    ("presence_penalty", {"presence_penalty": 3}),
    ("frequency_penalty", {"frequency_penalty": -2.5}),
    ("repetition_penalty", {"repetition_penalty": 0}),
    ("n", {"n": 0}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": "ten"}),
    ("max_tokens", {"max_tokens": 40960}),  # prompt + max_tokens > max_model_len
    ("seed", {"seed": 1.5}),
    ("stop", {"stop": 5}),
    ("stop", {"stop": [""]}),
    ("stop_token_ids", {"stop_token_ids": [10 ** 7]}),
    ("min_tokens", {"min_tokens": 10, "max_tokens": 5}),
    ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
    ("top_logprobs", {"top_logprobs": 2}),
    ("stream", {"stream": "yes"}),
    ("stream_options", {"stream_options": {"include_usage": True}}),
    ("tool_choice", {"tool_choice": "any", "tools": TOOLS}),
    ("tools", {"tools": [{"type": "function"}]}),
    ("messages", {"messages": []}),
    ("messages", {"messages": "hello"}),
    ("messages", {"messages": [{"role": "bot", "content": "x"}]}),
    ("chat_template_kwargs", {"chat_template_kwargs": {"enable_thinking": "no"}}),
    ("logit_bias", {"logit_bias": {"5": 101}}),
    ("logit_bias", {"logit_bias": {"five": 1}}),
    ("logit_bias", {"logit_bias": {"10000000": 1}}),
    ("logit_bias", {"logit_bias": {"-1": 1}}),
    ("logit_bias", {"logit_bias": {"5": "high"}}),
    ("logit_bias", {"logit_bias": [5, 10]}),
    ("logit_bias", {"logit_bias": {str(i): 1 for i in range(301)}}),
]


@pytest.mark.parametrize("param,patch", BAD_CHAT, ids=[f"{p}-{i}" for i, (p, _) in enumerate(BAD_CHAT)])
def test_bad_chat_fields(craft, param, patch):
    body = {"model": "crafted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **patch}
    err = error_of(requests.post(craft.url + "/v1/chat/completions", json=body, timeout=60), 400)
    assert err["param"] == param and err["type"] == "BadRequestError"


def test_request_errors(craft):
    u = craft.url
    err = error_of(requests.post(u + "/v1/chat/completions", data=b'{"messages": [', timeout=60), 400)
    assert "JSON" in err["message"]
    error_of(requests.post(u + "/v1/chat/completions", data=b"[1, 2]", timeout=60), 400)
    err = error_of(requests.post(u + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                   "model": "gpt-4"}, timeout=60), 404)
    assert err["param"] == "model" and "gpt-4" in err["message"]
    error_of(requests.post(u + "/v1/completions", json={"model": "crafted"}, timeout=60), 400)
    error_of(requests.post(u + "/v1/completions", json={"prompt": [[1, 2], "x"]}, timeout=60), 400)
    error_of(requests.post(u + "/v1/completions", json={"prompt": [10 ** 9]}, timeout=60), 400)
    error_of(requests.post(u + "/v1/completions", json={"prompt": "x", "logprobs": 50}, timeout=60), 400)
    error_of(requests.post(u + "/v1/completions", json={"prompt": " hello" * 41000, "max_tokens": 1}, timeout=60), 400)
    error_of(requests.get(u + "/v1/chat/completions", timeout=60), 405)
    error_of(requests.get(u + "/v2/nothing", timeout=60), 404)
    big = b'{"prompt": "' + b"a" * (17 << 20) + b'"}'
    error_of(requests.post(u + "/v1/completions", data=big, timeout=120), 413)
    # the server keeps serving
    r = craft.client().chat.completions.create(model="crafted", messages=[{"role": "user", "content": "hi"}],
                                               temperature=0, max_tokens=64)
    assert r.choices[0].message.content == "Hello there"


FUZZ_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
               "n", "stop", "stop_token_ids", "logprobs", "top_logprobs", "seed", "response_format", "tools",
               "tool_choice", "stream", "stream_options", "logit_bias", "presence_penalty", "frequency_penalty",
               "repetition_penalty", "min_tokens", "guided_choice", "guided_json", "structured_outputs",
               "chat_template_kwargs", "ignore_eos", "prompt", "echo", "user", "parallel_tool_calls", "best_of"]
FUZZ_KEYS = ["type", "name", "role", "content", "x", "json_schema", "schema", "function", "properties", "json"]


def fuzz_value(rng, depth=0):
    """A random JSON value: scalars at the edges of every type, strings up to 3000 bytes, and
    (shallowly) nested arrays and objects with keys the schema readers look for."""
    k = rng.randrange(14 if depth < 2 else 12)
    if k == 12:
        return [fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if k == 13:
        return {rng.choice(FUZZ_KEYS): fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return [None, True, False, 0, -1, 1 << 62, -(1 << 40), 1.5, -0.0, 1e308, "", "x" * rng.randint(1, 3000)][k]


def test_fuzzed_requests(rand):
    """Valid requests with one to three fields replaced by random JSON (sometimes the whole
    message list, sometimes the body cut short): every answer is a success or an OpenAI error
    object with a 4xx code, never a 5xx or a dropped connection, and the server serves on (in
    the sanitizer build, a memory error would end it)."""
    import random
    rng = random.Random(20261128)
    statuses = {}
    for _ in range(400):
        chat = rng.random() < 0.6
        body = {"model": "tiny", "max_tokens": 4, **({"messages": [{"role": "user", "content": "hi"}]} if chat
                                                        else {"prompt": "hi"})}
        for _ in range(rng.randint(1, 3)):
            body[rng.choice(FUZZ_FIELDS)] = fuzz_value(rng)
        if chat and rng.random() < 0.3:
            body["messages"] = [{"role": rng.choice(["user", "system", "assistant", "tool", "x", None, 3]),
                                 "content": fuzz_value(rng), **({"tool_calls": fuzz_value(rng)} if rng.random() < 0.3
                                                                else {})} for _ in range(rng.randint(0, 3))]
        data = json.dumps(body)
        if rng.random() < 0.05:
            data = data[:rng.randint(0, len(data))]
        r = requests.post(rand.url + ("/v1/chat/completions" if chat else "/v1/completions"), data=data, timeout=120,
                          headers={"Content-Type": "application/json"})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code == 200:
            if not r.headers.get("content-type", "").startswith("text/event-stream"):
                assert r.json()["choices"], data[:300]
            else:
                assert r.text.rstrip().endswith("data: [DONE]"), (data[:300], r.text[-300:])
        else:
            assert 400 <= r.status_code < 500, (data[:300], r.text[:300])
            error_of(r, r.status_code)
    assert statuses.get(200, 0) >= 20 and statuses.get(400, 0) >= 200, statuses
    r = rand.client().completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_port_in_use(quill_bin, crafted_model, craft):
    port = craft.url.rsplit(":", 1)[1]
    p = subprocess.run([str(quill_bin), "serve", str(crafted_model), "--port", port], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "already in use" in p.stderr


def test_api_key(quill_bin, crafted_model):
    s = Server(quill_bin, crafted_model, "--api-key", "sekrit", "--served-model-name", "crafted")
    try:
        body = {"model": "crafted", "prompt": "The answer is", "max_tokens": 2, "temperature": 0}
        error_of(requests.post(s.url + "/v1/completions", json=body, timeout=60), 401)
        error_of(requests.post(s.url + "/v1/completions", json=body, timeout=60,
                               headers={"Authorization": "Bearer wrong"}), 401)
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert requests.get(s.url + "/health", timeout=60).status_code == 200  # open, as in vLLM
        r = s.client("sekrit").completions.create(**body)
        assert r.choices[0].text == " forty-two"
    finally:
        assert s.stop(signal.SIGINT) == 0
    assert any("SIGINT" in line for line in s.lines)


def test_request_log_and_clean_stop_mid_stream(quill_bin, tiny_model):
    s = Server(quill_bin, tiny_model, "--max-model-len", 2048)
    r = requests.post(s.url + "/v1/completions", stream=True, timeout=600, json={
        "prompt": "x", "max_tokens": 2000, "ignore_eos": True, "stream": True})
    next(r.iter_lines())
    t0 = time.time()
    assert s.stop(signal.SIGTERM) == 0, "\n".join(s.lines[-30:])
    assert time.time() - t0 < 30
    r.close()
    assert any(re.search(r'"POST /v1/completions HTTP/1.1" 200 .*prompt_tokens=1', ln) for ln in s.lines), s.lines
    assert s.lines[-1] == "quill serve: stopped"


# ------------------------------------------------------------------ bench serve

def bench_serve(quill_bin, *args):
    help_ = subprocess.run([str(quill_bin), "bench", "serve", "--help"], capture_output=True, text=True, timeout=60)
    if help_.returncode != 0:
        pytest.skip("`quill bench serve` is not dispatched by this build")
    return subprocess.run([str(quill_bin), "bench", "serve", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_bench_serve_against_quill(quill_bin, rand, tmp_path):
    out = tmp_path / "bench.json"
    p = bench_serve(quill_bin, "--base-url", rand.url, "--model", "tiny", "--dataset", "random", "--input-len", 32,
                    "--output-len", 8, "--num-prompts", 12, "--max-concurrency", 4, "--ignore-eos", "--json", out)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert res["completed"] == 12 and res["failed"] == 0
    assert res["total_input_tokens"] == 12 * 32 and res["total_output_tokens"] == 12 * 8
    assert 0 < res["mean_ttft_ms"] <= res["mean_e2el_ms"]
    assert res["mean_tpot_ms"] > 0 and res["mean_itl_ms"] > 0 and res["max_concurrent_requests"] <= 4
    for line in ["Successful requests:", "Benchmark duration (s):", "Request throughput (req/s):",
                 "Output token throughput (tok/s):", "Total token throughput (tok/s):", "Mean TTFT (ms):",
                 "Median TPOT (ms):", "P99 ITL (ms):", "Mean E2EL (ms):"]:
        assert line in p.stdout


def test_bench_serve_timings(quill_bin, tmp_path):
    """Against a scripted server whose timings are known: first token after 300 ms, then one chunk
    every 100 ms, 5 tokens; the figures must match what the script did."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert body["stream"] is True and body["model"] == "scripted"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def send(obj):
                data = f"data: {obj}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            time.sleep(0.3)
            for i in range(5):
                if i:
                    time.sleep(0.1)
                send(json.dumps({"choices": [{"index": 0, "text": f"t{i}", "finish_reason": None}]}))
            send(json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5}}))
            send("[DONE]")
            self.wfile.write(b"0\r\n\r\n")

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "b.json"
        p = bench_serve(quill_bin, "--base-url", f"http://127.0.0.1:{srv.server_port}", "--model", "scripted",
                        "--input-len", 4, "--output-len", 5, "--num-prompts", 4, "--max-concurrency", 2, "--json", out)
    finally:
        srv.shutdown()
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(out.read_text())
    assert r["completed"] == 4 and r["total_output_tokens"] == 20
    assert r["mean_ttft_ms"] == pytest.approx(300, abs=60)
    assert r["mean_itl_ms"] == pytest.approx(100, abs=25) and len(r["itls"][0]) == 4
    assert r["mean_tpot_ms"] == pytest.approx(100, abs=25)
    assert r["mean_e2el_ms"] == pytest.approx(700, abs=100)
    assert r["duration"] == pytest.approx(1.4, abs=0.4)  # two waves of two
    assert r["request_throughput"] == pytest.approx(4 / r["duration"], rel=1e-6)
    assert r["max_concurrent_requests"] == 2


def test_speculative_decoding_serves_the_reference(quill_bin, tiny_model, shared_dir):
    """--speculative-config (vLLM's, n-gram drafts): greedy completions, plain and streamed, still
    equal transformers' greedy continuations, drafts are made and counted in /metrics."""
    from safetensors.numpy import load_file
    ref = load_file(str(shared_dir / "reference" / "tiny_ref.safetensors"))
    s = Server(quill_bin, tiny_model, "--served-model-name", "tiny", "--speculative-config",
               '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}')
    try:
        for name in ["chat", "raw", "long"]:
            body = {"model": "tiny", "prompt": ref[f"{name}.input_ids"].tolist(), "max_tokens": 32,
                    "temperature": 0, "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True}
            r = requests.post(s.url + "/v1/completions", timeout=600, json=body).json()
            ids = [int(t.split(":")[1]) for t in r["choices"][0]["logprobs"]["tokens"]]
            assert ids == ref[f"{name}.greedy32"].tolist()
            streamed = []
            with requests.post(s.url + "/v1/completions", timeout=600, json={**body, "stream": True}, stream=True) as resp:
                for line in resp.iter_lines():
                    if line.startswith(b"data: ") and line != b"data: [DONE]":
                        lp = json.loads(line[6:])["choices"][0].get("logprobs") or {}
                        streamed += [int(t.split(":")[1]) for t in lp.get("tokens", [])]
            assert streamed == ids
        m = s.metrics()
        assert 0 < m["quill:spec_decode_num_accepted_tokens_total"] <= m["quill:spec_decode_num_draft_tokens_total"]
    finally:
        assert s.stop() == 0, "\n".join(s.lines[-30:])
    bad = subprocess.run([str(quill_bin), "serve", str(tiny_model), "--port", "0", "--speculative-config",
                          '{"method": "ngram", "num_speculative_tokens": 99}'], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode != 0 and "num_speculative_tokens" in bad.stderr
