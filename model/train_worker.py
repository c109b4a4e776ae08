"""Entry point of one torchrun rank: `python -m model.train_worker OUT_DIR/run_config.json`."""
from __future__ import annotations

import argparse

from torch.distributed.elastic.multiprocessing.errors import record

from model.launch import read_run_config
from model.train import train_stage


@record  # torchrun then reports the failing rank's traceback as the root cause, not only its exit code
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m model.train_worker", description=__doc__)
    ap.add_argument("run_config", help="run_config.json written by model.launch.run_stage")
    args = ap.parse_args(argv)
    train_stage(**read_run_config(args.run_config))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
