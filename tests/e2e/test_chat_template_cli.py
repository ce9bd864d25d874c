"""`quill chat-template` end to end: the binary must print exactly what transformers rendered
(../shared/reference/chat_template_cases.json), and, where jinja2 is installed, exactly what the
real template renders under transformers' Jinja settings for conversations the reference does
not cover (earlier reasoning kept or dropped, several tool calls, tool-response grouping,
non-ASCII and float-heavy tool schemas). Bad input must fail with a non-zero exit and a message
naming what is wrong.

The binary is $QUILL_BIN or <root>/build/quill; the shared data is $QUILL_SHARED or ../shared."""
import json
import math
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUILL = Path(os.environ.get("QUILL_BIN", ROOT / "build" / "quill"))
SHARED = Path(os.environ.get("QUILL_SHARED", ROOT.parent / "shared"))
MODEL_DIR = SHARED / "tokenizer" / "qwen3"  # any existing directory will do
CASES = json.loads((SHARED / "reference" / "chat_template_cases.json").read_text())["renders"]

if not QUILL.exists():
    pytest.skip(f"quill binary not found at {QUILL} (set QUILL_BIN)", allow_module_level=True)


def run(args, stdin):
    return subprocess.run([str(QUILL), "chat-template", *map(str, args)], input=stdin.encode(),
                          capture_output=True, timeout=60)


def flags(think, gen):
    return ([] if think else ["--no-think"]) + ([] if gen else ["--no-generation-prompt"])


@pytest.mark.parametrize("case", CASES, ids=[f"{c['name']}-think{int(c['enable_thinking'])}"
                                              f"-gen{int(c['add_generation_prompt'])}" for c in CASES])
def test_reference_render(case, tmp_path):
    args = [MODEL_DIR, *flags(case["enable_thinking"], case["add_generation_prompt"])]
    if case["tools"] and case["enable_thinking"]:
        # tools from a file, messages as a bare array
        (tmp_path / "tools.json").write_text(json.dumps(case["tools"]))
        stdin = json.dumps(case["messages"])
        args += ["--tools", tmp_path / "tools.json"]
    else:
        # a request-like object; unrelated keys are ignored
        stdin = json.dumps({"model": "qwen3", "messages": case["messages"], "tools": case["tools"]})
    r = run(args, stdin)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == case["text"]


# ---------------------------------------------------------------- against the real template

def jinja_renderer():
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # transformers' apply_chat_template environment and tojson filter
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    config = json.loads((SHARED / "tokenizer" / "qwen3" / "tokenizer_config.json").read_text())
    template = env.from_string(config["chat_template"])

    def render(messages, tools, think, gen):
        # what an OpenAI server hands the template: text parts joined by "\n" (vLLM), null -> ""
        fixed = []
        for m in messages:
            m = dict(m)
            if isinstance(m.get("content"), list):
                m["content"] = "\n".join(p["text"] for p in m["content"])
            if m.get("content") is None:
                m["content"] = ""
            fixed.append(m)
        return template.render(messages=fixed, tools=tools, add_generation_prompt=gen, enable_thinking=think)

    return render


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Météo — 天气 \"now\"\n\ttabbed",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


def float_tool(seed):
    rng = random.Random(seed)
    vals = []
    for _ in range(40):
        kind = rng.randrange(4)
        if kind == 0:
            vals.append(rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30))
        elif kind == 1:
            vals.append(float(rng.randint(-10**6, 10**6)))
        elif kind == 2:
            vals.append(round(rng.uniform(0, 100), rng.randint(0, 6)))
        else:
            vals.append(rng.choice([1e16, 1e15, 1e-4, 1e-5, 0.1, -0.0, 5e-324, 1.7976931348623157e308, 123456789.0]))
    return {"type": "function", "function": {"name": "tune", "parameters": {
        "type": "object", "properties": {"x": {"type": "number", "enum": vals, "default": rng.randint(-10**12, 10**12),
                                               "nullable": None, "flag": False, "ctl": "\x01\x1f\x7f\u2028"}}}}}


