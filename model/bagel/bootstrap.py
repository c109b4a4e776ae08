"""The release bootstrap of the `tiny` preset: the parts a BAGEL release brings ready-made, made in the chain.

A GPU user starts from the downloaded BAGEL-7B-MoT directory (configs, weights, FLUX `ae.safetensors`, Qwen2
tokenizer). The embedded default has no such download, so the chain makes one of the same layout, and everything
after it (stage training, sampling, the self judge) reads it through `model.bagel.release` exactly as it reads
the real one:

- `subject_world_texts(data_root)`: every text the model will read: the training datasets' instructions and QA
  pairs, the benchmark's instructions, the SRUM prompts, and every question the self judge and the SRUM reward
  can ask (`judge_texts`).
- `train_tokenizer(texts, out_dir, vocab_size)`: a byte-level BPE on those texts in Qwen2's pipeline and file
  layout (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json), byte-identical for the same input.
- `fit_vocab(cfg, tokenizer_len, special)`: the embedding size that holds the tokenizer.
- `assemble_release(tokenizer_dir, ae_dir, out_dir, seed=...)`: the preset's configs, fresh weights for
  everything but the autoencoder, the autoencoder of `ae_dir` (BAGEL's `ae.safetensors` + `ae_params.json`), the
  tokenizer files, and the `config.json` marker the stage trainer wants (model.bagel.family.mark_release).

Special tokens. Qwen2's tokenizer has `<|endoftext|>`, `<|im_start|>` and `<|im_end|>` as added tokens after its
BPE vocabulary; the Qwen2.5 tokenizer BAGEL-7B-MoT ships also has `<|vision_start|>` and `<|vision_end|>`, so
BAGEL's loader (release.load_tokenizer) finds all four of its markers and appends nothing. The tokenizer made
here is laid out the same way: the BPE vocabulary first, then those five as special added tokens, in that order.

"yes" and "no". The self judge reads P(yes) off the logits of the first answer token, and the family encodes an
answer as `encode("yes")` (no leading space), so the tokens "yes" and "no" must each be a whole BPE token. BPE
merges pairs by count, so the trainer is given these words as many times as the corpus's most frequent byte pair
occurs, plus one: their merges come first, whatever the data, and the remaining merges are the ones the data
alone would pick, with "yes" / "no" already whole.
"""
from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

from data.instructions import (BACKGROUND_PHRASES, QA_TEMPLATES, TARGET_POSITION_PHRASES, VOCABULARY, qa_background,
                               qa_position, qa_there)
from data.scene import CHARACTER_CATEGORIES, COLOURS, OBJECT_CATEGORIES, TEXTURES, Subject
from model.bagel.config import AE_PARAMS, AutoencoderConfig, BagelConfig, preset
from model.bagel.model import BagelModel
from model.bagel.packing import SpecialTokens
from model.bagel.release import (AE_FILE, TOKENIZER_FILES, ReleaseError, check_keys, load_tokenizer, mark_release,
                                 save_release)

# Qwen2's added tokens, then BAGEL's image markers as Qwen2.5 has them; ids follow the BPE vocabulary in this order.
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
IMAGE_MARKERS = ("<|vision_start|>", "<|vision_end|>")
ADDED_TOKENS = QWEN2_SPECIALS + IMAGE_MARKERS
JUDGE_ANSWERS = ("yes", "no")
# Qwen2's pre-tokenizer split. transformers rebuilds a Qwen2Tokenizer's pipeline from its own copy of this pattern
# and keeps only the vocabulary and merges of the files, so training must split text exactly as it does.
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
BYTE_ALPHABET = 256
# Embedding rows are allotted in blocks, as Qwen2's (152064 = 1188 * 128 rows for 151665 tokens).
VOCAB_MULTIPLE = 64
MODEL_MAX_LENGTH = 32768  # Qwen2's; BAGEL never truncates through the tokenizer

