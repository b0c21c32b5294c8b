"""The step's peak and the process footprint (NOTE [Step peak], NOTE [Giving memory back])."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from surgeon_core.allocator import before_step, tune_malloc
from surgeon_core.methods import args_for, get_method
from surgeon_core.models import cifar_resnet_by_name
from surgeon_core.peak import PeakMeter, resident_bytes, resident_split

MB = 2 ** 20
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="procfs")
TCMALLOC = "/usr/lib/%s-linux-gnu/libtcmalloc_minimal.so.4" % os.uname().machine
needs_tcmalloc = pytest.mark.skipif(not os.path.exists(TCMALLOC), reason="libtcmalloc-minimal4 "
                                    "not installed (.ci/run installs it)")


def _outputs(command, choices, *more, env=None):
    """{choice: what ``command choice *more`` printed}, each in a fresh process."""
    return {choice: subprocess.run(command + [choice, *more], capture_output=True, text=True,
                                   check=True, env=env).stdout.strip() for choice in choices}


@linux
def test_the_meter_sees_a_transient_and_not_what_was_held_before():
    tune_malloc("trim")
    held = torch.ones(32 * MB // 4)                 # resident before the step: not its peak
    before_step()                                    # as Method.step does
    start = resident_bytes()
    with PeakMeter(torch.device("cpu")) as meter:
        transient = torch.ones(64 * MB // 4)         # 64 MiB, touched, freed inside
        del transient
    assert 60 * MB <= meter.peak_bytes <= 80 * MB
    assert meter.resident_bytes >= start + 60 * MB
    before_step()
    with PeakMeter(torch.device("cpu")) as quiet:
        torch.ones(1000).sum()
    assert quiet.peak_bytes < 8 * MB
    del held


@linux
def test_a_meter_inside_another_leaves_the_outer_ones_peak_whole():
    """The inner meter resets the high-water mark; what the outer step reached before that
    (the probe, before the engine's own meter) still counts in the outer peak."""
    tune_malloc("trim")
    before_step()
    with PeakMeter(torch.device("cpu")) as outer:
        transient = torch.ones(64 * MB // 4)
        del transient
        before_step()
        with PeakMeter(torch.device("cpu")) as inner:
            torch.ones(1000).sum()
    assert inner.peak_bytes < 8 * MB
    assert 60 * MB <= outer.peak_bytes <= 80 * MB


@linux
def test_glibc_is_told_to_return_freed_memory():
    """In a fresh process: tensors of mixed sizes over 256 KiB (about 200 MiB) allocated, then
    a small one that stays (as a step leaves its cached activations), then the big ones freed,
    three times over. With the settings each big one was its own mapping and went back at
    free; with glibc's adaptive defaults, once the first round's frees raised the mmap
    threshold, the later rounds' blocks lie in the heap below the one that stays, where no
    trim reaches (a bare alloc-and-free loop without it kept 12 to 23 MiB, too close to the
    tuned run's 1.5 to 1.9 MiB to tell apart on every torch)."""
    script = ("import random, sys, torch\n"
              "from surgeon_core.allocator import tune_malloc\n"
              "from surgeon_core.peak import resident_bytes\n"
              "if sys.argv[1] == 'tuned': assert tune_malloc('return')['mmap_threshold'] > 0\n"
              "random.seed(0)\n"
              "start, stays = resident_bytes(), []\n"
              "for _ in range(3):\n"
              "    blocks = [torch.ones(random.randint(80000, 1000000)) for _ in range(100)]\n"
              "    stays.append(torch.ones(1000))\n"
              "    del blocks\n"
              "print(resident_bytes() - start)\n")
    outputs = _outputs([sys.executable, "-c", script], ("tuned", "default"))
    kept = {mode: int(text.splitlines()[-1]) for mode, text in outputs.items()}
    assert kept["tuned"] < 10 * MB and kept["default"] > max(64 * MB, 8 * kept["tuned"]), kept


@linux
def test_every_step_reports_its_peak(resnet20_weights):
    tune_malloc("trim")
    model = cifar_resnet_by_name("resnet20", resnet20_weights)
    x = torch.rand(64, 3, 32, 32)
    for name in ("tent", "surgeon"):
        method = get_method(name)(copy.deepcopy(model), args_for(name))
        for _ in range(2):
            result = method.step(x)
        assert result.peak_bytes > MB and result.resident_bytes > result.peak_bytes


# Below the daemon's free-running peak at batch 64 (16-17 MiB since the exact-count gather)
# with room to spare: at 16 MiB one CI lane read 15.9 and the precondition failed.
PEAK_BUDGET_MB = 12
# Runs whose plan gave up (BudgetExceeded, which errs high by design) before one is judged: in
# parts of 8 under glibc's `return`, blocks below its 256 KiB mmap threshold come from the
# heap and some readings miss them (0.3-6.7 MiB at one size), so the margin can reach 2x and
# nothing fits 12 MiB: 2 runs in 10 on this commit and on older ones alike.
PLAN_ATTEMPTS = 3


@linux
@pytest.mark.parametrize("allocator, most, budget_mb", [
    ("glibc", 0.4, PEAK_BUDGET_MB), pytest.param("tcmalloc", 0.5, 16, marks=needs_tcmalloc)])
def test_with_memory_returned_surgeons_step_peak_is_a_fraction_of_full_backprops(allocator,
                                                                                   most,
                                                                                   budget_mb):
    """In its own process (the mode is process-wide): ResNet-20, batch 64. Under tcmalloc
    the pages a step touches include its spans' slack: one step's ratio read 0.26 to 0.40
    across runs, against glibc's mappings of live blocks alone. The slack swings the readings
    up to 2x, which the plan's margin follows: a part of 8 read 6.05 MiB and, doubled, did
    not fit 12 MiB (1 run in 8), so tcmalloc's budget is 16 (its free-running peak 23-28)."""
    command = [sys.executable, "-m", "surgeon_core.bench", "memory", "--batch-size", "64",
               "--steps", "1", "--threads", "1", "--peak-budget-mb", str(budget_mb), "--json"]
    env = dict(os.environ, SURGEON_MALLOC="return", SURGEON_ALLOCATOR=allocator)
    for _ in range(PLAN_ATTEMPTS):
        out = subprocess.run(command, capture_output=True, text=True, env=env)
        if "does not fit" not in out.stderr:   # the plan erred high: BudgetExceeded
            break
    assert out.returncode == 0, out.stderr
    rows = {row["config"]: row for row in json.loads(out.stdout)["results"]}
    assert rows["full"]["peak_step_bytes"] > 50 * MB
    assert rows["surgeon"]["peak_ratio"] < most, rows["surgeon"]
    # NOTE [Peak budget]: under a budget below its free-running peak, micro-batches keep it
    bounded = rows["daemon+peak"]
    assert rows["daemon"]["peak_step_bytes"] > budget_mb * MB
    assert bounded["peak_step_bytes"] <= budget_mb * MB and bounded["chunks"] > 1, bounded
    assert bounded["highest_peak_bytes"] <= budget_mb * MB, bounded   # the warm-up step's


@linux
def test_under_the_daemons_default_mode_the_bench_counts_the_pages_a_step_touches():
    """'trim' hands free pages back before each step, and the meter must start after that:
    started before it, the pages trimmed and touched again counted as nothing (full backprop
    read 4.7 MiB at batch 200 against its 290 MiB cache)."""
    out = subprocess.run([sys.executable, "-m", "surgeon_core.bench", "memory", "--batch-size",
                          "32", "--steps", "1", "--threads", "1", "--json"],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, SURGEON_MALLOC="trim"))
    rows = {row["config"]: row for row in json.loads(out.stdout)["results"]}
    for name in ("full", "surgeon", "daemon"):
        row = rows[name]
        assert row["peak_step_bytes"] > row["cache_bytes"] > 0, row


def test_no_peak_is_claimed_where_the_allocator_keeps_what_it_frees():
    tune_malloc("default")
    try:
        with PeakMeter(torch.device("cpu")) as meter:
            torch.ones(1000).sum()
        assert meter.peak_bytes is None
    finally:
        tune_malloc("trim")


@linux
@needs_tcmalloc
def test_under_a_preloaded_tcmalloc_every_step_sees_its_own_peak():
    """tcmalloc keeps what it frees for reuse; its free pages go back before each step, so
    the second step's 16 MiB transient is counted again, not served from the first one's
    pages (NOTE [Preloaded allocator]). In ``default`` mode no peak is claimed."""
    script = ("import sys, torch\n"
              "from surgeon_core.allocator import allocator_name, before_step, tune_malloc\n"
              "from surgeon_core.peak import PeakMeter\n"
              "assert tune_malloc(sys.argv[1]) == {}\n"
              "peaks = []\n"
              "for _ in range(2):\n"
              "    before_step()\n"
              "    with PeakMeter(torch.device('cpu')) as meter:\n"
              "        torch.ones(1 << 22).sum()\n"
              "    peaks.append(meter.peak_bytes)\n"
              "print(allocator_name().replace(' ', ''), *peaks)\n")
    outputs = _outputs([sys.executable, "-c", script], ("trim", "default"),
                       env=dict(os.environ, LD_PRELOAD=TCMALLOC))
    seen = {mode: text.split() for mode, text in outputs.items()}
    assert seen["default"] == ["tcmalloc,default", "None", "None"], seen
    name, first, second = seen["trim"]
    assert name == "tcmalloc,trim" and 16 * MB <= int(second) <= 24 * MB, seen


_BOUNDED_STEPS = ("import sys, torch\n"
                  "from surgeon_core.allocator import allocator_name, tune_malloc\n"
                  "from surgeon_core.data import load_cifar10, to_tensor\n"
                  "from surgeon_core.methods.surgeon import Surgeon, SurgeonArgs\n"
                  "from surgeon_core.models import cifar_resnet_by_name, default_weights_path\n"
                  "tune_malloc('return'); torch.manual_seed(0); torch.set_num_threads(1)\n"
                  "net = cifar_resnet_by_name('resnet20', default_weights_path('resnet20'))\n"
                  "method = Surgeon(net, SurgeonArgs())\n"
                  "method.engine.set_peak_budget(16 << 20)\n"
                  "x = to_tensor(load_cifar10('test', limit=64)[0])\n"
                  "steps = [method.step(x) for _ in range(int(sys.argv[1]))]\n"
                  "print(allocator_name().replace(' ', ''), *('%d:%d' % (r.chunks, r.peak_bytes)\n"
                  "                                              for r in steps))\n")


@linux
@pytest.mark.parametrize("allocator", ["glibc", pytest.param("tcmalloc", marks=needs_tcmalloc)])
def test_no_step_of_a_bounded_run_exceeds_its_peak_budget(allocator, resnet20_weights):
    """The daemon's learner under a 16 MiB peak budget at batch 64 (its free-running peak is
    25-30 MiB), step after step, in a fresh process under each allocator. Under tcmalloc the
    measured transients swing up to 1.7x between steps at one size; an estimate drawn through a
    low reading once planned parts of 32 that peaked at 22 MiB. The first step counts too: the
    libraries' one-time allocations (12 MiB) are made before its meter, by the priming."""
    out = _outputs([sys.executable, "-c", _BOUNDED_STEPS], ("10",),
                   env=dict(os.environ, LD_PRELOAD=TCMALLOC if allocator == "tcmalloc" else ""))
    name, *steps = out["10"].split()
    assert name.startswith(allocator), out
    parts = [tuple(int(v) for v in step.split(":")) for step in steps]
    assert all(chunks > 1 and peak <= 16 * MB for chunks, peak in parts), parts


_SHOW_ALLOCATOR = ("import os, sys\n"
                   "from surgeon_core.allocator import exec_with_allocator, allocator_name\n"
                   "exec_with_allocator(sys.argv[1])\n"
                   "print(allocator_name(), sys.argv[1:], "
                   "os.environ.get('LD_PRELOAD', '').count('malloc'))\n")


@linux
@needs_tcmalloc
def test_a_command_runs_itself_again_under_the_chosen_allocator(tmp_path):
    """Once, with its arguments, and only where glibc was not chosen."""
    script = tmp_path / "show.py"
    script.write_text(_SHOW_ALLOCATOR)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "SURGEON_ALLOCATOR")}
    shown = _outputs([sys.executable, str(script)], ("auto", "tcmalloc", "glibc"), "x y",
                     env=env)
    assert shown["tcmalloc"] == "tcmalloc, default ['tcmalloc', 'x y'] 1", shown
    assert shown["auto"] == "tcmalloc, default ['auto', 'x y'] 1", shown
    assert shown["glibc"] == "glibc, default ['glibc', 'x y'] 0", shown


