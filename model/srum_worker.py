"""Entry point of one torchrun rank of a SRUM round: `python -m model.srum_worker WORK_DIR/srum_run_config.json`."""
from __future__ import annotations

import argparse

from torch.distributed.elastic.multiprocessing.errors import record

from model.srum_launch import read_srum_run_config
from model.srum_train import train_srum_round


@record  # torchrun then reports the failing rank's traceback as the root cause, not only its exit code
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m model.srum_worker", description=__doc__)
    ap.add_argument("run_config", help="srum_run_config.json written by model.srum_launch.launch_srum_round")
    args = ap.parse_args(argv)
    train_srum_round(**read_srum_run_config(args.run_config))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