BENCH_DIR = "sconeeval_bench"  # data.build's layout under the data root
SRUM_PROMPTS = "srum_prompts/prompts.jsonl"


# ---------------------------------------------------------------------------------------------------------------
# texts


def judge_texts() -> list[str]:
    """Every question the self judge (evaluation.judges.self) and the SRUM reward (evaluation.srum) can ask about
    the subject world, and the two answers they compare.

    The judge words a subject as data.instructions.describe does (its phrase-only descriptions, without colour or
    texture, use a subset of the same words in the same places), so asking about every category x colour x texture
    in every template covers them; the SRUM reward also asks "is there a <colour>" about a region whose subject it
    cannot name."""
    texts = []
    for domain, categories in (("object", OBJECT_CATEGORIES), ("character", CHARACTER_CATEGORIES)):
        for category in categories:
            for colour in COLOURS:
                for texture in TEXTURES:
                    subject = Subject(uid="", domain=domain, category=category, colour=colour, texture=texture)
                    texts.append(qa_there(subject))
                    texts.extend(qa_position(subject, slot) for slot in TARGET_POSITION_PHRASES)
    texts.extend(qa_background(background) for background in BACKGROUND_PHRASES)
    texts.extend(QA_TEMPLATES[0].format(desc=f"a {colour}") for colour in COLOURS)
    texts.extend(JUDGE_ANSWERS)
    return texts


def _parquet_texts(path: Path) -> Iterator[str]:
    columns = [c for c in ("instruction", "qa") if c in pq.ParquetFile(path).schema_arrow.names]
    for row in pq.read_table(path, columns=columns).to_pylist():
        if row.get("instruction"):
            yield row["instruction"]
        # imported shards may carry no qa column, or null for rows without pairs
        for question, answer in json.loads(row.get("qa") or "[]"):
            yield question
            yield answer


def _jsonl_field(path: Path, key: str) -> Iterator[str]:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            value = json.loads(line).get(key)
            if value:
                yield value


def subject_world_texts(data_root: str | Path, datasets: Iterable[str] | None = None) -> list[str]:
    """Every text the model reads, in a fixed order, repeats kept (BPE learns from how often a word is read).

    1. the training datasets `<data_root>/parquet_data/<dataset>/*.parquet` (all of them by default, by name; or
       `datasets`), file by file in name order, row by row: the instruction, then each QA question and answer;
    2. the benchmark's instructions (`sconeeval_bench/data.jsonl`) and the SRUM prompts
       (`srum_prompts/prompts.jsonl`), when built: the model reads them at evaluation and in SRUM rounds;
    3. `judge_texts()`: the questions the self judge and the SRUM reward can ask, and "yes" / "no";
    4. the instruction writer's closed vocabulary (data.instructions.VOCABULARY) as one text, so that every word
       the templates can write has been seen after a space, as it stands in a sentence.
    """
    root = Path(data_root)
    parquet_root = root / "parquet_data"
    if datasets is None:
        names = sorted(p.name for p in parquet_root.iterdir() if p.is_dir()) if parquet_root.is_dir() else []
    else:
        names = list(datasets)
    texts: list[str] = []
    for name in names:
        files = sorted((parquet_root / name).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{parquet_root / name}: no parquet shards (build or import dataset {name!r})")
        for path in files:
            texts.extend(_parquet_texts(path))
    bench = root / BENCH_DIR / "data.jsonl"
    if bench.exists():
        texts.extend(_jsonl_field(bench, "instruction"))
    prompts = root / SRUM_PROMPTS
    if prompts.exists():
        texts.extend(_jsonl_field(prompts, "prompt"))
    texts.extend(judge_texts())
    texts.append(" ".join(VOCABULARY))
    return texts


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def _qwen2_pipeline() -> Tokenizer:
    """An untrained byte-level BPE with Qwen2's normalizer, pre-tokenizer, decoder and post-processor."""
    backend = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _top_pair_count(backend: Tokenizer, texts: list[str]) -> int:
    """Occurrences of the most frequent adjacent pair of byte symbols inside the words the trainer will count.
    Merged symbols never pair more often than the bytes at their seam, so no merge of the corpus exceeds this."""
    words: Counter[str] = Counter()
    for text, n in Counter(texts).items():
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text)):
            words[word] += n
    pairs: Counter[tuple[str, str]] = Counter()
    for word, n in words.items():
        for pair in zip(word, word[1:]):
            pairs[pair] += n
    return max(pairs.values(), default=0)


