"""The BAGEL model family reproduces what the public BAGEL code computes for the bagel-tiny fixture."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.cli import main
from model.bagel.parity import load_image
from model.bagel.release import load_release, load_tokenizer

FIXTURE = Path(__file__).parent / "data" / "bagel-tiny"


@pytest.fixture(scope="module")
def release():
    return load_release(FIXTURE / "release")


def test_parity_command_matches_expected(tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert main(["model", "parity", "--fixture", str(FIXTURE), "--out", str(out)]) == 0
    got, expected = load_file(str(out)), load_file(str(FIXTURE / "expected.safetensors"))
    assert set(got) == set(expected) == {"velocity", "answer_logits", "ae_encode_ref0", "ae_decode_out"}
    for key, want in expected.items():
        assert got[key].shape == want.shape
        assert (got[key] - want).abs().max().item() <= 1e-4, key
    printed = capsys.readouterr().out
    assert "parity passed" in printed and "velocity: max |diff|" in printed


def test_parity_command_fails_when_outputs_differ(tmp_path, capsys):
    fixture = tmp_path / "fixture"
    shutil.copytree(FIXTURE, fixture)
    expected = load_file(str(fixture / "expected.safetensors"))
    expected["velocity"] = expected["velocity"] + 1e-3
    save_file(expected, str(fixture / "expected.safetensors"))
    assert main(["model", "parity", "--fixture", str(fixture)]) == 1
    assert "FAIL velocity" in capsys.readouterr().out


def test_tokenizer_ids_match_case():
    case = json.loads((FIXTURE / "case.json").read_text())
    tokenizer, special = load_tokenizer(FIXTURE / "release")
    assert (special.bos, special.eos, special.start_of_image, special.end_of_image) == (
        354, 355, 356, 357) == tuple(case["special_token_ids"].values())
    framed = [special.bos, *tokenizer.encode(case["instruction"], add_special_tokens=False), special.eos]
    assert framed == load_file(str(FIXTURE / "inputs.safetensors"))["instruction_ids"].tolist()


def test_cached_context_gives_the_same_velocity(release):
    model, case = release.model, json.loads((FIXTURE / "case.json").read_text())
    inputs = load_file(str(FIXTURE / "inputs.safetensors"))
    ref = load_image(FIXTURE / "ref0.png")
    ids = release.encode_text(case["instruction"])
    with torch.no_grad():
        context = model.encode_context(model.generation_context([ref], ids))
        cached = model.velocity_from_context(context, inputs["x_t"], 0.7, (112, 112))
        # a second step reuses the same context unchanged
        again = model.velocity_from_context(context, inputs["x_t"], 0.7, (112, 112))
    expected = load_file(str(FIXTURE / "expected.safetensors"))["velocity"]
    assert (cached - expected).abs().max().item() <= 1e-4
    assert torch.equal(cached, again)


def test_latent_tokens_round_trip(release):
    latent = torch.randn(4, 14, 10)
    tokens = release.model.latent_to_tokens(latent)
    assert tokens.shape == (7 * 5, 16)
    # (h, w, p, q, c): the first token is the top-left 2x2 patch, channels fastest
    assert torch.equal(tokens[0, :4], latent[:, 0, 0])
    assert torch.equal(tokens[0, 4:8], latent[:, 0, 1])
    assert torch.equal(release.model.tokens_to_latent(tokens, 7, 5), latent)
