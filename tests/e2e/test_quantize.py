"""`quill quantize` end to end, against torchao.

The bf16 models come from `quill random-model` (the bytes of ../shared/spec/random-weights.md,
checked by sha256); `quill quantize` turns them into int4 checkpoints, which are compared tensor
by tensor with torchao's HQQ output in ../shared/reference/*_int4_hqq_tensors.safetensors, with
the agreement ../shared/reference/README.md asks for (>= 99.5% identical codes; scales identical
and zeros within scale/16 on >= 99.5% of groups; relative error <= 1.005x torchao's). minmax has
no tensor-level reference: on the trained model its mean weight error must match the one torchao
gave (trained_ref.json), which a float32 rather than bf16 computation misses by 4e-4. The
checkpoint layout (spec/int4-checkpoint.md), sharding, and refusals of bad input are checked too.

The binary is $QUILL_BIN or <root>/build/quill; the shared data is $QUILL_SHARED or ../shared."""
import hashlib
import json
import os
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
QUILL = Path(os.environ.get("QUILL_BIN", ROOT / "build" / "quill"))
SHARED = Path(os.environ.get("QUILL_SHARED", ROOT.parent / "shared"))
REF = SHARED / "reference"
SHA256 = {  # ../shared/spec/random-weights.md
    "tiny-qwen3": "8c8dc34a2dcf32691c3cd3c1d1ce40fcce6ea0aa50b0744c91de9cde8dcf86bc",
    "small-qwen3": "ac0d70b220c2f5ab681cc9c749e7f578ae91ee5b9916af5739f8aaa9662da99e",
}

if not QUILL.exists():
    pytest.skip(f"quill binary not found at {QUILL} (set QUILL_BIN)", allow_module_level=True)


# ------------------------------------------------------------------------ safetensors, raw

class Checkpoint:
    """All tensors of a safetensors file or of a sharded directory, as numpy arrays (BF16 is
    returned as its uint16 bits: numpy has no bfloat16)."""

    DTYPES = {"BF16": np.uint16, "U8": np.uint8, "F32": np.float32, "F16": np.float16}

    def __init__(self, path):
        path = Path(path)
        self.files = {}
        self.where = {}
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if index.exists():
                for name, fname in json.loads(index.read_text())["weight_map"].items():
                    self.where[name] = path / fname
                for f in set(self.where.values()):
                    self._load(f)
                return
            path = path / "model.safetensors"
        self._load(path)
        for name in self.files[path][0]:
            if name != "__metadata__":
                self.where[name] = path

    def _load(self, f):
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        self.files[f] = (header, memoryview(data)[8 + n:])

    @property
    def metadata(self):
        return next(iter(self.files.values()))[0].get("__metadata__", {})

    def names(self):
        return sorted(self.where)

    def entry(self, name):
        return self.files[self.where[name]][0][name]

    def __getitem__(self, name):
        e = self.entry(name)
        a, b = e["data_offsets"]
        buf = self.files[self.where[name]][1][a:b]
        return np.frombuffer(buf, dtype=self.DTYPES[e["dtype"]]).reshape(e["shape"])


