"""Measure a model's stage profile on this machine and print the split that balances the stages.

    python -m tandem.tools.profile_stage --model DIR [--device cuda] [--cpus 0-3] [--threads 4]
        [--out profile.json] [--stages 4] [--balance-at 16,256]

Times one decoder layer, the LM head and the embedding over a grid of tokens x context (see
docs/stage-profile.md), with the cores and torch threads a stage would have, and writes the
profile as JSON. With --stages it prints the boundaries that give every stage the same time on
a step of the --balance-at size: the `stage_boundaries` of the stage configs, or the Helm
chart's `pipeline.stageBoundaries`. A stage config can also point at the JSON file instead
(`stage_boundaries: auto`, `stage_profile: FILE`); every stage then computes the same split.
Run it on a machine like the stages' own: the split is only as right as the costs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tandem.core.errors import ConfigError, ModelLoadError


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tandem.tools.profile_stage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--device", default="cpu", help="torch device of the stages (default: cpu)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--cpus", default="", help="cores to run on, e.g. 0-3 (default: as started)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads, as a stage's num_threads (default: one per core it may use)")
    p.add_argument("--tokens", type=_ints, default=None, help="grid: tokens per step (default: 1,8,32,128,512)")
    p.add_argument("--contexts", type=_ints, default=None, help="grid: context lengths (default: 128,1024)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point; the fastest is kept (default: 5)")
    p.add_argument("--budget-s", type=float, default=5.0,
                   help="past this many seconds the remaining points run once (default: 5)")
    p.add_argument("--out", help="write the profile JSON here")
    p.add_argument("--stages", type=int, default=0, help="print the balanced split into this many stages")
    p.add_argument("--balance-at", type=_ints, default=None,
                   help="TOKENS,CONTEXT of the step the split balances (default: 16,256)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tandem.core.cpus import cpus_field, format_cpu_list, place_process
    from tandem.core.modeling.profile import BALANCE_CONTEXT, BALANCE_TOKENS, balanced_split
    from tandem.core.modeling.profiler import Grid, measure_profile

    try:
        place_process(cpus_field("--cpus", args.cpus), args.threads, "profile_stage")
        default = Grid()
        grid = Grid(args.tokens or default.tokens, args.contexts or default.contexts, default.max_seqs_per_step,
                    max(1, args.repeats), args.budget_s)
        profile = measure_profile(args.model, args.device, args.dtype, grid)
        if args.balance_at is not None and len(args.balance_at) != 2:
            raise ConfigError(f"--balance-at takes TOKENS,CONTEXT, got {args.balance_at}")
        tokens, context = args.balance_at or (BALANCE_TOKENS, BALANCE_CONTEXT)
        split = balanced_split(profile, args.stages, tokens, context) if args.stages else None
    except (ConfigError, ModelLoadError, OSError) as e:
        print(f"profile_stage: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(profile.to_json())
    print(f"# {profile.model} on {profile.device} ({profile.dtype}), torch threads {profile.num_threads} on cores "
          f"{format_cpu_list(profile.cpus)}, measured in {profile.measure_s:.1f} s", file=sys.stderr)
    print("tokens  " + "".join(f"layer@{c:<7}" for c in profile.contexts) + "LM head   embedding  (ms)",
          file=sys.stderr)
    for t, row, head, embed in zip(profile.tokens, profile.layer_ms, profile.head_ms, profile.embed_ms):
        print(f"{t:<8}" + "".join(f"{ms:<13.3f}" for ms in row) + f"{head:<10.3f}{embed:.4f}", file=sys.stderr)
    if split is not None:
        print(f"# {split.describe()}", file=sys.stderr)
        bounds = ",".join(map(str, split.boundaries))
        print(f"stage_boundaries: [{bounds}]")
        print(f"# helm: --set 'pipeline.stageBoundaries={{{bounds}}}'; tandem up/bench: --stage-boundaries {bounds}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
