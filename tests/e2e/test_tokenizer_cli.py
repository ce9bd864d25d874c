"""`quill tokenize` / `quill detokenize` against Hugging Face `tokenizers` on the same tokenizer.json.

Besides a few plain cases, the texts here are built to find disagreements: every code point in
several contexts, seeded random mixtures of scripts, whitespace, combining marks and special
tokens, and tokenizer.json variants that exercise the added-token flags (lstrip, rstrip,
single_word, normalized) and ignore_merges, which Qwen3's own file does not use. Many texts are
joined by <|endoftext|>: an added token cuts the text into independent parts, so one call checks
them all and a mismatch can still be located part by part."""
import json
import random
import subprocess
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = ROOT / "assets" / "tokenizer" / "qwen3"
EOT = "<|endoftext|>"
EOT_ID = 151643


@pytest.fixture(scope="module")
def hf():
    return tokenizers.Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))


def quill_tokenize(quill_bin, model_dir, text):
    r = subprocess.run([str(quill_bin), "tokenize", str(model_dir)], input=text.encode(),
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def quill_detokenize(quill_bin, model_dir, ids, *flags):
    r = subprocess.run([str(quill_bin), "detokenize", str(model_dir), *flags, *map(str, ids)],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def split_on(ids, sep):
    parts, cur = [], []
    for i in ids:
        if i == sep:
            parts.append(cur)
            cur = []
        else:
            cur.append(i)
    parts.append(cur)
    return parts


def assert_same_parts(quill_bin, model_dir, hf_tok, texts, sep_id=EOT_ID):
    """Encodes the texts joined by <|endoftext|> with both; a mismatch names the first texts."""
    joined = EOT.join(texts)
    ours = quill_tokenize(quill_bin, model_dir, joined)
    theirs = hf_tok.encode(joined, add_special_tokens=False).ids
    if ours != theirs:
        bad = [f"{t[:80]!r}: quill {a[:20]} != tokenizers {b[:20]}"
               for t, a, b in zip(texts, split_on(ours, sep_id), split_on(theirs, sep_id)) if a != b]
        pytest.fail(f"{len(bad)} of {len(texts)} texts differ, first:\n" + "\n".join(bad[:5]))
    return ours


SIMPLE = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
    "<think>\nreasoning\n</think>\n\nanswer",
    "caf\u00e9 vs cafe\u0301, na\u00efve \u00c5ngstr\u00f6m \u212b",
    "    def f(self):\n        return {'a': [1, 2, 3]}\n",
    "日本語 中文 한국어 العربية हिन्दी",
]


@pytest.mark.parametrize("text", SIMPLE)
def test_tokenize_matches_tokenizers(quill_bin, hf, text):
    assert quill_tokenize(quill_bin, TOKENIZER_DIR, text) == hf.encode(text, add_special_tokens=False).ids


def test_text_argument_and_file_path(quill_bin, hf):
    text = "Give me a short introduction to large language models."
    want = hf.encode(text, add_special_tokens=False).ids
    for model in (TOKENIZER_DIR, TOKENIZER_DIR / "tokenizer.json"):
        r = subprocess.run([str(quill_bin), "tokenize", str(model), text], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == want


@pytest.mark.parametrize("text", SIMPLE)
def test_detokenize_matches_tokenizers(quill_bin, hf, text):
    ids = hf.encode(text, add_special_tokens=False).ids
    assert quill_detokenize(quill_bin, TOKENIZER_DIR, ids) == hf.decode(ids, skip_special_tokens=False)
    assert (quill_detokenize(quill_bin, TOKENIZER_DIR, ids, "--skip-special")
            == hf.decode(ids, skip_special_tokens=True))


def test_detokenize_reads_json_from_stdin(quill_bin, hf):
    ids = hf.encode("piped <|im_end|> ids", add_special_tokens=False).ids
    r = subprocess.run([str(quill_bin), "detokenize", str(TOKENIZER_DIR)], input=json.dumps(ids),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "piped <|im_end|> ids"


def test_detokenize_partial_utf8_like_tokenizers(quill_bin, hf):
    # Byte tokens of a split character, alone or out of order, become U+FFFD as in from_utf8_lossy.
    ids = hf.encode("é😀", add_special_tokens=False).ids
    vocab = hf.get_vocab()
    lead, cont = vocab["Ã"], vocab["©"]  # the byte-level tokens of 0xC3 and 0xA9
    for seq in ([lead], [cont, lead], [lead, lead, cont], ids[:1] + [lead] + ids, [cont] * 3):
        assert quill_detokenize(quill_bin, TOKENIZER_DIR, seq) == hf.decode(seq), seq


def every_code_point_texts(dense_end=0x1FFFF, step=5, sparse_step=97):
    """One short text per code point: every one of planes 0 and 1, every step-th one up to the
    end of CJK Extension H (U+323AF; the rest of the ideographs), then every sparse_step-th."""
    cps = (list(range(dense_end + 1)) + list(range(dense_end + 1, 0x323B0, step)) +
           list(range(0x323B0, 0x110000, sparse_step)))
    cps = [c for c in cps if not 0xD800 <= c <= 0xDFFF]
    return [f"a{ch}b {ch}{ch} 1{ch}'{ch}s \t{ch}\n" for ch in map(chr, cps)]


@pytest.mark.slow  # ~20 s, nearly all in tokenizers; the random mixtures cover the same paths
def test_every_code_point(quill_bin, hf):
    """Every code point next to letters, digits, spaces, apostrophes and itself: regex classes
    (tokenizers' Oniguruma knows Unicode 16), NFC and the byte mapping must all agree."""
    assert_same_parts(quill_bin, TOKENIZER_DIR, hf, every_code_point_texts())


ATOMS = (
    list("abcxyzABCXYZ0123456789") + list(" \t\n\r") + list("!?.,;:'\"`~@#$%^&*()[]{}<>/\\|-_=+") +
    ["'s", "'S", "'ll", "'LL", "'re", "'Ve", "'d", "'m", "'t", "\u2019s", "\u017f", "\u212a"] +
    ["\u00a0", "\u2003", "\u3000", "\u2028", "\u0085", "\u180e", "\u200b", "\u200d", "\ufeff", "\x0b", "\x0c"] +
    ["\u0301", "\u0308", "\u0323", "\u0327", "\u031b", "\u0344", "\u0f73", "\u3099", "\u309a"] +
    ["e", "o", "u", "A", "\u1100", "\u1161", "\u11a8", "\uac00", "\u304b", "\u30cf"] +
    ["\u00e9", "\u212b", "\ufb01", "\u2460", "\u00b2", "\u216b", "\u0663", "\uff11", "\u00bd"] +
    ["日本", "中文", "한국어", "Привет", "مرحبا", "हिन्दी", "ไทย", "Ελλάδα", "ß", "İ", "ı", "ς"] +
    ["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "\U0001f130", "\U000e0041", "\U0010fffd"] +
    ["  ", "   ", "\n\n", " \n ", "\r\n", "\t\t", "1234", "3.14", "0x1F", "x" * 30, "ab" * 20] +
    ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "<|im_", "<|", "|>", "<|endoftext"]
)


def random_texts(seed, count, max_atoms):
    rng = random.Random(seed)
    return ["".join(rng.choice(ATOMS) for _ in range(rng.randint(1, max_atoms))) for _ in range(count)]


def test_random_mixtures(quill_bin, hf):
    assert_same_parts(quill_bin, TOKENIZER_DIR, hf, random_texts(1234, 3000, 40))


def test_large_text_matches(quill_bin, hf, shared_dir):
    text = (shared_dir / "reference" / "eval-python-stdlib.txt").read_text(encoding="utf-8")
    assert quill_tokenize(quill_bin, TOKENIZER_DIR, text) == hf.encode(text, add_special_tokens=False).ids


def variant(tmp_path, name, edit):
    """A copy of Qwen3's tokenizer.json changed by edit(dict), in its own directory."""
    data = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    d = tmp_path / name
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return d


def add_flagged_tokens(data):
    """Tokens with every flag combination; "word" and "Å" are already vocabulary strings (so
    tokenizers gives them those ids, not the ones written here) and "[R]" comes twice."""
    base = 151669
    specs = [
        ("<mask>", dict(lstrip=True, rstrip=True, single_word=True, normalized=False, special=True)),
        ("[L]", dict(lstrip=True, normalized=False, special=True)),
        ("[R]", dict(rstrip=True, normalized=False, special=False)),
        ("word", dict(single_word=True, normalized=False, special=False)),
        ("café", dict(normalized=True, special=False)),
        ("nai\u0308ve", dict(normalized=True, special=False)),  # not NFC itself
        ("é!", dict(normalized=False, special=False)),
        ("Å", dict(normalized=True, special=True)),
        (" sp ace", dict(normalized=False, special=False)),
        ("<mask>long", dict(normalized=False, special=False)),
        ("[R]", dict(lstrip=True, normalized=False, special=True)),  # again, new flags
    ]
    for i, (content, flags) in enumerate(specs):
        tok = dict(id=base + i, content=content, single_word=False, lstrip=False, rstrip=False,
                   normalized=False, special=False)
        tok.update(flags)
        data["added_tokens"].append(tok)


FLAG_TEXTS = [
    "a <mask> b", "a<mask>b", "x <mask>\t<mask>\u2000<mask> y", " <mask>", "<mask> ", "(<mask>)",
    "\u00e9<mask>", "a\u0301<mask>", "_<mask>", "<mask>_", "1<mask>2", "<mask>long", " <mask>long ",
    "  [L]  [R]  ", "a[L]b[R]c", "[R]   [L]", "[R][L]", "\u3000[L]\u3000[R]\u3000",
    "word words sword word. (word) _word word_ w\u00f6rd word\u0301 wordé 1word word1",
    "café cafe\u0301 CAFÉ caféine", "na\u00efve nai\u0308ve naive", "é! e\u0301! é!!", "A\u030a \u212b \u00c5 Å",
    " sp ace  sp ace", "x sp acey", "<|im_start|><mask><|im_end|>",
]


def test_added_token_flags(quill_bin, tmp_path):
    d = variant(tmp_path, "flags", add_flagged_tokens)
    hf_tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    # <|endoftext|> between the texts acts like the ends of a string for these flags too
    ids = assert_same_parts(quill_bin, d, hf_tok, FLAG_TEXTS)
    for skip in (False, True):
        flags = ["--skip-special"] if skip else []
        assert quill_detokenize(quill_bin, d, ids, *flags) == hf_tok.decode(ids, skip_special_tokens=skip)


DROPPED = {"\u0120hello", "world", "\u0120the"}  # merge results, as byte-level strings
MERGE_TEXTS = [" hello", " the theory of the other world", "Hello, the world! helloworld hello"]


def drop_merges(data, ignore_merges):
    """Without the merges that make DROPPED (the tokens stay in the vocabulary), plain BPE can no
    longer reach them but ignore_merges still finds them whole; later merges shift rank."""
    data["model"]["merges"] = [m for m in data["model"]["merges"] if "".join(m) not in DROPPED]
    data["model"]["ignore_merges"] = ignore_merges


@pytest.mark.parametrize("ignore", [False, True])
def test_dropped_merges_and_ignore_merges(quill_bin, tmp_path, ignore):
    d = variant(tmp_path, f"ignore_{ignore}", lambda data: drop_merges(data, ignore))
    hf_tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    ids = hf_tok.encode(MERGE_TEXTS[0], add_special_tokens=False).ids
    assert (len(ids) == 1) == ignore  # the variant really behaves differently
    assert_same_parts(quill_bin, d, hf_tok, MERGE_TEXTS + random_texts(99, 800, 30))


def run_quill(quill_bin, *args, stdin=None):
    return subprocess.run([str(quill_bin), *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=60)


def test_missing_tokenizer_is_named(quill_bin, tmp_path):
    r = run_quill(quill_bin, "tokenize", tmp_path, "hi")
    assert r.returncode == 1
    assert str(tmp_path / "tokenizer.json") in r.stderr


def test_invalid_json_is_named(quill_bin, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0,,}}}')
    r = run_quill(quill_bin, "tokenize", tmp_path, "hi")
    assert r.returncode == 1
    assert "tokenizer.json" in r.stderr and "line 1" in r.stderr


def test_unsupported_tokenizer_is_named(quill_bin, tmp_path):
    d = variant(tmp_path, "wordpiece", lambda data: data["model"].update(type="WordPiece"))
    r = run_quill(quill_bin, "tokenize", d, "hi")
    assert r.returncode == 1
    assert "model.type" in r.stderr and "WordPiece" in r.stderr


def test_unreadable_tokenizer_is_named(quill_bin, tmp_path):
    (tmp_path / "tokenizer.json").mkdir()  # a directory where the file should be
    r = run_quill(quill_bin, "tokenize", tmp_path, "hi")
    assert r.returncode == 1
    assert "tokenizer.json" in r.stderr


@pytest.mark.parametrize("bad", ["151669", "-1", "99999999999", "12abc", "x"])
def test_invalid_ids_are_named(quill_bin, bad):
    r = run_quill(quill_bin, "detokenize", TOKENIZER_DIR, "9707", bad)
    assert r.returncode == 1
    assert bad in r.stderr
    assert r.stdout == ""


def test_invalid_utf8_input(quill_bin):
    r = subprocess.run([str(quill_bin), "tokenize", str(TOKENIZER_DIR)], input=b"ok \xff\xfe",
                       capture_output=True, timeout=60)
    assert r.returncode == 1
    assert b"UTF-8" in r.stderr


def test_usage_errors(quill_bin):
    assert run_quill(quill_bin, "tokenize").returncode == 2
    assert run_quill(quill_bin, "detokenize").returncode == 2
    assert run_quill(quill_bin, "tokenize", TOKENIZER_DIR, "--bench", "0").returncode == 2


def test_bench_mode_reports_counts(quill_bin, hf):
    text = "bench me " * 100
    r = run_quill(quill_bin, "tokenize", TOKENIZER_DIR, "--bench", "3", stdin=text)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert stats["bytes"] == len(text.encode())
    assert stats["tokens"] == len(hf.encode(text, add_special_tokens=False).ids)
    assert stats["runs"] == 3 and stats["encode_s"] > 0 and stats["mb_per_s"] > 0
