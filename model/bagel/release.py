"""Release directories: the released BAGEL / Scone layout, read strictly and written back the same way.

    llm_config.json, vit_config.json, [ae_params.json]      architecture (see config.py)
    ema.safetensors | model.safetensors                      the unified model (BAGEL / Scone name)
      or <stem>-0000K-of-0000N.safetensors + <stem>.safetensors.index.json   the same, sharded
    ae.safetensors                                           the FLUX autoencoder
    vocab.json, merges.txt, tokenizer_config.json            Qwen2 tokenizer

Loading is strict: a key missing from the files, a key the model does not have, or a shape that differs is an
error that names them. The model is built on the meta device and the tensors are assigned as read, so a 14B
model never exists twice in memory and lands on the target device in the target dtype directly.
"""
from __future__ import annotations

import json
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


def load_release(directory: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 **config_overrides) -> Release:
    directory = Path(directory)
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


def _shard(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, in key order; a tensor larger than the limit gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_weights(state: dict[str, torch.Tensor], directory: Path, name: str,
                 max_shard_bytes: int | None = None) -> list[Path]:
    """One file, or shards + `<name>.index.json` (Hugging Face's layout) when the total exceeds the limit."""
    directory = Path(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    total = sum(v.numel() * v.element_size() for v in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(state, str(directory / name), metadata={"format": "pt"})
        return [directory / name]
    stem = name[: -len(".safetensors")]
    shards = _shard(state, max_shard_bytes)
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = directory / f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        paths.append(path)
        weight_map.update({k: path.name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / f"{name}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return paths


def save_release(model: BagelModel, directory: Path, weights_name: str = "ema.safetensors",
                 max_shard_bytes: int | None = None, tokenizer_from: Path | None = None, tokenizer=None) -> Path:
    """Write `model` as a release directory. The tokenizer files are copied from `tokenizer_from` (a release
    directory) when given, else written by `tokenizer.save_pretrained`."""
    if weights_name not in WEIGHT_NAMES:
        raise ReleaseError(f"weights_name must be one of {WEIGHT_NAMES}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stale = [p for p in directory.glob("*.safetensors*")]
    if stale:
        raise ReleaseError(f"{directory} already holds weights ({', '.join(sorted(p.name for p in stale))})")
    cfg = model.config
    # FLUX's own hyperparameters need no file (the real release has none); anything else must be stated.
    cfg.write_release_configs(directory, write_ae_params=cfg.vae != AutoencoderConfig())
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).exists():
                shutil.copy2(Path(tokenizer_from) / name, directory / name)
    elif tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    state = model.state_dict()
    save_weights({k: v for k, v in state.items() if not k.startswith(AE_PREFIX)}, directory, weights_name,
                 max_shard_bytes)
    save_weights({k[len(AE_PREFIX):]: v for k, v in state.items() if k.startswith(AE_PREFIX)}, directory, AE_FILE)
    return directory


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
