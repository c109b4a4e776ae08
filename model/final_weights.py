"""The trained weights out of the engine: gathered one layer-sized group at a time and streamed into the checkpoint.

Both recipes (model.train's stages, model.srum_train's rounds) save through `save_final_weights`: under ZeRO-3
each `weight_groups` group is gathered, handed to the family's writer (BAGEL: a release directory, cast to the
release's stored dtype, so 16-bit where the release is, sharded above train.max_shard_bytes) and re-partitioned
before the next, so no rank ever holds the whole model.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn


def weight_groups(model: nn.Module) -> list[list[tuple[str, torch.Tensor]]]:
    """Every state-dict entry of `model` (parameters and persistent buffers, under state-dict keys) in groups that
    are held whole one at a time when saving: each element of an nn.ModuleList (a decoder layer, a ViT layer, an
    autoencoder block) is a group, and so is each other module that holds no ModuleList; a module with ModuleLists
    below it contributes its own direct entries as one group and is split along its children."""
    def own(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor]]:
        out = [(prefix + n, p) for n, p in module._parameters.items() if p is not None]
        return out + [(prefix + n, b) for n, b in module._buffers.items()
                      if b is not None and n not in module._non_persistent_buffers_set]

    groups: list[list[tuple[str, torch.Tensor]]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        if not any(isinstance(m, nn.ModuleList) for m in module.modules()):
            entries = [e for name, m in module.named_modules(remove_duplicate=False)
                       for e in own(m, f"{prefix}{name}." if name else prefix)]
            if entries:
                groups.append(entries)
            return
        if own(module, prefix):
            groups.append(own(module, prefix))
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(model, "")
    return groups


def gather_weights(model: nn.Module, zero_stage: int, sink: Callable[[str, torch.Tensor], None] | None) -> float:
    """Hand each state-dict entry of `model`, whole, to `sink(key, tensor)` (None: this rank only takes part in
    the gathering), one `weight_groups` group at a time; returns this rank's checksum of the parameters.

    Under ZeRO-3 each group is gathered (a collective: every rank calls this) and re-partitioned before the next,
    so the full weights never exist at once on any rank; `sink` must copy what it keeps before it returns. Under
    ZeRO 0-2 every rank holds the whole model and nothing is gathered. Equal checksums on all ranks show that
    they ended on the same weights."""
    import deepspeed

    groups = weight_groups(model)
    keys = [k for g in groups for k, _ in g]
    if sorted(keys) != sorted(model.state_dict().keys()):  # the grouping must be the state dict, entry for entry
        raise RuntimeError(f"weight groups of {type(model).__name__} differ from its state dict")
    checksum = None
    for group in groups:
        partitioned = [t for _, t in group if hasattr(t, "ds_id")] if zero_stage == 3 else []
        gathered = (deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None) if partitioned
                    else contextlib.nullcontext())
        with gathered:
            for key, tensor in group:
                if isinstance(tensor, nn.Parameter):
                    part = tensor.detach().double().sum()
                    checksum = part if checksum is None else checksum + part.to(checksum.device)
                if sink is not None:
                    sink(key, tensor.detach())
    return 0.0 if checksum is None else float(checksum)


def save_final_weights(model: nn.Module, out_dir: Path, zero_stage: int, rank: int,
                       max_shard_bytes: int | None = None) -> float:
    """Write the trained weights into out_dir (rank 0) and return this rank's checksum; every rank calls it.

    A family whose model has `weights_writer(out_dir, max_shard_bytes)` (BAGEL) gets them streamed group by group
    (`gather_weights`) into a writer that casts each to the checkpoint's dtype and writes shards as they fill:
    rank 0 holds about one group plus one shard, never the whole model. Others get the whole fp32 state dict
    through `save_pretrained(out_dir, state_dict=...)`."""
    if rank == 0:  # no summary yet, so any weights here are an interrupted save's: a release is never written over
        for stale in [*out_dir.glob("*.safetensors"), *out_dir.glob("*.safetensors.index.json"),
                      *out_dir.glob(".*.partial")]:
            stale.unlink()
    open_writer = getattr(model, "weights_writer", None)
    if open_writer is None:  # the whole state dict at once, in fp32, on rank 0
        state: dict[str, torch.Tensor] = {}
        sink = (lambda k, v: state.__setitem__(k, v.to("cpu", torch.float32, copy=True))) if rank == 0 else None
        checksum = gather_weights(model, zero_stage, sink)
        if rank == 0:
            model.save_pretrained(out_dir, state_dict=state)
        return checksum
    writer = open_writer(out_dir, max_shard_bytes=max_shard_bytes) if rank == 0 else None
    try:
        checksum = gather_weights(model, zero_stage, None if writer is None else writer.add)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    return checksum


