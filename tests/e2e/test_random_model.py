"""`quill random-model` end to end, against ../shared/spec/random-weights.md and the Python
`safetensors` package: the files' sha256 equal the spec's, the tensors have transformers'
Qwen3ForCausalLM names and shapes, sampled elements equal an independent Python implementation
of the spec, the JSON files match Qwen3's, and bad arguments or failed writes give a clear
error and leave no checkpoint-looking directory behind."""
import hashlib
import json
import re
import resource
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15

PRESETS = {  # name: (vocab, hidden, intermediate, layers, heads, kv heads, head_dim, tied, seed)
    "tiny-qwen3": (151936, 128, 384, 2, 2, 1, 128, True, 1),
    "small-qwen3": (4096, 512, 1536, 3, 8, 2, 128, False, 2),
}


def run(quill_bin, *args, **kw):
    return subprocess.run([str(quill_bin), "random-model", *map(str, args)], capture_output=True,
                          text=True, timeout=600, **kw)


def spec_sha(shared_dir, name):
    spec = (shared_dir / "spec" / "random-weights.md").read_text()
    m = re.search(rf"^\| {re.escape(name)} \|.*\| ([0-9a-f]{{64}}) \|$", spec, re.M)
    assert m, f"no sha256 for {name} in the spec"
    return m.group(1)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def expected_shapes(preset):
    V, H, I, L, NH, KV, D, tied, _ = PRESETS[preset]
    shapes = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H]}
    for l in range(L):
        p = f"model.layers.{l}."
        shapes |= {p + "input_layernorm.weight": [H], p + "post_attention_layernorm.weight": [H],
                   p + "self_attn.q_proj.weight": [NH * D, H],
                   p + "self_attn.k_proj.weight": [KV * D, H],
                   p + "self_attn.v_proj.weight": [KV * D, H],
                   p + "self_attn.o_proj.weight": [H, NH * D],
                   p + "self_attn.q_norm.weight": [D], p + "self_attn.k_norm.weight": [D],
                   p + "mlp.gate_proj.weight": [I, H], p + "mlp.up_proj.weight": [I, H],
                   p + "mlp.down_proj.weight": [H, I]}
    if not tied:
        shapes["lm_head.weight"] = [V, H]
    return shapes


# --- an independent implementation of the spec, element by element -----------------------------

