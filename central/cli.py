"""``sohoa central ...``: argparse wiring; the one place central's errors become exit codes.

Central's modules are imported when a central command runs, not when the parser is built: every
``sohoa`` command builds it, and ``sohoa edge run`` on a commune box must not carry the catalog's
code (~2.6 MB resident) for the life of the process.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from central.admin.roles import ROLES
from central.errors import CentralError
from protocol.errors import ProtocolError

log = logging.getLogger("sohoa.central")


def _guard(action: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except CentralError as exc:
            print(f"sohoa central: error: {exc}\nhint: {exc.hint}", file=sys.stderr)
            return exc.exit_code
        except ProtocolError as exc:
            print(f"sohoa central: error: {exc}\nhint: {exc.hint}", file=sys.stderr)
            return 65
        except OSError as exc:
            print(f"sohoa central: error: {exc}", file=sys.stderr)
            return 74
    return run


def _init(args: argparse.Namespace) -> int:
    from central.admin import commands, tls
    from central.config import load_config
    given = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(given) and not all(given):
        print("sohoa central: error: --tls-cert, --tls-key and --tls-ca go together", file=sys.stderr)
        return 64
    certs = tls.OperatorCerts(args.tls_cert, args.tls_key, args.tls_ca) if all(given) else None
    commands.init(args.home, broker_url=args.broker, http=args.http, device_url=args.device_broker,
                  allow_plaintext=args.insecure_plaintext,
                  tls_certs=certs, archive_name=args.archive_name)
    config = load_config(args.home)
    print(f"central home ready in {args.home}\n"
          f"  broker: mosquitto -c {args.home / 'mosquitto.conf'} (central on {config.broker.url}, "
          f"devices on {config.broker.devices_dial})\n"
          f"  enroll: sohoa central enroll DEVICE_ID --home {args.home} --out DEVICE.bundle")
    return 0


def _enroll(args: argparse.Namespace) -> int:
    from central.admin import commands
    if args.from_csv is not None:
        if args.device_id is not None or args.out is not None or args.out_dir is None or args.replaces:
            raise CentralError("--from takes --out-dir DIR, and no DEVICE_ID, --out or --replaces (a "
                               "replaces column in the CSV instead)",
                               hint="sohoa central enroll --from devices.csv --out-dir bundles/ --home DIR")
        args.out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        devices = commands.read_enrollment_csv(args.from_csv, args.out_dir)
        commands.enroll_many(args.home, devices)
        print(f"enrolled {len(devices)} devices; bundles (secret, 0600) written to {args.out_dir}/")
        return 0
    if args.device_id is None or args.out is None:
        raise CentralError("give DEVICE_ID and --out FILE, or --from devices.csv --out-dir DIR",
                           hint="sohoa central enroll xa-tan-trao --out xa-tan-trao.toml --home DIR")
    commands.enroll(args.home, args.device_id, args.out, replaces=args.replaces)
    print(f"enrolled {args.device_id}{f' (replaces {args.replaces})' if args.replaces else ''}; "
          f"bundle (secret, 0600) written to {args.out}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from central.admin import commands
    result = commands.revoke(args.home, args.device_id)
    state = "revoked" if result.was_active else "was already revoked; broker account removed again"
    broker = (f"broker (pid {result.broker_pid}) reloaded: live session cut" if result.broker_pid
              else "no running broker found: SIGHUP your broker so the live session is cut")
    print(f"{args.device_id} {state}; {broker}")
    if result.awaiting_originals:
        # The box announced these and never sent them: only it (re-enrolled as its own replacement)
        # or a new scan of the paper can bring them.
        print(f"{result.awaiting_originals} document(s) it announced still lack their original; enroll the "
              f"box again with `sohoa central enroll NEW --replaces {args.device_id}` and run "
              "`sohoa edge retry --all` on it, or have the commune scan them again")
    return 0


def _clear_clone(args: argparse.Namespace) -> int:
    from central.admin import commands
    result = commands.clear_clone(args.home, args.device_id)
    if not result.was_flagged:
        print(f"{args.device_id} was not flagged as a possible clone")
        return 0
    seen = result.suspicion or {}
    print(f"{args.device_id}: possible-clone flag cleared (first seen {seen.get('since')}, "
          f"{seen.get('count')} refused transfer(s)); a new sequence collision raises it again")
    return 0


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            from central.admin.operators import OperatorError
            raise OperatorError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _user_add(args: argparse.Namespace) -> int:
    from central.admin import commands
    commands.user_add(args.home, args.name, args.role, _read_password())
    print(f"operator {args.name} ({args.role}) saved")
    return 0


def _table(rows: list[dict[str, object]], columns: tuple[str, ...]) -> None:
    def shown(row: dict[str, object], column: str) -> str:
        value = row.get(column)
        return "-" if value is None else str(value)

    widths = [max([len(c), *(len(shown(r, c)) for r in rows)]) for c in columns]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        cells = [shown(row, c) for c in columns]
        print("  ".join(v.ljust(w) for v, w in zip(cells, widths, strict=True)).rstrip())


def _user_list(args: argparse.Namespace) -> int:
    from central.admin import commands
    _table(commands.user_list(args.home), ("name", "role", "disabled", "sessions", "created_at"))
    return 0


def _user_remove(args: argparse.Namespace) -> int:
    from central.admin import commands
    commands.user_remove(args.home, args.name)
    print(f"operator {args.name} disabled and signed out (kept in the audit log)")
    return 0


def _token_list(args: argparse.Namespace) -> int:
    from central.admin import commands
    _table(commands.token_list(args.home), ("name", "role", "created_at", "revoked_at"))
    return 0


def _device_list(args: argparse.Namespace) -> int:
    from central.admin import commands
    rows = commands.device_list(args.home)
    for row in rows:
        row["online"] = "yes" if row["online"] else "no"
        row["possible_clone"] = "POSSIBLE CLONE" if row["possible_clone"] else None
    _table(rows, ("id", "status", "online", "last_seen", "backlog_docs", "last_receipt", "problem",
                  "possible_clone"))
    return 0


def _device_remove(args: argparse.Namespace) -> int:
    from central.admin import commands
    commands.device_remove(args.home, args.device_id)
    print(f"{args.device_id} removed (it had never sent anything); its broker account is gone")
    return 0


def _token_create(args: argparse.Namespace) -> int:
    from central.admin import commands
    token = commands.token_create(args.home, args.name, args.role)
    print(token)   # shown once, by design: only its hash is stored
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from central.admin import commands
    commands.token_revoke(args.home, args.name)
    print(f"token {args.name} revoked")
    return 0


def _run(args: argparse.Namespace) -> int:
    from central import worker
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return worker.run(args.home, worker=args.worker)


def _verify(args: argparse.Namespace) -> int:
    from central.admin import commands
    problems = commands.verify(args.home)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)" if problems else "all stored objects verify")
    return 1 if problems else 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``central`` with ``init``, ``enroll``, ``run`` and ``verify`` to the top-level parser."""
    central = subparsers.add_parser("central", help="the central aggregator (ingest, archive, API)",
                                    description="Run and administer the central archive.")
    sub = central.add_subparsers(dest="central_command", required=True, metavar="COMMAND")

    init = sub.add_parser("init", help="create keys, central.toml, broker config and API token",
                          description="Create a central home: keys, central.toml, mosquitto.conf with "
                                      "password file and ACL, and a random API token (all 0600).")
    init.add_argument("--home", type=Path, required=True, help="central home directory (created)")
    init.add_argument("--broker", default="mqtt://127.0.0.1:1883", metavar="mqtt://HOST:PORT",
                      help="central's own broker listener: loopback, central's account only "
                           "(default: %(default)s)")
    init.add_argument("--device-broker", metavar="mqtt[s]://HOST:PORT",
                      help="what devices dial, their own listener (client id = username); mqtts:// adds "
                           "TLS (generated CA and server certificate for HOST unless --tls-* are given) and "
                           "puts the CA in bundles (default: plain mqtt:// on --broker's host, port + 1; "
                           "plain is refused off loopback unless --insecure-plaintext)")
    init.add_argument("--tls-cert", type=Path, metavar="PEM", help="operator's server certificate chain")
    init.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    init.add_argument("--tls-ca", type=Path, metavar="PEM", help="the CA devices must trust")
    init.add_argument("--http", default="127.0.0.1:8080", metavar="HOST:PORT",
                      help="dashboard, API and /metrics address (default: %(default)s)")
    init.add_argument("--archive-name", metavar="NAME",
                      help="the archive named in the certificate of its signing key, which signs the "
                           "archival PDF/A copies (default: Lưu trữ số hóa sohoa)")
    init.add_argument("--insecure-plaintext", action="store_true",
                      help="let devices dial a non-loopback broker without TLS (a closed lab network "
                           "only; refused otherwise)")
    init.set_defaults(func=_guard(_init))

    enroll = sub.add_parser("enroll", help="enroll a device and write its secret bundle",
                            description="Generate a device signing key and broker account, record the "
                                        "device, reload a running broker, and write the bundle for "
                                        "`sohoa edge init --bundle`.")
    enroll.add_argument("device_id", metavar="DEVICE_ID", nargs="?", help="e.g. xa-tan-trao (a-z, 0-9, '-')")
    enroll.add_argument("--home", type=Path, required=True, help="central home directory")
    enroll.add_argument("--out", type=Path, help="bundle file to write (0600)")
    enroll.add_argument("--from", dest="from_csv", type=Path, metavar="CSV",
                        help="enroll every device of a CSV file (a device_id column, or ids in the first "
                             "column): all or none, one broker reload")
    enroll.add_argument("--out-dir", type=Path, metavar="DIR", help="with --from: DIR/<device_id>.toml each")
    enroll.add_argument("--replaces", metavar="OLD_ID",
                        help="this box replaces the revoked device OLD_ID: the originals OLD_ID announced "
                             "and never sent complete its documents when this box sends them (in a CSV: "
                             "a replaces column)")
    enroll.set_defaults(func=_guard(_enroll))

    revoke = sub.add_parser("revoke", help="revoke a device: refuse its envelopes and cut its broker session",
                            description="Mark the device revoked in the catalog (central refuses its "
                                        "envelopes from now on), remove its broker account and reload "
                                        "a running broker, which disconnects its live session.")
    revoke.add_argument("device_id", metavar="DEVICE_ID")
    revoke.add_argument("--home", type=Path, required=True, help="central home directory")
    revoke.set_defaults(func=_guard(_revoke))

    device = sub.add_parser("device", help="device administration beyond enroll and revoke",
                            description="Administer enrolled devices.")
    device_sub = device.add_subparsers(dest="device_command", required=True, metavar="COMMAND")
    clear = device_sub.add_parser(
        "clear-clone", help="clear the possible-clone flag once one of the boxes was re-enrolled",
        description="Two boxes signed transfers with one identity (a reused sequence number): central "
                    "refused the second and flagged the device. Enroll one box under a new id first, "
                    "then clear the flag (audited). A new collision raises it again.")
    clear.add_argument("device_id", metavar="DEVICE_ID")
    clear.add_argument("--home", type=Path, required=True, help="central home directory")
    clear.set_defaults(func=_guard(_clear_clone))
    device_ls = device_sub.add_parser("list", help="every enrolled device with its state",
                                      description="Devices by id: status, online, last seen, backlog, "
                                                  "problem.")
    device_ls.add_argument("--home", type=Path, required=True, help="central home directory")
    device_ls.set_defaults(func=_guard(_device_list))
    device_rm = device_sub.add_parser(
        "remove", help="remove a device that never sent anything (else: revoke)",
        description="Delete an enrolled device that never sent a transfer (a typo, a box never installed) "
                    "and its broker account. A device whose documents are archived stays: revoke it.")
    device_rm.add_argument("device_id", metavar="DEVICE_ID")
    device_rm.add_argument("--home", type=Path, required=True, help="central home directory")
    device_rm.set_defaults(func=_guard(_device_remove))

    user = sub.add_parser("user", help="dashboard operators (argon2id passwords)",
                          description="Manage the people who sign in to the dashboard.")
    user_sub = user.add_subparsers(dest="user_command", required=True, metavar="COMMAND")
    user_add = user_sub.add_parser("add", help="add an operator or reset its role and password",
                                   description="Password from stdin (one line), or prompted twice on a tty.")
    user_add.add_argument("name", metavar="NAME")
    user_add.add_argument("--role", choices=ROLES, required=True,
                          help="viewer: browse and search; operator: also download originals (audited); "
                               "admin: also revoke devices and read the audit log")
    user_add.add_argument("--home", type=Path, required=True, help="central home directory")
    user_add.set_defaults(func=_guard(_user_add))
    user_ls = user_sub.add_parser("list", help="operators, their roles and open sessions")
    user_ls.add_argument("--home", type=Path, required=True, help="central home directory")
    user_ls.set_defaults(func=_guard(_user_list))
    user_rm = user_sub.add_parser("remove", help="disable an operator and end its sessions",
                                  description="The account is disabled (kept: the audit log names it) and "
                                              "signed out everywhere; `user add` with the name enables it "
                                              "again.")
    user_rm.add_argument("name", metavar="NAME")
    user_rm.add_argument("--home", type=Path, required=True, help="central home directory")
    user_rm.set_defaults(func=_guard(_user_remove))

    token = sub.add_parser("token", help="API tokens for scripts (stored hashed)",
                           description="Bearer tokens for /api; HOME/api-token stays the bootstrap admin.")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    create = token_sub.add_parser("create", help="create a token and print it once")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--role", choices=ROLES, default="viewer", help="default: %(default)s")
    create.add_argument("--home", type=Path, required=True, help="central home directory")
    create.set_defaults(func=_guard(_token_create))
    revoke_token = token_sub.add_parser("revoke", help="revoke a token (effective on the next request)")
    revoke_token.add_argument("name", metavar="NAME")
    revoke_token.add_argument("--home", type=Path, required=True, help="central home directory")
    revoke_token.set_defaults(func=_guard(_token_revoke))
    token_ls = token_sub.add_parser("list", help="tokens by name (never their values), with revocations")
    token_ls.add_argument("--home", type=Path, required=True, help="central home directory")
    token_ls.set_defaults(func=_guard(_token_list))

    run = sub.add_parser("run", help="run ingest and HTTP until SIGTERM",
                         description="Connect to the broker, ingest transfers, serve the dashboard, "
                                     "/api and /metrics. SIGTERM or Ctrl-C stops cleanly.")
    run.add_argument("--home", type=Path, required=True, help="central home directory")
    run.add_argument("--worker", metavar="NAME", default=None,
                     help="run as one of several workers sharing this home: MQTT client id "
                          "<client_id>-NAME on the shared subscription, its own segment journal; every "
                          "worker serves HTTP on the same port (SO_REUSEPORT)")
    run.set_defaults(func=_guard(_run))

    verify = sub.add_parser("verify", help="re-hash every stored object against the catalog",
                            description="Fixity check: every stored original, package and archival "
                                        "copy must exist and hash to its name. The outcome is recorded "
                                        "as fixity events; a bad archival copy is queued to be built "
                                        "again from its original. Exit 1 if any object does not verify.")
    verify.add_argument("--home", type=Path, required=True, help="central home directory")
    verify.set_defaults(func=_guard(_verify))
