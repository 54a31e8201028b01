"""Time-boxed atheris (libFuzzer) runs over the fuzz targets; new coverage joins the corpus.

    python -m tests.fuzz.run --seconds 30                 # every target, 30 s each
    python -m tests.fuzz.run --seconds 60 --target config

Each target runs in its own process (libFuzzer exits when done). Inputs that reach new coverage
are written to tests/fuzz/corpus/<target>/, which the normal pytest run replays: commit them. A
crash leaves `crash-*` in tests/fuzz/corpus/ and a non-zero exit; once fixed, move the input
into its target's folder so it stays a regression.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

CORPUS = Path(__file__).parent / "corpus"


def child(target: str, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["proxy", "tests.fuzz"]):
        from tests.fuzz.targets import TARGETS

    atheris.Setup([sys.argv[0], *libfuzzer_args], TARGETS[target])
    atheris.Fuzz()


def run(target: str, seconds: int) -> int:
    corpus = CORPUS / target
    return subprocess.call(
        [sys.executable, "-m", "tests.fuzz.run", "--child", target, "--",
         f"-max_total_time={seconds}", "-max_len=4096", f"-artifact_prefix={CORPUS}/",
         str(corpus)]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30, help="time box per target")
    parser.add_argument("--target", action="append", help="a target name (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        child(args.child, [a for a in rest if a != "--"])
        return 0
    from tests.fuzz.targets import TARGETS

    failures = 0
    for target in args.target or sorted(TARGETS):
        code = run(target, args.seconds)
        print(f"{target}: {'ok' if code == 0 else f'FAILED (exit {code})'}", flush=True)
        failures += code != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
