"""Word-level tokenizer over the subject world's vocabulary.

The tiny model learns its text embeddings from scratch, so a closed word vocabulary (lower-cased, split on
whitespace and punctuation, `<imagehere>` kept whole) is all it needs; unknown words map to [UNK] instead of failing. Ids are a pure
function of the vocabulary: special tokens first, then the sorted set of words.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
# Always present: the understanding head answers yes/no questions (the `self` judge), and instructions
# refer to references by number and use basic punctuation.
BASE_WORDS = ("yes", "no", *"0123456789", ".", ",", "?", "!", "'", ":", ";", "-")


# Words and punctuation runs, as the Whitespace pre-tokenizer, but MIGE's `<imagehere>` placeholder stays one token.
WORD_PATTERN = r"<imagehere>|\w+|[^\w\s]+"


def _pre_tokenizer():
    return pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True)


def _words(entries: Iterable[str]) -> set[str]:
    split = _pre_tokenizer()
    return {piece.lower() for entry in entries for piece, _ in split.pre_tokenize_str(str(entry))}


def build_tokenizer(vocabulary: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Tokenizer for `vocabulary` (words or phrases); defaults to `data.instructions.VOCABULARY`."""
    if vocabulary is None:
        # Imported lazily: the instruction writer owns the word list and the tokenizer must not pin it at import.
        from data.instructions import VOCABULARY

        vocabulary = VOCABULARY
    words = sorted(_words(vocabulary) | set(BASE_WORDS))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = _pre_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved beside a checkpoint (tokenizer.json + tokenizer_config.json)."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {directory}; save checkpoints with model.modeling.save_checkpoint(model, tokenizer, dir)"
        )
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def encode_text(tokenizer: PreTrainedTokenizerFast, text: str, max_len: int) -> list[int]:
    """[BOS] + word ids, truncated to max_len tokens in all. BOS is always there so that every sequence has
    at least one valid key (an instruction dropped for guidance leaves [BOS] alone)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id, *ids][:max_len]


def answer_id(tokenizer: PreTrainedTokenizerFast, answer: str) -> int:
    """Id of the first word of an answer (answers are single words such as yes / no)."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"empty answer {answer!r}: every question needs a one-word answer")
    return ids[0]