CONVERSATIONS = [
    ("last_assistant_keeps_reasoning", [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nplan\n</think>\n\nHello!"}], None),
    ("reasoning_field_after_query", [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "\n\na2", "reasoning_content": "\nnew thoughts\n"}], None),
    ("multi_step_tools", [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "<think>\nTwo cities.\n</think>\n\nChecking both.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
        {"role": "tool", "content": "{\"temp_c\": 18}"},
        {"role": "tool", "content": "{\"temp_c\": 24}"},
        {"role": "assistant", "content": None, "reasoning_content": "Compare.", "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Zürich", "unit": ["c", 1.5, None, True]}}]},
        {"role": "tool", "content": "{\"temp_c\": 11}"}], [WEATHER]),
    ("tool_response_user_is_not_a_query", [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "reasoning_content": "r1",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {}}}]},
        {"role": "user", "content": "<tool_response>\nok\n</tool_response>"},
        {"role": "assistant", "content": "<think>r2</think>done"}], [WEATHER]),
    ("content_parts_and_inline_system", [
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]},
        {"role": "system", "content": "late system"},
        {"role": "assistant", "content": "<think>a</think>\n<think>b</think>\n\nc"}], None),
    ("float_heavy_tools_1", [{"role": "user", "content": "x"}], [float_tool(1), WEATHER]),
    ("float_heavy_tools_2", [{"role": "system", "content": ""}, {"role": "user", "content": "y"}], [float_tool(2)]),
]


@pytest.mark.parametrize("think,gen", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("name,messages,tools", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_matches_jinja(name, messages, tools, think, gen):
    want = jinja_renderer()(messages, tools, think, gen)
    r = run([MODEL_DIR, *flags(think, gen)], json.dumps({"messages": messages, "tools": tools}, ensure_ascii=False))
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode() == want


def test_tojson_floats_match_python():
    """Tool schemas are printed with Python's json.dumps: floats as repr() (shortest round-trip
    digits), so random bit patterns, subnormals and every power of two must match it."""
    rng = random.Random(11)
    vals = []
    while len(vals) < 20000:
        x = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        if math.isfinite(x):
            vals.append(x)
    vals += [2.0 ** k for k in range(-1074, 1024)] + [-(2.0 ** k) * 3 for k in range(-1000, 1000)]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"enum": vals}}}
    r = run([MODEL_DIR], json.dumps({"messages": [{"role": "user", "content": "x"}], "tools": [tool]}))
    assert r.returncode == 0, r.stderr.decode()
    got = r.stdout.decode().split("<tools>\n", 1)[1].split("\n</tools>", 1)[0]
    want = json.dumps(tool, ensure_ascii=False)
    if got != want:
        bad = [(g, w) for g, w in zip(got.split(", "), want.split(", ")) if g != w]
        pytest.fail(f"{len(bad)} values differ from Python, e.g. {bad[:5]}")


# ---------------------------------------------------------------- errors

def test_bad_json_reports_position():
    r = run([MODEL_DIR], '[{"role": "user",\n  "content": "hi"')
    assert r.returncode != 0
    msg = r.stderr.decode()
    assert "stdin: line 2" in msg and "column" in msg, msg


@pytest.mark.parametrize("stdin,needle", [
    ('[{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]', "messages[1].role: unknown role 'robot'"),
    ('[{"role": "user"}]', "messages[0]: missing 'content'"),
    ('[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]',
     "messages[0].content[0].type: unsupported part type 'image_url'"),
    ('{"model": "m"}', 'no "messages" key'),
    ('"just a string"', "stdin: line 1"),
    ('[]', "expected at least one message"),
    ('{"messages": [{"role": "user", "content": "x"}], "tools": {"a": 1}}', "tools: expected an array"),
])
def test_bad_messages(stdin, needle):
    r = run([MODEL_DIR], stdin)
    assert r.returncode == 1
    assert r.stdout == b""
    assert needle in r.stderr.decode(), r.stderr.decode()


def test_tools_given_twice(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps([WEATHER]))
    r = run([MODEL_DIR, "--tools", tmp_path / "t.json"],
            json.dumps({"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]}))
    assert r.returncode == 1 and "tools given twice" in r.stderr.decode()


def test_bad_tools_file(tmp_path):
    (tmp_path / "t.json").write_text('{"type": "function"}')
    r = run([MODEL_DIR, "--tools", tmp_path / "t.json"], '[{"role": "user", "content": "x"}]')
    assert r.returncode == 1 and "expected a JSON array of tools" in r.stderr.decode()
    r = run([MODEL_DIR, "--tools", tmp_path / "missing.json"], '[{"role": "user", "content": "x"}]')
    assert r.returncode == 1 and "missing.json" in r.stderr.decode()


def test_model_dir_checked(tmp_path):
    r = run([tmp_path / "nope"], '[{"role": "user", "content": "x"}]')
    assert r.returncode == 1 and "nope" in r.stderr.decode()
    r = run([], '[{"role": "user", "content": "x"}]')
    assert r.returncode == 2 and "MODEL_DIR" in r.stderr.decode()
    r = run([MODEL_DIR, "--bogus"], '[{"role": "user", "content": "x"}]')
    assert r.returncode == 2 and "--bogus" in r.stderr.decode()
