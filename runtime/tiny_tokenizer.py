"""The tiny models' tokenizer: a byte-level CLIP BPE vocabulary made here (no download).

Every byte, every byte ending a word (``</w>``), a few merges of common English letter pairs and the two
special tokens: :data:`TINY_VOCAB_SIZE` entries, the ``vocab_size`` of the tiny text encoders.  The tiny
checkpoints are written with it, so a change here needs a bump of ``runtime.tiny.TINY_VERSION``.
"""
from __future__ import annotations

import json
from pathlib import Path

# A few merges of common English letter pairs, so that ordinary words take fewer tokens.
_MERGES = ["t h", "h e</w>", "i n", "e r", "a n", "r e", "o n", "a t", "e n", "o u", "e s</w>", "t o</w>",
           "s t", "i t</w>", "in g</w>", "th e</w>", "a r", "o r", "a l", "o f</w>"]


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the 256 byte values (GPT-2/CLIP order)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) of the tiny tokenizer: bytes, bytes + '</w>', merged pairs, then the two specials."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(tokens)) == len(tokens), "tiny tokenizer: duplicate vocabulary entries"
    return {tok: i for i, tok in enumerate(tokens)}, list(_MERGES)


TINY_VOCAB_SIZE = len(tiny_vocab()[0])


def make_tokenizer(pad_token: str = "<|endoftext|>"):
    """The tiny CLIPTokenizer (SD1.5 and SDXL's first tokenizer pad with '<|endoftext|>', SDXL's second with '!')."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab()
    pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab=vocab, merges=pairs, pad_token=pad_token, model_max_length=77)


def write_vocab_files(folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` into a saved tokenizer folder."""
    # The classic vocab.json + merges.txt beside tokenizer.json, so any CLIP tokenizer implementation reads it.
    vocab, merges = tiny_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
