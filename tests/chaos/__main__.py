"""``python -m tests.chaos [--long] [--backend postgres|sqlite] [--keep]``: run the chaos scenario
of :mod:`tests.chaos.run` and print which guarantees held. Exit 0 iff all four held."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

from .run import LONG, SHORT, run_chaos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--long", action="store_true", help="the long form (minutes of kills)")
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="how long replicas keep dying")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the logs even when all held")
    args = parser.parse_args(argv)
    config = dataclasses.replace(LONG if args.long else SHORT, backend=args.backend, seed=args.seed)
    if args.clients is not None:
        config = dataclasses.replace(config, clients=args.clients)
    if args.seconds is not None:
        config = dataclasses.replace(config, chaos_s=args.seconds)
    work_dir = Path(tempfile.mkdtemp(prefix="stepchain-chaos-"))
    report = run_chaos(config, work_dir)
    print(report.summary())
    if report.ok and not args.keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