def fnv1a64(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def splitmix64(s, k):
    z = (s + k * GOLDEN) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def is_outlier(s, n, i):
    return (splitmix64(s, 4 * n + 1 + i) >> 40) < 16777


def spec_element(name, seed, n, i):
    s = fnv1a64(name) ^ seed
    u = [(splitmix64(s, 4 * i + 1 + j) >> 40) / 2.0**24 for j in range(4)]
    x = ((u[0] + u[1]) + (u[2] + u[3]) - 2.0) * 1.7320508075688772
    if name.endswith("norm.weight"):
        v = 1.0 + 0.1 * x
    elif name in ("model.embed_tokens.weight", "lm_head.weight"):
        v = 0.02 * x
    else:
        v = 0.02 * x
        if is_outlier(s, n, i):
            v *= 8.0
    bits = int(np.array([v], dtype=np.float32).view(np.uint32)[0])  # double -> float32, RNE
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16                  # float32 -> bf16, RNE


def raw_tensors(path):
    """Header and data of a safetensors file, parsed here (not by quill, not by the package)."""
    data = Path(path).read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    return header, memoryview(data)[8 + hlen:]


# --- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny-qwen3", "small-qwen3"])
def test_sha256_matches_spec(preset, tiny_model, small_model, shared_dir):
    model = tiny_model if preset == "tiny-qwen3" else small_model
    assert sha256(model / "model.safetensors") == spec_sha(shared_dir, preset)


@pytest.mark.parametrize("preset", ["tiny-qwen3", "small-qwen3"])
def test_opens_with_safetensors_package(preset, tiny_model, small_model):
    model = tiny_model if preset == "tiny-qwen3" else small_model
    want = expected_shapes(preset)
    with safe_open(str(model / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(want)
        for name, shape in want.items():
            sl = f.get_slice(name)
            assert sl.get_dtype() == "BF16", name
            assert list(sl.get_shape()) == shape, name


def test_elements_match_python_spec(small_model):
    seed = PRESETS["small-qwen3"][-1]
    header, data = raw_tensors(small_model / "model.safetensors")
    header.pop("__metadata__")
    for name, info in header.items():
        n = int(np.prod(info["shape"]))
        begin = info["data_offsets"][0]
        vals = np.frombuffer(data[begin:begin + 2 * n], dtype="<u2")
        idx = sorted({0, 1, 2, 7, 8, 9, n // 2, n // 2 + 1, n - 2, n - 1})
        if name.endswith("_proj.weight"):  # include this tensor's first outlier
            s = fnv1a64(name) ^ seed
            idx.append(next(i for i in range(n) if is_outlier(s, n, i)))
        for i in idx:
            assert int(vals[i]) == spec_element(name, seed, n, i), f"{name}[{i}]"


def test_json_files(tiny_model, small_model, shared_dir):
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"],
            cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["tie_word_embeddings"]) == PRESETS["tiny-qwen3"][:8]
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1000000
    assert cfg["max_position_embeddings"] == 40960 and cfg["hidden_act"] == "silu"
    assert cfg["bos_token_id"] == 151643 and cfg["eos_token_id"] == 151645
    assert cfg["attention_bias"] is False and cfg["torch_dtype"] == "bfloat16"
    # written the way transformers writes it
    assert (tiny_model / "config.json").read_text() == json.dumps(cfg, indent=2,
                                                                   sort_keys=True) + "\n"
    gen = json.loads((tiny_model / "generation_config.json").read_text())
    assert {k: v for k, v in gen.items() if k != "transformers_version"} == {
        "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
        "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    small_cfg = json.loads((small_model / "config.json").read_text())
    assert small_cfg["vocab_size"] == 4096 and small_cfg["tie_word_embeddings"] is False
    # the real vocabulary gets the tokenizer; the small one does not
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tiny_model / f).read_bytes() == (shared_dir / "tokenizer" / "qwen3" / f).read_bytes()
        assert not (small_model / f).exists()


def test_config_round_trip_gives_same_model(quill_bin, small_model, tmp_path, shared_dir):
    """--config with the written config.json and the preset's seed reproduces the preset."""
    out = tmp_path / "again"
    r = run(quill_bin, "--config", small_model / "config.json", "--seed", 2, "--threads", 1, out)
    assert r.returncode == 0, r.stderr
    assert sha256(out / "model.safetensors") == spec_sha(shared_dir, "small-qwen3")
    r = run(quill_bin, "--config", small_model / "config.json", "--seed", 3, tmp_path / "other")
    assert r.returncode == 0, r.stderr
    assert sha256(tmp_path / "other" / "model.safetensors") != spec_sha(shared_dir, "small-qwen3")


def test_custom_config(quill_bin, tmp_path):
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 1000,
           "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
           "tie_word_embeddings": False, "rope_parameters": {"rope_theta": 5e5,
                                                             "rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run(quill_bin, "--config", tmp_path / "config.json", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="numpy") as f:
        assert list(f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape()) == [128, 64]
        assert list(f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape()) == [64, 64]
        assert list(f.get_slice("lm_head.weight").get_shape()) == [1000, 64]
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert written["rope_theta"] == 500000 and written["head_dim"] == 32


def test_bad_arguments(quill_bin, tmp_path):
    cases = [
        ([], "OUT_DIR is missing"),
        (["--preset", "tiny-qwen3"], "OUT_DIR is missing"),
        ([tmp_path / "x"], "exactly one of --preset or --config"),
        (["--preset", "tiny-qwen3", "--config", "c.json", tmp_path / "x"], "exactly one"),
        (["--preset", "qwen3-9b", tmp_path / "x"], "qwen3-9b"),
        (["--preset", "tiny-qwen3", "--seed", "abc", tmp_path / "x"], "--seed 'abc'"),
        (["--preset", "tiny-qwen3", "--threads", "0", tmp_path / "x"], "--threads '0'"),
        (["--preset", "tiny-qwen3", "--bogus", tmp_path / "x"], "--bogus"),
        (["--preset", "tiny-qwen3", tmp_path / "x", tmp_path / "y"], "more than one OUT_DIR"),
    ]
    for args, msg in cases:
        r = run(quill_bin, *args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert msg in r.stderr, (args, r.stderr)
    r = run(quill_bin, "--preset", "qwen3-9b", tmp_path / "x")
    assert "tiny-qwen3" in r.stderr  # lists the known presets
    r = run(quill_bin, "--help")
    assert r.returncode == 0 and "--preset" in r.stdout
    assert not list(tmp_path.iterdir())


def test_bad_config_file(quill_bin, tmp_path):
    (tmp_path / "llama.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 10}))
    r = run(quill_bin, "--config", tmp_path / "llama.json", tmp_path / "out")
    assert r.returncode == 1 and "llama" in r.stderr and "llama.json" in r.stderr, r.stderr
    r = run(quill_bin, "--config", tmp_path / "missing.json", tmp_path / "out")
    assert r.returncode == 1 and "missing.json" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_existing_directory(quill_bin, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run(quill_bin, "--preset", "small-qwen3", out)
    assert r.returncode == 1 and "--force" in r.stderr, r.stderr
    assert (out / "keep.txt").read_text() == "precious"
    r = run(quill_bin, "--preset", "small-qwen3", "--force", out)
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(quill_bin, "--preset", "small-qwen3", empty).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m"]  # no staging dirs left


def test_failed_write_leaves_nothing(quill_bin, tmp_path):
    """A write that cannot get its space (a file size limit stands in for a full disk) fails with
    a message naming the file, and leaves neither OUT_DIR nor a staging directory."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    r = run(quill_bin, "--preset", "small-qwen3", tmp_path / "m", preexec_fn=limit)
    assert r.returncode == 1
    assert "model.safetensors" in r.stderr and "reserve" in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


def test_missing_tokenizer(quill_bin, tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    r = run(quill_bin, "--preset", "tiny-qwen3", "--tokenizer", tok, tmp_path / "m")
    assert r.returncode == 1 and "tokenizer_config.json" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()


def test_assets_lookup(quill_bin, tmp_path, shared_dir):
    """A binary away from the tree finds the tokenizer through QUILL_ASSETS, or in
    <exedir>/../assets, and says where it looked when neither has it."""
    exe = tmp_path / "bin" / "quill"
    exe.parent.mkdir()
    shutil.copy(quill_bin, exe)

    def gen(out, **env):
        return subprocess.run([str(exe), "random-model", "--preset", "tiny-qwen3", str(out)],
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env},
                              timeout=600)

    r = gen(tmp_path / "a")
    assert r.returncode == 1 and "QUILL_ASSETS" in r.stderr and str(tmp_path) in r.stderr, r.stderr
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(shared_dir / "tokenizer" / "qwen3", elsewhere / "tokenizer" / "qwen3")
    r = gen(tmp_path / "b", QUILL_ASSETS=str(elsewhere))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b" / "tokenizer_config.json").exists()
    shutil.copytree(shared_dir / "tokenizer" / "qwen3", tmp_path / "assets" / "tokenizer" / "qwen3")
    r = gen(tmp_path / "c")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c" / "tokenizer.json").exists()
