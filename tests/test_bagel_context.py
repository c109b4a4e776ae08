"""Generation contexts (model.bagel.context): MIGE's `<imagehere>` instructions interleave each reference at its
placeholder, in training (family.collate + packed_forward) and sampling (generate) through the one layout function;
plain instructions keep the references first. Also: placeholder counts, editing rows, MICo's five-input rows."""
import zlib

import numpy as np
import pytest
import torch

from data.build import MICO, MIGE, build_dataset
from data.config import DataConfig, DatasetSizes
from data.formats import scone_s2i
from flows.params import load_params
from model.bagel import family as fam
from model.bagel import generate as gen
from model.bagel.bridge import layout_of
from model.bagel.config import preset
from model.bagel.context import encode_instruction
from model.bagel.model import BagelModel
from model.bagel.packing import TEXT, VAE, VIT
from model.bagel.siglip import patchify
from model.batching import Example, examples_from_rows
from model.config import BridgeConfig, ModelConfig

SIDE = 32
N_LAT, N_VIT = 64, 16  # the tiny preset's 32 px image: 8 x 8 latent tokens, 4 x 4 ViT tokens
EDIT = "add <imagehere> on the left of <imagehere>"


class WordTokenizer:
    """Whitespace words -> ids below the tiny preset's markers; carries the preset's config as collate wants."""

    config = preset("tiny")

    def encode(self, text: str) -> list[int]:
        return [3 + zlib.crc32(w.encode()) % 400 for w in text.split()]


