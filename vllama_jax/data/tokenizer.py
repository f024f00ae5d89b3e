"""Tokenizers: a LLaMA tokenizer from a local directory with Video-LLaMA's placeholder tokens, or a small
byte-level BPE built on the spot (tests and the CPU demo cannot download the real one)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vllama_jax.constants import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER


def add_placeholders(tokenizer):
    """Add `<ImageHere>` and `<AudioHere>` as special tokens (after the base vocabulary, as the original does)
    and use `unk` as the pad token when there is none."""
    tokenizer.add_tokens([IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def load_tokenizer(path: str | Path):
    """A Hugging Face tokenizer saved in `path` (no downloads), with the placeholders added."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    return add_placeholders(AutoTokenizer.from_pretrained(str(path), local_files_only=True))


def build_bpe_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with LLaMA's special-token layout (<unk>=0, <s>=1, </s>=2), trained on `corpus`.

    Its base vocabulary is at most `vocab_size`; any text encodes (byte fallback), so captions never hit unk.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
