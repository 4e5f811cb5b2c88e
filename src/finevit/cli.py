"""The `finevit` command: one argparse subcommand per verb.

A subcommand is a function that adds its parser to the subparsers and sets `run` to a function
taking the parsed arguments and returning the exit status; list it in COMMANDS. Heavy imports
(torch, megatron) happen inside the `run` functions, so `finevit --help` and `finevit config`
stay fast.
"""

import argparse
import sys
from typing import Optional, Sequence


def _run_doctor(args: argparse.Namespace) -> int:
    from finevit import doctor

    return doctor.run()


def add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="report versions, devices and backends; exit 1 if the install is broken",
                       description="Report what is installed and what finevit will use on this machine. "
                                   "Exits 1, with one sentence per problem, when the install is broken.")
    p.set_defaults(run=_run_doctor)


def _run_config_show(args: argparse.Namespace) -> int:
    from finevit.config import ConfigError, load_config, to_yaml
    from finevit.train.task import check_config

    try:
        cfg = load_config(args.config, args.overrides)
        check_config(cfg, args.world_size)
    except ConfigError as e:
        for problem in e.problems:
            print(f"finevit config: {problem}", file=sys.stderr)
        return 2
    print(to_yaml(cfg), end="")
    return 0


def add_config(sub) -> None:
    p = sub.add_parser("config", help="inspect configuration files")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    show = verbs.add_parser(
        "show", help="print the resolved, validated config",
        description="Print CONFIG after its _base_ files and the overrides are merged and the result "
                    "validated; exit 2 with one sentence per problem when it is invalid.")
    show.add_argument("config", metavar="CONFIG", help="YAML file, e.g. configs/encoder/tiny_cpu.yaml")
    show.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                      help="dotted overrides, e.g. model.vision.num_layers=4")
    show.add_argument("--world-size", type=int, default=None, metavar="N",
                      help="also check that the parallel layout fits N ranks")
    show.set_defaults(run=_run_config_show)


def _run_train(args: argparse.Namespace) -> int:
    from finevit.train import main

    return main.train(args.config, args.overrides, args.task)


def _run_eval(args: argparse.Namespace) -> int:
    from finevit.train import main

    return main.evaluate(args.config, args.overrides, args.task)


def add_train_and_eval(sub) -> None:
    from finevit.train.task import TASKS

    for verb, run, text in (
            ("train", _run_train, "train (resuming from the run directory's latest checkpoint if any)"),
            ("eval", _run_eval, "zero-shot retrieval / classification of the run's latest checkpoint "
                                 "on eval.corpora")):
        p = sub.add_parser(verb, help=text, description=f"{text[0].upper()}{text[1:]}. Launch under "
                           "torchrun or srun for several processes; see launch/.")
        p.add_argument("config", metavar="CONFIG", help="YAML file, e.g. configs/stage1/demo_cpu.yaml")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
        p.add_argument("--task", default=None, choices=sorted(TASKS),
                       help="what to train (default: the config's `task`, stage1 unless it says otherwise)")
        p.set_defaults(run=run)


def _run_convert(args: argparse.Namespace) -> int:
    import logging

    from finevit.convert.export import ExportError, export_run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = export_run(args.source, args.out, args.step, args.overwrite, args.max_shard_size)
    except ExportError as e:
        print(f"finevit convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="export a run's checkpoint as Hugging Face directories",
                       description="Export a trained run (its latest checkpoint, or --step) as Hugging Face "
                                   "directories that load in transformers with no custom code; see "
                                   "docs/convert.md.")
    p.add_argument("source", metavar="RUN", help="run directory (or its checkpoints, or one step directory)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must be empty or new)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (an index above it)")
    p.set_defaults(run=_run_convert)


def _run_report(args: argparse.Namespace) -> int:
    from finevit.train.metrics import report

    return report(args.run_dir)


def add_report(sub) -> None:
    p = sub.add_parser("report", help="summarise a run: evaluations first and last, the last step",
                       description="Print a run directory's first and last evaluation and its last "
                                   "logged training step (from metrics.jsonl).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(run=_run_report)


COMMANDS = (add_doctor, add_config, add_train_and_eval, add_convert, add_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finevit", description="Distributed pretraining of FineViT-style vision encoders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
