"""Training that survives 7B, on the tiny BAGEL models: activation checkpointing, the multi-node launch command
and its settings, and the final weights gathered group by group and streamed into safetensors shards."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from data.formats.scone_s2i import write_rows
from model import engine as ds_engine
from model import launch
from model.bagel import family as fam
from model.bagel.config import preset
from model.bagel.release import ReleaseError, ReleaseWriter, ShardedWriter, find_weights, load_release
from model.config import BridgeConfig, ModelConfig, StageConfig, TrainConfig
from model.launch import Topology, TopologyError, resolve_topology, torchrun_command
from model.train import (StageLoss, apply_freezing, enable_activation_checkpointing, save_final_weights,
                         train_stage, weight_groups)
from test_bagel_train import FIXTURE, SPEC, _release_copy, _rows

NO_DROPOUT = ModelConfig(cfg_drop_text=0.0, cfg_drop_image=0.0)
BRIDGE = BridgeConfig(early_layer=1, apply_until=2, tau=0.1)  # keeps part of the references in the tiny fixture


# ---------------------------------------------------------------------------------------------------------------
# activation checkpointing


@pytest.fixture(scope="module")
def tiny():
    """The `tiny` preset with fresh weights (a random velocity head, so the generation loss reaches every layer),
    everything trainable (the ViT too), and a batch of three samples at the preset's 32 px."""
    tok = fam.tokenizer(FIXTURE / "release")
    torch.manual_seed(0)
    m = fam.build(ModelConfig(), tok)
    assert m.config == preset("tiny").model_copy(update={"llm": m.config.llm})  # the tiny preset's architecture
    tok.config = m.config  # collate sizes images for this model, not for the fixture's
    torch.nn.init.normal_(m.bagel.llm2vae.weight, std=0.05)
    for p in m.parameters():
        p.requires_grad_(True)
    batch = fam.collate(fam.examples_from_rows(_rows(3)), tok, NO_DROPOUT)
    return m.train(), batch


def _set_checkpointing(m, on: bool) -> None:
    m.bagel.language_model.activation_checkpointing = on
    m.bagel.vit_model.activation_checkpointing = on


def _layers(m):
    return [*m.bagel.language_model.model.layers, *m.bagel.vit_model.vision_model.encoder.layers]


def _loss_and_grads(m, batch, *, on: bool, bridge: bool):
    """(loss, {name: grad}, layer calls during forward, layer calls during backward, bytes saved for backward
    outside checkpointed regions)."""
    _set_checkpointing(m, on)
    m.zero_grad(set_to_none=True)
    calls = {"n": 0}
    # pre-hooks: a recomputation stops once it has what backward needs, before a layer's post-forward hooks
    hooks = [layer.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
             for layer in _layers(m)]
    saved = {"bytes": 0}

    def pack(t):
        saved["bytes"] += t.numel() * t.element_size()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = m.training_loss(batch, bridge=bridge, bridge_straight_through=bridge,
                                  bridge_config=BRIDGE if bridge else None,
                                  generator=torch.Generator().manual_seed(0))
        forward_calls = calls["n"]
        out["loss"].backward()
        backward_calls = calls["n"] - forward_calls
    finally:
        for h in hooks:
            h.remove()
        _set_checkpointing(m, False)
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads, forward_calls, backward_calls, saved["bytes"]


@pytest.mark.parametrize("bridge", [False, True], ids=["plain", "bridge-straight-through"])
def test_activation_checkpointing_recomputes_layers_with_the_same_loss_and_gradients(tiny, bridge):
    m, batch = tiny
    loss_off, grads_off, fwd_off, bwd_off, saved_off = _loss_and_grads(m, batch, on=False, bridge=bridge)
    loss_on, grads_on, fwd_on, bwd_on, saved_on = _loss_and_grads(m, batch, on=True, bridge=bridge)

    n_layers = len(_layers(m))
    assert n_layers == m.config.llm.num_hidden_layers + m.config.vit.used_layers >= 5  # decoder, ViT encoder
    assert fwd_off == fwd_on == n_layers and bwd_off == 0
    assert bwd_on == n_layers  # every layer ran again in backward
    # what the autograd graph keeps outside the layers: the layers' activations are no longer part of it
    assert saved_on < 0.5 * saved_off

    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    assert any(k.startswith("bagel.vit_model.") for k in grads_on)  # the ViT's layers are checkpointed too
    for k in grads_off:
        torch.testing.assert_close(grads_on[k], grads_off[k], rtol=1e-6, atol=1e-7, msg=k)
    assert any(float(g.abs().sum()) > 0 for k, g in grads_on.items() if ".layers.0." in k)
    if bridge:  # the mask is a real one: it masks some reference tokens and keeps others
        kept = m.packed_forward(batch, torch.Generator().manual_seed(0), bridge=BRIDGE)["bridge_kept"]
        assert 0 < float(kept) < 1