TOK = WordTokenizer()
CFG = ModelConfig(max_references=5, cfg_drop_text=0.0, cfg_drop_image=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = fam.BagelForTraining(BagelModel(preset("tiny")), None)
    m.bagel.init_fresh()
    torch.nn.init.normal_(m.bagel.llm2vae.weight, std=0.05)
    return m.eval()


def _images(n: int, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(n)]


def _training_samples(model, examples, monkeypatch) -> tuple[dict, list]:
    """The packed samples family.packed_forward builds for `examples` (recorded at the model call)."""
    seen = []
    real = model._hidden_states

    def record(samples, bridge=None):
        seen.extend(samples)
        return real(samples, bridge)

    monkeypatch.setattr(model, "_hidden_states", record)
    batch = fam.collate(examples, TOK, CFG)
    with torch.no_grad():
        model.packed_forward(batch, torch.Generator().manual_seed(0))
    return batch, seen


def _runs(sample) -> list[tuple[int, int, int]]:
    """(kind, first position id, token count) per segment, the vision markers counted with their image."""
    out = []
    for seg in sample.segments:
        kinds = set(sample.kinds[seg.start + 1: seg.end - 1]) if not seg.causal else {TEXT}
        (kind,) = kinds
        out.append((kind, sample.position_ids[seg.start], seg.end - seg.start))
    return out


def _text_of(sample, seg) -> list[int]:
    by_position = dict(zip(sample.text_index, sample.text_ids))
    return [by_position[i] for i in range(seg.start, seg.end)]


def test_interleaved_context_puts_each_image_at_its_placeholder_in_training(model, monkeypatch):
    subject, source, target = _images(3)
    batch, (sample,) = _training_samples(model, [Example([subject, source], EDIT, target)], monkeypatch)
    bos, eos = model.bagel.special.bos, model.bagel.special.eos
    add, middle = TOK.encode("add"), TOK.encode("on the left of")
    assert batch["samples"][0]["pieces"] == [add, middle, []]
    # token order: text, the subject's VAE then ViT tokens, text, the source's, the closing (empty) text, target
    assert _runs(sample) == [(TEXT, 0, 3), (VAE, 3, N_LAT + 2), (VIT, 4, N_VIT + 2), (TEXT, 5, 6),
                             (VAE, 11, N_LAT + 2), (VIT, 12, N_VIT + 2), (TEXT, 13, 2), (VAE, 15, N_LAT + 2)]
    texts = [_text_of(sample, s) for s in sample.segments if s.causal]
    assert texts == [[bos, *add, eos], [bos, *middle, eos], [bos, eos]]
    # the images at the placeholders are the subject (1st) and the source (2nd), each VAE + ViT of the same picture
    pixels = batch["pixels"]
    refs = batch["samples"][0]["refs"]
    assert torch.equal(sample.vit_images[0].patches, patchify(pixels[refs[0]], 8))
    assert torch.equal(sample.vit_images[1].patches, patchify(pixels[refs[1]], 8))
    # positions: one per text token, one per image (its markers included), increasing along the sequence
    assert sample.position_ids == sorted(sample.position_ids) and sample.position_ids[-1] == 15
    # attention: text causal, an image full within itself, every segment sees all earlier ones and none later
    mask = sample.attention_mask()
    for seg in sample.segments:
        block = mask[seg.start:seg.end, seg.start:seg.end]
        n = seg.end - seg.start
        expected = torch.ones(n, n, dtype=torch.bool)
        assert torch.equal(block, expected.tril() if seg.causal else expected)
        assert mask[seg.start:seg.end, :seg.start].all() and not mask[seg.start:seg.end, seg.end:].any()
    first_text, subject_vae = sample.segments[0], sample.segments[1]
    assert not mask[first_text.start:first_text.end, subject_vae.start:].any()  # the text before sees no image
    assert mask[subject_vae.start:subject_vae.end, first_text.start:first_text.end].all()


def test_sampling_builds_the_training_context_through_the_same_function(model, monkeypatch):
    subject, source, target = _images(3)
    example = Example([subject, source], EDIT, target)
    _, (trained,) = _training_samples(model, [example], monkeypatch)
    case = gen._prepare(model.bagel, TOK, example, 0, SIDE)
    sampled = gen._context(model.bagel, case, "full")
    n = len(sampled)
    assert trained.kinds[:n] == sampled.kinds and trained.position_ids[:n] == sampled.position_ids
    assert trained.text_ids[:len(sampled.text_ids)] == sampled.text_ids
    assert [(s.start, s.end, s.causal) for s in trained.segments[:-1]] == \
        [(s.start, s.end, s.causal) for s in sampled.segments]
    assert torch.equal(trained.attention_mask()[:n, :n], sampled.attention_mask())
    for a, b in zip(trained.vae_images, sampled.vae_images):
        torch.testing.assert_close(a.tokens, b.tokens)
    # the guidance passes: (I, -) references first then an empty text, as training's text dropout; (-, -) no images
    image_pass = gen._context(model.bagel, case, "image")
    assert _runs(image_pass) == [(VAE, 0, N_LAT + 2), (VIT, 1, N_VIT + 2), (VAE, 2, N_LAT + 2),
                                 (VIT, 3, N_VIT + 2), (TEXT, 4, 2)]
    assert _runs(gen._context(model.bagel, case, "none")) == [(TEXT, 0, 2)]
    # the cached sampler continues the interleaved context exactly (the noisy target stays last)
    kw = dict(steps=2, cfg_text=2.0, cfg_image=1.5, seed=1, image_size=SIDE)
    cached = gen.sample_latents(model.bagel, TOK, [example], **kw)
    uncached = gen.sample_latents(model.bagel, TOK, [example], use_cache=False, **kw)
    torch.testing.assert_close(cached[0], uncached[0], atol=1e-5, rtol=0)
    # and the placement matters: the same images and words, references first, give another image
    plain = gen.sample_latents(model.bagel, TOK, [Example([subject, source], "add on the left of", target)], **kw)
    assert not torch.allclose(cached[0], plain[0], atol=1e-4)


def test_an_instruction_without_placeholders_keeps_the_references_first(model, monkeypatch):
    refs, target = _images(2), _images(1, seed=9)[0]
    example = Example(refs, "put the red circle on the beach", target)
    batch, (sample,) = _training_samples(model, [example], monkeypatch)
    assert "pieces" not in batch["samples"][0] and batch["samples"][0]["text"] == TOK.encode(example.instruction)
    assert _runs(sample) == [(VAE, 0, N_LAT + 2), (VIT, 1, N_VIT + 2), (VAE, 2, N_LAT + 2), (VIT, 3, N_VIT + 2),
                             (TEXT, 4, 2 + 7), (VAE, 13, N_LAT + 2)]
    pixels = [fam._pixels(r, SIDE) for r in refs]
    released = model.bagel.generation_context(pixels, TOK.encode(example.instruction))  # the released layout
    n = len(released)
    assert sample.kinds[:n] == released.kinds and sample.position_ids[:n] == released.position_ids


def test_placeholders_must_match_the_references(model):
    one_slot = Example(_images(2), "add <imagehere> to the scene", _images(1)[0])
    with pytest.raises(ValueError, match=r"has 1 <imagehere> placeholder\(s\) but 2 input image\(s\)"):
        fam.collate([one_slot], TOK, CFG)
    with pytest.raises(ValueError, match=r"example 0: its instruction has 1 <imagehere>"):
        gen.sample_latents(model.bagel, TOK, [one_slot], steps=1, cfg_text=1.0, cfg_image=1.0, seed=0,
                           image_size=SIDE)
    # a row is named by its key (model.data_loader then quarantines it or stops, naming its shard and row)
    png = scone_s2i_png(_images(1)[0])
    with pytest.raises(ValueError, match=r"row mige_000007: its instruction has 2 <imagehere>"):
        examples_from_rows([{"key": "mige_000007", "image": [png, png], "instruction": EDIT}])
    # an interleaved row needs all its inputs: max_references may not cut them
    with pytest.raises(ValueError, match="raise model.max_references"):
        fam.collate([Example(_images(2), EDIT, _images(1)[0])], TOK, CFG.model_copy(update={"max_references": 1}))
    assert encode_instruction(TOK.encode, "no slots here", 3, "x") == [TOK.encode("no slots here")]


def scone_s2i_png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_the_bridge_reads_an_interleaved_context(model, monkeypatch):
    subject, source, target = _images(3)
    _, (sample,) = _training_samples(model, [Example([subject, source], EDIT, target)], monkeypatch)
    layout = layout_of(sample, model.bagel.special)
    assert len(layout.references) == 2 and torch.equal(layout.targets, sample.vae_images[-1].index)
    text_positions = [i for s in sample.segments if s.causal for i in range(s.start, s.end)]
    assert layout.instruction.tolist() == text_positions  # every framed piece of the instruction
    bridge = BridgeConfig(early_layer=1, apply_until=2, tau=0.0)
    with torch.no_grad():
        out = model.packed_forward(fam.collate([Example([subject, source], EDIT, target)], TOK, CFG),
                                   torch.Generator().manual_seed(0), bridge=bridge)
    assert out["bridge_kept"] is not None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix") / "data"
    cfg = DataConfig(root=str(root), num_workers=1, rows_per_row_group=8,
                     sizes=DatasetSizes(mige_edit=4, mico=6))
    build_dataset(MIGE, cfg)
    build_dataset(MICO, cfg)
    return cfg


def test_an_editing_row_gives_the_model_its_source_at_its_placeholder(built, model, monkeypatch):
    cases = scone_s2i.read_cases(built.root, MIGE)
    rows = list(scone_s2i.iter_rows(built.root, MIGE))
    examples = examples_from_rows(rows)
    batch, samples = _training_samples(model, examples, monkeypatch)
    for case, row, example, collated, sample in zip(cases, rows, examples, batch["samples"], samples):
        k = case.meta["source_image"]
        source = example.refs[k]
        np.testing.assert_array_equal(source, scone_s2i_decode(row["image"][k]))
        # the source is a reference (not the target) and stands at the k-th placeholder of the instruction
        assert torch.equal(batch["pixels"][collated["refs"][k]], fam._pixels(source, SIDE))
        assert not torch.equal(batch["pixels"][collated["refs"][k]], batch["pixels"][collated["target"]])
        pieces = encode_instruction(TOK.encode, example.instruction, 2, case.key)
        images = [seg for seg in sample.segments if not seg.causal]
        texts = [seg for seg in sample.segments if seg.causal]
        source_vae = images[2 * k]
        before = [t for t in texts if t.end <= source_vae.start]
        assert len(before) == len([p for p in pieces[:k + 1] if p])
        # the unchanged part of the source survives in the target the model is asked for
        same = (source == example.target).all(axis=-1).mean()
        assert same > 0.5, case.key


def scone_s2i_decode(data) -> np.ndarray:
    from model.batching import decode_image

    return decode_image(data)


def test_a_mico_five_input_row_fits_whole(built, model, monkeypatch):
    cases = scone_s2i.read_cases(built.root, MICO)
    rows = list(scone_s2i.iter_rows(built.root, MICO))
    (k,) = [i for i, c in enumerate(cases) if c.case_type == "5O"]
    example = examples_from_rows([rows[k]])[0]
    assert len(example.refs) == 5
    params = load_params("params.yaml")
    assert params.model.max_references >= 5  # the chain keeps all five
    cfg = CFG.model_copy(update={"max_references": params.model.max_references})
    batch = fam.collate([example], TOK, cfg)
    assert len(batch["samples"][0]["refs"]) == 5
    _, samples = _training_samples(model, [example], monkeypatch)  # the generation sample, then its question's
    assert len(samples[0].vae_images) == 6 and len(samples[0].vit_images) == 5  # five references and the target
    n = fam.sample_tokens(example, TOK, cfg)
    assert n == sum(len(s) for s in samples)  # the token budget counts what the packed forward runs
    assert n < 700  # 5 x (66 + 18) + the target's 66 + text and a question
