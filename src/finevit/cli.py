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
    from finevit.config import ConfigError, load_config, to_yaml, validate

    try:
        cfg = validate(load_config(args.config, args.overrides), args.world_size)
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


COMMANDS = (add_doctor, add_config)


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