def test_activation_checkpointing_leaves_no_grad_and_cached_inference_alone(tiny):
    m, batch = tiny
    _set_checkpointing(m, True)
    try:
        calls = {"n": 0}
        hooks = [layer.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
                 for layer in _layers(m)]
        with torch.no_grad():
            on = m.packed_forward(batch, torch.Generator().manual_seed(0))["velocity"]
        for h in hooks:
            h.remove()
        assert calls["n"] == len(_layers(m))
        # the sampler's cached context (keep=True) builds its per-layer cache once, with a graph or without
        pixels = batch["pixels"]
        sample = m.bagel.generation_context([pixels[0]], batch["samples"][0]["text"])
        ctx = m.bagel.encode_context(sample)
        assert len(ctx.kv) == m.config.llm.num_hidden_layers
    finally:
        _set_checkpointing(m, False)
    with torch.no_grad():
        off = m.packed_forward(batch, torch.Generator().manual_seed(0))["velocity"]
    assert torch.equal(on, off)


def test_a_frozen_vit_is_not_recomputed(tiny):
    m, batch = tiny
    vit = list(m.bagel.vit_model.parameters())
    for p in vit:
        p.requires_grad_(False)
    try:
        _, grads, fwd, bwd, _ = _loss_and_grads(m, batch, on=True, bridge=False)
    finally:
        for p in vit:
            p.requires_grad_(True)
    assert not any(k.startswith("bagel.vit_model.") for k in grads)
    assert fwd == len(_layers(m)) and bwd == m.config.llm.num_hidden_layers  # the decoder layers only


def test_the_trainer_turns_it_on_where_the_family_offers_it(tiny):
    m, _ = tiny
    try:
        assert enable_activation_checkpointing(m) == 2  # the language model and the ViT
        assert m.bagel.language_model.activation_checkpointing and m.bagel.vit_model.activation_checkpointing
    finally:
        _set_checkpointing(m, False)
    with pytest.raises(ValueError, match="activation_checkpointing"):
        enable_activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert TrainConfig(stages={}).activation_checkpointing is False


# ---------------------------------------------------------------------------------------------------------------
# launch: one node, several nodes, settings from params or the environment


def _train(**kw) -> TrainConfig:
    return TrainConfig(stages={}, **kw)


def test_one_node_keeps_the_standalone_command(tmp_path):
    topo = resolve_topology(_train(num_ranks=2), env={})
    assert topo == Topology(1, 0, 2, None, topo.sources) and topo.world_size == 2 and not topo.multi_node
    cmd = torchrun_command(tmp_path / "run_config.json", 2, topo)
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "model.train_worker", str(tmp_path / "run_config.json")]
    assert cmd == torchrun_command(tmp_path / "run_config.json", 2)  # the command of before
    # a single-node job under SLURM (or with MASTER_ADDR set) still gets the standalone command
    env = {"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu001", "MASTER_ADDR": "gpu001"}
    assert torchrun_command(tmp_path / "r.json", 8, resolve_topology(_train(), 8, env)) == \
        torchrun_command(tmp_path / "r.json", 8)


def test_several_nodes_rendezvous_over_c10d(tmp_path):
    topo = resolve_topology(_train(num_ranks=8, nodes=4, node_rank=3, rdzv_endpoint="gpu001:29400"), env={})
    assert (topo.nodes, topo.node_rank, topo.rdzv_endpoint, topo.world_size) == (4, 3, "gpu001:29400", 32)
    cmd = torchrun_command(tmp_path / "run_config.json", 8, topo, rdzv_id="job-7")
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nnodes=4", "--node_rank=3",
                   "--nproc_per_node=8", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu001:29400", "--rdzv_id=job-7",
                   "-m", "model.train_worker", str(tmp_path / "run_config.json")]
    assert "--standalone" not in cmd
    assert launch.rdzv_id("stage1_step1", {}) == "scone-stage1_step1"
    assert launch.rdzv_id("s", {"SLURM_JOB_ID": "123"}) == "slurm-123"
    assert launch.rdzv_id("s", {"SLURM_JOB_ID": "123", "PET_RDZV_ID": "mine"}) == "mine"


