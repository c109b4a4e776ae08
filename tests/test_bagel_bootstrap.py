"""The tiny preset's release bootstrap: texts of a built subject world, the Qwen2-layout tokenizer trained on them,
and the release assembled from it and an autoencoder directory, read back by the release loader and the family."""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from data.build import BASE, BENCH, SRUM, build_dataset
from data.config import DataConfig, DatasetSizes
from data.formats.scone_s2i import write_rows
from model.bagel import bootstrap as bs
from model.bagel import family as fam
from model.bagel.autoencoder import FluxAutoencoder
from model.bagel.config import AE_PARAMS, preset
from model.bagel.packing import SpecialTokens
from model.bagel.release import AE_FILE, TOKENIZER_FILES, ReleaseError, load_release, load_tokenizer

torch.set_num_threads(1)

IMPORTED = "user_import"  # a dataset as imported data looks: no qa column at all
IMPORTED_INSTRUCTIONS = ["replace the café sign in <imagehere> with <imagehere>",
                         "Put the RED cube from image 2  on the left!\nthen stop"]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "data"
    sizes = DatasetSizes(base=6, multi_candidate=2, bench_per_task=1, srum_prompts=7, t2i_pretrain=7)
    cfg = DataConfig(root=str(root), rows_per_row_group=2, row_groups_per_file=2, num_workers=1, sizes=sizes)
    for name in (BASE, BENCH, SRUM):
        build_dataset(name, cfg)
    schema = pa.schema([("image", pa.list_(pa.binary())), ("instruction", pa.string())])
    write_rows([{"image": [_png(), _png()], "instruction": text} for text in IMPORTED_INSTRUCTIONS], root, IMPORTED,
               rows_per_row_group=2, schema=schema)
    return root


@pytest.fixture(scope="module")
def texts(world) -> list[str]:
    return bs.subject_world_texts(world)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, texts) -> Path:
    return bs.train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=512)


def _shard_rows(world: Path, name: str) -> list[dict]:
    rows = []
    for path in sorted((world / "parquet_data" / name).glob("*.parquet")):
        rows += pq.read_table(path, columns=["instruction", "qa"]).to_pylist()
    return rows


# ---- texts ----


def test_texts_hold_every_instruction_qa_pair_prompt_and_judge_question_in_order(world, texts):
    rows = _shard_rows(world, BASE)
    assert len(rows) == 6
    expected = []
    for row in rows:
        expected.append(row["instruction"])
        for question, answer in json.loads(row["qa"]):
            expected += [question, answer]
    expected += IMPORTED_INSTRUCTIONS  # datasets by name: user_import after scone_single_candidate_base
    assert texts[: len(expected)] == expected
    assert len(expected) > 6 + 12  # the built rows do carry QA pairs

    bench = [json.loads(line)["instruction"] for line in (world / BENCH / "data.jsonl").read_text().splitlines()]
    prompts = [json.loads(line)["prompt"] for line in (world / SRUM / "prompts.jsonl").read_text().splitlines()]
    n = len(expected)
    assert texts[n: n + len(bench) + len(prompts)] == bench + prompts
    judge = bs.judge_texts()
    assert texts[n + len(bench) + len(prompts):] == [*judge, " ".join(bs.VOCABULARY)]
    for question in ("is there a striped red circle", "is there an orange diamond",
                     "is the robot in dotted blue at the top left", "is this at night", "is there a cyan"):
        assert question in judge
    assert judge[-2:] == ["yes", "no"]
    assert bs.subject_world_texts(world) == texts


def test_texts_of_chosen_datasets_and_a_missing_one(world):
    texts = bs.subject_world_texts(world, datasets=[IMPORTED])
    assert texts[:2] == IMPORTED_INSTRUCTIONS
    assert _shard_rows(world, BASE)[0]["instruction"] not in texts
    with pytest.raises(FileNotFoundError, match="no_such"):
        bs.subject_world_texts(world, datasets=["no_such"])


# ---- tokenizer ----


