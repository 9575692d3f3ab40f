"""A small tokenizer trained on a corpus, with the chat templates' special tokens (tests, demos, benchmarks)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from instit_jax.chat_template import IMAGE_TOKEN

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>")


def train_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 512, *, kind: str = "bpe",
                         special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """Trains a small byte-level BPE (or WordLevel) tokenizer with our special tokens, for tests/demos.

    Special tokens get the first ids in the order given (``<unk>``=0, ``<s>``=1, ``</s>``=2, ...).
    """
    corpus = list(corpus)
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[AddedToken(s, special=True) for s in special_tokens],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, special_tokens=[AddedToken(s, special=True) for s in special_tokens],
            show_progress=False)
    else:
        raise ValueError(f"kind must be 'bpe' or 'wordlevel', got {kind!r}")
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True) for s in special_tokens])
    return tok
