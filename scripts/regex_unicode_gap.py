#!/usr/bin/env python3
"""Where PCRE2 and tokenizers' Oniguruma disagree on \\p{L}, \\p{N} and \\s.

quill compiles tokenizer.json's pre-tokenizer regex with PCRE2, tokenizers with Oniguruma; any
code point the two classify differently can change the pieces and so the token ids. This tests
every code point with both engines and prints the differences as PCRE2 class ranges, the source
of NEW_LETTERS / NEW_NUMBERS / WHITE_SPACE in src/text/tokenizer.c. Rerun it when the system
PCRE2 or the tokenizers package changes (tests/e2e/test_tokenizer_cli.py::test_every_code_point
fails then). Needs a C compiler and libpcre2-dev."""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenizers import Regex, pre_tokenizers

PROPS = {"L": r"\p{L}", "N": r"\p{N}", "s": r"\s"}
CODE_POINTS = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]

PCRE2_PROBE = r"""
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdio.h>
static int utf8(unsigned c, unsigned char *o) {
    if (c < 0x80) { o[0] = c; return 1; }
    if (c < 0x800) { o[0] = 0xC0 | c >> 6; o[1] = 0x80 | (c & 63); return 2; }
    if (c < 0x10000) { o[0] = 0xE0 | c >> 12; o[1] = 0x80 | (c >> 6 & 63); o[2] = 0x80 | (c & 63); return 3; }
    o[0] = 0xF0 | c >> 18; o[1] = 0x80 | (c >> 12 & 63); o[2] = 0x80 | (c >> 6 & 63); o[3] = 0x80 | (c & 63);
    return 4;
}
int main(int argc, char **argv) {
    int e; PCRE2_SIZE at;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)argv[1], PCRE2_ZERO_TERMINATED, PCRE2_UTF | PCRE2_UCP, &e, &at, NULL);
    pcre2_match_data *md = pcre2_match_data_create(2, NULL);
    for (unsigned c = 0; c < 0x110000; c++) {
        unsigned char b[4];
        if (c >= 0xD800 && c <= 0xDFFF) continue;
        if (pcre2_match(re, b, utf8(c, b), 0, PCRE2_ANCHORED, md, NULL) > 0) printf("%u\n", c);
    }
    return argc < 2;
}
"""


def onig_set(pattern):
    text = "".join(map(chr, CODE_POINTS))
    split = pre_tokenizers.Split(Regex(pattern), behavior="removed")
    kept = set()
    for _, (a, b) in split.pre_tokenize_str(text):
        kept.update(text[a:b])
    return {c for c in CODE_POINTS if chr(c) not in kept}


def pcre2_set(pattern, probe):
    out = subprocess.run([probe, pattern], capture_output=True, text=True, check=True).stdout
    return {int(x) for x in out.split()}


def ranges(cps):
    out = []
    for c in sorted(cps):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return "".join(f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in out)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        src, probe = Path(tmp) / "probe.c", Path(tmp) / "probe"
        src.write_text(PCRE2_PROBE)
        subprocess.run(["cc", "-O2", str(src), "-o", str(probe), "-lpcre2-8"], check=True)
        for name, pattern in PROPS.items():
            onig, pcre = onig_set(pattern), pcre2_set(pattern, str(probe))
            print(f"{pattern}: Oniguruma only: {ranges(onig - pcre) or '-'}")
            print(f"{pattern}: PCRE2 only:     {ranges(pcre - onig) or '-'}")
        print("Oniguruma \\s:", ranges(onig_set(PROPS["s"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