def test_tokenizer_is_byte_identical_for_the_same_texts(tmp_path, texts, tokenizer_dir):
    again = bs.train_tokenizer(list(texts), tmp_path / "again", vocab_size=512)
    for name in TOKENIZER_FILES:
        assert (again / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name
    other = bs.train_tokenizer(texts[::-1], tmp_path / "other", vocab_size=400)
    assert (other / "merges.txt").read_bytes() != (tokenizer_dir / "merges.txt").read_bytes()


def test_tokenizer_has_qwen2_layout_with_bagel_markers(tokenizer_dir):
    tok, special = load_tokenizer(tokenizer_dir)
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    n = len(vocab)
    assert not set(bs.ADDED_TOKENS) & set(vocab)  # added tokens follow the BPE vocabulary, as in Qwen2
    assert len(tok) == n + 5 <= preset("tiny").llm.vocab_size
    assert tok.convert_tokens_to_ids(list(bs.ADDED_TOKENS)) == list(range(n, n + 5))
    assert special == SpecialTokens(n + 1, n + 2, n + 3, n + 4)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|endoftext|>", "<|endoftext|>", None)
    # markers in text are matched whole, never split into bytes
    assert tok.encode("<|vision_start|><|im_end|>", add_special_tokens=False) == [n + 3, n + 2]
    assert (tokenizer_dir / "merges.txt").read_text().startswith("#version: 0.2\n")


def test_yes_and_no_are_single_tokens_as_the_family_encodes_answers(tokenizer_dir):
    tok, _ = load_tokenizer(tokenizer_dir)
    for word in ("yes", "no"):
        assert tok.encode(word, add_special_tokens=False) == [tok.convert_tokens_to_ids(word)]


def test_yes_and_no_are_whole_even_when_the_corpus_never_says_them(tmp_path):
    texts = ["the striped red circle on the left", "a dotted blue square in the snow"] * 40
    out = bs.train_tokenizer(texts, tmp_path / "tok", vocab_size=300)
    tok, _ = load_tokenizer(out)
    assert len(tok.encode("yes", add_special_tokens=False)) == 1
    assert len(tok.encode("no", add_special_tokens=False)) == 1
    assert len(tok) <= 300


def test_vocab_size_without_room_for_the_answers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 263"):
        bs.train_tokenizer(["yes no"], tmp_path / "tok", vocab_size=263)
    with pytest.raises(ValueError, match="no texts"):
        bs.train_tokenizer(["", ""], tmp_path / "tok", vocab_size=512)


def test_every_text_round_trips_and_every_loader_agrees(tmp_path, texts, tokenizer_dir):
    tok, _ = load_tokenizer(tokenizer_dir)
    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    slow_layout = tmp_path / "vocab_merges_only"  # what a Qwen2 loader without tokenizer.json reads
    slow_layout.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, slow_layout / name)
    slow, _ = load_tokenizer(slow_layout)
    for text in dict.fromkeys(texts):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert raw.encode(text, add_special_tokens=False).ids == ids
        assert slow.encode(text, add_special_tokens=False) == ids


def test_the_judges_words_are_whole_tokens(tokenizer_dir):
    tok, _ = load_tokenizer(tokenizer_dir)
    judge = bs.judge_texts()
    pieces = sum(len(tok.encode(q, add_special_tokens=False)) for q in judge)
    words = sum(len(q.split()) for q in judge)
    assert pieces == words  # 512 tokens leave room for every word of the closed world, spaced or first


def test_fit_vocab_keeps_the_preset_size_or_rounds_up():
    cfg = preset("tiny")
    assert bs.fit_vocab(cfg, 473, SpecialTokens(469, 470, 471, 472)) is cfg
    assert bs.fit_vocab(cfg, 512).llm.vocab_size == 512
    assert bs.fit_vocab(cfg, 513).llm.vocab_size == 576
    assert bs.fit_vocab(cfg, 100, SpecialTokens(1, 2, 3, 600)).llm.vocab_size == 640
    assert cfg.llm.vocab_size == 512


# ---- release ----


@pytest.fixture(scope="module")
def ae_dir(tmp_path_factory) -> Path:
    """An autoencoder directory as the autoencoder trainer leaves it: BAGEL's two files, distinctive weights."""
    out = tmp_path_factory.mktemp("ae")
    vae = preset("tiny").vae
    gen = torch.Generator().manual_seed(7)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in FluxAutoencoder(vae).state_dict().items()}
    save_file(state, str(out / AE_FILE), metadata={"format": "pt"})
    vae.to_json(out / AE_PARAMS)
    return out


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory, tokenizer_dir, ae_dir) -> Path:
    return bs.assemble_release(tokenizer_dir, ae_dir, tmp_path_factory.mktemp("rel") / "release", seed=3)


