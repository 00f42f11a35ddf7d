"""The Ansible roles against booted Debian 12 containers: one central+broker, two commune boxes.

In order (each test builds on the one before): site.yml converges; a second run changes nothing;
units are active and their `systemd-analyze security` exposure is recorded; a scan written with
smbclient into a box's Samba share reaches central and is found by full-text search; kill -9 of
the edge service → systemd restarts it and nothing is lost; `systemctl restart` while tesseract
reads a page does not wait for the page and charges the scan no attempt; SIGHUP reloads without a
restart;
upgrade.yml rolls a newer wheel through both boxes with the health gate passing, and stops at a box
whose gate fails, naming it; revoke.yml cuts a box off.

Runs when CI=true or SOHOA_FLEET=1 (it boots three containers: about 22 minutes on 2 cores) and
skips with the reason on a machine that cannot boot them. Figures go to FLEET_REPORT (printed at the
end of the run by .ci/run).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fleet.machines import BASE_PACKAGES, SUITE, FleetError, Machine, build_base, run, why_not_here
from tests.support.broker import free_port

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
ANSIBLE_BIN = Path(os.environ.get("SOHOA_ANSIBLE_BIN", ROOT / ".venv-ansible" / "bin"))
SMB_PASSWORD = "quet-tai-lieu-2026"   # the test scanner's Samba password
CENTRAL = "luu-tru-tinh"
EDGES = {"xa-tan-trao": "Xã Tân Trào", "xa-hong-thai": "Xã Hồng Thái"}
REPORT = Path(os.environ.get("FLEET_REPORT", ROOT / ".fleet-report.txt"))

pytestmark = pytest.mark.timeout(2700)


def _wanted() -> str | None:
    flag = os.environ.get("SOHOA_FLEET", "")
    if flag == "0":
        return "SOHOA_FLEET=0"
    if flag != "1" and os.environ.get("CI", "").lower() != "true":
        return ("boots three Debian containers (~22 min on 2 cores): runs in CI (CI=true) or with "
                "SOHOA_FLEET=1")
    if not (ANSIBLE_BIN / "ansible-playbook").exists():
        return f"no ansible-playbook in {ANSIBLE_BIN} (make ansible-venv)"
    return why_not_here()


def report(line: str) -> None:
    with REPORT.open("a", encoding="utf-8") as out:
        out.write(line + "\n")
    print(line, file=sys.stderr)


@dataclass
class Fleet:
    workdir: Path
    wheelhouse: Path
    inventory: Path
    key: Path
    central: Machine
    edges: dict[str, Machine]
    ports: dict[str, int]
    version: str
    timings: dict[str, float] = field(default_factory=dict)

    def playbook(self, name: str, *extra: str, timeout: float = 1500,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
               "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_LOCAL_TEMP": str(self.workdir / "ansible-tmp"),
               "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.workdir / "cp"),
               "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3"}
        started = time.monotonic()
        done = run([str(ANSIBLE_BIN / "ansible-playbook"), "-i", str(self.inventory),
                    str(ANSIBLE / name), *extra], timeout=timeout, check=False, env=env)
        elapsed = time.monotonic() - started
        (self.workdir / f"{name}-{int(time.time())}.log").write_text(done.stdout + done.stderr)
        if check and done.returncode != 0:
            raise FleetError(f"{name} failed (exit {done.returncode}) after {elapsed:.0f} s:\n"
                             f"{done.stdout[-6000:]}\n{done.stderr[-2000:]}")
        self.timings[name] = elapsed
        return done

    def api(self, path: str, **params: str) -> object:
        token = (self.central.root / "var/lib/sohoa-central/api-token").read_text().strip()
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports['http']}{path}{query}",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def documents(self, device: str, q: str = "") -> list[dict[str, object]]:
        params = {"device": device, **({"q": q} if q else {})}
        found = self.api("/api/documents", **params)
        assert isinstance(found, list)
        return found

    def smb_put(self, edge: str, local: Path, remote_name: str) -> None:
        run(["smbclient", "//127.0.0.1/scans", "-p", str(self.ports[f"smb-{edge}"]),
             "-U", f"scanner%{SMB_PASSWORD}", "-c", f'put "{local}" "{remote_name}"'], timeout=60)

    def unit(self, machine: Machine, unit: str) -> dict[str, str]:
        shown = machine.sh(f"systemctl show -p ActiveState,MainPID,NRestarts {unit}").stdout
        return dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)


def recap(output: str) -> dict[str, dict[str, int]]:
    hosts: dict[str, dict[str, int]] = {}
    for match in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", output, re.MULTILINE):
        hosts[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
    return hosts


def _changed(totals: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{host}={counts['changed']}" for host, counts in totals.items())


def journal_with(machine: Machine, text: str, since: str = "") -> str | None:
    """The edge unit's journal (message text only) if it contains ``text``."""
    option = f"--since '{since}'" if since else "-n 200"
    out = machine.sh(f"journalctl -u sohoa-edge.service -o cat --no-pager {option}").stdout
    return out if text in out else None


