"""Release directories: the released BAGEL / Scone layout, read strictly and written back the same way.

    llm_config.json, vit_config.json, [ae_params.json]      architecture (see config.py)
    ema.safetensors | model.safetensors                      the unified model (BAGEL / Scone name)
      or <stem>-0000K-of-0000N.safetensors + <stem>.safetensors.index.json   the same, sharded
    ae.safetensors                                           the FLUX autoencoder
    vocab.json, merges.txt, tokenizer_config.json            Qwen2 tokenizer

Loading is strict: a key missing from the files, a key the model does not have, or a shape that differs is an
error that names them. The model is built on the meta device and the tensors are assigned as read, so a 14B
model never exists twice in memory and lands on the target device in the target dtype directly. For ZeRO-3
training, `load_release_partitioned` builds it under deepspeed.zero.Init and fills each rank's partitions, so it
never exists whole on any rank.

Writing (`save_release`, or `ReleaseWriter` for savers that gather a model piece by piece) streams the unified
model's tensors into shards as they arrive (`ShardedWriter`): one shard is held at a time, never the model.

Over 400 lines on purpose: reading and writing the release layout (strict keys, shards, index, dtypes, meta-device
loading) must stay one place so a round trip is exact by construction.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.bagel.config import AutoencoderConfig, BagelConfig
from model.bagel.model import AE_PREFIX, BagelModel
from model.bagel.packing import SpecialTokens

WEIGHT_NAMES = ("ema.safetensors", "model.safetensors")
AE_FILE = "ae.safetensors"
VIT_FILE = "vit.safetensors"  # a pretrained ViT alone (`vit_model.*`), as the chain's bootstrap makes it
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json")
# The four markers BAGEL adds to Qwen2's vocabulary when missing, in this order (ids follow the order).
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
_LISTED = 20


class ReleaseError(ValueError):
    pass


@dataclass
class WeightFiles:
    name: str  # "ema.safetensors" or "model.safetensors": the name to write back
    files: list[Path]
    sharded: bool


def find_weights(directory: Path) -> WeightFiles:
    directory = Path(directory)
    found = []
    for name in WEIGHT_NAMES:
        index = directory / f"{name}.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({directory / f for f in weight_map.values()})
            missing = [str(s.name) for s in shards if not s.exists()]
            if missing:
                raise ReleaseError(f"{index.name} names shards that are not there: {', '.join(missing)}")
            found.append(WeightFiles(name, shards, True))
        elif (directory / name).exists():
            found.append(WeightFiles(name, [directory / name], False))
    if not found:
        raise ReleaseError(f"{directory}: no weights file ({' or '.join(WEIGHT_NAMES)}, or a sharded index)")
    if len(found) > 1:
        raise ReleaseError(f"{directory}: both {found[0].name} and {found[1].name}; which one is the model is "
                           "ambiguous")
    return found[0]


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key in shapes:
                    raise ReleaseError(f"{key} is stored twice (again in {path.name})")
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _names(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_LISTED])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > _LISTED else "")


def check_keys(expected: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]], where: str) -> None:
    missing = expected.keys() - stored.keys()
    unexpected = stored.keys() - expected.keys()
    wrong = [f"{k} {list(stored[k])} (model {list(expected[k])})"
             for k in sorted(expected.keys() & stored.keys()) if tuple(stored[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches: {'; '.join(wrong[:_LISTED])}")
    if problems:
        raise ReleaseError(f"{where}: " + " | ".join(problems))


def load_tokenizer(directory: Path):
    """The release's Qwen2 tokenizer with BAGEL's four markers, and their ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing)
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    return tokenizer, SpecialTokens(*ids)


@dataclass
class Release:
    model: BagelModel
    tokenizer: object
    directory: Path
    weights: WeightFiles

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text (unframed; the model frames with <|im_start|> ... <|im_end|>)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))


def _open_release(directory: Path, config_overrides: dict) -> tuple[WeightFiles, Path, BagelConfig, object,
                                                                     SpecialTokens, BagelModel]:
    """What a release directory holds, checked strictly against its architecture (built on the meta device)."""
    weights = find_weights(directory)
    ae_path = directory / AE_FILE
    if not ae_path.exists():
        raise ReleaseError(f"{directory}: no {AE_FILE}")
    main_shapes = _shapes(weights.files)
    ae_shapes = _shapes([ae_path])
    cfg = BagelConfig.from_release(directory, main_shapes, **config_overrides)
    tokenizer, special = load_tokenizer(directory)
    if len(tokenizer) > cfg.llm.vocab_size:
        raise ReleaseError(f"tokenizer has {len(tokenizer)} tokens, the embedding only {cfg.llm.vocab_size}")

    with torch.device("meta"):
        model = BagelModel(cfg, special)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys({k: s for k, s in expected.items() if not k.startswith(AE_PREFIX)}, main_shapes, weights.name)
    check_keys({k[len(AE_PREFIX):]: s for k, s in expected.items() if k.startswith(AE_PREFIX)}, ae_shapes, AE_FILE)
    return weights, ae_path, cfg, tokenizer, special, model


