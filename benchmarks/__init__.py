"""`scone bench NAME`: benchmarks and ablations, above the library.

Each module measures something about the library and writes its figures as JSON (`run(params, out: Path) -> dict`;
flows/cli.py maps the command names to these modules):

    data-build        benchmarks.data_build        rows per second of building, one process vs all cores
    train-throughput  benchmarks.train_throughput  training-step speed and achieved FLOP/s
    sampling          benchmarks.sampling          per-case sampling latency, 1-4 references, context cache on/off
    judge             benchmarks.judge             the openai judge at 400 cases against a local stub endpoint
    ablation-stage2   benchmarks.ablation_stage2   the Scone paper's Table 5 / 6 in miniature
    srum-ablation     benchmarks.srum_ablation     SRUM's reward ablation and its SFT baseline

benchmarks.openai_stub is the local OpenAI-compatible endpoint the judge benchmark (and the judge tests) talk to.

Import direction: this package may import tasks/ and everything below it (data, model, evaluation, registry);
nothing in those packages, nor flows/ or dashboards/, imports it (tests/test_import_graph.py). Where artifacts
live and which checkpoint a benchmark starts from come from the chain's one path map, tasks/paths.py.
"""
