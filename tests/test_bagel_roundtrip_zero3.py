"""Release -> 2-rank ZeRO-3 training -> release, round trip exact (issue 10).

The `tiny` preset (grouped-query attention: 4 query heads over 2 key/value heads; the generation and
understanding experts; ViT, connector and autoencoder) is made as a release directory (tests/bagel_release.py),
trained a few steps by two torchrun ranks under ZeRO-3 with every weight partitioned, and saved through the
trainer's normal save path (`save_final_weights`, streamed group by group). The model that trained is read in the
training processes themselves: this file is also the torchrun worker (`__main__` below). Each rank runs
`train_stage` from the launcher's run config; the family's `load_zero3` is wrapped to keep the partitioned model
it builds, so after the final step the ranks gather that same live model (`deepspeed.zero.GatheredParameters`)
and rank 0 computes the parity case with it (`model.bagel.parity.compute_case`) and writes its weights.

A parity fixture is then the saved release plus the case of tests/data/bagel-tiny (adapted to the preset's
sizes: that case is at 112 px, the preset's images are 32 px) plus the live model's outputs as
`expected.safetensors`, and `scone model parity` on it must agree.

What is exact and what is not: the saved tensors equal the gathered live weights bit for bit (torch.equal, fp32
on both sides). The outputs agree to within 1e-6, not always bit for bit: both sides run fp32 on CPU on one
thread, but the same weights at a different memory alignment can take another SIMD reduction order in a
matrix-vector product. `load_release` leaves each tensor where safetensors put it (8-byte aligned offsets in the
file's buffer) while the live weights sit in DeepSpeed's gather buffers: measured here, `answer_logits` (lm_head
applied to one hidden vector, logits up to ~5.5) differs by one float32 ulp, 4.8e-7, and the same lm_head weight
copied to 16-byte aligned memory gives the live value exactly; velocity and the autoencoder outputs are 0.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from model.bagel import family as fam
from model.bagel.release import AE_FILE, find_weights, load_release, load_tokenizer

FIXTURE = Path(__file__).parent / "data" / "bagel-tiny"
REPO = Path(__file__).resolve().parents[1]
OUTPUT_KEYS = {"velocity", "answer_logits", "ae_encode_ref0", "ae_decode_out"}


def _adapt_case(release_dir: Path, case_dir: Path) -> None:
    """tests/data/bagel-tiny's case (its instruction, question, reference image and time) at the sizes of the
    release's architecture: reference and target at the largest side both position grids allow, x_t and the
    decoder's input drawn at the latent token layout, token ids from the release's tokenizer."""
    release = load_release(release_dir)
    m, cfg = release.model, release.model.config
    case = json.loads((FIXTURE / "case.json").read_text())
    side = min(cfg.vit.patch_size * cfg.vit_max_num_patch_per_side, cfg.latent_downsample * cfg.max_latent_size)
    rows, cols = m.latent_grid(side, side)
    p, z = cfg.latent_patch_size, cfg.vae.z_channels
    case.update(target_size=[side, side], latent_patch_size=p, max_latent_size=cfg.max_latent_size,
                vit_max_num_patch_per_side=cfg.vit_max_num_patch_per_side, weights_file=release.weights.name,
                special_token_ids={"bos_token_id": m.special.bos, "eos_token_id": m.special.eos,
                                   "start_of_image": m.special.start_of_image,
                                   "end_of_image": m.special.end_of_image})
    case_dir.mkdir(parents=True)
    (case_dir / "case.json").write_text(json.dumps(case, indent=2) + "\n")
    for name in case["references"]:
        Image.open(FIXTURE / name).convert("RGB").resize((side, side), Image.BILINEAR).save(case_dir / name)
    gen = torch.Generator().manual_seed(0)
    # latent_grid counts tokens (each p x p latent pixels); the decoder takes the latent itself
    save_file({"x_t": torch.randn(rows * cols, p * p * z, generator=gen),
               "t": torch.tensor([float(case["t"])]),
               "ae_decode_in": torch.randn(z, rows * p, cols * p, generator=gen),
               "instruction_ids": torch.tensor(m.frame_text(release.encode_text(case["instruction"])))},
              str(case_dir / "inputs.safetensors"))


def _release_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a release directory (sharded or not) under BagelModel's state-dict keys."""
    state = {}
    for f in find_weights(directory).files:
        state.update(load_file(str(f)))
    state.update({"ae." + k: v for k, v in load_file(str(directory / AE_FILE)).items()})
    return state


