"""Configuration owned by the model package: which release and how to feed it (`model:`), training (`train:`), SRUM."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from data.config import Strict
from model.bagel.config import preset


class BridgeConfig(Strict):
    """Understanding bridge (Scone Sec. 3.4). Paper: layer 8 of 28 for the mask, applied in layers 9-16, tau 0.88.

    Scaled to the tiny model by depth fraction: early layer ~ 8/28 of depth, applied through ~16/28. A release
    stores no bridge settings: these are the only ones, checked against the model's depth where the two meet
    (model.bagel.bridge.check_layers).
    """

    early_layer: int = Field(1, ge=0, description="layer whose und.-expert states give the semantic mask")
    apply_until: int = Field(2, ge=0, description="last layer (inclusive) receiving the mask; starts at early_layer+1")
    tau: float = Field(0.88, ge=-1.0, le=1.0, description="cosine threshold; tokens with s <= tau are masked")
    soft_temperature: float = Field(
        0.05, gt=0, description="T of the straight-through surrogate log sigmoid((s - tau) / T) (stages with "
        "bridge_straight_through); the forward pass always uses the exact mask of Eq. 4"
    )

    @model_validator(mode="after")
    def _mask_then_apply(self):
        if not self.early_layer < self.apply_until:
            raise ValueError(f"bridge layers (early_layer={self.early_layer}, apply_until={self.apply_until}) must "
                             "satisfy early_layer < apply_until: the mask acts in the layers after the one it is "
                             "computed from")
        return self


class AutoencoderTrainConfig(Strict):
    """The tiny release's FLUX autoencoder, trained in the chain on the training datasets' images."""

    datasets: list[str] = Field(
        default_factory=lambda: ["scone_single_candidate_base", "scone_multi_candidate", "t2i_pretrain"],
        min_length=1, description="training datasets whose images (references and targets) it learns")
    steps: int = Field(800, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)


class VitPretrainConfig(Strict):
    """The tiny release's ViT, pretrained in the chain on the subject world's exact labels (model.bagel.vit_pretrain),
    as BAGEL's SigLIP arrives pretrained. steps 0: the release keeps a fresh ViT."""

    steps: int = Field(1500, ge=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    images: int = Field(8192, ge=1, description="training scenes, drawn from the training combinations")
    heldout_images: int = Field(256, ge=1, description="scenes of the held-out combinations, for the accuracies")


class BootstrapConfig(Strict):
    """What a BAGEL release brings ready-made, made in the chain for a preset (model.bagel.bootstrap)."""

    seed: int = 0
    tokenizer_vocab_size: int = Field(512, ge=300, description="byte-level BPE size, specials included")
    autoencoder: AutoencoderTrainConfig = AutoencoderTrainConfig()
    vit: VitPretrainConfig = VitPretrainConfig()


class ModelConfig(Strict):
    """params' `model:`: which release the chain starts from and how the model is fed, sampled and bridged.

    The architecture is not here: it is the release directory's (llm_config.json, vit_config.json, the weights'
    shapes), or the preset's when the chain makes its own release (model.bagel.config.preset)."""

    name: str = "tiny"
    preset: str = Field("tiny", description="BAGEL preset the chain bootstraps a release of (model.bagel.config)")
    release: str | None = Field(
        None, description="release directory the first stage starts from (scale: the downloaded BAGEL-7B-MoT or "
        "Scone directory); null: the chain makes one for `preset` under artifacts/release/")
    bootstrap: BootstrapConfig = BootstrapConfig()
    image_size: int = Field(
        32, ge=1, description="side the images are fed and generated at, rounded up to the model's token grid "
        "(model.bagel.family.image_side)")
    max_references: int = Field(4, ge=0, description="references per sample; training keeps the first ones")
    timestep_shift: float = Field(1.0, gt=0)
    timestep_sampling: Literal["logit_normal", "uniform"] = Field(
        "logit_normal", description="training timestep distribution before the shift"
    )
    cfg_drop_text: float = Field(0.1, ge=0, le=1, description="guidance dropout: instruction replaced by empty")
    cfg_drop_image: float = Field(
        0.05, ge=0, le=1, description="guidance dropout: references and instruction removed, the unconditional "
        "branch image guidance needs (model.scheduler.guidance_dropout)")
    bridge: BridgeConfig = BridgeConfig()

    @model_validator(mode="after")
    def _bridge_fits_the_preset(self):
        """The layers of a release the chain makes are the preset's, so a bridge that cannot fit them is refused
        here, before hours of bootstrap and Stage I. A given release is checked when the model meets its config
        (model.bagel.bridge.check_layers): its depth is in its files."""
        if self.release is None:
            layers = preset(self.preset).llm.num_hidden_layers
            b = self.bridge
            if not b.apply_until < layers:
                raise ValueError(
                    f"bridge layers (early_layer={b.early_layer}, apply_until={b.apply_until}) must satisfy "
                    f"early_layer < apply_until < num_layers={layers}, the layers of preset {self.preset!r}")
        return self


class StageConfig(Strict):
    """One training stage: a data mix, a freezing schedule and a length. No code per stage."""

    datasets: list[str] = Field(min_length=1, description="dataset names under data.root/parquet_data")
    init_from: str | None = Field(
        None, description="previous stage name (its checkpoint); null: the release directory (model.release, or the "
        "one the chain makes for model.preset)")
    steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    train_understanding: bool = True
    train_generation: bool = True
    train_vit: bool = Field(
        False, description="also train the ViT encoder (frozen otherwise, as in Scone's stages); the understanding "
        "pretraining stage trains it, since the tiny release's ViT is fresh")
    bridge: bool = False
    bridge_straight_through: bool = Field(
        False, description="with bridge: the generation loss trains the semantic mask through a soft surrogate "
        "(straight-through; forward = Eq. 4). Bridge formation (stage2_step1) needs it at small scale"
    )
    und_loss_weight: float = Field(0.1, ge=0)
    mixture: dict[str, float] | None = Field(
        None, description="share of the stage's samples per named dataset (0 < share <= 1); the datasets not named "
        "share the rest in proportion to their rows (shares summing to 1 when every dataset is named). null: every "
        "dataset in proportion to its rows. A dataset's rows repeat as often as its share asks (model.data_loader)")

    @model_validator(mode="after")
    def _straight_through_needs_bridge(self):
        if self.bridge_straight_through and not self.bridge:
            raise ValueError("bridge_straight_through: true needs bridge: true (there is no mask to train otherwise)")
        return self

    @model_validator(mode="after")
    def _mixture_of_the_stage_datasets(self):
        if not self.mixture:
            return self
        unknown = sorted(set(self.mixture) - set(self.datasets))
        if unknown:
            raise ValueError(f"mixture names {unknown}, which are not among the stage's datasets {self.datasets}")
        bad = {k: v for k, v in self.mixture.items() if not 0 < v <= 1}
        if bad:
            raise ValueError(f"mixture shares must be in (0, 1], got {bad}")
        total = sum(self.mixture.values())
        if set(self.mixture) == set(self.datasets):
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"mixture names every dataset of the stage, so its shares must sum to 1, got {total:g}")
        elif total >= 1.0:
            raise ValueError(f"mixture shares sum to {total:g}, leaving nothing for the stage's other datasets "
                             f"{sorted(set(self.datasets) - set(self.mixture))}")
        return self