def test_topology_from_the_environment_with_params_winning():
    torchrun_style = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.8", "MASTER_PORT": "6000"}
    topo = resolve_topology(_train(num_ranks=4), env=torchrun_style)
    assert (topo.nodes, topo.node_rank, topo.rdzv_endpoint, topo.world_size) == (2, 1, "10.0.0.8:6000", 8)
    assert dict(topo.sources) == {"nodes": "NNODES", "node_rank": "NODE_RANK",
                                  "rdzv_endpoint": "MASTER_ADDR:MASTER_PORT"}
    # each explicit param wins over its variable
    topo = resolve_topology(_train(nodes=3, node_rank=2, rdzv_endpoint="head:29400"), env=torchrun_style)
    assert (topo.nodes, topo.node_rank, topo.rdzv_endpoint) == (3, 2, "head:29400")
    assert dict(topo.sources) == {"nodes": "params", "node_rank": "params", "rdzv_endpoint": "params"}
    assert resolve_topology(_train(node_rank=0), env=torchrun_style).node_rank == 0
    # torchrun's own PET_* variables come before the generic ones, the generic ones before SLURM's
    slurm = {"SLURM_NNODES": "4", "SLURM_NODEID": "3", "SLURM_JOB_NODELIST": "gpu[003-005,010]"}
    topo = resolve_topology(_train(), env={**slurm, "PET_NNODES": "2", "PET_NODE_RANK": "0",
                                           "PET_RDZV_ENDPOINT": "gpu009:29400", **torchrun_style})
    assert (topo.nodes, topo.node_rank, topo.rdzv_endpoint) == (2, 0, "gpu009:29400")
    topo = resolve_topology(_train(), env={**slurm, **torchrun_style})
    assert (topo.nodes, topo.node_rank, topo.rdzv_endpoint) == (2, 1, "10.0.0.8:6000")
    # SLURM alone: its node count and id, rank 0's host is the first of the allocation, the customary port
    topo = resolve_topology(_train(), env=slurm)
    assert (topo.nodes, topo.node_rank, topo.rdzv_endpoint) == (4, 3, "gpu003:29500")
    assert resolve_topology(_train(), env={**slurm, "MASTER_PORT": "7000"}).rdzv_endpoint == "gpu003:7000"
    assert resolve_topology(_train(), env={"SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
                                           "SLURM_NODELIST": "a1,b2"}).rdzv_endpoint == "a1:29500"


@pytest.mark.parametrize("nodelist, host", [("gpu001", "gpu001"), ("gpu[003-005,010]", "gpu003"),
                                            ("node[7,9],cpu01", "node7"), ("a-b.c[01-02]", "a-b.c01"),
                                            ("x1,x2", "x1")])
def test_first_slurm_host(nodelist, host):
    assert launch.first_slurm_host(nodelist) == host


def test_topology_errors_name_what_is_missing():
    with pytest.raises(TopologyError, match="node rank is unknown"):
        resolve_topology(_train(nodes=2, rdzv_endpoint="h:1"), env={})
    with pytest.raises(TopologyError, match="no rendezvous address"):
        resolve_topology(_train(nodes=2, node_rank=0), env={})
    with pytest.raises(TopologyError, match="not below nodes 2"):
        resolve_topology(_train(nodes=2), env={"NODE_RANK": "2", "MASTER_ADDR": "h"})
    with pytest.raises(TopologyError, match="PET_NNODES='1:4'"):
        resolve_topology(_train(), env={"PET_NNODES": "1:4"})
    with pytest.raises(TopologyError, match="expected host:port"):
        resolve_topology(_train(nodes=2, node_rank=1), env={"PET_RDZV_ENDPOINT": "head"})
    with pytest.raises(ValueError, match="expected host:port"):
        _train(rdzv_endpoint="head:port")
    with pytest.raises(ValueError, match="node_rank 2 must be below nodes 2"):
        _train(nodes=2, node_rank=2)


