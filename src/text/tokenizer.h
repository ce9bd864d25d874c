/* tokenizer.h — the Qwen3 byte-level BPE tokenizer, loaded from a Hugging Face tokenizer.json.
 *
 * Encoding reproduces `tokenizers`' Tokenizer.encode(text, add_special_tokens=False) for the
 * files Qwen3 ships: added tokens are cut out of the raw text first (honouring their special,
 * normalized, lstrip, rstrip and single_word flags), the rest is NFC-normalized, split by the
 * pre-tokenizer's regex ("Isolated"), mapped to bytes and merged by BPE rank. Decoding reverses
 * the byte-level mapping and replaces invalid UTF-8 as Rust's from_utf8_lossy does.
 *
 * A loaded Tok is immutable: any number of threads may call every function below on the same
 * Tok at once. A TokStream belongs to one thread at a time. */
#ifndef QUILL_TOKENIZER_H
#define QUILL_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "util/qerr.h"

typedef struct Tok Tok;

/* Loads a tokenizer from `path`: a tokenizer.json file, or a directory containing one. Supports
 * what Qwen-style files use: model BPE (byte-level, optionally ignore_merges), normalizer null or
 * NFC, pre_tokenizer Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)], decoder
 * ByteLevel. Added tokens get the ids tokenizers itself assigns on loading (for a file it saved,
 * the ids written in it). Takes about 0.1 s for Qwen3's 11 MB file. Returns NULL with err naming
 * the file and the field at fault for a missing, unreadable, malformed or unsupported file.
 * Free with tok_free(). */
Tok *tok_load(const char *path, QErr *err);

/* Frees everything; NULL is allowed. */
void tok_free(Tok *t);

/* One more than the largest token id (the model vocabulary plus the added tokens). Ids below it
 * that no token uses (holes) are invalid like those above it. */
int32_t tok_vocab_size(const Tok *t);

/* Encodes len bytes of UTF-8 text (NULs allowed) into token ids, as tokenizers'
 * encode(text, add_special_tokens=False): special tokens written in the text become their ids.
 * On success returns 0 and sets *ids to a malloc'd array (the caller frees it; non-NULL even
 * when *n_ids is 0). Returns -1 with err set if the text is not valid UTF-8 (naming the byte
 * offset) or on out-of-memory. */
int tok_encode(const Tok *t, const char *text, size_t len, int32_t **ids, size_t *n_ids, QErr *err);

/* Decodes ids to text: each token's bytes concatenated, special tokens (those flagged `special`
 * in added_tokens) written as their text unless skip_special is set, invalid UTF-8 replaced by
 * U+FFFD per maximal ill-formed subsequence. Returns a malloc'd NUL-terminated string (the
 * caller frees it) and its length in *len (may be NULL), or NULL with err naming the first
 * invalid id. */
char *tok_decode(const Tok *t, const int32_t *ids, size_t n, int skip_special, size_t *len,
                 QErr *err);

/* The id of the token whose text is the len bytes at `text`: an added token's content (e.g.
 * "<think>" -> 151667, "<|im_end|>" -> 151645) or a vocabulary token's decoded bytes (e.g. "\n"
 * -> 198, " the"). Returns -1 if there is none. */
int32_t tok_token_id(const Tok *t, const char *text, size_t len);

/* The bytes the token `id` decodes to (not NUL-terminated in general; a NUL follows them),
 * owned by t; *len gets their length. Returns NULL for an invalid id. */
const char *tok_token_bytes(const Tok *t, int32_t id, size_t *len);

/* 1 if id is a special added token (skipped by skip_special), 0 otherwise or if invalid. */
int tok_is_special(const Tok *t, int32_t id);

/* Incremental decoder for generation: fed one id at a time, it returns only complete UTF-8,
 * holding back the bytes of a character split across tokens. The concatenation of every chunk
 * (flush included) equals tok_decode() of all the ids. */
typedef struct TokStream TokStream;

/* Returns a new stream over t (which must outlive it), or NULL with err set (out of memory). */
TokStream *tok_stream_new(const Tok *t, int skip_special, QErr *err);

/* Frees the stream; NULL is allowed. */
void tok_stream_free(TokStream *s);

/* Adds token `id` and returns the text that became complete (NUL-terminated, possibly empty,
 * owned by the stream and valid until its next call), its length in *len (may be NULL). Returns
 * NULL with err naming the id if it is invalid (the stream is unchanged), or on out-of-memory. */
const char *tok_stream_put(TokStream *s, int32_t id, size_t *len, QErr *err);

/* Ends the text: returns what was held back (an incomplete character becomes U+FFFD), with the
 * same ownership as tok_stream_put, and resets the stream for a new text. Never fails. */
const char *tok_stream_flush(TokStream *s, size_t *len);

#endif
