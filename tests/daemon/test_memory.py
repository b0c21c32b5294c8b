import pytest

from daemon.memory import MB, BudgetPolicy, MemorySample, is_out_of_memory, read_meminfo

JETSON_MEMINFO = """MemTotal:        7015344 kB
MemFree:          201224 kB
MemAvailable:    3105228 kB
Buffers:           51200 kB
Cached:          2800000 kB
NvMapMemFree:      33456 kB
NvMapMemUsed:     812344 kB
"""


def test_meminfo_fields_in_bytes_with_jetson_nvmap(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text(JETSON_MEMINFO + "garbage line\nHugePages_Total:       0\n")
    info = read_meminfo(str(path))
    assert info["MemAvailable"] == 3105228 * 1024
    assert info["NvMapMemUsed"] == 812344 * 1024
    assert info["HugePages_Total"] == 0
    assert read_meminfo(str(tmp_path / "absent")) == {}


def _sample(available_mb):
    return MemorySample(int(available_mb * MB), int(8000 * MB), int(available_mb * MB))


def test_budget_is_the_smaller_of_cap_and_share_above_the_reserve():
    policy = BudgetPolicy(cap_bytes=int(30 * MB), share=0.25, reserve_bytes=int(256 * MB))
    assert policy.budget(_sample(1256))[0] == int(30 * MB)            # 250 MB share > cap
    budget, why = policy.budget(_sample(356))
    assert budget == int(25 * MB) and "25%" in why                    # share of 100 MB
    budget, why = policy.budget(_sample(200))
    assert budget == 0 and "reserve" in why                           # nothing left to plan on


@pytest.mark.parametrize("exc, oom", [
    (MemoryError(), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
    (RuntimeError("NVML_SUCCESS == r INTERNAL ASSERT FAILED at "
                  "\"../c10/cuda/CUDACachingAllocator.cpp\":1154"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_includes_the_tegra_allocator_assertion(exc, oom):
    assert is_out_of_memory(exc) is oom


class _FakeJtop:
    """jetson-stats' client as its 4.x API shows it: ok(), stats, memory."""

    def __init__(self, answering=True):
        self.answering, self.closed = answering, False
        self.stats = {"GPU": 37.0, "Temp GPU": 41.5, "Power TOT": 3000, "jetson_clocks": False,
                      "uptime": "1 day", "RAM": 0.5}
        self.memory = {"RAM": {"used": 2000000, "tot": 7000000, "lfb": 120}}

    def ok(self):
        return self.answering

    def close(self):
        self.closed = True


def test_a_configured_jtop_is_read_and_its_numbers_published(tmp_path, monkeypatch):
    from daemon import memory

    path = tmp_path / "meminfo"
    path.write_text(JETSON_MEMINFO)
    fake = _FakeJtop()
    monkeypatch.setattr(memory, "_open_jtop", lambda: fake)
    probe = memory.MemoryProbe("cpu", tegrastats="off", use_jtop=True, meminfo_path=str(path))
    sample = probe.read()
    assert sample.jtop == {"GPU": 37.0, "Temp GPU": 41.5, "Power TOT": 3000, "RAM": 0.5,
                           "lfb_blocks": 120}
    assert sample.lfb_blocks == 120
    fake.answering = False
    assert probe.read().jtop is None
    probe.close()
    assert fake.closed