def test_run_stage_with_nodes_from_the_environment_starts_torchrun_with_the_topology(tmp_path, monkeypatch):
    """One rank per machine on two machines is still a torchrun launch; each machine writes the same run config
    (no node rank in it) and logs apart from the others."""
    write_rows(_rows(2), tmp_path / "data", "s2i", rows_per_row_group=2)
    stage = StageConfig(datasets=["s2i"], steps=1, lr=1e-3)
    train = TrainConfig(num_ranks=1, stages={"s": stage})
    for k in ("PET_NNODES", "PET_NODE_RANK", "PET_RDZV_ENDPOINT", "PET_RDZV_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NNODES", "2")
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "head")
    monkeypatch.setenv("MASTER_PORT", "29411")
    out = tmp_path / "out"
    seen = {}

    def fake_torchrun(cmd, log_path, echo, num_ranks=1):
        seen.update(cmd=cmd, log=log_path)
        (out / "train_summary.json").write_text(json.dumps({"stage": "s", "num_ranks": 2}))
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(launch, "_run_torchrun", fake_torchrun)
    monkeypatch.setattr(launch, "train_stage", lambda **kw: pytest.fail("a multi-node rank ran in process"))
    summary = launch.run_stage("s", stage, train, ModelConfig(), tmp_path / "data", out, progress=False)
    assert summary == {"stage": "s", "num_ranks": 2}
    assert "--nnodes=2" in seen["cmd"] and "--node_rank=1" in seen["cmd"] and "--nproc_per_node=1" in seen["cmd"]
    assert "--rdzv_endpoint=head:29411" in seen["cmd"] and "--rdzv_backend=c10d" in seen["cmd"]
    assert seen["log"] == out / "ds_state" / "worker.node1.log"
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["nodes"] == 2 and cfg["rdzv_endpoint"] == "head:29411" and cfg["train"]["node_rank"] is None
    assert cfg["rdzv_id"] == "scone-s" and "--rdzv_id=scone-s" in seen["cmd"]  # what joining machines use
    assert not list(out.glob(".run_config.json.*"))  # written through a temporary name, renamed
    kw = launch.read_run_config(out / "run_config.json")
    assert kw["train"].num_ranks == 1
    # node 0 of the same run writes the same file and logs to worker.log
    assert launch.worker_log(out, Topology(2, 0, 1, "head:29411")) == out / "worker.log"


def test_run_settings_do_not_depend_on_where_the_machines_are(tmp_path):
    from model.train import run_settings

    write_rows(_rows(2), tmp_path / "data", "s2i", rows_per_row_group=2)
    stage = StageConfig(datasets=["s2i"], steps=1, lr=1e-3)
    base = TrainConfig(stages={"s": stage})
    other = base.model_copy(update={"nodes": 2, "node_rank": 1, "rdzv_endpoint": "h:1", "max_shard_bytes": 10,
                                    "activation_checkpointing": True, "zero3_persistence_threshold": 0})

    def settings(t):
        return run_settings("s", stage, t, ModelConfig(), tmp_path / "data", None, 2, SPEC)

    assert settings(base) == settings(other)  # a run may resume on other machines, with checkpointing on, ...
    assert settings(base) != settings(base.model_copy(update={"seed": 1}))


# ---------------------------------------------------------------------------------------------------------------
# streamed, sharded writing