def test_release_loads_strictly_with_the_given_autoencoder_and_tokenizer(release_dir, tokenizer_dir, ae_dir):
    rng = torch.get_rng_state()
    release = load_release(release_dir)
    cfg = release.model.config
    assert cfg.model_dump() == preset("tiny").model_dump()  # the tokenizer fits: the preset's vocab_size stays
    given = load_file(str(ae_dir / AE_FILE))
    assert load_file(str(release_dir / AE_FILE)).keys() == given.keys()
    for key, value in release.model.ae.state_dict().items():
        assert torch.equal(value, given[key]), key
    for name in TOKENIZER_FILES:
        assert (release_dir / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name
    assert max(vars(release.model.special).values()) < cfg.llm.vocab_size
    assert len(release.tokenizer) <= cfg.llm.vocab_size
    assert torch.equal(torch.get_rng_state(), rng)
    assert not list(release_dir.parent.glob(".*partial"))

    tok = fam.BagelTokenizer(release_dir)
    assert tok.special == release.model.special
    trainable = fam.load(release_dir)  # the stage trainer's entry, with its config.json marker
    assert (release_dir / fam.MARKER).exists()
    assert trainable.bagel.special == tok.special


def test_release_runs_an_understanding_forward(release_dir):
    release = load_release(release_dir)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        logits = release.model.answer_logits([image], release.encode_text("is there a striped red circle"))
    assert logits.shape == (preset("tiny").llm.vocab_size,)
    assert torch.isfinite(logits).all()


def test_release_is_a_function_of_its_inputs_and_seed(tmp_path, release_dir, tokenizer_dir, ae_dir):
    same = bs.assemble_release(tokenizer_dir, ae_dir, tmp_path / "same", seed=3)
    for path in sorted(release_dir.iterdir()):
        assert (same / path.name).read_bytes() == path.read_bytes(), path.name
    other = bs.assemble_release(tokenizer_dir, ae_dir, tmp_path / "other", seed=4)
    assert (other / "ema.safetensors").read_bytes() != (release_dir / "ema.safetensors").read_bytes()
    assert (other / AE_FILE).read_bytes() == (release_dir / AE_FILE).read_bytes()
    with pytest.raises(ReleaseError, match="not empty"):
        bs.assemble_release(tokenizer_dir, ae_dir, tmp_path / "same", seed=3)


def test_release_refuses_an_autoencoder_of_another_shape(tmp_path, tokenizer_dir, ae_dir):
    wrong = tmp_path / "ae"
    wrong.mkdir()
    shutil.copy(ae_dir / AE_FILE, wrong / AE_FILE)
    preset("tiny").vae.model_copy(update={"ch": 64}).to_json(wrong / AE_PARAMS)
    with pytest.raises(ReleaseError, match="shape mismatches"):
        bs.assemble_release(tokenizer_dir, wrong, tmp_path / "release", seed=0)
    assert not (tmp_path / "release").exists()
    with pytest.raises(ReleaseError, match="no ae.safetensors"):
        bs.assemble_release(tokenizer_dir, tmp_path / "nothing", tmp_path / "release", seed=0)


def test_release_takes_the_pretrained_vit_exactly_and_refuses_one_of_another_shape(tmp_path, tokenizer_dir, ae_dir):
    from model.bagel.release import read_pretrained_vit
    from model.bagel.siglip import SiglipVisionModel
    from model.bagel.vit_pretrain import save_vit

    vit = SiglipVisionModel(preset("tiny").vit)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(1.0)  # distinctive: no fresh initialisation has these values
    save_vit(vit, tmp_path / "vit", {"steps": 0})
    release = load_release(bs.assemble_release(tokenizer_dir, ae_dir, tmp_path / "release", seed=3,
                                               vit_state=read_pretrained_vit(tmp_path / "vit")))
    for key, value in vit.state_dict().items():
        assert torch.equal(release.model.vit_model.state_dict()[key], value), key

    small = SiglipVisionModel(preset("tiny").vit.model_copy(update={"hidden_size": 32, "intermediate_size": 64}))
    save_vit(small, tmp_path / "small", {"steps": 0})
    with pytest.raises(ReleaseError, match="shape mismatches"):
        bs.assemble_release(tokenizer_dir, ae_dir, tmp_path / "refused", seed=3,
                            vit_state=read_pretrained_vit(tmp_path / "small"))
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ReleaseError, match="scone bootstrap vit"):
        read_pretrained_vit(tmp_path / "nothing")