def test_a_missing_allocator_library_leaves_glibc_in_place(tmp_path):
    from surgeon_core.allocator import allocator_library, preload_command

    assert allocator_library("tcmalloc", dirs=(str(tmp_path),)) is None
    assert allocator_library("glibc") is None
    with pytest.raises(ValueError, match="allocator 'mimalloc'"):
        allocator_library("mimalloc")
    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"")
    assert allocator_library("jemalloc", dirs=(str(tmp_path),)) == str(library)
    assert preload_command("glibc") is None


@linux
@pytest.mark.parametrize("allocator", ["glibc", pytest.param("tcmalloc", marks=needs_tcmalloc)])
def test_the_footprint_bench_compares_the_daemons_learner_with_full_backprop(allocator):
    # batch 64: a step outgrows what the process already holds; at batch 16 the heap left by
    # loading the model could serve it, and a growth of 0 made the test flaky
    out = subprocess.run([sys.executable, "-m", "surgeon_core.bench", "footprint",
                          "--batch-size", "64", "--steps", "3", "--json"],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, SURGEON_ALLOCATOR=allocator))
    rows = {row["config"]: row for row in json.loads(out.stdout)["results"]}
    assert set(rows) == {"full", "daemon"}
    assert rows["full"]["allocator"] == allocator + ", trim" and rows["full"]["growth_ratio"] == 1
    assert rows["daemon"]["rss_growth_bytes"] > 0 and rows["daemon"]["step_seconds"] > 0
    # what a step touched went back after it (after_step), not only before the next one
    for row in rows.values():
        assert row["anon_after_bytes"] < row["anon_growth_bytes"] / 2, row
    # the anonymous part is the process's own: never more than the whole, and it grows too
    for row in rows.values():
        assert 0 < row["anon_growth_bytes"] <= row["rss_growth_bytes"] + 2**20, row


@linux
def test_the_anonymous_part_of_the_resident_set_holds_what_the_process_allocates():
    before = resident_split()[1]
    block = torch.ones(64 * 2**20 // 4)     # touched: 64 MiB of the process's own memory
    rss, anonymous = resident_split()
    grown = anonymous - before
    assert 60 * 2**20 <= grown <= 70 * 2**20, grown / 2**20
    assert anonymous <= rss
    del block