def test_sharded_writer_writes_each_shard_as_it_fills(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(7)}  # 400 bytes each
    tensors["big"] = torch.arange(300, dtype=torch.float32)  # 1200 bytes, over the limit alone
    tensors["last"] = torch.ones(10, dtype=torch.bfloat16)
    w = ShardedWriter(tmp_path, "ema.safetensors", max_shard_bytes=1000)
    on_disk = []
    for k, v in tensors.items():
        w.add(k, v)
        on_disk.append(len(list(tmp_path.glob(".ema-part*.partial"))))
        assert w._pending_bytes <= 1000 or len(w._pending) == 1  # never more than one shard held
    assert on_disk == [0, 0, 1, 1, 2, 2, 3, 4, 5]  # shards appear while tensors still arrive
    paths = w.close()
    assert [p.name for p in paths] == [f"ema-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    assert not list(tmp_path.glob("*.partial"))
    index = json.loads((tmp_path / "ema.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 7 * 400 + 1200 + 20
    assert index["weight_map"]["big"] == "ema-00005-of-00006.safetensors"  # a shard of its own
    back = {}
    for p in paths:
        back.update(load_file(str(p)))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    assert back["last"].dtype == torch.bfloat16
    with pytest.raises(ReleaseError, match="closed"):
        w.add("again", torch.zeros(1))

    # under the limit: one file with the release's name, no index
    one = ShardedWriter(tmp_path / "one", "model.safetensors", max_shard_bytes=10_000)
    (tmp_path / "one").mkdir()
    for k, v in tensors.items():
        one.add(k, v)
    assert one.close() == [tmp_path / "one" / "model.safetensors"]
    assert not list((tmp_path / "one").glob("*.json"))


def test_release_writer_checks_keys_and_shapes_and_aborts_cleanly(tmp_path):
    release = load_release(FIXTURE / "release")
    state = release.model.state_dict()
    w = ReleaseWriter(tmp_path / "bad", release.model.config, weights_name="ema.safetensors",
                      max_shard_bytes=100_000, tokenizer_from=FIXTURE / "release")
    with pytest.raises(ReleaseError, match="not a weight"):
        w.add("language_model.extra.weight", torch.zeros(1))
    with pytest.raises(ReleaseError, match="shape"):
        w.add("vae2llm.weight", torch.zeros(3, 3))
    keys = list(state)
    for k in keys[:-1]:
        w.add(k, state[k])
    with pytest.raises(ReleaseError, match="written twice"):
        w.add(keys[0], state[keys[0]])
    assert list((tmp_path / "bad").glob(".ema-part*.partial"))  # shards already written
    with pytest.raises(ReleaseError, match=f"never written: {keys[-1]}"):
        w.close()
    w.abort()
    assert not list((tmp_path / "bad").glob("*.partial")) and not list((tmp_path / "bad").glob("*.safetensors*"))

    m = fam.load(FIXTURE / "release")
    with pytest.raises(RuntimeError, match="boom"):
        with m.weights_writer(tmp_path / "ctx", max_shard_bytes=50_000) as w2:
            for i, (k, v) in enumerate(m.state_dict().items()):
                w2.add(k, v)
                if i == 100:
                    assert list((tmp_path / "ctx").glob(".ema-part*.partial"))
                    raise RuntimeError("boom")
    assert not list((tmp_path / "ctx").glob("*.partial")) and not list((tmp_path / "ctx").glob("*.safetensors*"))


def test_weight_groups_are_the_state_dict_one_layer_at_a_time():
    m = fam.load(FIXTURE / "release")
    groups = weight_groups(m)
    keys = [k for g in groups for k, _ in g]
    assert sorted(keys) == sorted(m.state_dict()) and len(keys) == len(set(keys))
    names = [{k.rsplit(".", 1)[0] for k, _ in g} for g in groups]
    layer = [g for g in names if any(".layers.1." in k and "language_model" in k for k in g)]
    assert len(layer) == 1 and all("language_model.model.layers.1." in k for k in layer[0])
    assert any(all("vit_model.vision_model.encoder.layers.0." in k for k in g) for g in names)
    biggest = max(sum(t.numel() for _, t in g) for g in groups)
    assert biggest < 0.2 * sum(p.numel() for p in m.parameters())  # no group is close to the whole model


# ---- through DeepSpeed, one rank in this process ----

def _bf16_release(tmp_path):
    """The fixture release stored in bf16, as BAGEL-7B's is."""
    out = _release_copy(tmp_path)
    for name in ("ema.safetensors", "ae.safetensors"):
        state = load_file(str(out / name))
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(out / name), metadata={"format": "pt"})
    return out


def _stored(directory):
    weights = find_weights(directory)
    state = {}
    for f in weights.files:
        state.update(load_file(str(f)))
    state.update({"ae." + k: v for k, v in load_file(str(directory / "ae.safetensors")).items()})
    return weights, state


@pytest.mark.parametrize("zero_stage, stored", [(2, torch.float32), (3, torch.float32), (3, torch.bfloat16)],
                         ids=["zero2-fp32", "zero3-fp32", "zero3-bf16"])
def test_final_weights_stream_into_shards_equal_to_the_trained_weights(tmp_path, zero_stage, stored):
    """One optimizer step, then the save path of model/train.py: under ZeRO-3 (every parameter partitioned) only
    the group being written is ever gathered, and the sharded release holds exactly the trained weights in the
    release's stored dtype (the reference: everything gathered at once, the old way)."""
    import deepspeed

    init = _bf16_release(tmp_path) if stored == torch.bfloat16 else _release_copy(tmp_path)
    tok = fam.tokenizer(init)
    model = fam.load(init)
    assert model.save_dtype == stored
    stage = StageConfig(datasets=["s2i"], steps=1, lr=1e-2, schedule="constant", train_understanding=False)
    train = TrainConfig(micro_batch=2, zero_stage=zero_stage, zero3_persistence_threshold=0, stages={"s": stage})
    rank, world = ds_engine.init_distributed()
    assert (rank, world) == (0, 1)
    trainable = apply_freezing(model, stage)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eng = ds_engine.build_engine(StageLoss(model, bridge=False, und_loss_weight=0.1), trainable, train, stage,
                                 world_size=1, precision="fp32")
    try:
        eng.train()
        batch = fam.collate(fam.examples_from_rows(_rows(2)), tok, NO_DROPOUT)
        out = eng(batch, generator=torch.Generator().manual_seed(0))
        eng.backward(out["loss"])
        eng.step()
        params = dict(model.named_parameters())
        if zero_stage == 3:
            assert all(p.numel() == 0 for p in params.values())  # partitioned: nothing is whole until gathered
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None, enabled=zero_stage == 3):
            reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
        assert any(not torch.equal(reference[k], before[k]) for k in reference)  # the step moved weights
        assert all(torch.equal(reference[k], before[k]) for k in reference if fam.expert_of(k[6:]) != "generation")

        # at every hand-over, the gathered parameters are those of the group being written, and no others
        groups = {k: i for i, g in enumerate(weight_groups(model)) for k, _ in g}
        names = {id(p): n for n, p in params.items()}
        real_writer = model.weights_writer
        seen = []

        def spying_writer(out_dir, max_shard_bytes=None):
            w = real_writer(out_dir, max_shard_bytes)
            add = w.add

            def spy(key, tensor):
                whole = {names[id(p)] for p in params.values() if p.numel() > 0}
                if zero_stage == 3:
                    assert {groups[n] for n in whole} == {groups[key]} and key in whole
                seen.append(key)
                add(key, tensor)

            w.add = spy
            return w

        model.weights_writer = spying_writer
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        checksum = save_final_weights(model, out_dir, zero_stage, rank, max_shard_bytes=60_000)
        del model.weights_writer
        assert sorted(seen) == sorted(reference)
        if zero_stage == 3:
            assert all(p.numel() == 0 for p in params.values())  # every group went back to its partition
    finally:
        eng.destroy()

    weights, saved = _stored(out_dir)
    assert weights.sharded and len(weights.files) >= 3 and (out_dir / "ema.safetensors.index.json").exists()
    assert not list(out_dir.glob("*.partial")) and (out_dir / "config.json").exists()
    assert saved.keys() == {k[len(fam.PREFIX):] for k in reference}
    for k, v in reference.items():
        s = saved[k[len(fam.PREFIX):]]
        assert s.dtype == stored and torch.equal(s, v.to(stored)), k
    assert checksum == pytest.approx(sum(float(v.double().sum()) for v in reference.values()), rel=1e-12)
    again = load_release(out_dir, dtype=stored)  # strictly, sharded
    assert again.weights.sharded
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, reference[fam.PREFIX + k].to(stored)), k


