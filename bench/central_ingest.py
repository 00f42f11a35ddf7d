"""Central ingest throughput against raw Mosquitto, with the same devices and bytes, in one run.

    .venv/bin/python -m bench.central_ingest [--devices 1000] [--docs 1] [--size 110000]
                                            [--before DIR] [--big-mib 0] [--json]

Every simulated device (``bench.mqttload``, one asyncio process) connects to its own account on the
generated broker config and publishes pre-sealed documents (init, 32 KiB segments, fin; QoS 1, a
window of 8 PUBACKs, like the edge). Baseline: the same messages to a subscriber that only counts
them (paho, the shared subscription central uses, auto-ack) — what Mosquitto carries. Then
``sohoa central run`` (a separate process) ingests them, and every device waits for its receipts.

``central_ingest_ratio`` = central's bytes/s (first publish → last receipt) ÷ the baseline's bytes/s.
``--before DIR`` runs the same central workload a second time with the code in DIR (e.g. a
``git archive`` of main) on a home that code made: the before/after comparison in the same run,
including CPU ms per document from the central process's own CPU time. ``--strace`` counts
fsync/fdatasync per document (strace slows both runs alike). ``--big-mib N`` adds one N MiB transfer
on loopback. The machine's load average is reported with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.signing
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.mqttload import DevicePlan, Plan
from central.admin.broker_config import hash_password
from central.keys import load_keys
from central.paths import CentralPaths
from protocol.messages import RECEIPT_IS_STORED, encode
from tests.central.builders import seal_document
from tests.support.broker import Broker, free_port, running_broker

ROOT = Path(__file__).resolve().parents[1]
SEGMENT = 32 * 1024          # the edge's uplink.segment_size
CHUNK = 64 * 1024            # the sealer's secretstream chunk (DESIGN §4)
MB = 1_000_000


@dataclass(frozen=True, slots=True)
class Home:
    path: Path
    code: Path
    broker_port: int
    device_port: int
    http_port: int

    @property
    def central_password(self) -> str:
        data = tomllib.loads((self.path / "central.toml").read_text())
        return str(data["broker"]["password"])


def make_home(root: Path, code: Path, name: str) -> Home:
    """``central init`` by the code under test (its own catalog schema), on free ports."""
    home = root / name
    broker_port, device_port, http_port = free_port(), free_port(), free_port()
    script = ("import sys; from pathlib import Path; from central.admin import commands;"
              "commands.init(Path(sys.argv[1]), broker_url=sys.argv[2], http=sys.argv[3],"
              " device_url=sys.argv[4])")
    subprocess.run([sys.executable, "-c", script, str(home), f"mqtt://127.0.0.1:{broker_port}",
                    f"127.0.0.1:{http_port}", f"mqtt://127.0.0.1:{device_port}"],
                   check=True, env=_env(code), cwd=root)
    return Home(home, code, broker_port, device_port, http_port)


def _env(code: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code)}


def enroll_direct(home: Home, devices: dict[str, nacl.signing.SigningKey], password: str) -> None:
    """Enroll many devices straight into the catalog and the broker's password file (same rows and
    lines ``central enroll`` writes; the bench must not depend on the enrol speed of the code it
    compares)."""
    conn = sqlite3.connect(home.path / "catalog.db")
    with conn:
        conn.executemany("INSERT INTO devices (id, verify_key, enrolled_at, status)"
                         " VALUES (?, ?, ?, 'active')",
                         [(d, bytes(k.verify_key), "2026-12-01T00:00:00.000Z") for d, k in devices.items()])
    conn.close()
    hashed = hash_password(password)   # one hash for all: the broker checks each login against it
    (home.path / "mosquitto.passwd").write_text("".join(f"{d}:{hashed}\n" for d in devices))


def seal_all(home: Home, devices: dict[str, nacl.signing.SigningKey], docs: int,
             size: int) -> dict[str, list[tuple[str, bytes]]]:
    central_key = load_keys(CentralPaths(home.path)).encryption.public_key
    messages: dict[str, list[tuple[str, bytes]]] = {}
    for device, key in devices.items():
        out: list[tuple[str, bytes]] = []
        for seq in range(1, docs + 1):
            sealed = seal_document(device=device, seq=seq, signing_key=key, central_key=central_key,
                                   original=secrets.token_bytes(size), media_type="image/jpeg",
                                   name=f"Trang {seq} – {device}.jpg", text="Quyết định số hoá",
                                   chunk_size=CHUNK)
            out += [encode(m) for m in sealed.messages(SEGMENT)]
        messages[device] = out
    return messages


def run_load(root: Path, plan: Plan, *, on_connected: threading.Event | None = None) -> dict[str, object]:
    path = root / f"plan-{secrets.token_hex(3)}.pickle"
    path.write_bytes(pickle.dumps(plan))
    proc = subprocess.Popen([sys.executable, "-m", "bench.mqttload", str(path)], stdout=subprocess.PIPE,
                            env=_env(ROOT), cwd=ROOT, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if not first:
        raise RuntimeError("load generator died before connecting")
    if on_connected is not None:
        on_connected.set()
    last = proc.stdout.read()
    if proc.wait() != 0:
        raise RuntimeError(f"load generator failed: {last[-2000:]}")
    path.unlink()
    result: dict[str, object] = json.loads(last.strip().splitlines()[-1])
    return result


def _start_line(root: Path) -> Path:
    return root / f"start-{secrets.token_hex(3)}"


def raw_baseline(root: Path, home: Home, broker: Broker, messages: dict[str, list[tuple[str, bytes]]],
                 password: str) -> dict[str, float]:
    """What Mosquitto carries: the same messages to a subscriber that only counts them."""
    total = sum(len(payload) for ms in messages.values() for _, payload in ms)
    count = sum(len(ms) for ms in messages.values())
    got = {"n": 0, "bytes": 0, "last": 0.0}
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        got["n"] += 1
        got["bytes"] += len(message.payload)
        if got["n"] >= count:
            got["last"] = time.monotonic()
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-null", protocol=mqtt.MQTTv5)
    client.username_pw_set("central", home.central_password)
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = 2048
    client.connect("127.0.0.1", broker.port, properties=props)
    client.loop_start()
    client.subscribe("$share/central/sohoa/v1/up/#", qos=1)
    if not subscribed.wait(10):
        raise TimeoutError("null subscriber got no SUBACK")
    start = _start_line(root)
    plan = Plan(port=home.device_port, start_file=str(start), init_properties=(RECEIPT_IS_STORED,),
                devices=tuple(DevicePlan(d, d, password, tuple(ms)) for d, ms in messages.items()))
    connected = threading.Event()
    result: dict[str, object] = {}
    runner = threading.Thread(target=lambda: result.update(run_load(root, plan, on_connected=connected)))
    runner.start()
    connected.wait(600)
    cpu_before = time.process_time()
    start.touch()
    if not done.wait(900):
        raise TimeoutError(f"baseline: {got['n']} of {count} messages arrived")
    runner.join()
    client.disconnect()
    client.loop_stop()
    seconds = got["last"] - float(str(result["first_publish"]))
    cpu = time.process_time() - cpu_before
    # The counting subscriber's CPU (paho's receive path alone) per message, to set central's against.
    return {"seconds": seconds, "bytes": total, "mb_s": total / seconds / MB, "messages": count,
            "subscriber_cpu_us_per_message": round(cpu * 1e6 / count, 1)}


@contextlib.contextmanager
def running_central(home: Home, log: Path, *, strace: Path | None = None, profile: Path | None = None,
                    worker: str | None = None, gil: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    argv = [sys.executable, "-m", "sohoa.cli", "central", "run", "--home", str(home.path)]
    if worker is not None:
        argv += ["--worker", worker]
    if profile is not None:
        # Collapsed stacks (one line per stack, with its sample count): greppable, and
        # flamegraph.pl or speedscope draw them.
        argv = [str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw",
                "--threads", "-r", "200", *(["--gil"] if gil else []), "-o", str(profile), "--", *argv]
    if strace is not None:
        argv = ["strace", "-f", "-c", "-e", "trace=fsync,fdatasync,sync_file_range,syncfs", "-o", str(strace),
                *argv]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=_env(home.code),
                                cwd=home.code)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"central exited: see {log}")
            if "subscriptions acknowledged" in log.read_text(errors="replace") or _healthy(home, worker):
                break
            time.sleep(0.1)
        else:
            raise TimeoutError(f"central did not come up: see {log}")
        yield proc
    finally:
        if profile is not None or strace is not None:
            # Stop central itself; the tracer then writes what it gathered and exits.
            for child in psutil.Process(proc.pid).children():
                child.terminate()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _healthy(home: Home, worker: str | None) -> bool:
    if worker is not None:
        return False   # several processes answer on the port: wait for this one's own log line
    url = f"http://127.0.0.1:{home.http_port}/healthz"
    with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=1) as r:
        return bool(json.loads(r.read()).get("mqtt_connected"))
    return False


def _central_pid(proc: subprocess.Popen[bytes], strace: bool) -> psutil.Process:
    process = psutil.Process(proc.pid)
    if strace:   # the python child of strace
        for _ in range(100):
            children = process.children()
            if children:
                return children[0]
            time.sleep(0.05)
    return process


def central_run(root: Path, home: Home, messages: dict[str, list[tuple[str, bytes]]], password: str,
                docs: int, *, strace: bool = False, profile: Path | None = None,
                workers: int = 1, gil: bool = False) -> dict[str, Any]:
    """Run ``workers`` central processes on ``home`` (one: the plain ``central run``) until every
    device has its receipts."""
    total = sum(len(payload) for ms in messages.values() for _, payload in ms)
    trace = root / f"strace-{home.path.name}.txt" if strace else None
    names: list[str | None] = [None] if workers == 1 else [f"w{n}" for n in range(workers)]
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(running_central(
            home, root / f"central-{home.path.name}{'' if name is None else '-' + name}.log",
            strace=trace if n == 0 else None, profile=profile if n == 0 else None, worker=name, gil=gil))
            for n, name in enumerate(names)]
        centrals = [_central_pid(proc, strace or profile is not None) for proc in procs]
        start = _start_line(root)
        plan = Plan(port=home.device_port, start_file=str(start), init_properties=(RECEIPT_IS_STORED,),
                    devices=tuple(DevicePlan(d, d, password, tuple(ms), expect=docs,
                                             subscribe=f"sohoa/v1/down/{d}/#") for d, ms in messages.items()))
        connected = threading.Event()
        result: dict[str, object] = {}
        runner = threading.Thread(target=lambda: result.update(run_load(root, plan, on_connected=connected)))
        runner.start()
        connected.wait(600)
        cpu_before = [sum(c.cpu_times()[:4]) for c in centrals]
        start.touch()
        runner.join()
        cpu_each = [sum(c.cpu_times()[:4]) - before for c, before in zip(centrals, cpu_before, strict=True)]
    seconds = float(str(result["last_expected"])) - float(str(result["first_publish"]))
    documents = docs * len(messages)
    for log in sorted(root.glob(f"central-{home.path.name}*.log")):
        stats = [line for line in log.read_text().splitlines()
                 if "ingest: " in line or "cpu seconds by thread: " in line]
        for line in stats[-2:]:
            print(f"{log.stem}: {line}", file=sys.stderr)
    messages_in = sum(len(ms) for ms in messages.values())
    cpu = sum(cpu_each)
    out: dict[str, Any] = {
        "seconds": seconds, "bytes": total, "mb_s": total / seconds / MB, "documents": documents,
        "docs_s": documents / seconds, "cpu_ms_per_doc": cpu * 1000 / documents,
        "cpu_us_per_message": round(cpu * 1e6 / messages_in, 1), "workers": workers,
        "cpu_s_per_worker": [round(c, 2) for c in cpu_each]}
    if trace is not None:
        out["fsyncs_per_doc"] = _strace_calls(trace) / documents
    if result.get("errors"):
        out["errors"] = result["errors"]
    return out


def workers_ratio(*, devices: int, workers: int = 3, docs: int = 1, size: int = 110_000,
                  keep: Path | None = None) -> dict[str, Any]:
    """``workers`` central processes on one home against one, the same workload, same run."""
    password = "bench-device-password"
    with contextlib.ExitStack() as stack:
        root = keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sohoa-workers-")))
        root.mkdir(parents=True, exist_ok=True)
        keys = {f"xa-{n:05d}": nacl.signing.SigningKey.generate() for n in range(devices)}
        one = make_home(root, ROOT, "one")
        messages = workload(root, one, devices, docs, size, keys)
        many = make_home(root, ROOT, "many")
        share_keys(one, many)
        enroll_direct(many, keys, password)
        with running_broker(one.path / "mosquitto.conf", one.broker_port, root / "broker-one.log"):
            single = central_run(root, one, messages, password, docs)
        with running_broker(many.path / "mosquitto.conf", many.broker_port, root / "broker-many.log"):
            several = central_run(root, many, messages, password, docs, workers=workers)
    cores = os.cpu_count() or 1
    per_doc_ms = several["cpu_ms_per_doc"]
    return {"value": round(several["mb_s"] / single["mb_s"], 3),
            "baseline": f"one worker, same devices and messages ({cores} cores)",
            "details": {"one": single, "several": several,
                        # What one core of ingest carries, from the measured CPU per document.
                        "docs_per_core_s": round(1000 / per_doc_ms, 1),
                        "mb_per_core_s": round(
                            1000 / per_doc_ms * several["bytes"] / several["documents"] / MB, 2)}}


def thread_cpu(process: psutil.Process) -> dict[str, float]:
    """CPU seconds per thread name (assembler_0..7 summed as 'assembler')."""
    out: dict[str, float] = {}
    for thread in process.threads():
        try:
            name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
        except OSError:
            continue
        name = name.rstrip("0123456789_").removesuffix("_") or name
        out[name] = out.get(name, 0.0) + thread.user_time + thread.system_time
    return out


def _strace_calls(trace: Path) -> int:
    calls = 0
    for line in trace.read_text().splitlines():
        parts = line.split()
        if parts and parts[-1] in ("fsync", "fdatasync", "sync_file_range"):
            calls += int(parts[3]) if len(parts) >= 6 else int(parts[-2])
    return calls


def workload(root: Path, home: Home, devices: int, docs: int, size: int,
             keys: dict[str, nacl.signing.SigningKey]) -> dict[str, list[tuple[str, bytes]]]:
    password = "bench-device-password"
    enroll_direct(home, keys, password)
    return seal_all(home, keys, docs, size)


def configure(home: Home, settings: list[str]) -> None:
    """Set ``[ingest]`` keys of central.toml (``assembler_processes=2``) for the code under test."""
    import tomli_w  # noqa: PLC0415

    path = home.path / "central.toml"
    data = tomllib.loads(path.read_text())
    for setting in settings:
        key, _, value = setting.partition("=")
        data["ingest"][key] = int(value) if value.isdigit() else value
    path.write_text(tomli_w.dumps(data))


def share_keys(source: Home, target: Home) -> None:
    """Same central keys in both homes, so one sealed workload serves both runs."""
    for name in ("encryption.key", "receipt.key"):
        shutil.copy2(source.path / "keys" / name, target.path / "keys" / name)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(args: argparse.Namespace) -> dict[str, object]:
    figures: dict[str, object] = {"cores": os.cpu_count(), "load_before": load_average(),
                                  "devices": args.devices, "docs_per_device": args.docs,
                                  "original_bytes": args.size}
    password = "bench-device-password"
    with contextlib.ExitStack() as stack:
        root = Path(args.keep) if args.keep else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="sohoa-ingest-")))
        root.mkdir(parents=True, exist_ok=True)
        keys = {f"xa-{n:05d}": nacl.signing.SigningKey.generate() for n in range(args.devices)}
        after = make_home(root, ROOT, "after")
        configure(after, args.ingest)
        messages = workload(root, after, args.devices, args.docs, args.size, keys)
        with running_broker(after.path / "mosquitto.conf", after.broker_port,
                            root / "broker-after.log") as broker:
            figures["raw"] = raw_baseline(root, after, broker, messages, password)
            figures["central"] = central_run(root, after, messages, password, args.docs, strace=args.strace,
                                             profile=Path(args.profile) if args.profile else None,
                                             gil=args.gil)
        if args.before:
            before = make_home(root, Path(args.before).resolve(), "before")
            share_keys(after, before)
            enroll_direct(before, keys, password)
            with running_broker(before.path / "mosquitto.conf", before.broker_port,
                                root / "broker-before.log"):
                figures["central_before"] = central_run(root, before, messages, password, args.docs,
                                                        strace=args.strace)
        if args.big_mib:
            big = make_home(root, ROOT, "big")
            key = {"xa-lon": nacl.signing.SigningKey.generate()}
            big_messages = workload(root, big, 1, 1, args.big_mib * 1024 * 1024, key)
            with running_broker(big.path / "mosquitto.conf", big.broker_port, root / "broker-big.log"):
                figures["big"] = central_run(root, big, big_messages, password, 1)
            if args.before:
                big_before = make_home(root, Path(args.before).resolve(), "big-before")
                share_keys(big, big_before)
                enroll_direct(big_before, key, password)
                with running_broker(big_before.path / "mosquitto.conf", big_before.broker_port,
                                    root / "broker-big-before.log"):
                    figures["big_before"] = central_run(root, big_before, big_messages, password, 1)
    raw = figures["raw"]
    central = figures["central"]
    assert isinstance(raw, dict) and isinstance(central, dict)
    figures["central_ingest_ratio"] = round(central["mb_s"] / raw["mb_s"], 3)
    if "central_before" in figures:
        before_figures = figures["central_before"]
        assert isinstance(before_figures, dict)
        figures["central_ingest_ratio_before"] = round(before_figures["mb_s"] / raw["mb_s"], 3)
    figures["load_after"] = load_average()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--docs", type=int, default=1, help="documents per device")
    parser.add_argument("--size", type=int, default=110_000, help="bytes per original (incompressible)")
    parser.add_argument("--before", help="a source tree of the code to compare against (e.g. main)")
    parser.add_argument("--strace", action="store_true", help="count fsync/fdatasync per document")
    parser.add_argument("--big-mib", type=int, default=0, help="also time one transfer of this many MiB")
    parser.add_argument("--profile", help="py-spy record central (after) into this file (collapsed stacks)")
    parser.add_argument("--gil", action="store_true",
                        help="with --profile: sample only the thread holding the GIL (central's Python "
                             "work is one core's worth: this is what limits it)")
    parser.add_argument("--ingest", action="append", default=[], metavar="KEY=VALUE",
                        help="an [ingest] setting of central.toml for the code under test")
    parser.add_argument("--keep", help="work in this directory and keep it (logs, homes)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = measure(args)
    print(json.dumps(figures, indent=1) if args.json else _table(figures))
    return 0


def _table(figures: dict[str, object]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in figures.items())


if __name__ == "__main__":
    raise SystemExit(main())
