"""`scone`: the command line over the same steps the Prefect flows and `dvc repro` run.

Every subcommand takes `--params PATH` and repeated `--set key.path=value` overrides.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


# `scone bench NAME` -> module whose `run(params, out: Path) -> dict` measures and writes the JSON. The benchmarks
# package sits above the library (it imports tasks/); named here, imported only when its command runs.
BENCHMARKS = {
    "data-build": "benchmarks.data_build",
    "judge": "benchmarks.judge",
    "sampling": "benchmarks.sampling",
    "train-throughput": "benchmarks.train_throughput",
    "ablation-stage2": "benchmarks.ablation_stage2",
    "srum-ablation": "benchmarks.srum_ablation",
    "autoencoder-ceiling": "benchmarks.autoencoder_ceiling",
}


def _round_index(text: str) -> int:
    value = text.removeprefix("srum_round")
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a SRUM round: give K or srum_roundK with K >= 1")
    return int(value)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set train.micro_batch=4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="scone", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="run the whole chain as a Prefect flow")
    _common(p)
    p.add_argument("--no-dvc-commit", action="store_true", help="do not record the results in dvc.lock")

    data = sub.add_parser("data", help="build / validate datasets").add_subparsers(dest="action", required=True)
    for action in ("build", "validate"):
        p = data.add_parser(action)
        _common(p)
        p.add_argument("name", help="dataset name, or 'all'")
    p = data.add_parser("import", help="register a downloaded Scone-S2I-57K / SconeEval directory as a dataset")
    _common(p)
    p.add_argument("--kind", required=True, choices=["scone-s2i", "sconeeval"])
    p.add_argument("--name", default=None, help="dataset name (default: every dataset in the folder)")
    p.add_argument("--no-dvc", action="store_true", help="copy without `dvc add` (the raw copy is then untracked)")
    p.add_argument("path")

    p = sub.add_parser("train", help="train one stage (DeepSpeed; num_ranks from params)")
    _common(p)
    p.add_argument("--stage", required=True)

    ev = sub.add_parser("eval", help="benchmark scoring").add_subparsers(dest="action", required=True)
    p = ev.add_parser("checkpoint", help="generate + judge + score one checkpoint on the held-out benchmark")
    _common(p)
    p.add_argument("name", help="checkpoint name (a stage or srum_roundK)")
    p = ev.add_parser("aggregate", help="aggregate a results tree (ours or another tool's): SconeEval / OmniContext "
                      "(--results-dir D --model M: D/M/score_try*/), MICo-Bench / MIGE-Bench (one folder: DIR)")
    p.add_argument("dir", nargs="?", default=None, help="mico / mige: the model's results folder (scores.jsonl)")
    p.add_argument("--results-dir", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--benchmark", choices=["sconeeval", "omnicontext", "mico", "mige"], default="sconeeval")
    p.add_argument("--out", default=None, help="write the summary JSON here")

    srum = sub.add_parser("srum", help="SRUM self-reward rounds")
    _common(srum)
    srum.add_argument("--rounds", type=int, default=None, help="run N rounds as a Prefect flow")
    srum_sub = srum.add_subparsers(dest="action")
    p = srum_sub.add_parser("round", help="run one round (generate, judge, reward, train) without Prefect")
    _common(p)
    p.add_argument("index", type=_round_index, help="the round: K or srum_roundK (a key of srum.rounds)")
    p = srum_sub.add_parser("reward-map", help="dense reward maps from a SRUM regional-reward JSONL")
    p.add_argument("--rewards", required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--out", required=True)

    p = sub.add_parser("register", help="register checkpoints in MLflow and apply the promotion gate")
    _common(p)
    p.add_argument("names", nargs="*", help="checkpoint names (default: every checkpoint of the chain, in order)")

    p = sub.add_parser("report", help="write artifacts/reports/index.html")
    _common(p)

    p = sub.add_parser("serve", help="serve every deployment of prefect.yaml locally: the scheduled chain one run at a time, on-demand stages beside it")
    _common(p)

    p = sub.add_parser("bench", help="benchmarks; each writes its figures as JSON under artifacts/bench/")
    _common(p)
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("--out", default=None, help="JSON output (default: artifacts/bench/<name>.json)")

    p = sub.add_parser("bootstrap", help="make the release directory the chain starts from (tokenizer, "
                       "autoencoder, ViT, release), as a GPU user downloads theirs")
    _common(p)
    p.add_argument("part", choices=["tokenizer", "autoencoder", "vit", "release"])

    mdl = sub.add_parser("model", help="the BAGEL model family: parity against a fixture, size of a preset")
    mdl_sub = mdl.add_subparsers(dest="action", required=True)
    p = mdl_sub.add_parser("parity", help="load FIXTURE/release, compute the case, compare with expected.safetensors")
    p.add_argument("--fixture", required=True, help="fixture directory (release/, case.json, inputs.safetensors)")
    p.add_argument("--out", default=None, help="write the computed outputs here (safetensors)")
    p.add_argument("--device", default="cpu")
    p = mdl_sub.add_parser("inspect", help="parameters per expert and a ZeRO-3 memory plan of a preset")
    p.add_argument("--preset", required=True, choices=["tiny", "bagel-7b"])
    p.add_argument("--gpus", type=int, default=8)

    return ap


def _quiet_environment() -> None:
    """No telemetry calls from a machine that may have no network (Prefect's ephemeral server would log errors).

    One intra-op thread per process unless OMP_NUM_THREADS says otherwise: the tiny model runs thousands of small
    kernels per step, and with two OpenMP threads per process any other busy process on a 2-core laptop makes
    them spin against each other (measured: 0.38 vs 11.9 samples/s beside one busy process; BENCHMARKS.md).
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's ephemeral server migrates a fresh database on its first start; on a busy 2-core machine that takes
    # longer than Prefect's default 20 s wait (seen in CI), and the whole run would fail before its first step
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    args = build_parser().parse_args(argv)
    from flows.params import ParamsError

    from model.safe_state import UnsafeCheckpointError
    from tasks.freshness import DvcError
    from tasks.lock import ArtifactsLocked

    try:
        return _dispatch(args)
    except (ParamsError, ArtifactsLocked, DvcError, UnsafeCheckpointError) as e:
        # the message names the file, key or holder and the fix; a traceback would bury it
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, ArtifactsLocked) else 2