def test_one_rank_trains_the_same_weights_with_checkpointing_and_saves_them_sharded(tmp_path, monkeypatch):
    """train_stage end to end, ZeRO-2: activation checkpointing changes nothing in the result, the release is
    written in shards with an index, and equals the model that trained."""
    write_rows(_rows(4), tmp_path / "data", "s2i", rows_per_row_group=4)
    init = _release_copy(tmp_path)
    loaded = []

    def load_and_keep(path):
        m = fam.load(path)
        loaded.append(m)
        return m

    monkeypatch.setattr(fam, "BAGEL", dataclasses.replace(fam.BAGEL, load=load_and_keep))
    stage = StageConfig(datasets=["s2i"], steps=3, lr=2e-3, schedule="constant")
    train = TrainConfig(micro_batch=4, zero_stage=2, log_every=1, save_every=100, max_shard_bytes=200_000,
                        stages={"s": stage})
    runs = {}
    for on in (False, True):
        t = train.model_copy(update={"activation_checkpointing": on})
        runs[on] = train_stage("s", stage, t, NO_DROPOUT, tmp_path / "data", tmp_path / f"ac{on}", init,
                               progress=False, model_family=SPEC)
    off, on = runs[False], runs[True]
    assert on["activation_checkpointing"] and not off["activation_checkpointing"]
    assert loaded[1].bagel.language_model.activation_checkpointing  # the trainer turned it on
    assert not loaded[0].bagel.language_model.activation_checkpointing
    assert on["final_loss"] == off["final_loss"]

    w_off, s_off = _stored(tmp_path / "acFalse")
    w_on, s_on = _stored(tmp_path / "acTrue")
    assert w_off.sharded and len(w_off.files) >= 2
    assert s_off.keys() == s_on.keys()
    for k in s_off:
        assert torch.equal(s_on[k], s_off[k]), k
    trained = loaded[0].to("cpu", torch.float32).bagel_state_dict()
    for k, v in trained.items():
        assert torch.equal(s_off[k], v), k  # what was saved is what was trained
    load_release(tmp_path / "acTrue")  # strictly


