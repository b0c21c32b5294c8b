"""Memory probes and the budget policy (DESIGN.md decision 4, research/jetson.md section 2.4).

Sources, in the order the budget trusts them:
1. torch's own counters (CUDA allocated/reserved): what the daemon itself holds;
2. /proc/meminfo MemAvailable (psutil's ``available``), plus NvMapMemUsed on Jetson, where the
   GPU has no memory of its own and CUDA allocations lower MemAvailable but not our RSS;
3. a tegrastats child (RAM, lfb) and jtop's service when present: cross-checks only;
4. NVML on desktop GPUs (free device memory), never on Tegra.

The budget is min(configured cap, share x (available - reserve)); it is re-read every
``poll_s`` and handed to the engine's solver. A budget of 0 pauses the learner, with the reason.
"""

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from .tegrastats import TegraSample, TegrastatsMonitor

__all__ = ["MemorySample", "MemoryProbe", "BudgetPolicy", "read_meminfo", "is_out_of_memory",
           "on_tegra"]

log = logging.getLogger("surgeond.memory")
MB = 2 ** 20

# the Jetson form of a CUDA OOM: the allocator asks NVML for its message and NVML is absent
_OOM_MARKERS = ("out of memory", "NVML_SUCCESS == r INTERNAL ASSERT FAILED",
                "CUDACachingAllocator", "NvMapMemAlloc")


def on_tegra() -> bool:
    return Path("/etc/nv_tegra_release").exists()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's OutOfMemoryError, MemoryError and the Tegra allocator assertions."""
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError)
                                          and any(m in str(exc) for m in _OOM_MARKERS))


def read_meminfo(path: str = "/proc/meminfo") -> Dict[str, int]:
    """``/proc/meminfo`` as bytes per field (MemAvailable, NvMapMemUsed on Jetson, ...)."""
    fields: Dict[str, int] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            fields[name.strip()] = int(parts[0]) * scale
    return fields


@dataclass
class MemorySample:
    """One reading. Bytes; None where the source is not present."""

    available: int                     # what the budget plans on (see MemoryProbe.read)
    total: int
    system_available: int              # MemAvailable
    nvmap_used: Optional[int] = None   # Jetson: GPU allocations (NvMapMemUsed)
    torch_allocated: Optional[int] = None
    torch_reserved: Optional[int] = None
    device_free: Optional[int] = None  # desktop GPU: free device memory (NVML or CUDA)
    process_rss: Optional[int] = None
    lfb_blocks: Optional[int] = None   # tegrastats: largest free blocks (fragmentation)
    jtop: Optional[Dict] = None        # jetson-stats' numeric stats, when configured
    source: str = "meminfo"

    def as_dict(self) -> Dict:
        return asdict(self)