def bf16(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def unpack_codes(qweight):
    return np.stack([qweight & 15, qweight >> 4], axis=-1).reshape(qweight.shape[0], -1)


def dequant(qweight, scales, zeros):
    q = unpack_codes(qweight).astype(np.float32)
    rows, cols = q.shape
    gs = cols // scales.shape[1]
    w = (q.reshape(rows, -1, gs) - 8) * bf16(scales)[..., None] + bf16(zeros)[..., None]
    return w.reshape(rows, cols)


def rel_err(w_bits, qweight, scales, zeros):
    w = bf16(w_bits).astype(np.float64)
    d = dequant(qweight, scales, zeros).astype(np.float64)
    return float(np.linalg.norm(d - w) / np.linalg.norm(w))


# ------------------------------------------------------------------------ running quill

def quill(*args, check=True):
    r = subprocess.run([str(QUILL), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, f"quill {' '.join(map(str, args))}: {r.stderr}"
    return r


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for preset in SHA256:
        d = root / preset
        quill("random-model", "--preset", preset, d)
        digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
        assert digest == SHA256[preset], f"{preset}: random-model bytes differ from the spec"
        out[preset] = d
    return out


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for preset, src in models.items():
        for alg in ("hqq", "minmax"):
            dst = root / f"{preset}-{alg}"
            quill("quantize", src, dst, "--algorithm", alg)
            out[preset, alg] = dst
    return out


# ------------------------------------------------------------------------ parity with torchao

@pytest.mark.parametrize("preset,ref_name", [("tiny-qwen3", "tiny"), ("small-qwen3", "small")])
def test_hqq_matches_torchao(models, quantized, preset, ref_name):
    src = Checkpoint(models[preset])
    got = Checkpoint(quantized[preset, "hqq"])
    ref = Checkpoint(REF / f"{ref_name}_int4_hqq_tensors.safetensors")
    ref_rel = json.loads(ref.metadata["rel_err"])
    layers = sorted(n[: -len(".qweight")] for n in ref.names() if n.endswith(".qweight"))
    assert len(layers) == len(ref_rel) > 0
    exact = 0
    for layer in layers:
        q, s, z = (got[f"{layer}.{k}"] for k in ("qweight", "scales", "zeros"))
        rq, rs, rz = (ref[f"{layer}.{k}"] for k in ("qweight", "scales", "zeros"))
        assert q.shape == rq.shape and s.shape == rs.shape and z.shape == rz.shape, layer
        codes_same = float(np.mean(unpack_codes(q) == unpack_codes(rq)))
        groups_ok = float(np.mean((s == rs) & (np.abs(bf16(z) - bf16(rz)) <= bf16(rs) / 16)))
        err = rel_err(src[f"{layer}.weight"], q, s, z)
        assert codes_same >= 0.995, f"{layer}: only {codes_same:.2%} of codes equal torchao's"
        assert groups_ok >= 0.995, f"{layer}: only {groups_ok:.2%} of groups match torchao's"
        assert err <= 1.005 * ref_rel[layer], f"{layer}: error {err:.5f} vs {ref_rel[layer]}"
        exact += np.array_equal(q, rq) and np.array_equal(s, rs) and np.array_equal(z, rz)
    print(f"{preset}: {exact}/{len(layers)} matrices bit-identical to torchao's")


@pytest.mark.parametrize("preset", ["tiny-qwen3", "small-qwen3"])
@pytest.mark.parametrize("alg", ["hqq", "minmax"])
def test_checkpoint_layout(models, quantized, preset, alg):
    src_dir, dst_dir = models[preset], quantized[preset, alg]
    src, dst = Checkpoint(src_dir), Checkpoint(dst_dir)
    assert dst.metadata == {"format": "pt"}
    expected = []
    for name in src.names():
        e = src.entry(name)
        if name.endswith("_proj.weight"):
            base, (rows, cols) = name[: -len(".weight")], e["shape"]
            expected += [f"{base}.qweight", f"{base}.scales", f"{base}.zeros"]
            assert dst.entry(f"{base}.qweight")["dtype"] == "U8"
            assert dst.entry(f"{base}.qweight")["shape"] == [rows, cols // 2]
            for k in ("scales", "zeros"):
                assert dst.entry(f"{base}.{k}")["dtype"] == "BF16"
                assert dst.entry(f"{base}.{k}")["shape"] == [rows, cols // 128]
        else:
            expected.append(name)
            assert dst.entry(name) == {**e, "data_offsets": dst.entry(name)["data_offsets"]}
            assert np.array_equal(dst[name], src[name]), f"{name} was not copied unchanged"
    assert dst.names() == sorted(expected)

    src_cfg = json.loads((src_dir / "config.json").read_text())
    cfg = json.loads((dst_dir / "config.json").read_text())
    assert cfg.pop("quantization_config") == {
        "quant_method": "int4_weight_only", "bits": 4, "group_size": 128, "algorithm": alg,
        "dequant": "(q - 8) * scale + zero",
        "modules_not_quantized": ["model.embed_tokens", "lm_head"]}
    assert cfg == src_cfg
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src_dir / f).exists():
            assert (dst_dir / f).read_bytes() == (src_dir / f).read_bytes(), f
    assert (dst_dir / "tokenizer.json").exists() == (preset == "tiny-qwen3")


def test_minmax_is_worse_than_hqq(models, quantized):
    src = Checkpoint(models["small-qwen3"])
    errs = {}
    for alg in ("hqq", "minmax"):
        ck = Checkpoint(quantized["small-qwen3", alg])
        errs[alg] = [rel_err(src[n], *(ck[n[:-7] + k] for k in (".qweight", ".scales", ".zeros")))
                     for n in src.names() if n.endswith("_proj.weight")]
    hqq, mm = np.mean(errs["hqq"]), np.mean(errs["minmax"])
    print(f"small-qwen3 mean relative error: hqq {hqq:.5f}, minmax {mm:.5f}")
    assert 0.09 < hqq < mm < 0.12


def test_trained_model_matches_torchao_error(tmp_path):
    """The trained model's mean weight error for both algorithms vs torchao's (trained_ref.json,
    an average of 28 numbers rounded to 5 decimals)."""
    with tarfile.open(SHARED / "models" / "trained-qwen3.tar.xz") as tar:
        tar.extractall(tmp_path, filter="data")
    src_dir = next(p.parent for p in tmp_path.rglob("config.json"))
    ref = json.loads((REF / "trained_ref.json").read_text())
    src = Checkpoint(src_dir)
    mats = [n for n in src.names() if n.endswith("_proj.weight")]
    assert len(mats) == 28
    for alg in ("hqq", "minmax"):
        dst = tmp_path / alg
        quill("quantize", src_dir, dst, "--algorithm", alg)
        ck = Checkpoint(dst)
        errs = [round(rel_err(src[n], *(ck[n[:-7] + k] for k in (".qweight", ".scales", ".zeros"))),
                      5) for n in mats]
        mean = float(np.mean(errs))
        print(f"trained-qwen3 {alg}: mean relative error {mean:.6f}, torchao "
              f"{ref[alg]['mean_rel_err']:.6f}")
        assert abs(mean - ref[alg]["mean_rel_err"]) < 2e-5, alg
    # tied embeddings: there is no lm_head to quantize
    r = quill("quantize", src_dir, tmp_path / "lm", "--quantize-lm-head", check=False)
    assert r.returncode == 1 and "lm_head" in r.stderr
    assert not (tmp_path / "lm").exists()


# ------------------------------------------------------------------------ options

def test_threads_do_not_change_the_result(models, quantized, tmp_path):
    dst = tmp_path / "t1"
    quill("quantize", models["small-qwen3"], dst, "--threads", "1")
    a = (dst / "model.safetensors").read_bytes()
    b = (quantized["small-qwen3", "hqq"] / "model.safetensors").read_bytes()
    assert a == b


def test_sharding_and_lm_head(models, tmp_path):
    src = Checkpoint(models["small-qwen3"])
    dst = tmp_path / "sharded"
    quill("quantize", models["small-qwen3"], dst, "--max-shard-size", "4MB",
          "--quantize-lm-head", "--group-size", "64")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (dst / "model.safetensors").exists()
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors"
                     for i in range(1, len(files) + 1)]
    total = 0
    for f in files:
        shard = Checkpoint(dst / f)
        size = sum(shard[n].nbytes for n in shard.names())
        # a file holds at most 4 MB of tensors, unless one tensor alone is larger (embed_tokens)
        assert size <= 4_000_000 or len(shard.names()) == 1, (f, size)
        total += size
    assert index["metadata"]["total_size"] == total
    ck = Checkpoint(dst)
    assert "lm_head.qweight" in ck.names() and "lm_head.weight" not in ck.names()
    assert ck["lm_head.scales"].shape == (4096, 512 // 64)
    err = rel_err(src["lm_head.weight"], ck["lm_head.qweight"], ck["lm_head.scales"],
                  ck["lm_head.zeros"])
    assert 0.05 < err < 0.1  # group 64: finer than 128's ~0.105
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert cfg["group_size"] == 64 and cfg["modules_not_quantized"] == ["model.embed_tokens"]


# ------------------------------------------------------------------------ refusals

def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def test_bad_input_is_refused(models, quantized, tmp_path):
    small, tiny = models["small-qwen3"], models["tiny-qwen3"]

    # an existing, non-empty destination needs --force, which replaces it entirely
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    r = quill("quantize", small, dst, check=False)
    assert r.returncode == 1 and "--force" in r.stderr and (dst / "old.txt").exists()
    quill("quantize", small, dst, "--force")
    assert not (dst / "old.txt").exists() and (dst / "model.safetensors").exists()

    # a quantized source
    r = quill("quantize", quantized["small-qwen3", "hqq"], tmp_path / "again", check=False)
    assert r.returncode == 1 and "already quantized" in r.stderr

    # a group size that does not divide in_features names the tensor (tiny: hidden 128)
    r = quill("quantize", tiny, tmp_path / "g256", "--group-size", "256", check=False)
    assert r.returncode == 1 and "_proj.weight" in r.stderr and "multiple" in r.stderr, r.stderr
    assert not (tmp_path / "g256").exists()

    # bad option values are usage errors
    for args in (["--group-size", "100"], ["--algorithm", "gptq"], ["--threads", "0"],
                 ["--max-shard-size", "5XB"], ["--bogus"]):
        r = quill("quantize", small, tmp_path / "bad", *args, check=False)
        assert r.returncode == 2, args
    r = quill("quantize", small, check=False)
    assert r.returncode == 2 and "DST_DIR" in r.stderr

    # the source itself, or a directory holding it, is never the destination
    r = quill("quantize", small, small, "--force", check=False)
    assert r.returncode == 1 and "source" in r.stderr
    r = quill("quantize", small, small.parent, "--force", check=False)
    assert r.returncode == 1 and (small / "model.safetensors").exists()

    # not a checkpoint
    r = quill("quantize", tmp_path / "missing", tmp_path / "x", check=False)
    assert r.returncode == 1 and "missing" in r.stderr

    assert not (tmp_path / "bad").exists() and not (tmp_path / "x").exists()
    assert leftovers(tmp_path) == [] and leftovers(small.parent) == []


def test_corrupt_source_leaves_nothing(models, tmp_path):
    """A failure half-way (a non-finite weight in the last matrix) leaves no checkpoint."""
    src = tmp_path / "src"
    src.mkdir()
    for f in models["small-qwen3"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    ck = Checkpoint(src)
    name = [n for n in ck.names() if n.endswith("_proj.weight")][-1]
    a, _ = ck.entry(name)["data_offsets"]
    data = bytearray((src / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    off = 8 + n + a + 2 * (3 * ck.entry(name)["shape"][1] + 7)  # row 3, column 7
    data[off:off + 2] = struct.pack("<H", 0x7F80)  # +inf
    (src / "model.safetensors").write_bytes(bytes(data))
    r = quill("quantize", src, tmp_path / "out", check=False)
    assert r.returncode == 1 and name in r.stderr and "row 3, column 7" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