def wait(predicate, within: float, what: str, interval: float = 2.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within:.0f} s")
        time.sleep(interval)


def _build_wheel(version: str | None, into: Path, scratch: Path, *, deps: bool = False) -> None:
    """A wheel of this checkout (under another version number: what an upgrade ships), built from
    a copy so the checkout gets no build/ or egg-info; ``deps`` adds every dependency's wheel."""
    source = scratch / f"src-{version or 'current'}"
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "protocol", "edge", "central", "sohoa"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    if version is not None:
        pyproject = source / "pyproject.toml"
        pyproject.write_text(re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', pyproject.read_text()))
    # With deps: both sides' extras, since the roles install sohoa[central] and sohoa[edge].
    run([sys.executable, "-m", "pip", "wheel", "--quiet", *(() if deps else ("--no-deps",)),
         "--wheel-dir", str(into), f"{source}[edge,central]" if deps else str(source)], timeout=900)


def _sample_pages(into: Path, seed: int) -> list[Path]:
    """Sample scans (PDF, TIFF, JPEG, PNG); another seed gives other bytes, so no scan of one test
    is a duplicate of another's (the edge would rightly drop a re-drop of a receipted scan)."""
    from edge.samples import generate_samples  # noqa: PLC0415 - only when the fleet test runs

    return [sample.path for sample in generate_samples(into, pages=4, seed=seed)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    reason = _wanted()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    REPORT.write_text("")
    cache_key = hashlib.sha256(f"{SUITE} {BASE_PACKAGES}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("SOHOA_FLEET_CACHE", f"/var/tmp/sohoa-fleet-cache-{cache_key}"))
    attach = os.environ.get("SOHOA_FLEET_ATTACH")
    if attach:   # developers: boot the kept containers of an earlier run (SOHOA_FLEET_KEEP=1) again
        yield from _attach(Path(attach))
        return
    workdir = Path(f"/var/tmp/sohoa-fleet-run-{os.getpid()}")
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "cp").mkdir(parents=True)
    (workdir / "ansible-tmp").mkdir()
    machines: list[Machine] = []
    try:
        cached = (cache / "base.complete").exists()
        t0 = time.monotonic()
        base = build_base(cache)
        report(f"base tree: {'reused from ' + str(cache) if cached else 'debootstrap'} "
               f"{time.monotonic() - t0:.0f} s")
        key = workdir / "id_ed25519"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], timeout=30)
        ports = {"ssh-central": free_port(), "broker": free_port(), "device": free_port(),
                 "http": free_port()}
        central = Machine(CENTRAL, workdir / CENTRAL, ports["ssh-central"], workdir / f"{CENTRAL}.log")
        edges: dict[str, Machine] = {}
        for name in EDGES:
            ports[f"ssh-{name}"], ports[f"smb-{name}"] = free_port(), free_port()
            edges[name] = Machine(name, workdir / name, ports[f"ssh-{name}"], workdir / f"{name}.log")
        machines = [central, *edges.values()]
        t0 = time.monotonic()
        for machine in machines:
            machine.prepare(base, (key.with_suffix(".pub")).read_text())
            machine.boot()
        report(f"three containers copied and booted: {time.monotonic() - t0:.0f} s")
        t0 = time.monotonic()
        wheelhouse = workdir / "wheelhouse"
        _build_wheel(None, wheelhouse, workdir, deps=True)
        version = next(wheelhouse.glob("sohoa-*.whl")).name.split("-")[1]
        report(f"wheelhouse (sohoa {version} + dependencies, "
               f"{sum(p.stat().st_size for p in wheelhouse.iterdir()) / 1e6:.0f} MB): "
               f"{time.monotonic() - t0:.0f} s")
        inventory = workdir / "inventory.yml"
        common = {"ansible_host": "127.0.0.1", "ansible_user": "root",
                  "ansible_ssh_private_key_file": str(key),
                  "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                  "sohoa_version": version, "sohoa_wheelhouse": str(wheelhouse)}
        edge_hosts = {name: {"ansible_port": ports[f"ssh-{name}"], "sohoa_commune_name": commune,
                             "sohoa_edge_smb_port": ports[f"smb-{name}"],
                             "sohoa_edge_smb_interfaces": ["127.0.0.1"],
                             "sohoa_edge_smb_password": SMB_PASSWORD, "sohoa_edge_uplink_rate_kbit": 2048}
                      for name, commune in EDGES.items()}
        inventory.write_text(json.dumps({"all": {"vars": common, "children": {
            "sohoa_central": {"hosts": {CENTRAL: {
                "ansible_port": ports["ssh-central"], "sohoa_commune_name": "Lưu trữ tỉnh Tuyên Quang",
                "sohoa_central_broker_url": f"mqtt://127.0.0.1:{ports['broker']}",
                "sohoa_central_device_broker_url": f"mqtts://127.0.0.1:{ports['device']}",
                "sohoa_central_http_listen": f"127.0.0.1:{ports['http']}",
                "sohoa_broker_port": ports["broker"], "sohoa_broker_device_port": ports["device"],
                "sohoa_broker_device_bind": "127.0.0.1"}}},
            "sohoa_edges": {"children": {"tuyen_quang": {"hosts": edge_hosts}}},
        }}}, ensure_ascii=False, indent=1))
        yield Fleet(workdir, wheelhouse, inventory, key, central, edges, ports, version)
    finally:
        for machine in machines:
            try:
                machine.stop()
            except Exception as exc:
                print(f"stopping {machine.name}: {exc}", file=sys.stderr)
        if os.environ.get("SOHOA_FLEET_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}: SOHOA_FLEET_ATTACH={workdir} boots it again", file=sys.stderr)
        report(f"fleet test total (setup, scenarios, teardown): {time.monotonic() - started:.0f} s")


def _attach(workdir: Path) -> Iterator[Fleet]:
    inventory = workdir / "inventory.yml"
    children = json.loads(inventory.read_text())["all"]["children"]
    central_vars = children["sohoa_central"]["hosts"][CENTRAL]
    edge_vars = children["sohoa_edges"]["children"]["tuyen_quang"]["hosts"]
    ports = {"ssh-central": central_vars["ansible_port"], "broker": central_vars["sohoa_broker_port"],
             "device": central_vars["sohoa_broker_device_port"],
             "http": int(central_vars["sohoa_central_http_listen"].rsplit(":", 1)[1])}
    for name, host in edge_vars.items():
        ports[f"ssh-{name}"], ports[f"smb-{name}"] = host["ansible_port"], host["sohoa_edge_smb_port"]
    central = Machine(CENTRAL, workdir / CENTRAL, ports["ssh-central"], workdir / f"{CENTRAL}.log")
    edges = {name: Machine(name, workdir / name, ports[f"ssh-{name}"], workdir / f"{name}.log")
             for name in edge_vars}
    machines = [central, *edges.values()]
    try:
        for machine in machines:
            machine.boot()
        version = json.loads(inventory.read_text())["all"]["vars"]["sohoa_version"]
        yield Fleet(workdir, workdir / "wheelhouse", inventory, workdir / "id_ed25519", central, edges, ports,
                    version)
    finally:
        for machine in machines:
            machine.stop()


def test_site_converges_then_changes_nothing(fleet: Fleet) -> None:
    first = fleet.playbook("site.yml")
    totals = recap(first.stdout)
    assert set(totals) == {CENTRAL, *EDGES} and all(h["failed"] == 0 for h in totals.values()), totals
    report(f"site.yml first converge: {fleet.timings['site.yml']:.0f} s (changed: {_changed(totals)})")
    second = fleet.playbook("site.yml")
    totals = recap(second.stdout)
    report(f"site.yml second run: {fleet.timings['site.yml']:.0f} s (changed: {_changed(totals)})")
    assert all(h["changed"] == 0 and h["failed"] == 0 for h in totals.values()), second.stdout[-5000:]


def test_units_active_and_their_exposure(fleet: Fleet) -> None:
    units = [(fleet.central, "sohoa-broker.service"), (fleet.central, "sohoa-central.service"),
             *((edge, "sohoa-edge.service") for edge in fleet.edges.values()),
             *((edge, "smbd.service") for edge in fleet.edges.values())]
    for machine, unit in units:
        assert fleet.unit(machine, unit)["ActiveState"] == "active", (machine.name, unit)
    for machine, unit in units[:3]:
        shown = machine.sh(f"systemd-analyze security --no-pager {unit}", check=False).stdout
        level = re.search(r"Overall exposure level for \S+: (\S+ \S+)", shown)
        exposure = level.group(1) if level else shown[-300:]
        report(f"systemd-analyze security {unit} on {machine.name}: {exposure}")
        assert level is not None
        assert float(level.group(1).split()[0]) < 5.0, shown   # "OK" is below 5 (MEDIUM from 5)


def test_scan_into_samba_share_reaches_central_and_is_searchable(fleet: Fleet) -> None:
    page = _sample_pages(fleet.workdir / "pages", seed=1)[0]
    edge = "xa-tan-trao"
    started = time.monotonic()
    fleet.smb_put(edge, page, f"Tờ trình số 1{page.suffix}")
    found = wait(lambda: fleet.documents(edge, q="hanh phuc"), 240, "the scan searchable at central")
    report(f"smbclient put -> searchable at central (OCR + sync inside containers): "
           f"{time.monotonic() - started:.0f} s; {found[0]['filename']!r} found by its OCR text "
           "without diacritics ('hanh phuc')")
    assert found[0]["filename"] == f"Tờ trình số 1{page.suffix}"
    machine = fleet.edges[edge]
    assert machine.sh("ls -A /srv/sohoa/scans").stdout.strip() == ""   # taken out of the share


def test_kill_9_of_the_edge_service_loses_nothing(fleet: Fleet) -> None:
    edge = "xa-tan-trao"
    machine = fleet.edges[edge]
    before = fleet.unit(machine, "sohoa-edge.service")
    pages = _sample_pages(fleet.workdir / "pages-kill", seed=2)
    names = [f"kill-{index}{page.suffix}" for index, page in enumerate(pages)]
    for page, name in zip(pages, names, strict=True):
        fleet.smb_put(edge, page, name)
    # Mid-work: as soon as the service has taken the first scan out of the share.
    wait(lambda: len(machine.sh("ls -A /srv/sohoa/scans").stdout.split()) < len(pages), 60,
         "the service taking scans", interval=0.2)
    machine.sh(f"kill -9 {before['MainPID']}")
    killed_at = time.monotonic()
    after = wait(lambda: (u := fleet.unit(machine, "sohoa-edge.service"))["ActiveState"] == "active"
                 and u["MainPID"] not in ("0", before["MainPID"]) and u, 60, "systemd restarting the service",
                 interval=0.5)
    restarted = time.monotonic() - killed_at
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    # Stored, not only catalogued: a notice makes a document searchable before its original is in.
    def stored() -> list[str]:
        return sorted(str(d["filename"]) for d in fleet.documents(edge)
                      if d.get("state") == "stored" and str(d["filename"]).startswith("kill-"))

    wait(lambda: stored() == sorted(names), 300, "every scan stored at central")
    status = json.loads(machine.sh("runuser -u sohoa-edge -- /opt/sohoa/venv/bin/sohoa edge status "
                                   "--home /var/lib/sohoa-edge --json").stdout)
    assert status["failed"] == [] and status["queued_docs"] == 0, status
    at_central = sorted(str(d["filename"]) for d in fleet.documents(edge))
    assert sorted(names) == [n for n in at_central if n.startswith("kill-")]
    report(f"kill -9 of sohoa-edge: restarted by systemd in {restarted:.1f} s (NRestarts "
           f"{before['NRestarts']}->{after['NRestarts']}); {len(pages)}/{len(pages)} scans at central, "
           "none failed, none duplicated")


def _pids(machine: Machine, command: str) -> set[str]:
    """The pids of ``command`` in the container (minbase has no procps: /proc read directly)."""
    listed = machine.sh(f"for c in /proc/[0-9]*/comm; do [ \"$(cat $c 2>/dev/null)\" = {command} ] && "
                        "basename ${c%/comm}; done; true").stdout
    return set(listed.split())


def test_a_restart_mid_page_does_not_wait_for_it_and_charges_no_attempt(fleet: Fleet) -> None:
    """`systemctl restart` (what every upgrade does) while tesseract reads a page: under systemd,
    with the unit as Ansible installs it, the stop kills the page's tesseract at once, and the scan
    is read again after the start without a counted failed attempt."""
    edge = "xa-tan-trao"
    machine = fleet.edges[edge]
    since = machine.sh("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    pages = _sample_pages(fleet.workdir / "pages-restart", seed=4)
    names = [f"restart-{index}{page.suffix}" for index, page in enumerate(pages)]
    for page, name in zip(pages, names, strict=True):
        fleet.smb_put(edge, page, name)
    reading = wait(lambda: _pids(machine, "tesseract"), 120, "tesseract reading a page", interval=0.1)
    started = time.monotonic()
    machine.sh("systemctl restart sohoa-edge.service", timeout=120)   # returns once READY=1 again
    restarted = time.monotonic() - started
    left = reading & _pids(machine, "tesseract")
    assert not left, f"tesseract {left} outlived the service that started it"
    assert restarted < 25, f"the restart took {restarted:.1f} s: the stop waited for the page"

    def stored() -> list[str]:
        return sorted(str(d["filename"]) for d in fleet.documents(edge)
                      if d.get("state") == "stored" and str(d["filename"]).startswith("restart-"))

    wait(lambda: stored() == sorted(names), 300, "every scan stored at central")
    charged = machine.sh(f"journalctl -u sohoa-edge.service --since '{since}' --no-pager -o cat "
                         "| grep -c 'failed (attempt' || true").stdout.strip()
    assert charged == "0", machine.sh(f"journalctl -u sohoa-edge.service --since '{since}' -o cat").stdout
    report(f"systemctl restart of sohoa-edge while tesseract read a page: {restarted:.1f} s (stop and "
           f"start), its tesseract gone; {len(pages)}/{len(pages)} scans stored, no attempt charged")


def test_sighup_reloads_without_restart(fleet: Fleet) -> None:
    machine = fleet.edges["xa-hong-thai"]
    before = fleet.unit(machine, "sohoa-edge.service")
    machine.sh("sed -i 's/^rate_kbit = .*/rate_kbit = 128.0/' /var/lib/sohoa-edge/edge.toml")
    machine.sh("systemctl reload sohoa-edge.service")
    after = fleet.unit(machine, "sohoa-edge.service")
    assert (after["MainPID"], after["NRestarts"], after["ActiveState"]) == (
        before["MainPID"], before["NRestarts"], "active")
    journal = wait(lambda: journal_with(machine, "reloaded: uplink.rate_kbit=128"), 20,
                   "the reload in the journal")
    assert "<" not in journal.split("reloaded:")[0][-40:]   # journald parsed the priority prefix
    report(f"SIGHUP (systemctl reload): same MainPID {after['MainPID']}, NRestarts {after['NRestarts']}; "
           "journal: 'reloaded: uplink.rate_kbit=128 …'")
    # Back to what Ansible manages, through Ansible: only a reload, never a restart.
    done = fleet.playbook("site.yml", "--limit", "xa-hong-thai")
    assert "RUNNING HANDLER [sohoa_edge : Reload sohoa-edge]" in done.stdout
    assert "RUNNING HANDLER [sohoa_edge : Restart sohoa-edge]" not in done.stdout
    assert fleet.unit(machine, "sohoa-edge.service")["MainPID"] == before["MainPID"]


def _versions(fleet: Fleet) -> dict[str, str]:
    return {name: machine.sh("/opt/sohoa/venv/bin/sohoa --version").stdout.split()[1]
            for name, machine in fleet.edges.items()}


def test_upgrade_rolls_through_both_boxes_with_the_gate_passing(fleet: Fleet) -> None:
    _build_wheel("0.1.1", fleet.wheelhouse, fleet.workdir)
    done = fleet.playbook("upgrade.yml", "-e", "sohoa_version=0.1.1", "-e", '{"sohoa_upgrade_batches": [1]}')
    assert _versions(fleet) == dict.fromkeys(EDGES, "0.1.1")
    assert "health gate failed" not in done.stdout
    report(f"upgrade.yml 0.1.0 -> 0.1.1, serial 1, gate passing on both boxes: "
           f"{fleet.timings['upgrade.yml']:.0f} s")


def test_upgrade_stops_at_a_box_whose_gate_fails(fleet: Fleet) -> None:
    broken = fleet.edges["xa-tan-trao"]
    # A box that will not come back on the new release: an unknown key in its configuration.
    broken.sh("printf '\\n[mystery]\\nsetting = 1\\n' >> /var/lib/sohoa-edge/edge.toml")
    _build_wheel("0.1.2", fleet.wheelhouse, fleet.workdir)
    done = fleet.playbook("upgrade.yml", "-e", "sohoa_version=0.1.2", "-e", '{"sohoa_upgrade_batches": [1]}',
                          "-e", "sohoa_upgrade_gate_retries=8", check=False)
    assert done.returncode != 0
    assert "health gate failed on xa-tan-trao (Xã Tân Trào)" in done.stdout, done.stdout[-4000:]
    assert _versions(fleet)["xa-hong-thai"] == "0.1.1"   # the roll-out stopped before it
    message = next(line.strip() for line in done.stdout.splitlines() if "health gate failed on" in line)
    report(f"upgrade.yml 0.1.1 -> 0.1.2 with xa-tan-trao broken: stopped at xa-tan-trao, "
           f"xa-hong-thai left on 0.1.1; message: {message[:200]}")
    broken.sh("sed -i '/^\\[mystery\\]$/,$d' /var/lib/sohoa-edge/edge.toml && systemctl restart sohoa-edge")
    wait(lambda: fleet.unit(broken, "sohoa-edge.service")["ActiveState"] == "active", 60, "repaired box")


def test_revoke_cuts_a_box_off(fleet: Fleet) -> None:
    edge = "xa-hong-thai"
    machine = fleet.edges[edge]
    count = len(fleet.documents(edge))
    since = machine.sh("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    fleet.playbook("revoke.yml", "-e", f"sohoa_revoke_device={edge}", "-e", "sohoa_revoke_stop_edge=false")
    # Its session is cut and it cannot log in again: the running service reports it.
    journal = wait(lambda: journal_with(machine, "cannot reach the broker", since), 60,
                   "the box failing to reconnect")
    page = _sample_pages(fleet.workdir / "pages-revoked", seed=3)[0]
    fleet.smb_put(edge, page, f"sau-thu-hoi{page.suffix}")
    time.sleep(30)
    assert len(fleet.documents(edge)) == count, "a revoked box's scan reached the catalog"
    refusal = next(line for line in journal.splitlines() if "cannot reach the broker" in line)
    report(f"revoke.yml {edge}: live session cut, reconnect refused ({refusal.strip()[:140]}); "
           f"a scan dropped afterwards never reached central")
