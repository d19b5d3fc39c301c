"""A character-level tokenizer built in-process, so the zoo needs no download.

One token per character keeps the tiny models honest (no token does arithmetic for them) and makes
``tokenizer.decode`` the exact inverse of ``tokenizer.encode``. It is a plain
``PreTrainedTokenizerFast``: saved beside each model, ``AutoTokenizer.from_pretrained(dir)`` loads it.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
CHARS = " +-=" + string.digits + string.ascii_lowercase


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Pad/bos/eos/unk, then one id per character of ``CHARS``; encoding prepends bos, pads left."""
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
    )