def check_endpoint(value: str) -> str:
    """`value` if it is host:port (a rendezvous address), else ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rendezvous endpoint {value!r}: expected host:port, e.g. node001:29500")
    return value


class TrainConfig(Strict):
    num_ranks: int = Field(1, ge=1, description="DeepSpeed ranks (torchrun --nproc_per_node)")
    zero_stage: int = Field(2, ge=0, le=3)
    micro_batch: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    seed: int = 0
    log_every: int = 10
    save_every: int = Field(50, ge=1, description="resumable DeepSpeed checkpoint interval (steps)")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=1, description="pack micro batches by tokens, as BAGEL: each takes samples in the data order while "
        "the next one still fits this many tokens of the packed sequence (micro_batch is then unused); a sample "
        "larger than the budget is an error. null: micro_batch samples each")
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes per lane (each rank reads grad_accum lanes) that read and "
        "decode row groups ahead of training; 0: in the training process. Batches are identical for any value")
    shuffle_window: int = Field(
        4, ge=1, description="row groups whose rows are shuffled together in a lane's data order; also what one "
        "loader worker decodes at once (memory: about shuffle_window x (prefetch 2 + 1) row groups per worker)")
    stages: dict[str, StageConfig]
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="save the exponential moving average of the trained weights (model.ema) "
        "instead of the last step's, as BAGEL releases ema.safetensors; null: the last step's weights")
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer (and trained ViT layer) in backward instead of keeping its "
        "activations: far less memory for about a third more compute, same losses and gradients")
    max_shard_bytes: int = Field(
        5_000_000_000, ge=1, description="largest weights file of the saved checkpoint: above it the weights are "
        "written as <name>-0000K-of-0000N.safetensors shards plus <name>.safetensors.index.json")
    zero3_persistence_threshold: int | None = Field(
        None, ge=0, description="ZeRO-3: parameters of fewer elements stay whole on every rank instead of being "
        "partitioned (DeepSpeed's stage3_param_persistence_threshold); null: DeepSpeed's default (100000)")
    nodes: int | None = Field(
        None, ge=1, description="machines of the run (torchrun --nnodes), each running num_ranks ranks; null: from "
        "the environment (PET_NNODES, NNODES, SLURM_NNODES, SLURM_JOB_NUM_NODES), else 1")
    node_rank: int | None = Field(
        None, ge=0, description="this machine's index in 0..nodes-1 (torchrun --node_rank); null: from the "
        "environment (PET_NODE_RANK, NODE_RANK, SLURM_NODEID), else 0 on one node")
    rdzv_endpoint: str | None = Field(
        None, description="host:port of the c10d rendezvous of a multi-node run (torchrun --rdzv_endpoint), the "
        "same on every node; null: from the environment (PET_RDZV_ENDPOINT, MASTER_ADDR:MASTER_PORT, or the "
        "first host of SLURM_JOB_NODELIST with MASTER_PORT or 29500)")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_and_port(cls, value: str | None) -> str | None:
        return value if value is None else check_endpoint(value)

    @model_validator(mode="after")
    def _node_rank_in_range(self):
        if self.nodes is not None and self.node_rank is not None and self.node_rank >= self.nodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nodes {self.nodes}")
        return self


class SrumConfig(Strict):
    """SRUM self-reward post-training (SRUM Sec. 3, Table 6), scaled to the tiny model."""

    rounds: dict[str, str] = Field(
        default_factory=lambda: {"srum_round1": "stage2_step2"},
        description="the rounds in order: checkpoint name srum_roundK -> the checkpoint it starts from (round 1 "
        "from a training stage, round K from srum_round{K-1}); an int N means N rounds after stage2_step2")
    candidates: int = Field(4, ge=1, description="K candidates per compositional prompt")
    judge: Literal["self", "oracle", "openai"] = Field(
        "self", description="who scores the candidates: the model's own understanding expert (SRUM), the prompt's "
        "exact scene (oracle) or a VLM endpoint (openai, settings under eval.openai)")
    lambda_c: float = Field(0.5, ge=0, description="weight of the reference flow-matching constraint (paper's best 0.5)")
    alpha: float = Field(1.0, gt=0, description="scale of the reward term")
    steps: int = Field(40, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(5, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-15
    grad_clip: float = 1.0
    weight_decay: float = Field(0.0, ge=0, description="Table 6: 0.0")
    micro_batch: int = Field(8, ge=1, description="self-generated candidates per step (each with its reference)")
    seed: int = Field(0, description="candidate sampling seeds and training noise derive from it and the round")
    bridge: bool = Field(True, description="understanding bridge on while sampling and training (as stage2)")
    train_understanding: bool = Field(
        False, description="also update the understanding expert; off keeps the self judge fixed within a round"
    )
    reward_weighting: Literal["direct", "signed"] = Field(
        "direct", description="loss weight from the reward map R in [0, 1]: R itself, or 2R-1 (negative repels); "
        "see model.srum_loss"
    )

    @field_validator("rounds", mode="before")
    @classmethod
    def _rounds_from_count(cls, value):
        # `--set srum.rounds=2` (and the srum deployment's `rounds` parameter) give a count: the paper's chain
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise ValueError(f"srum.rounds must be >= 0, got {value}")
            return {srum_round_name(k): ("stage2_step2" if k == 1 else srum_round_name(k - 1))
                    for k in range(1, value + 1)}
        return value

    @field_validator("rounds")
    @classmethod
    def _rounds_chain(cls, rounds: dict[str, str]) -> dict[str, str]:
        for k, (name, start) in enumerate(rounds.items(), start=1):
            if name != srum_round_name(k):
                raise ValueError(f"srum.rounds: entry {k} is named {name!r}; rounds are srum_round1, srum_round2, "
                                 f"... in order (add one with: dvc exp run -S '+srum.rounds.{srum_round_name(k)}="
                                 f"{srum_round_name(k - 1) if k > 1 else 'stage2_step2'}')")
            if k > 1 and start != srum_round_name(k - 1):
                raise ValueError(f"srum.rounds.{name} starts from {start!r}; round {k} continues "
                                 f"{srum_round_name(k - 1)}")
            if k == 1 and start.startswith("srum_round"):
                raise ValueError(f"srum.rounds.{name} starts from {start!r}; the first round starts from a "
                                 "training stage's checkpoint")
        return rounds

    @property
    def count(self) -> int:
        return len(self.rounds)

    @property
    def init_from(self) -> str:
        """The training stage whose checkpoint the first round starts from (what the rounds refine)."""
        return next(iter(self.rounds.values()), "stage2_step2")


def srum_round_name(index: int) -> str:
    return f"srum_round{index}"
