"""json_prefix: an RFC 8259 recogniser written apart from quill's structured outputs, to judge
them (tests of the server and of the CLI)."""
import re


def json_prefix(text):
    """(is a prefix of a JSON object, is a whole one): a character-level recogniser of RFC 8259,
    written apart from quill's, to judge its JSON mode."""
    stack, state, i, n = [], "start", 0, len(text)
    while i < n:
        c = text[i]
        if state == "string":
            if c == '"':
                state = "colon" if key else "after"
            elif c == "\\":
                if i + 1 < n and text[i + 1] == "u":
                    hexd = text[i + 2:i + 6]
                    if not all(h in "0123456789abcdefABCDEF" for h in hexd):
                        return False, False
                    i += 5
                elif i + 1 < n and text[i + 1] not in '"\\/bfnrt':
                    return False, False
                i += 1
            elif ord(c) < 0x20:
                return False, False
            i += 1
            continue
        if c in " \t\n\r":
            i += 1
            continue
        if state == "done":
            return False, False
        if state == "start":
            if c != "{":
                return False, False
            stack, state = ["{"], "key_first"
        elif state in ("key_first", "key"):
            if c == "}" and state == "key_first":
                stack.pop()
                state = "after" if stack else "done"
            elif c == '"':
                state, key = "string", True
            else:
                return False, False
        elif state == "colon":
            if c != ":":
                return False, False
            state = "value"
        elif state in ("value", "arr_first"):
            if c == "]" and state == "arr_first":
                stack.pop()
                state = "after" if stack else "done"
            elif c in "{[":
                stack.append(c)
                state = "key_first" if c == "{" else "arr_first"
            elif c == '"':
                state, key = "string", False
            else:  # a number or a literal: its whole run of characters
                run = re.match(r"[-+.0-9eE]+|[a-z]+", text[i:])
                word = run.group(0) if run else ""
                full = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?|true|false|null"
                if i + len(word) == n:  # at the end: a prefix of one?
                    ok = bool(word) and (any(w.startswith(word) for w in ("true", "false", "null")) or
                                         re.fullmatch(r"-?(0|[1-9][0-9]*)?(\.[0-9]*)?([eE][+-]?[0-9]*)?", word) is not None)
                    return ok, False
                if not re.fullmatch(full, word):
                    return False, False
                i += len(word)
                state = "after"
                continue
        elif state == "after":
            if c == ",":
                state = "key" if stack[-1] == "{" else "value"
            elif c in "}]" and stack[-1] == ("{" if c == "}" else "["):
                stack.pop()
                state = "after" if stack else "done"
            else:
                return False, False
        i += 1
    return True, state == "done"
