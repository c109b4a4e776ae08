"""On-disk formats: Scone-S2I-57K training shards, the SconeEval benchmark layout, SRUM prompts and rewards."""