# ---- two torchrun ranks, ZeRO-3, every parameter partitioned ----

@pytest.mark.slow
def test_two_ranks_zero3_stream_a_sharded_release_equal_to_one_rank(tmp_path):
    write_rows(_rows(4), tmp_path / "data", "s2i", rows_per_row_group=4)
    init = _release_copy(tmp_path)
    # the understanding expert frozen: frozen weights inside checkpointed, partitioned layers
    stage = StageConfig(datasets=["s2i"], steps=3, lr=2e-3, schedule="constant", train_understanding=False)
    train2 = TrainConfig(micro_batch=2, zero_stage=3, log_every=1, save_every=100, max_shard_bytes=150_000,
                         zero3_persistence_threshold=0, activation_checkpointing=True, stages={"s": stage})
    two = launch.run_stage("s", stage, train2, NO_DROPOUT, tmp_path / "data", tmp_path / "two", init, num_ranks=2,
                           progress=False, model_family=SPEC)
    assert two["num_ranks"] == 2 and two["zero_stage"] == 3 and two["activation_checkpointing"]
    a, b = two["rank_weight_checksums"]
    assert a == b

    weights, w2 = _stored(tmp_path / "two")
    assert weights.sharded and len(weights.files) >= 3
    index = json.loads((tmp_path / "two" / "ema.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in weights.files}
    for f in weights.files:
        with safe_open(str(f), framework="pt") as h:
            size = sum(np.prod(h.get_slice(k).get_shape()) * 4 for k in h.keys())
            assert size <= 150_000 or len(list(h.keys())) == 1
    # rank 0's checksum is of the weights it gathered: the files hold those
    assert a == pytest.approx(sum(float(v.double().sum()) for v in w2.values()), rel=1e-12)
    reloaded = load_release(tmp_path / "two")  # strictly
    assert reloaded.weights.sharded

    # the same global batch on one rank (ZeRO-2, no checkpointing, one file) ends on the same weights
    train1 = train2.model_copy(update={"grad_accum": 2, "zero_stage": 2, "activation_checkpointing": False,
                                       "max_shard_bytes": 10**9})
    one = launch.run_stage("s", stage, train1, NO_DROPOUT, tmp_path / "data", tmp_path / "one", init, num_ranks=1,
                           progress=False, model_family=SPEC)
    _, w1 = _stored(tmp_path / "one")
    assert (tmp_path / "one" / "ema.safetensors").exists()
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-5, msg=k)
    assert two["final_loss"] == pytest.approx(one["final_loss"], abs=1e-5)
    before = _stored(init)[1]
    assert all(torch.equal(w2[k], before[k]) for k in before if fam.expert_of(k) != "generation")
    assert any(not torch.equal(w2[k], before[k]) for k in before if fam.expert_of(k) == "generation")


# ---- ZeRO-3 from the start: the release loaded straight into partitions ----

def test_zero3_loads_the_release_into_partitions_with_the_release_values(tmp_path):
    import deepspeed

    init = _release_copy(tmp_path)
    train = TrainConfig(micro_batch=2, zero_stage=3, zero3_persistence_threshold=0, stages={})
    ds_engine.init_distributed()
    m = fam.load_zero3(init, ds_engine.deepspeed_config(train, world_size=1, precision="fp32"))
    assert fam.BAGEL.load_zero3 is fam.load_zero3  # what train_stage calls under ZeRO-3
    params = dict(m.named_parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())  # never whole after loading
    whole = fam.load(init)
    assert sum(p.ds_numel for p in params.values()) == sum(p.numel() for p in whole.parameters())
    assert m.save_dtype == whole.save_dtype and m.weights_name == whole.weights_name
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        for k, v in whole.state_dict().items():
            assert torch.equal(m.state_dict()[k], v), k
    rope = m.bagel.language_model.model.rotary_emb.inv_freq
    assert rope.dtype == torch.float32 and torch.equal(rope, whole.bagel.language_model.model.rotary_emb.inv_freq)


def test_other_machines_join_from_machine_zeros_run_config(tmp_path, monkeypatch):
    out = tmp_path / "out"
    topo0 = Topology(3, 0, 4, "head:29500")
    path = launch.write_run_config("s", StageConfig(datasets=["d"], steps=1, lr=1e-3),
                                   TrainConfig(num_ranks=4, stages={}), ModelConfig(), tmp_path / "data", out, None,
                                   4, topology=topo0, rendezvous_id="slurm-42")
    seen = {}
    monkeypatch.setattr(launch, "_run_torchrun", lambda cmd, log, echo, num_ranks=1: seen.update(cmd=cmd, log=log))
    topo = launch.join_stage(path, env={"SLURM_NODEID": "2"}, progress=False)
    assert (topo.nodes, topo.node_rank, topo.ranks_per_node, topo.rdzv_endpoint) == (3, 2, 4, "head:29500")
    assert seen["cmd"] == torchrun_command(path, 4, topo, "slurm-42")  # the same rendezvous as machine 0
    assert "--node_rank=2" in seen["cmd"] and seen["log"] == out / "ds_state" / "worker.node2.log"
    assert launch.join_stage(path, 1, env={}, progress=False).node_rank == 1  # an explicit rank wins
    with pytest.raises(TopologyError, match="machine 0 runs `scone train`"):
        launch.join_stage(path, 0, env={}, progress=False)
    with pytest.raises(TopologyError, match="node rank is unknown"):
        launch.join_stage(path, env={}, progress=False)
    single = launch.write_run_config("s", StageConfig(datasets=["d"], steps=1, lr=1e-3), TrainConfig(stages={}),
                                     ModelConfig(), tmp_path / "data", tmp_path / "one", None, 2)
    with pytest.raises(TopologyError, match="nothing to join"):
        launch.join_stage(single, 1, env={}, progress=False)
    with pytest.raises(FileNotFoundError, match="not written within"):
        launch.join_stage(tmp_path / "missing" / "run_config.json", 1, wait_s=0.0, env={}, progress=False)


@pytest.mark.slow
def test_two_machines_on_one_host_train_one_stage_over_c10d(tmp_path):
    """The multi-node commands for real: `run_stage` as machine 0 and `python -m model.launch` as machine 1, one
    rank each, meeting at a c10d rendezvous on localhost; ZeRO-3 over the two, result published by machine 0."""
    import subprocess
    from pathlib import Path

    write_rows(_rows(4), tmp_path / "data", "s2i", rows_per_row_group=4)
    init = _release_copy(tmp_path)
    stage = StageConfig(datasets=["s2i"], steps=2, lr=2e-3, schedule="constant")
    train = TrainConfig(num_ranks=1, micro_batch=2, zero_stage=3, zero3_persistence_threshold=0, log_every=1,
                        save_every=100, nodes=2, node_rank=0, rdzv_endpoint=f"127.0.0.1:{ds_engine.free_port()}",
                        stages={"s": stage})
    out = tmp_path / "out"
    repo = Path(launch.__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ds_engine.RANK_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(repo), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    machine1 = subprocess.Popen([sys.executable, "-m", "model.launch", str(out / "run_config.json"), "--node-rank",
                                 "1", "--wait", "300"], cwd=os.getcwd(), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    try:
        summary = launch.run_stage("s", stage, train, NO_DROPOUT, tmp_path / "data", out, init, progress=False,
                                   model_family=SPEC)
        log, _ = machine1.communicate(timeout=300)
    finally:
        if machine1.poll() is None:
            machine1.kill()
    assert machine1.returncode == 0, log.decode(errors="replace")[-3000:]
    assert summary["num_ranks"] == 2 and summary["zero_stage"] == 3
    a, b = summary["rank_weight_checksums"]
    assert a == b and np.isfinite(summary["final_loss"])
    assert (out / "ds_state" / "worker.node1.log").exists() and (out / "worker.log").exists()
    load_release(out)  # strictly
