"""Run one fuzz target with atheris: ``python -m tests.fuzz.run TARGET SECONDS``.

The seed corpus in ``tests/fuzz/corpus/TARGET`` is read, never written: new
inputs go to a scratch directory (kept with ``--keep DIR``). A crash, an
uncaught exception, an input taking over ``--timeout`` seconds or the
process growing over ``--rss-mb`` stops the run with a non-zero exit and the
input saved as ``crash-*``, ``timeout-*`` or ``oom-*`` in the working directory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import atheris

CORPUS = Path(__file__).resolve().parent / "corpus"


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz")
    parser.add_argument("target")
    parser.add_argument("seconds", type=int)
    parser.add_argument("--timeout", type=int, default=30, help="seconds one input may take")
    parser.add_argument("--rss-mb", type=int, default=1024, help="memory limit of the process")
    parser.add_argument("--keep", default="", help="directory for the inputs found")
    parser.add_argument("--artifacts", default="", help="directory for crash inputs")
    args = parser.parse_args()

    with atheris.instrument_imports(include=["agent"]):
        from agent.archive import limits
        from tests.fuzz import targets

    if args.target not in targets.TARGETS:
        print(f"unknown target {args.target}; one of {', '.join(targets.TARGETS)}")
        return 2
    limits.configure(targets.FUZZ_LIMITS)
    target = targets.TARGETS[args.target]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / args.target
    libfuzzer = [
        sys.argv[0],
        f"-max_total_time={args.seconds}",
        f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_mb}",
        "-print_final_stats=1",
        str(work),
        *([str(seeds)] if seeds.is_dir() else []),
    ]
    if args.artifacts:
        libfuzzer.insert(1, f"-artifact_prefix={args.artifacts.rstrip('/')}/")
    atheris.Setup(libfuzzer, target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