def read_pretrained_vit(vit_dir: str | Path) -> dict[str, torch.Tensor]:
    """The `vit_model.*` tensors of a pretrained ViT directory (model.bagel.vit_pretrain.save_vit writes it)."""
    path = Path(vit_dir) / VIT_FILE
    if not path.exists():
        raise ReleaseError(f"{path} is missing: run `scone bootstrap vit` first (model.bootstrap.vit.steps: 0 "
                           "makes one with a fresh ViT)")
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def load_release(directory: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 **config_overrides) -> Release:
    directory = Path(directory)
    weights, ae_path, _, tokenizer, _, model = _open_release(directory, config_overrides)
    state: dict[str, torch.Tensor] = {}
    for path, prefix in [(p, "") for p in weights.files] + [(ae_path, AE_PREFIX)]:
        with safe_open(str(path), framework="pt", device=str(torch.device(device))) as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                state[prefix + key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_non_persistent(torch.device(device))
    model.eval()
    return Release(model, tokenizer, directory, weights)


def load_release_partitioned(directory: Path, ds_config: dict, **config_overrides) -> Release:
    """`load_release` for ZeRO-3 training (every rank of the process group calls it): no rank ever holds the
    whole model, on the host or on its device.

    The model is built inside `deepspeed.zero.Init` with the engine's config, so each weight is partitioned across
    the ranks as its module is constructed (in the engine's dtype, on the rank's accelerator). The release's
    tensors then go in one module's weights at a time: gathered whole on every rank, filled by rank 0 from the
    memory-mapped files, and scattered back into the partitions when the module is done. The engine built on this
    model (`deepspeed.initialize` with the same config) keeps the partitions as they are.
    """
    import deepspeed
    import torch.distributed as dist

    directory = Path(directory)
    weights, ae_path, cfg, tokenizer, special, _ = _open_release(directory, config_overrides)
    # mem_efficient_linear would replace F.linear process-wide, for good
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        model = BagelModel(cfg, special)
    sources = [(p, "") for p in weights.files] + [(ae_path, AE_PREFIX)]
    where = {key: (path, key[len(prefix):]) for path, prefix in sources for key in _prefixed(path, prefix)}
    rank = dist.get_rank()
    files: dict[Path, object] = {}

    def read(key: str) -> torch.Tensor:
        path, stored = where[key]
        if path not in files:
            files[path] = safe_open(str(path), framework="pt", device="cpu")
        return files[path].get_tensor(stored)

    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        params = [(prefix + n, p) for n, p in module._parameters.items() if p is not None]
        if params:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        for key, p in params:
                            p.data.copy_(read(key))
        for n, b in module._buffers.items():  # not partitioned: every rank reads its own copy
            if b is not None and n not in module._non_persistent_buffers_set:
                with torch.no_grad():
                    b.copy_(read(prefix + n))
    files.clear()
    # zero.Init also made the derived buffers in its dtype; they are computed again in float32, as load_release has
    model.reset_non_persistent(model.vae2llm.weight.device)
    model.eval()
    return Release(model, tokenizer, directory, weights)


def _prefixed(path: Path, prefix: str) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return [prefix + k for k in f.keys()]


class ShardedWriter:
    """Writes one weights file, or shards + `<name>.index.json` (Hugging Face's layout), from tensors handed over
    one at a time: a shard is written as soon as the next tensor would take it past `max_shard_bytes`, so only one
    shard is ever held (a tensor larger than the limit gets a shard of its own). Greedy in arrival order.

    Shards are written under temporary names and get their final `-0000K-of-0000N` names on `close`, when N is
    known; `abort` removes them. Without a limit, or when everything fits in one shard, the result is `name`.
    """

    def __init__(self, directory: Path, name: str, max_shard_bytes: int | None = None):
        self.directory = Path(directory)
        self.name = name
        self.stem = name[: -len(".safetensors")]
        self.limit = max_shard_bytes
        self.total = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self._keys: set[str] = set()
        self._closed = False

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise ReleaseError(f"{self.name}: writer already closed")
        if key in self._keys:
            raise ReleaseError(f"{self.name}: {key} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if self.limit is not None and self._pending and self._pending_bytes + nbytes > self.limit:
            self._flush()
        self._keys.add(key)
        self._pending[key] = tensor
        self._pending_bytes += nbytes
        self.total += nbytes

    def _part_path(self, index: int) -> Path:
        return self.directory / f".{self.stem}-part{index:05d}.partial"

    def _flush(self) -> None:
        path = self._part_path(len(self._parts) + 1)
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._parts.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is pending, name the files, write the index; the written weight files, in order."""
        if self._closed:
            raise ReleaseError(f"{self.name}: writer already closed")
        if self._pending or not self._parts:
            self._flush()
        self._closed = True
        if self.limit is None or self.total <= self.limit:  # one file, named as the release names it
            (path, _), = self._parts
            final = self.directory / self.name
            os.replace(path, final)
            return [final]
        n = len(self._parts)
        paths, weight_map = [], {}
        for i, (path, keys) in enumerate(self._parts, 1):
            final = self.directory / f"{self.stem}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            paths.append(final)
            weight_map.update({k: final.name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / f"{self.name}.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return paths

    def abort(self) -> None:
        self._closed = True
        self._pending = {}
        for path, _ in self._parts:
            path.unlink(missing_ok=True)


def save_weights(state: dict[str, torch.Tensor], directory: Path, name: str,
                 max_shard_bytes: int | None = None) -> list[Path]:
    """One file, or shards + `<name>.index.json` (Hugging Face's layout) when the total exceeds the limit."""
    writer = ShardedWriter(directory, name, max_shard_bytes)
    for key, tensor in state.items():
        writer.add(key, tensor)
    return writer.close()


class ClosedOnExit:
    """A writer as a `with` block: `close()` (publish) when the block ends normally, `abort()` when it raises, so
    an interrupted save never leaves what looks like a finished release."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ReleaseWriter(ClosedOnExit):
    """A release directory written as its weights arrive (`add(key, tensor)` with the model's state-dict keys, in
    any order), for savers that gather a model piece by piece: the unified model's weights stream into
    `ShardedWriter` shards; the autoencoder's (`ae.*`, small, one file by the layout) are held until `close`.

    The configs and tokenizer files are written at once. `close` checks the keys and shapes against the
    architecture (the strict loader's check, before anything is published) and names the files; used as a context
    manager, an exception instead removes the partial shards.
    """

    def __init__(self, directory: Path, config: BagelConfig, special: SpecialTokens | None = None,
                 weights_name: str = "ema.safetensors", max_shard_bytes: int | None = None,
                 tokenizer_from: Path | None = None, tokenizer=None):
        if weights_name not in WEIGHT_NAMES:
            raise ReleaseError(f"weights_name must be one of {WEIGHT_NAMES}")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stale = [p for p in directory.glob("*.safetensors*")]
        if stale:
            raise ReleaseError(f"{directory} already holds weights ({', '.join(sorted(p.name for p in stale))})")
        with torch.device("meta"):
            shell = BagelModel(config, special)
        self.expected = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
        self.directory = directory
        self.weights_name = weights_name
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._ae: dict[str, torch.Tensor] = {}
        self._main = ShardedWriter(directory, weights_name, max_shard_bytes)
        # FLUX's own hyperparameters need no file (the real release has none); anything else must be stated.
        config.write_release_configs(directory, write_ae_params=config.vae != AutoencoderConfig())
        if tokenizer_from is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_from) / name).exists():
                    shutil.copy2(Path(tokenizer_from) / name, directory / name)
        elif tokenizer is not None:
            tokenizer.save_pretrained(str(directory))

    def add(self, key: str, tensor: torch.Tensor) -> None:
        want = self.expected.get(key)
        if want is None:
            raise ReleaseError(f"{self.directory}: {key} is not a weight of this architecture")
        if tuple(tensor.shape) != want:
            raise ReleaseError(f"{self.directory}: {key} has shape {list(tensor.shape)}, the architecture {list(want)}")
        if key in self._shapes:
            raise ReleaseError(f"{self.directory}: {key} written twice")
        self._shapes[key] = want
        if key.startswith(AE_PREFIX):
            self._ae[key[len(AE_PREFIX):]] = tensor.detach().to("cpu")
        else:
            self._main.add(key, tensor)

    def close(self) -> Path:
        missing = self.expected.keys() - self._shapes.keys()
        if missing:
            raise ReleaseError(f"{self.directory}: never written: {_names(missing)}")
        self._main.close()
        save_weights(self._ae, self.directory, AE_FILE)
        self._ae = {}
        return self.directory

    def abort(self) -> None:
        self._main.abort()
        self._ae = {}



def save_release(model: BagelModel, directory: Path, weights_name: str = "ema.safetensors",
                 max_shard_bytes: int | None = None, tokenizer_from: Path | None = None, tokenizer=None) -> Path:
    """Write `model` as a release directory. The tokenizer files are copied from `tokenizer_from` (a release
    directory) when given, else written by `tokenizer.save_pretrained`."""
    with ReleaseWriter(directory, model.config, model.special, weights_name, max_shard_bytes, tokenizer_from,
                       tokenizer) as writer:
        for key, tensor in model.state_dict().items():
            writer.add(key, tensor)
    return Path(directory)


FAMILY_SPEC = "model.bagel.family:BAGEL"
MARKER = "config.json"  # what model/train.py looks for in a checkpoint directory


def mark_release(directory: str | Path) -> Path:
    """Add the `config.json` marker model/train.py requires of an init checkpoint (kept when already there)."""
    path = Path(directory) / MARKER
    if not path.exists():
        find_weights(Path(directory))  # only a release directory gets marked
        path.write_text(json.dumps({"model_family": FAMILY_SPEC, "layout": "bagel-release",
                                    "note": "marker for model/train.py; the architecture is in llm_config.json, "
                                            "vit_config.json and the weights"}, indent=2) + "\n")
    return path