def _corpus(texts: list[str], forced: dict[str, int], chunk: int = 4096) -> Iterator[list[str]]:
    for start in range(0, len(texts), chunk):
        yield texts[start: start + chunk]
    for word, n in forced.items():
        for start in range(0, n, chunk):
            yield [word] * min(chunk, n - start)


def _tokenizer_config(first_added_id: int) -> dict:
    """Qwen2's tokenizer_config.json: the added tokens by id, no BOS, `<|endoftext|>` as EOS and padding, and no
    clean-up of spaces on decoding (the instructions' " , " must decode as written)."""
    added = {str(first_added_id + i): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True}
             for i, token in enumerate(ADDED_TOKENS)}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(ADDED_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int) -> Path:
    """Train a byte-level BPE of `vocab_size` tokens in all (the 256 byte symbols, the merges, and the five added
    tokens) on `texts`, and write it to `out_dir` in Qwen2's layout (the files of release.TOKENIZER_FILES).

    The same texts in the same order give byte-identical files. Fails when the result does not load through
    release.load_tokenizer with BAGEL's four markers in place, or when "yes" / "no" are not single tokens."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no texts to train the tokenizer on (is the data built?)")
    merges = vocab_size - BYTE_ALPHABET - len(ADDED_TOKENS)
    needed = sum(len(w.encode("utf-8")) - 1 for w in JUDGE_ANSWERS)
    if merges < needed:
        raise ValueError(f"vocab_size {vocab_size} leaves {merges} merges after the {BYTE_ALPHABET} byte symbols "
                         f"and {len(ADDED_TOKENS)} added tokens; {', '.join(JUDGE_ANSWERS)} alone need {needed}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    backend = _qwen2_pipeline()
    top = _top_pair_count(backend, texts)
    forced = {word: top + 1 for word in JUDGE_ANSWERS}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(ADDED_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    backend.train_from_iterator(_corpus(texts, forced), trainer=trainer)
    first_added = backend.get_vocab_size(with_added_tokens=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
    ids = [backend.token_to_id(t) for t in ADDED_TOKENS]
    if ids != list(range(first_added, first_added + len(ADDED_TOKENS))):
        raise RuntimeError(f"added tokens got ids {ids}, expected them right after the {first_added} BPE tokens")

    backend.save(str(out_dir / "tokenizer.json"), pretty=True)
    backend.model.save(str(out_dir))  # vocab.json and merges.txt, Qwen2's slow-tokenizer files
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(first_added), indent=2) + "\n")
    missing = [name for name in TOKENIZER_FILES if not (out_dir / name).exists()]
    if missing:
        raise RuntimeError(f"{out_dir}: the tokenizer save wrote no {', '.join(missing)}")
    _check_tokenizer(out_dir, first_added)
    return out_dir


def _check_tokenizer(directory: Path, first_added: int) -> None:
    tokenizer, special = load_tokenizer(directory)
    expected = SpecialTokens(*(first_added + ADDED_TOKENS.index(t) for t in
                               ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")))
    if special != expected or len(tokenizer) != first_added + len(ADDED_TOKENS):
        raise RuntimeError(f"{directory}: BAGEL's loader reads markers {special} and {len(tokenizer)} tokens, "
                           f"expected {expected} and {first_added + len(ADDED_TOKENS)}")
    for word in JUDGE_ANSWERS:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"{directory}: {word!r} encodes as {len(ids)} tokens, the self judge needs one")


def fit_vocab(cfg: BagelConfig, tokenizer_len: int, special: SpecialTokens | None = None,
              multiple: int = VOCAB_MULTIPLE) -> BagelConfig:
    """`cfg` with an embedding that holds every token id of the tokenizer.

    The preset's vocab_size is kept when the tokenizer fits it (the rows past the tokenizer stay unused, as in
    BAGEL-7B: 152064 rows for 151665 tokens); otherwise it grows to the tokenizer's size rounded up to `multiple`.
    """
    need = tokenizer_len
    if special is not None:
        need = max(need, max(vars(special).values()) + 1)
    if need <= cfg.llm.vocab_size:
        return cfg
    size = multiple * math.ceil(need / multiple)
    return cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"vocab_size": size})})


# ---------------------------------------------------------------------------------------------------------------
# release


def _read_autoencoder(ae_dir: Path) -> tuple[AutoencoderConfig, dict[str, torch.Tensor]]:
    """BAGEL's layout: `ae.safetensors` (FLUX's parameter names) and `ae_params.json`; without the latter the
    hyperparameters are FLUX's, as a release loader reads them."""
    path = ae_dir / AE_FILE
    if not path.exists():
        raise ReleaseError(f"{ae_dir}: no {AE_FILE} (train the autoencoder first)")
    params = ae_dir / AE_PARAMS
    cfg = AutoencoderConfig.from_json(params) if params.exists() else AutoencoderConfig()
    with safe_open(str(path), framework="pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
    return cfg, state


def assemble_release(tokenizer_dir: str | Path, ae_dir: str | Path, out_dir: str | Path, *,
                     preset_name: str = "tiny", seed: int, vit_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a release directory to `out_dir` (which must be absent or empty) and return it.

    Architecture: the preset's, its autoencoder replaced by `ae_dir`'s hyperparameters and its vocab_size by
    `fit_vocab`. Weights: fresh (`BagelModel.init_fresh` under torch.manual_seed(seed); the global RNG is left as
    it was) for the language model, ViT, connector and the small joining modules; the autoencoder's from `ae_dir`,
    checked key by key and shape by shape; the ViT's from `vit_state` when given (`vit_model.*` names, as
    model.bagel.release.read_pretrained_vit returns them), checked the same way. Tokenizer: `tokenizer_dir`'s
    files, copied unchanged. Plus the `config.json` marker (family.mark_release). Same inputs and seed give byte-identical files.

    The directory is written next to `out_dir` and renamed into place, so an interrupted run leaves no
    half-release behind to be mistaken for a finished one."""

    tokenizer_dir, ae_dir, out_dir = Path(tokenizer_dir), Path(ae_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ReleaseError(f"{out_dir} is not empty; remove it to assemble the release again")
    tokenizer, special = load_tokenizer(tokenizer_dir)
    vae, ae_state = _read_autoencoder(ae_dir)
    cfg = fit_vocab(preset(preset_name).model_copy(update={"vae": vae}), len(tokenizer), special)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BagelModel(cfg, special)
        model.init_fresh()
    expected = {k: tuple(v.shape) for k, v in model.ae.state_dict().items()}
    check_keys(expected, {k: tuple(v.shape) for k, v in ae_state.items()}, str(ae_dir / AE_FILE))
    model.ae.load_state_dict(ae_state, strict=True)
    if vit_state is not None:
        vit_state = {k.removeprefix("vit_model."): v for k, v in vit_state.items()}
        check_keys({k: tuple(v.shape) for k, v in model.vit_model.state_dict().items()},
                   {k: tuple(v.shape) for k, v in vit_state.items()}, "the pretrained ViT (vit.safetensors)")
        model.vit_model.load_state_dict(vit_state, strict=True)

    staging = out_dir.with_name(f".{out_dir.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    save_release(model, staging, weights_name="ema.safetensors", tokenizer_from=tokenizer_dir)
    mark_release(staging)
    if out_dir.exists():
        out_dir.rmdir()
    staging.rename(out_dir)
    return out_dir
