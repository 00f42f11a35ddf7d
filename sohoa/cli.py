"""The ``sohoa`` console script: ``sohoa central …``, ``sohoa edge …``, ``sohoa demo``.

Errors from either side are turned into one-line messages and exit codes here, in one place.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from central import cli as central_cli
from edge import cli as edge_cli
from edge.config import ConfigError
from sohoa.localbroker import BrokerStartError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sohoa",
        description="Digitise commune archives: edge boxes OCR and sync scans to a central archive.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    central_cli.register(sub)
    edge_cli.register(sub)
    demo = sub.add_parser("demo", help="run broker, central and one edge on this machine with sample pages",
                          description="Start Mosquitto, a central and one edge in a temporary home, feed "
                                      "sample Vietnamese pages, show progress until all are receipted.")
    demo.add_argument("--scans", type=Path, help="use these scans instead of generated sample pages")
    demo.add_argument("--pages", type=_positive_int, default=10,
                      help="number of generated sample pages (default 10)")
    demo.add_argument("--home", type=Path, help="keep state here instead of a temporary directory")
    demo.add_argument("--exit-when-synced", action="store_true", help="stop once everything is receipted")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    demo.set_defaults(func=_demo)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _demo(args: argparse.Namespace) -> int:
    from sohoa.demo import main as demo_main
    return demo_main(scans=args.scans, pages=args.pages, home=args.home,
                     exit_when_synced=args.exit_when_synced, as_json=args.json, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The demo draws a progress bar: keep routine log lines out of its way unless asked.
    quiet = args.command == "demo" or getattr(args, "json", False)
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"sohoa: configuration error: {exc}", file=sys.stderr)
        return 2
    except BrokerStartError as exc:
        print(f"sohoa: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