@pytest.mark.slow
def test_two_ranks_zero3_train_and_save_a_release_that_parity_reproduces(bagel_release, tmp_path, monkeypatch):
    from bagel_release import copy_release
    from data.formats.scone_s2i import write_rows
    from model import launch
    from model.config import ModelConfig, StageConfig, TrainConfig
    from test_bagel_train import _rows

    write_rows(_rows(4), tmp_path / "data", "s2i", rows_per_row_group=4)
    init = copy_release(bagel_release, tmp_path / "init")  # marked (config.json): an init checkpoint as it is
    case_dir = tmp_path / "case"
    _adapt_case(init, case_dir)
    stage = StageConfig(datasets=["s2i"], steps=2, lr=2e-3, schedule="constant")
    # fp32 on every side; threshold 0: every weight partitioned, none kept whole on every rank
    train = TrainConfig(micro_batch=2, zero_stage=3, zero3_persistence_threshold=0, precision="fp32", log_every=1,
                        save_every=100, stages={"s": stage})
    out, live_dir = tmp_path / "trained", tmp_path / "live"
    # one intra-op thread in the workers and in `scone model parity`: a thread count changes how a convolution's
    # sums are split (2 threads move ae_decode_out by 7e-7)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_config = launch.write_run_config("s", stage, train, ModelConfig(cfg_drop_text=0.0, cfg_drop_image=0.0),
                                         tmp_path / "data", out, init, num_ranks=2, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(run_config), str(case_dir), str(live_dir)]
    launch._run_torchrun(cmd, out / launch.WORKER_LOG, echo=False, num_ranks=2)

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_ranks"] == 2 and summary["zero_stage"] == 3 and summary["precision"] == "fp32"
    live_info = json.loads((live_dir / "live.json").read_text())
    assert live_info["every_weight_partitioned"] and live_info["ranks"] == 2 and live_info["steps"] == 2
    assert not live_info["problems"]

    # the saved release holds exactly the weights the ranks gathered from the live model
    live, saved, before = (load_file(str(live_dir / "live_weights.safetensors")), _release_weights(out),
                           _release_weights(init))
    assert saved.keys() == live.keys() == before.keys()
    for k, v in live.items():
        assert saved[k].dtype == v.dtype == torch.float32 and torch.equal(saved[k], v), k
    for k in ("llm2vae.weight", "language_model.model.layers.0.self_attn.k_proj.weight",
              "language_model.model.layers.0.self_attn.k_proj_moe_gen.weight", "language_model.lm_head.weight"):
        assert not torch.equal(saved[k], before[k]), k  # training moved both experts (GQA k_proj: 2 kv heads)
    assert saved["language_model.model.layers.0.self_attn.k_proj.weight"].shape[0] * 2 == \
        saved["language_model.model.layers.0.self_attn.q_proj.weight"].shape[0]

    # a parity fixture of the saved release, the adapted case and the live model's outputs
    fixture = tmp_path / "fixture"
    shutil.copytree(case_dir, fixture)
    shutil.copytree(out, fixture / "release", ignore=shutil.ignore_patterns("ds_state", "*.jsonl", "*.log",
                                                                            "run_config.json", "quarantine"))
    shutil.copy2(live_dir / "expected.safetensors", fixture / "expected.safetensors")
    expected = load_file(str(fixture / "expected.safetensors"))
    assert expected.keys() == OUTPUT_KEYS
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # `scone model parity`, pinned to this interpreter (the `scone` script is flows.cli:main)
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "model", "parity", "--fixture", str(fixture)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    diffs = dict(re.findall(r"^ok\s+(\w+): max \|diff\| (\S+)$", proc.stdout, flags=re.M))
    assert diffs.keys() == OUTPUT_KEYS, proc.stdout
    # equal weights through the same code, fp32 on CPU: at most an ulp or two from buffer alignment (docstring)
    assert all(float(d) <= 1e-6 for d in diffs.values()), proc.stdout
    assert "parity passed" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# the torchrun worker: `python -m torch.distributed.run --nproc_per_node=2 THIS_FILE RUN_CONFIG CASE_DIR LIVE_DIR`


def _worker(run_config: Path, case_dir: Path, live_dir: Path) -> None:
    import deepspeed
    import torch.distributed as dist

    import model.bagel.parity as parity
    from model.bagel.release import Release
    from model.launch import read_run_config
    from model.train import train_stage

    kept = []

    def load_and_keep(path, ds_config):
        m = fam.load_zero3(path, ds_config)
        kept.append(m)
        return m

    # train_stage resolves "model.bagel.family:BAGEL" at run time: the same loader, keeping what it built
    fam.BAGEL = dataclasses.replace(fam.BAGEL, load_zero3=load_and_keep)
    kw = read_run_config(run_config)
    summary = train_stage(**kw)  # trains, saves the release (every rank), returns after a barrier
    (live,) = kept
    params = list(live.parameters())
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in params)
    rank = dist.get_rank()
    # the engine is gone, its partitions are not: gather them whole on every rank (a collective), rank 0 reads
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank == 0:
            live.eval()  # as load_release hands its model over
            live_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().to("cpu", torch.float32, copy=True).contiguous()
                       for k, v in live.bagel.state_dict().items()}, str(live_dir / "live_weights.safetensors"))
            tokenizer, _ = load_tokenizer(Path(kw["init_checkpoint"]))
            in_memory = Release(live.bagel, tokenizer, case_dir, None)
            parity.load_release = lambda *a, **k: in_memory  # the case computed by the live model
            device = str(params[0].device)
            outputs, problems = parity.compute_case(case_dir, device)
            save_file(outputs, str(live_dir / "expected.safetensors"))
            (live_dir / "live.json").write_text(json.dumps({
                "every_weight_partitioned": partitioned, "ranks": dist.get_world_size(), "device": device,
                "steps": summary["steps"], "problems": problems}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*map(Path, sys.argv[1:4]))
