"""`autollm`: the command line. Every user-facing failure is one `error:` line and exit code 2."""
from __future__ import annotations

import argparse
import os
import sys

from .bench import run_bench
from .bench.quality import QUALITY_METHODS, QUALITY_OPTIMIZERS, quality_pairs
from .checks import load_config
from .errors import UserError, mask_secrets
from .footprint import show as show_footprint
from .log import get_logger, run_log, set_verbosity
from .pipeline import STAGES, run_stages
from .rounds import apply_round

STAGE_HELP = {
    "prepare": "read the sources, chunk, hold out validation/test, write LLaMA-Factory data files",
    "train": "render configs/<delta>.yaml from autollm_lf/templates/ and run `llamafactory-cli train` per delta",
    "search": "find the delta weights that maximise the validation score (Bayesian optimisation)",
    "mix": "train@auto_mix: one adapter on the SFT chunks interleaved with probabilities from the best weights",
    "report": "score raw, train@all, train@<chunk>, average/human/auto merges on validation and test",
    "export": "save the best merge as one PEFT adapter in runs/<name>/merged/ and the WebUI's saves/, "
              "write export.yaml and chat.yaml for llamafactory-cli",
}


logger = get_logger(__name__)

FORCEABLE = ["train", "search", "mix", "report", "export"]
# what `autollm bench` measures; --only picks some
BENCH_PARTS = ["merge", "exact_match", "bo", "search", "model", "ceiling", "scale", "quality"]
BENCH_DEFAULT = BENCH_PARTS[:-1]  # quality runs searches by the dozen on a real model (hours on a CPU): asked for only


def add_verbosity(parser: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    """-q/-v before the command (`autollm -q run x.yaml`) or after it (a subcommand's default leaves the first)."""
    parser.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity", default=default,
                        help="print only warnings and errors (the run's autollm.log keeps every line)")
    parser.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity", default=default,
                        help="print debug lines too")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autollm",
        description="Improve an LLM from new data without guessing mixing ratios: one LoRA delta per data chunk "
                    "(trained with LLaMA-Factory), merge weights found by Bayesian optimisation on validation.",
        epilog="Start with: autollm run examples/toy.yaml   (outputs go to runs/<name>/, re-runs skip finished work)")
    add_verbosity(p, default=0)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="every stage in order: " + ", ".join(STAGE_HELP))
    stages = {"run": run, **{name: sub.add_parser(name, help=text) for name, text in STAGE_HELP.items()}}
    for stage in stages.values():
        add_verbosity(stage)
        stage.add_argument("config", help="run YAML, e.g. examples/toy.yaml")
        stage.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                           help="config keys over the YAML's, as llamafactory-cli takes them: "
                                "name=toy_ray cluster.address=auto")
        stage.add_argument("--force", action="append", choices=FORCEABLE, default=[], metavar="STAGE",
                           help=f"redo this stage even if nothing changed ({', '.join(FORCEABLE)}); repeatable")
        stage.add_argument("--keep-going", action="store_true",
                           help="if a delta fails to train, train the rest and search over those that succeeded")
        stage.add_argument("--round", type=int, default=None, metavar="K",
                           help="continual round K >= 2: start from round K-1's best merge, add its bad cases; "
                                "outputs in runs/<name>/round-K/ (default: the config's `round`, else 1)")
    for stage in (run, stages["export"]):
        stage.add_argument("--full", action="store_true",
                           help="export: also merge into full weights with `llamafactory-cli export` and check that "
                                "the full model scores what the adapter scores")
    validate = sub.add_parser("validate", help="check a config and report every error at once (exit 2 if any)")
    validate.add_argument("config")
    validate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config keys over the YAML's")
    validate.add_argument("--round", type=int, default=None, metavar="K", help="check it as round K")
    bench = sub.add_parser("bench", help="measure what a search trial costs (in place vs reload, per apply mode, ...)")
    bench.add_argument("--json", action="store_true", help="print one JSON object last")
    bench.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test (figures mean little)")
    bench.add_argument("--toy", default="examples/toy.yaml",
                       help="toy config whose run the exact-match and BO parts use")
    bench.add_argument("--model-run", default="examples/gemma3_270m.yaml",
                       help="config of a finished run of a real model, which the model part measures")
    bench.add_argument("--only", action="append", choices=BENCH_PARTS, metavar="PART",
                       help=f"run only this part ({', '.join(BENCH_PARTS)}); repeatable; default: all but quality")
    bench.add_argument("--rounds", type=int, default=5, metavar="N",
                       help="exact_match: time each side N times, in turn (default 5); the medians and the per-round "
                            "speedups are reported")
    bench.add_argument("--merge", action="append", choices=QUALITY_METHODS, metavar="METHOD",
                       help=f"quality: search only this merge method (repeatable; default: "
                            f"{', '.join(QUALITY_METHODS)})")
    bench.add_argument("--optimizer", action="append", choices=QUALITY_OPTIMIZERS, metavar="NAME",
                       help=f"quality: only this optimiser (repeatable; default: {', '.join(QUALITY_OPTIMIZERS)})")
    bench.add_argument("--seeds", type=int, default=None, metavar="N",
                       help="quality: searches per method x optimiser, each with its own RNG seed (the gradient's "
                            "minibatches and the fit/holdout split; every search starts from the same baseline "
                            "points, so these are not independent replications) (default 3; 1 with --quick)")
    bench.add_argument("--larger-budget", type=int, default=None, metavar="TRIALS",
                       help="quality: one more search of the run's own method and optimiser at this many trials "
                            "(default 3 x the budget; 0: none)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # KEY=VALUE overrides may also come after the options
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides += extra
    set_verbosity(args.verbosity)
    if not sys.stderr.isatty():  # logs and pipes get one line per step, not progress-bar redraws
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
    try:
        if args.command == "bench":
            from pathlib import Path

            if args.rounds < 1:
                raise UserError(f"bench --rounds: {args.rounds} is not a positive number of rounds; give 1 or more")
            for flag, value, least, hint in (("--seeds", args.seeds, 1, "of 1 or more"),
                                             ("--larger-budget", args.larger_budget, 0, "(0 for none)")):
                if value is not None and value < least:
                    raise UserError(f"bench {flag}: {value} is not a valid count; give a whole number {hint}")
            quality = {"pairs": quality_pairs(args.merge or QUALITY_METHODS, args.optimizer or QUALITY_OPTIMIZERS),
                       "seeds": args.seeds, "big_budget": args.larger_budget}
            run_bench(args.json, args.quick, Path(args.toy), args.only or BENCH_DEFAULT, args.rounds,
                      Path(args.model_run), {k: v for k, v in quality.items() if v is not None})
            return 0
        cfg = load_config(args.config, args.round, args.overrides)
        if cfg.round > 1:
            cfg = apply_round(cfg, args.config)
        if args.command == "validate":
            print(f"{args.config}: ok")
            show_footprint(cfg)  # disk and memory the run needs; exit 2 when the run's disk lacks the space
            return 0

        with run_log(cfg.run.log):
            try:
                run_stages(cfg, list(STAGES) if args.command == "run" else [args.command], frozenset(args.force),
                           args.keep_going, getattr(args, "full", False))
            except UserError as e:  # in the run's log too, if the run got as far as writing one
                if cfg.run.log.parent.is_dir():
                    logger.error("error: %s", mask_secrets(str(e)), extra={"console": False})
                raise
        return 0
    except UserError as e:
        print(f"error: {mask_secrets(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, re-run to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
