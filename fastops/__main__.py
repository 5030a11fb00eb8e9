"""Command line: ``python -m fastops info`` (also installed as the ``fastops`` script)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastops", description="fastops kernels for vision models")
    parser.add_argument("command", nargs="?", default="info", choices=["info"],
                        help="info: versions, build, device and backend availability per op")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import info

        info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
