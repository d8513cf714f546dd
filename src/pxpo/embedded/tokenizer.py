"""The embedded default's tokenizer: byte-level BPE trained locally on the prompt corpus, saved as a CLIPTokenizer."""

from __future__ import annotations

from ..prompts import DIGIT_WORDS, digit_prompt


def _tokenizer_corpus() -> list[str]:
    words = (
        "a an the handwritten digit number image photo picture of with and in on at "
        "left right top bottom center middle half side bright dark light black white "
        "grey gray red green blue yellow colour color big small thick thin bold"
    )
    corpus = [digit_prompt(d) for d in range(10)] + [f"the number {w}" for w in DIGIT_WORDS]
    return corpus + [words] * 3


def build_tokenizer(max_length: int = 16):
    """Learn a byte-level BPE vocabulary from the prompt corpus; wrap it as a CLIPTokenizer.

    Classic BPE training on the corpus words (the same pre-tokenisation as
    CLIP: words, single digits, punctuation runs; byte-level alphabet; ``</w>``
    ends a word), merging until every corpus word is one token. Deterministic:
    frequency ties are broken by the pair's text (the `tokenizers` trainer breaks
    them differently from run to run, which changed the model built).
    Unknown words still tokenize: every byte, with and without ``</w>``, is in
    the vocabulary.
    """
    import re

    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    byte_map = dict(zip(range(256), _bytes_to_unicode()))
    counts: dict[tuple[str, ...], int] = {}
    for line in _tokenizer_corpus():
        for w in re.findall(r"[^\W\d_]+|\d|[^\s\w]+", " ".join(line.lower().split())):
            chars = [byte_map[b] for b in w.encode("utf-8")]
            key = tuple(chars[:-1] + [chars[-1] + "</w>"])
            counts[key] = counts.get(key, 0) + 1
    # Classic BPE (Sennrich et al.): repeatedly merge the most frequent adjacent
    # pair; ties broken by the pair's text, so the result is deterministic.
    merges: list[tuple[str, str]] = []
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for word, c in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new_counts: dict[tuple[str, ...], int] = {}
        for word, c in counts.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_counts[tuple(out)] = new_counts.get(tuple(out), 0) + c
        counts = new_counts
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte -> printable unicode character table (for byte 0..255 in order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]