class MemoryProbe:
    """Reads every available memory source; optional ones are started lazily and may be absent.

    Args:
        device: the learner's torch device string (``cpu``, ``cuda``, ``cuda:0``).
        tegrastats: ``auto`` (when the binary exists), ``on`` or ``off``.
        meminfo_path: for tests.
    """

    def __init__(self, device: str = "cpu", tegrastats: str = "auto",
                 tegrastats_path: str = "tegrastats", use_jtop: bool = False,
                 meminfo_path: str = "/proc/meminfo"):
        self.device = device
        self.meminfo_path = meminfo_path
        self.tegra = on_tegra()
        self._tegrastats: Optional[TegrastatsMonitor] = None
        if tegrastats == "on" or (tegrastats == "auto"
                                  and TegrastatsMonitor.available(tegrastats_path)):
            try:
                self._tegrastats = TegrastatsMonitor(tegrastats_path).start()
            except OSError as exc:
                log.warning("tegrastats not started (%s); using /proc/meminfo", exc)
        self._jtop = _open_jtop() if use_jtop else None
        self._nvml = None if self.tegra or not device.startswith("cuda") else _open_nvml(device)

    def close(self) -> None:
        if self._tegrastats is not None:
            self._tegrastats.stop()
        if self._jtop is not None:
            try:
                self._jtop.close()
            except Exception:  # noqa: BLE001 - jtop raises its own exception types
                pass

    @property
    def tegrastats_sample(self) -> Optional[TegraSample]:
        return self._tegrastats.latest if self._tegrastats is not None else None

    def read(self) -> MemorySample:
        info = read_meminfo(self.meminfo_path)
        system_available, total = _system_memory(info)
        sample = MemorySample(available=system_available, total=total,
                              system_available=system_available,
                              nvmap_used=info.get("NvMapMemUsed"), process_rss=_rss())
        allocated, reserved = _torch_counters(self.device)
        sample.torch_allocated, sample.torch_reserved = allocated, reserved
        if self.device.startswith("cuda") and not self.tegra:
            sample.device_free = self._device_free()
            if sample.device_free is not None:
                # the learner's cache lives on the GPU: plan on its free memory, plus what
                # torch's caching allocator holds but does not use
                sample.available = sample.device_free + max(0, (reserved or 0) - (allocated or 0))
                sample.source = "nvml" if self._nvml is not None else "cuda"
        teg = self.tegrastats_sample
        if teg is not None:
            sample.lfb_blocks = teg.lfb_blocks
        if self._jtop is not None:
            sample.jtop = self._jtop_stats()
            if sample.lfb_blocks is None and sample.jtop is not None:
                sample.lfb_blocks = sample.jtop.get("lfb_blocks")
        return sample

    def _jtop_stats(self) -> Optional[Dict]:
        """jtop's ``stats`` (GPU load, temperatures, power, RAM), numbers only, plus the RAM
        lfb count from ``memory``; None while its service does not answer."""
        client = self._jtop
        try:
            if not client.ok():
                return None
            stats = {str(k): v for k, v in dict(client.stats).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)}
            ram = (getattr(client, "memory", None) or {}).get("RAM") or {}
            if isinstance(ram.get("lfb"), int):
                stats["lfb_blocks"] = ram["lfb"]
            return stats
        except Exception as exc:  # noqa: BLE001 - jtop raises its own exception types
            log.debug("jtop read failed: %s", exc)
            return None

    def _device_free(self) -> Optional[int]:
        if self._nvml is not None:
            try:
                return int(self._nvml.nvmlDeviceGetMemoryInfo(self._nvml_handle()).free)
            except Exception:  # noqa: BLE001 - NVML errors are its own types
                self._nvml = None
        try:
            import torch

            return int(torch.cuda.mem_get_info(torch.device(self.device))[0])
        except (ImportError, RuntimeError, AssertionError):
            return None

    def _nvml_handle(self):
        index = int(self.device.split(":")[1]) if ":" in self.device else 0
        return self._nvml.nvmlDeviceGetHandleByIndex(index)


def _system_memory(info: Dict[str, int]) -> Tuple[int, int]:
    if "MemAvailable" in info and "MemTotal" in info:
        return info["MemAvailable"], info["MemTotal"]
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


def _rss() -> Optional[int]:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except (ImportError, OSError):
        return None


def _torch_counters(device: str) -> Tuple[Optional[int], Optional[int]]:
    if not device.startswith("cuda"):
        return None, None
    try:
        import torch

        dev = torch.device(device)
        return int(torch.cuda.memory_allocated(dev)), int(torch.cuda.memory_reserved(dev))
    except (ImportError, RuntimeError, AssertionError):
        return None, None


def _open_jtop():
    """jetson-stats' client (AGPL, optional): None when absent or its service is unreachable."""
    try:
        from jtop import jtop
    except ImportError:
        log.info("jtop requested but jetson-stats is not installed")
        return None
    try:
        client = jtop()
        client.start()
        return client
    except Exception as exc:  # noqa: BLE001 - JtopException and socket errors
        log.warning("jtop service not usable (%s); using /proc/meminfo", exc)
        return None


def _open_nvml(device: str):
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - ImportError or NVMLError_LibraryNotFound
        return None


class BudgetPolicy:
    """Cache budget in bytes from a configured cap and a share of available memory, and the
    step's peak budget from that share alone.

    Args:
        cap_bytes: hard cap (None: no cap).
        share: fraction of (available - reserve) the cache may take.
        reserve_bytes: memory never planned on (camera, codec, other processes).
    """

    def __init__(self, cap_bytes: Optional[int], share: float, reserve_bytes: int):
        self.cap_bytes, self.share, self.reserve_bytes = cap_bytes, share, reserve_bytes

    def peak_budget(self, sample: MemorySample) -> Optional[int]:
        """What one step may take at its peak: the share of available memory above the reserve
        (NOTE [Peak budget]); the cap bounds only the cache. None when nothing is available."""
        return int(self.share * max(0, sample.available - self.reserve_bytes)) or None

    def budget(self, sample: MemorySample) -> Tuple[int, str]:
        """(budget bytes, what bound it). 0 means nothing may be cached now."""
        headroom = max(0, sample.available - self.reserve_bytes)
        from_memory = int(self.share * headroom)
        if self.cap_bytes is not None and self.cap_bytes <= from_memory:
            return self.cap_bytes, "cap %.1f MB" % (self.cap_bytes / MB)
        if from_memory == 0:
            return 0, ("available memory %.0f MB is below the %.0f MB reserve"
                       % (sample.available / MB, self.reserve_bytes / MB))
        return from_memory, "%.0f%% of %.0f MB available above the reserve" % (
            100 * self.share, headroom / MB)
