"""tegrastats: a field-by-field parser and a child process we own.

The line format changed across L4T releases (research/jetson.md section 2.2): R32 has no date
prefix and unitless power, R35 adds the date, ``GR3D_FREQ x%@[f]`` and ``mW``, R36 lists one
frequency per GPC and ``off`` engines, Thor drops the GPU load and R39 writes temperature pairs
and three-value rails. One regular expression per field, each optional, copes with all of them;
a line without a RAM field is not a tegrastats line and parses to None.
"""

import logging
import re
import shutil
import subprocess
import threading
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["TegraSample", "parse_line", "TegrastatsMonitor"]

log = logging.getLogger("surgeond.memory")

_UNIT_MB = {"k": 1.0 / 1024, "K": 1.0 / 1024, "M": 1.0, "G": 1024.0}
_DATE = re.compile(r"^\s*\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2}\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)([kKMG])B(?: ?\(lfb (\d+)x(\d+)([kKMG])B\))?")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)([kKMG])B(?: ?\(cached (\d+)([kKMG])B\))?")
_CPU = re.compile(r"\bCPU \[(.*?)\](?:@(\d+))?")     # R28's form: one clock after the list
_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\b(GR3D\d*)_FREQ (?:(\d+)%)?(?:@\[?([\d,]+)\]?)?")
_TEMP = re.compile(r"\b([A-Za-z][\w.]*)@(-?\d+(?:\.\d+)?)C(?:/-?\d+(?:\.\d+)?C)?(?=\s|$)")
_POWER = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/\d+(?:mW)?)?(?=\s|$)")
_OFFLINE_C = -256.0


@dataclass
class TegraSample:
    """One tegrastats line. Memory in MB (2^20), power in mW, temperatures in C."""

    ram_used_mb: float
    ram_total_mb: float
    lfb_blocks: Optional[int] = None
    lfb_block_mb: Optional[float] = None
    swap_used_mb: Optional[float] = None
    swap_total_mb: Optional[float] = None
    swap_cached_mb: Optional[float] = None
    cpu: List[Optional[Tuple[int, int]]] = field(default_factory=list)  # (load %, MHz) or off
    emc_load: Optional[int] = None
    gpu_load: Optional[int] = None               # GR3D_FREQ (the first GPU cluster)
    gpu_mhz: List[int] = field(default_factory=list)
    gpu_loads: Dict[str, Optional[int]] = field(default_factory=dict)   # GR3D, GR3D2, ...
    temperatures: Dict[str, Optional[float]] = field(default_factory=dict)
    power_mw: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # rail: (now, average)

    def as_dict(self) -> Dict:
        """What telemetry publishes (a rail seen twice is already kept as NAME#2)."""
        return asdict(self)


def _mb(value: str, unit: str) -> float:
    return int(value) * _UNIT_MB[unit]


def parse_line(line: str) -> Optional[TegraSample]:
    """Parse one tegrastats line; None for anything that is not one."""
    text = _DATE.sub("", line.strip())
    ram = _RAM.search(text)
    if ram is None:
        return None
    sample = TegraSample(_mb(ram.group(1), ram.group(3)), _mb(ram.group(2), ram.group(3)))
    if ram.group(4):
        sample.lfb_blocks = int(ram.group(4))
        sample.lfb_block_mb = _mb(ram.group(5), ram.group(6))
    swap = _SWAP.search(text)
    if swap:
        sample.swap_used_mb = _mb(swap.group(1), swap.group(3))
        sample.swap_total_mb = _mb(swap.group(2), swap.group(3))
        if swap.group(4):
            sample.swap_cached_mb = _mb(swap.group(4), swap.group(5))
    cpu = _CPU.search(text)
    if cpu:
        shared_mhz = int(cpu.group(2)) if cpu.group(2) else 0
        for core in cpu.group(1).split(","):
            match = _CORE.match(core.strip())
            if match:
                mhz = int(match.group(2)) if match.group(2) else shared_mhz
                sample.cpu.append((int(match.group(1)), mhz))
            elif core.strip() == "off":
                sample.cpu.append(None)
    emc = _EMC.search(text)
    if emc:
        sample.emc_load = int(emc.group(1))
    for index, (engine, load, mhz) in enumerate(_GR3D.findall(text)):
        sample.gpu_loads[engine] = int(load) if load else None
        if index == 0:
            sample.gpu_load = sample.gpu_loads[engine]
            sample.gpu_mhz = [int(f) for f in mhz.split(",") if f]
    for name, value in _TEMP.findall(text):
        celsius = float(value)
        sample.temperatures[name] = None if celsius <= _OFFLINE_C else celsius
    for name, now, average in _POWER.findall(text):
        if name in ("RAM", "SWAP"):
            continue
        key, copy = name, 2
        while key in sample.power_mw:          # a rail name listed twice: keep both
            key, copy = "%s#%d" % (name, copy), copy + 1
        sample.power_mw[key] = (int(now), int(average))
    return sample


class TegrastatsMonitor:
    """Runs ``tegrastats --interval MS`` as our own child and keeps its latest parsed line.

    Never calls ``tegrastats --stop`` (it stops every instance on the board, jtop's included):
    the child is terminated by its PID.
    """

    def __init__(self, executable: str = "tegrastats", interval_ms: int = 1000):
        self.executable, self.interval_ms = executable, interval_ms
        self.latest: Optional[TegraSample] = None
        self.lines = 0
        self.garbage = 0
        self._proc: Optional[subprocess.Popen] = None
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def available(executable: str = "tegrastats") -> bool:
        return shutil.which(executable) is not None

    def start(self) -> "TegrastatsMonitor":
        self._proc = subprocess.Popen([self.executable, "--interval", str(self.interval_ms)],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True, bufsize=1)
        self._thread = threading.Thread(target=self._pump, name="tegrastats", daemon=True)
        self._thread.start()
        return self

    def _pump(self) -> None:
        for line in self._proc.stdout:
            sample = parse_line(line)
            if sample is None:
                self.garbage += 1
            else:
                self.latest, self.lines = sample, self.lines + 1

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(2.0)
        if self._thread is not None:
            self._thread.join(2.0)
        proc.stdout.close()