def _params(args):
    from flows.params import load_params

    return load_params(args.params, args.overrides)


def _dispatch(args) -> int:
    cmd = args.command
    if cmd == "model":
        if args.action == "parity":
            from model.bagel.parity import run as parity

            return parity(Path(args.fixture), Path(args.out) if args.out else None, device=args.device)
        from model.bagel.inspect import run as inspect_preset

        return inspect_preset(args.preset, args.gpus)
    if cmd == "eval" and args.action == "aggregate":
        from evaluation.aggregate import aggregate_command

        if (args.dir is None) == (args.results_dir is None):
            print("error: give the results folder as DIR or as --results-dir (with --model)", file=sys.stderr)
            return 2
        try:
            print(aggregate_command(Path(args.dir or args.results_dir), args.model, args.benchmark,
                                    Path(args.out) if args.out else None))
        except (ValueError, FileNotFoundError) as e:  # the message names the folder and the fix
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if cmd == "srum" and args.action == "reward-map":
        import numpy as np

        from model.reward_map import reward_maps_from_jsonl

        maps = reward_maps_from_jsonl(Path(args.rewards), args.width, args.height)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out, maps)
        print(f"wrote {len(maps)} reward maps of {args.height}x{args.width} to {args.out}")
        return 0

    params = _params(args)
    if cmd in WRITERS:
        from tasks.lock import artifacts_lock
        from tasks.paths import Paths

        from tasks.atomic import clear_staging

        root = Paths.from_params(params).root
        with artifacts_lock(root, command=f"scone {' '.join(sys.argv[1:]) or cmd}"):
            clear_staging(root)
            return _run(args, params)
    return _run(args, params)


# Commands that write under the artifacts folder hold its lock (tasks/lock.py); the flows take it themselves.
WRITERS = ("data", "bootstrap", "train", "eval", "srum", "register", "report", "bench")


def _run(args, params) -> int:
    cmd = args.command
    if cmd == "bootstrap":
        from tasks import bootstrap, bootstrap_vit

        step = {"tokenizer": bootstrap.tokenizer_step, "autoencoder": bootstrap.autoencoder_step,
                "vit": bootstrap_vit.vit_step, "release": bootstrap.release_step}[args.part]
        print(json.dumps(step(params), indent=1, default=str))
        return 0
    if cmd == "pipeline":
        from flows.pipeline import scone_pipeline

        scone_pipeline(params_path=args.params, overrides=args.overrides, dvc_commit=not args.no_dvc_commit)
        return 0
    if cmd == "data" and args.action == "import":
        from tasks.datasets import import_step

        print(json.dumps(import_step(params, args.kind, args.path, args.name, track=not args.no_dvc), indent=1,
                         default=str))
        return 0
    if cmd == "data" and args.action == "validate":
        from data.validate import DataValidationError, validate_all
        from tasks import datasets

        def validate(name: str) -> dict:
            summary = datasets.validate_step(params, name)
            print(json.dumps(summary, indent=1, default=str))
            return summary

        # every dataset is checked (and its report written) before one combined error lists all failures
        try:
            validate_all(datasets.all_names() if args.name == "all" else [args.name], validate)
        except DataValidationError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if cmd == "data":
        from tasks import datasets

        names = datasets.all_names() if args.name == "all" else [args.name]
        for name in names:
            fn = datasets.build_step if args.action == "build" else datasets.validate_step
            print(json.dumps(fn(params, name), indent=1, default=str))
        return 0
    if cmd == "train":
        from tasks.train_stage import train_step

        print(json.dumps(train_step(params, args.stage), indent=1, default=str))
        return 0
    if cmd == "eval":
        from tasks.evaluate import evaluate_step

        print(json.dumps(evaluate_step(params, args.name), indent=1, default=str)[:4000])
        return 0
    if cmd == "srum":
        if args.action == "round":
            from tasks.srum import srum_round_step

            print(json.dumps(srum_round_step(params, args.index), indent=1, default=str))
            return 0
        from flows.srum import srum_flow

        srum_flow(params_path=args.params, overrides=args.overrides, rounds=args.rounds)
        return 0
    if cmd == "register":
        from tasks.register import register_all_step, register_step

        records = [register_step(params, n) for n in args.names] if args.names else register_all_step(params)
        for record in records:
            print(json.dumps(record, indent=1, default=str))
        return 0
    if cmd == "report":
        from tasks.report import report_step

        print(report_step(params))
        return 0
    if cmd == "bench":
        import importlib

        from tasks.paths import Paths

        out = Path(args.out or Paths.from_params(params).bench_result(args.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        result = importlib.import_module(BENCHMARKS[args.name]).run(params, out)
        print(json.dumps(result, indent=1, default=str)[:6000])
        print(f"wrote {out}")
        return 0
    if cmd == "serve":
        from flows.deploy import serve

        serve(params_path=args.params)
        return 0
    raise AssertionError(f"unhandled command {cmd}")


if __name__ == "__main__":
    sys.exit(main())
