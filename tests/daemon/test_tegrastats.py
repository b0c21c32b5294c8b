import os
import stat
import sys
import time
from pathlib import Path

import pytest

from daemon.tegrastats import TegrastatsMonitor, parse_line

FIXTURES = Path(__file__).parent / "fixtures" / "tegrastats.txt"


def _lines():
    return [line for line in FIXTURES.read_text().splitlines()
            if line and not line.startswith("#")]


def test_r32_line_every_field():
    s = parse_line(_lines()[0])
    assert (s.ram_used_mb, s.ram_total_mb, s.lfb_blocks, s.lfb_block_mb) == (5246, 7771, 7, 4)
    assert (s.swap_used_mb, s.swap_total_mb, s.swap_cached_mb) == (983, 20269, 280)
    assert s.cpu == [(47, 1420)]
    assert (s.emc_load, s.gpu_load, s.gpu_mhz) == (2, 0, [1109])
    assert s.temperatures["GPU"] == 31.5 and s.temperatures["thermal"] == 31.35
    assert s.power_mw == {"VDD_IN": (6140, 5510), "VDD_CPU_GPU_CV": (2706, 2119),
                          "VDD_SOC": (1074, 1051)}


def test_r35_line_with_date_brackets_and_milliwatts():
    s = parse_line(_lines()[1])
    assert (s.ram_used_mb, s.ram_total_mb, s.lfb_blocks) == (3168, 6851, 2)
    assert (s.gpu_load, s.gpu_mhz) == (0, [114])
    assert s.power_mw["VDD_IN"] == (2763, 2846)
    assert s.temperatures["CPU"] == 46.5


def test_r36_orin_line_with_gpc_array_and_off_engines():
    s = parse_line(_lines()[2])
    assert (s.ram_used_mb, s.ram_total_mb, s.lfb_blocks) == (18207, 62841, 466)
    assert (s.gpu_load, s.gpu_mhz) == (0, [0, 0])
    assert s.temperatures["cpu"] == 52.562 and s.temperatures["tj"] == 52.562
    assert s.power_mw["VIN_SYS_5V0"] == (4707, 4707)
    assert "NVENC" not in s.power_mw


def test_thor_and_r39_forms():
    s = parse_line("RAM 1000/128000MB (lfb 10x4MB) GR3D_FREQ @[0,0,0] cpu@50C/50C "
                   "VDD_IN 9761mW/9761mW/9761mW GPU@-256C")
    assert s.gpu_load is None and s.gpu_mhz == [0, 0, 0]
    assert s.temperatures["cpu"] == 50.0 and s.temperatures["GPU"] is None   # offline sensor
    assert s.power_mw["VDD_IN"] == (9761, 9761)


def test_non_root_line_without_frequencies():
    s = parse_line("RAM 5246/7771MB (lfb 7x4MB) EMC_FREQ 0% GR3D_FREQ 37%")
    assert (s.emc_load, s.gpu_load, s.gpu_mhz) == (0, 37, [])


def test_the_old_cpu_form_a_second_gpu_cluster_and_a_rail_listed_twice():
    s = parse_line("RAM 2000/3964MB (lfb 100x4MB) SWAP 0/1982MB (cached 0MB) "
                   "CPU [12%,3%,off,8%]@1428 EMC_FREQ 4%@1600 GR3D_FREQ 10%@921 "
                   "GR3D2_FREQ 25%@921 VDD_IN 3000/2900 VDD_IN 100/90")
    assert s.cpu == [(12, 1428), (3, 1428), None, (8, 1428)]
    assert s.gpu_load == 10 and s.gpu_loads == {"GR3D": 10, "GR3D2": 25}
    assert s.power_mw == {"VDD_IN": (3000, 2900), "VDD_IN#2": (100, 90)}
    published = s.as_dict()
    assert published["gpu_loads"]["GR3D2"] == 25 and published["lfb_block_mb"] == 4


@pytest.mark.parametrize("garbage", ["", "hello", "RAM", "RAM x/yMB", "\x00\xff binary",
                                     "SWAP 1/2MB (cached 0MB)", "Error: must be run as root"])
def test_garbage_parses_to_none(garbage):
    assert parse_line(garbage) is None


def test_monitor_runs_a_child_keeps_the_latest_line_and_stops_it(tmp_path):
    fake = tmp_path / "tegrastats"
    fake.write_text("#!%s\nimport sys, time\nlines = open(%r).read().splitlines()\n"
                    "print('garbage line', flush=True)\n"
                    "for l in lines:\n    if l and not l.startswith('#'): print(l, flush=True)\n"
                    "time.sleep(60)\n" % (sys.executable, str(FIXTURES)))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monitor = TegrastatsMonitor(str(fake), interval_ms=100).start()
    deadline = time.monotonic() + 20
    while monitor.lines < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = monitor._proc.pid
    assert monitor.lines == 3 and monitor.garbage == 1
    assert monitor.latest.ram_total_mb == 62841
    monitor.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
