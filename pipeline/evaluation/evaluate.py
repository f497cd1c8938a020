"""`pipeline eval`: standalone FID/KID, in one process or over many ranks.

    python -m pipeline eval --checkpoint runs/NAME                       # its newest checkpoint
    python -m pipeline eval --checkpoint runs/NAME/checkpoints/step_0001000 --n-gen 50000
    torchrun --nproc_per_node 8 -m pipeline eval --checkpoint runs/NAME
    python -m pipeline eval --real data/mnist32 --real data/mnist32_test --n-ref 10000

Which ranks run it: every rank generates/extracts its share; rank 0 prints the JSON.
It needs torch.distributed only (no DeepSpeed): the evaluation has no engine.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from pipeline.errors import UserError


def run_eval(args) -> int:
    from pipeline.checkpoint import read_meta
    from pipeline.config import load_config
    from pipeline.dist import detect
    from pipeline.evaluation.fid import FidEvaluator, compare_sets
    from pipeline.export import load_generator, resolve_source

    if bool(args.checkpoint) == bool(args.real) or (args.real and len(args.real) != 2):
        raise UserError("eval: give --checkpoint PATH, or --real A --real B (two datasets)")
    base, label, generator, payload = None, "defaults", None, None
    if args.checkpoint:
        generator, payload = load_generator(args.checkpoint)
        source = resolve_source(args.checkpoint)
        if source.is_dir():
            base, label = read_meta(source)["config"], f"checkpoint {source}"
        elif not (args.reference or args.config):
            raise UserError(f"{source} is a generator export without a dataset: pass --reference DATA")
    config = load_config(args.config, args.overrides, base=None if args.config else base, base_label=label)
    for flag, key in ((args.n_gen, "n_generated"), (args.n_ref, "n_reference"), (args.reference, "reference")):
        if flag is not None:
            setattr(config.eval, key, flag)
    info = detect(args.device)
    if info.world_size > 1:  # destroyed by the CLI's teardown, on every exit path
        dist.init_process_group(info.backend, timeout=timedelta(minutes=config.deepspeed.timeout_minutes))
    if args.real:
        result = compare_sets(args.real[0], args.real[1], config, info.device, config.train.progress)
    else:
        evaluator = FidEvaluator(config, info.device, config.train.progress)
        result = evaluator(generator.to(info.device))
        result = {
            "checkpoint": str(resolve_source(args.checkpoint)),
            "step": payload["step"],
            "ema": payload["ema"],
            **result,
        }
    result["world_size"] = info.world_size
    if info.is_main:
        text = json.dumps(result)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    return 0
