"""The ``sohoa`` console script: ``sohoa central …``, ``sohoa edge …``, ``sohoa demo``.

Errors from either side are turned into one-line messages and exit codes here, in one place.
Exit codes follow sysexits(3), the same table for every command (README, "Exit codes"):

    0 ok · 1 the command ran and the answer is "no" (verify found problems, demo not synced)
    64 usage · 65 bad data (bundle, device id, refused envelope) · 66 missing input (home, bundle)
    69 a service is unavailable (broker cannot start) · 70 internal error (a bug: traceback logged)
    74 I/O error · 75 temporary failure, try again · 77 permission denied · 78 configuration error
    130 interrupted (Ctrl-C); SIGTERM to a running service is a clean stop: 0
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import signal
import sys
from pathlib import Path
from typing import NoReturn

from central import cli as central_cli
from central.errors import CentralError
from edge import cli as edge_cli
from edge.config import ConfigError
from edge.errors import BadInputError, EdgeError
from protocol.errors import ProtocolError
from protocol.version import version as protocol_version
from sohoa import daemon
from sohoa.localbroker import BrokerStartError

log = logging.getLogger("sohoa")

EX_OK = 0
EX_NO = 1            # ran fine, the answer is "no"
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78
EX_INTERRUPTED = 130


def version() -> str:
    """The release, from package metadata (one helper for every side: protocol.version)."""
    return protocol_version()


class Parser(argparse.ArgumentParser):
    """argparse with EX_USAGE (64) for a bad command line instead of its own 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v and --log-format on every level, so ``sohoa edge run --home H -v`` works as expected.

    Below the top the defaults are SUPPRESS: a subcommand that is not given the flag must not reset
    what was given before it (``sohoa -v edge run``).
    """
    default: object = argparse.SUPPRESS
    parser.add_argument("-v", "--verbose", action="store_true", default=False if top else default,
                        help="debug logging")
    parser.add_argument("--log-format", choices=daemon.LOG_FORMATS, default="auto" if top else default,
                        help="auto (journal under systemd, else text), text, journal or json "
                             "(one object per line)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_common(child, top=False)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sohoa",
        description="Digitise commune archives: edge boxes OCR and sync scans to a central archive.",
        epilog="Exit codes (every command): 0 ok, 1 answer is no, 64 usage, 65 bad data, "
               "66 missing input, 69 unavailable, 70 internal error, 74 I/O error, 75 try again, "
               "77 permission denied, 78 configuration error, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"sohoa {version()}")
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
    _add_common(parser, top=True)
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


def _service(args: argparse.Namespace) -> int | None:
    """The two long-running services run under sohoa.daemon (sd_notify, watchdog, SIGHUP)."""
    if args.command == "edge" and args.edge_command == "run":
        return daemon.run_edge(args.home, verbose=args.verbose)
    if args.command == "central" and args.central_command == "run":
        return daemon.run_central(args.home, verbose=args.verbose, worker=args.worker)
    return None


def _stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints every thread's stack to stderr (the journal, for a service): a box
    that hangs can say where, without a debugger on it. The process's own stderr, not a stand-in
    (a test's captured stream has no file descriptor to write to from a signal handler)."""
    if sys.__stderr__ is not None:
        with contextlib.suppress(OSError, ValueError):   # io.UnsupportedOperation is both
            faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _stacks_on_sigusr1()
    # The demo draws a progress bar: keep routine log lines out of its way unless asked.
    quiet = args.command == "demo" or getattr(args, "json", False)
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    daemon.configure_logging(level, args.log_format)
    try:
        code = _service(args)
        if code is None:
            code = args.func(args)
    except ConfigError as exc:
        return _fail(EX_CONFIG, f"configuration error: {exc}")
    except CentralError as exc:
        return _fail(exc.exit_code, f"{exc}\nhint: {exc.hint}")
    except BadInputError as exc:
        return _fail(EX_DATAERR, f"{exc}\nhint: {exc.hint}")
    except ProtocolError as exc:
        return _fail(EX_DATAERR, f"{exc}\nhint: {exc.hint}")
    except BrokerStartError as exc:
        return _fail(EX_UNAVAILABLE, str(exc))
    except EdgeError as exc:
        return _fail(getattr(exc, "exit_code", EX_UNAVAILABLE), f"{exc}\nhint: {exc.hint}")
    except PermissionError as exc:
        return _fail(EX_NOPERM, str(exc))
    except FileNotFoundError as exc:
        return _fail(EX_NOINPUT, str(exc))
    except OSError as exc:
        return _fail(EX_IOERR, str(exc))
    except KeyboardInterrupt:
        return EX_INTERRUPTED
    except Exception:
        log.exception("internal error (a bug: please report it with this traceback)")
        return EX_SOFTWARE
    return int(code)


def _fail(code: int, message: str) -> int:
    print(f"sohoa: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
