"""`surgeond doctor`: what this machine offers the daemon, and what to fix.

Each check returns a Finding: ok, warn (works, but not as well as it could) or fail (the daemon
will not work as configured), with a one-line fix. Exit code 1 when anything fails. ``root``
exists so that tests can point the Jetson files (/etc/nv_tegra_release, the device-tree model)
at fixtures.
"""

import grp
import importlib
import os
import platform
import re
import shutil
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

__all__ = ["Finding", "run_checks", "l4t_release", "format_findings"]

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Finding:
    check: str
    status: str
    detail: str
    fix: str = ""


def l4t_release(root: Path = Path("/")) -> Optional[str]:
    """'R35.4.1' from '# R35 (release), REVISION: 4.1, ...'; None off Jetson."""
    path = root / "etc" / "nv_tegra_release"
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", text)
    return "R%s.%s" % match.groups() if match else "unknown (%s)" % text.strip()[:40]


def _board(root: Path) -> str:
    try:
        return (root / "proc" / "device-tree" / "model").read_text().strip("\0 \n")
    except OSError:
        return ""


def check_platform(root: Path) -> Finding:
    release = l4t_release(root)
    python = platform.python_version()
    where = "%s, Python %s" % (platform.machine(), python)
    if release is None:
        return Finding("platform", OK, "not a Jetson (%s)" % where)
    board = _board(root)
    detail = "Jetson %sL4T %s, %s" % (board + ", " if board else "", release, where)
    if release.startswith("R35") and not python.startswith("3.8"):
        return Finding("platform", WARN, detail, "JetPack 5 wheels of torch are cp38: run the "
                       "daemon with the system Python 3.8")
    return Finding("platform", OK, detail)


def check_torch(root: Path) -> Finding:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return Finding("torch", FAIL, "not installed", "Jetson: NVIDIA's wheel or the "
                       "l4t-pytorch image; x86: pip install 'surgeon[torch]'")
    cuda = torch.cuda.is_available()
    detail = "torch %s, CUDA %s" % (torch.__version__, "available (%s)" %
                                    torch.cuda.get_device_name(0) if cuda else "not available")
    if l4t_release(root) is not None and not cuda:
        return Finding("torch", FAIL, detail, "this torch does not use the Tegra GPU (PyPI's "
                       "aarch64 build?): reinstall NVIDIA's JetPack wheel, and install the "
                       "daemon with a constraints file (deploy/install-jetson.sh)")
    return Finding("torch", OK, detail)


def opencv_origin(path: str) -> str:
    """Whose cv2 this is, from where it lives: NVIDIA's JetPack build installs into the
    versioned /usr/lib/python3.X/dist-packages, Ubuntu's python3-opencv into
    /usr/lib/python3/dist-packages, pip into a site-packages (or /usr/local)."""
    if "/usr/lib/python3/dist-packages/" in path:
        return "Ubuntu's python3-opencv"
    if path.startswith("/usr/lib/python3.") and "/dist-packages/" in path:
        return "NVIDIA's JetPack build"
    if "site-packages" in path or path.startswith("/usr/local/"):
        return "a pip wheel"
    return "from %s" % path


def check_opencv(root: Path) -> Finding:
    try:
        cv2 = importlib.import_module("cv2")
    except ImportError as exc:
        if "static TLS" in str(exc):
            from .sources.opencv import _TLS_FIX

            return Finding("opencv", FAIL, str(exc), _TLS_FIX)
        return Finding("opencv", WARN, "not installed: only replay://, dir:// and synthetic:// "
                       "sources work", "Jetson: NVIDIA's OpenCV comes with JetPack (sudo apt "
                       "install nvidia-opencv), or Ubuntu's: apt install python3-opencv; "
                       "x86: pip install 'surgeon[opencv]'")
    from .sources.opencv import gstreamer_available

    gst = gstreamer_available()
    detail = "OpenCV %s (%s), GStreamer %s" % (cv2.__version__, opencv_origin(cv2.__file__),
                                              "yes" if gst else "no")
    if not gst and l4t_release(root) is not None:
        return Finding("opencv", FAIL, detail, "a pip OpenCV shadows JetPack's: pip uninstall "
                       "opencv-python opencv-python-headless, then use the system cv2")
    if not gst:
        return Finding("opencv", WARN, detail, "csi:// and rtsp:// need OpenCV built with "
                       "GStreamer (Debian/Ubuntu python3-opencv has it)")
    return Finding("opencv", OK, detail)


def check_zmq(root: Path) -> Finding:
    try:
        zmq = importlib.import_module("zmq")
    except ImportError:
        return Finding("zmq", FAIL, "pyzmq not installed", "pip install pyzmq")
    curve = zmq.has("curve")
    detail = "pyzmq %s, libzmq %s, CURVE %s" % (zmq.__version__, zmq.zmq_version(),
                                                "yes" if curve else "no")
    return Finding("zmq", OK if curve else WARN, detail,
                   "" if curve else "TCP control beyond loopback needs libzmq with libsodium")


def check_memory_probes(root: Path) -> List[Finding]:
    from .memory import read_meminfo

    found = []
    try:
        info = read_meminfo()
        found.append(Finding("meminfo", OK, "MemAvailable %.0f MB" %
                             (info.get("MemAvailable", 0) / 2**20)))
    except OSError as exc:
        found.append(Finding("meminfo", FAIL, "cannot read /proc/meminfo: %s" % exc,
                             "do not set ProtectProc=/ProcSubset= in the unit"))
    if l4t_release(root) is not None:
        binary = shutil.which("tegrastats")
        found.append(Finding("tegrastats", OK if binary else WARN, binary or "not on PATH",
                             "" if binary else "install nvidia-l4t-tools or set "
                             "memory.tegrastats_path"))
    found.append(_optional_probe("jtop", "jtop", "/run/jtop.sock", "pip install "
                                 "'surgeon[jetson]' and run jtop.service (AGPL)"))
    found.append(_nvml_probe())
    return found


def _optional_probe(name: str, module: str, socket_path: str, fix: str) -> Finding:
    try:
        importlib.import_module(module)
    except ImportError:
        return Finding(name, OK, "not installed (optional)", fix)
    there = Path(socket_path).exists()
    return Finding(name, OK if there else WARN, "installed; service socket %s %s"
                   % (socket_path, "present" if there else "missing"),
                   "" if there else "systemctl enable --now jtop")


def _nvml_probe() -> Finding:
    try:
        pynvml = importlib.import_module("pynvml")
    except ImportError:
        return Finding("nvml", OK, "not installed (optional; desktop GPUs only)")
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return Finding("nvml", OK, "%d GPU(s)" % count)
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound on Jetson
        return Finding("nvml", OK, "unusable here (%s); Jetson has no NVML" % type(exc).__name__)


def check_allocator(choice: str, dirs: Optional[tuple] = None) -> Finding:
    """Whether the allocator ``memory.allocator`` asks for is there to preload."""
    from surgeon_core.allocator import PACKAGES, allocator_library, preloadable

    name = preloadable(choice)
    if name is None:
        return Finding("allocator", OK, "glibc's malloc (memory.allocator: glibc)")
    library = allocator_library(choice, dirs)
    if library is not None:
        return Finding("allocator", OK, "%s: the daemon preloads it" % library)
    return Finding("allocator", WARN, "%s is not installed: glibc's malloc serves, whose heap "
                   "grows about 4x as much in a CPU step" % name,
                   "sudo apt-get install %s (NOTE [Preloaded allocator])" % PACKAGES[name])


def check_directory(name: str, path: Path, max_mode: int) -> Finding:
    """Exists (or can be made) by this user, and grants nobody more than ``max_mode``."""
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        if os.access(parent, os.W_OK):
            return Finding(name, OK, "%s will be created" % path)
        return Finding(name, FAIL, "%s is missing and %s is not writable" % (path, parent),
                       "create it for the service user (systemd: %s=)" %
                       ("RuntimeDirectory" if name == "runtime dir" else "StateDirectory"))
    info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    detail = "%s mode %o, owner uid %d" % (path, mode, info.st_uid)
    if not os.access(path, os.W_OK | os.X_OK):
        return Finding(name, FAIL, detail + ", not writable by this user",
                       "chown it to the service user")
    if mode & ~max_mode:
        return Finding(name, WARN, detail + ", more open than %o" % max_mode,
                       "chmod %o %s" % (max_mode, path))
    return Finding(name, OK, detail)


def check_devices(root: Path) -> Finding:
    nodes = sorted(str(p) for p in Path("/dev").glob("video*")) + sorted(
        str(p) for p in Path("/dev").glob("nvhost-ctrl*"))
    if not nodes:
        return Finding("devices", OK, "no /dev/video* or /dev/nvhost-* here")
    denied = [n for n in nodes if not os.access(n, os.R_OK | os.W_OK)]
    groups = {grp.getgrgid(g).gr_name for g in os.getgroups() if _group_exists(g)}
    detail = "%d device nodes, %d not accessible; groups: %s" % (len(nodes), len(denied),
                                                                 ",".join(sorted(groups)))
    if denied:
        return Finding("devices", FAIL, detail, "add the service user to group video "
                       "(SupplementaryGroups=video)")
    return Finding("devices", OK, detail)


def _group_exists(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
        return True
    except KeyError:
        return False


def check_config(config) -> Finding:
    """The configured model, built and run on one dummy batch as `surgeond run` would."""
    from .config import ConfigError
    from .model import load_model

    try:
        built = load_model(config.model)
    except ConfigError as exc:
        return Finding("model", FAIL, str(exc), "fix the model section (docs/MODELS.md)")
    return Finding("model", OK, "%s, %d classes, input %d px, weights %s" % (
        built.builder, built.num_classes, built.preprocessing.crop, built.weights))


def check_source(config, timeout_s: float = 10.0) -> Finding:
    """Open the configured source and read one frame, within ``timeout_s`` (a hung driver is
    abandoned in its thread: doctor is a one-shot process)."""
    import threading

    from .sources import UnknownSource, source_factory

    uri = config.source.uri
    try:
        factory = source_factory(uri, config.source)
    except UnknownSource as exc:
        return Finding("source", FAIL, str(exc), "fix source.uri (docs/DEPLOY.md, Cameras)")
    outcome: List[object] = []

    def one_frame() -> None:
        source = factory()
        try:
            source.open()
            outcome.append(source.read())
        except Exception as exc:  # noqa: BLE001 - any failure is the finding
            outcome.append(exc)
        finally:
            source.close()

    worker = threading.Thread(target=one_frame, name="doctor-source", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not outcome:
        return Finding("source", FAIL, "%s: no frame within %.0f s" % (uri, timeout_s),
                       "check the camera or stream is running and reachable")
    if isinstance(outcome[0], Exception):
        return Finding("source", FAIL, "%s: %s" % (uri, outcome[0]), "see the message; "
                       "`surgeond run` keeps retrying a source that fails")
    shape = outcome[0].image.shape
    return Finding("source", OK, "%s: a %d x %d frame" % (uri, shape[1], shape[0]))


def check_video_outputs(config) -> Finding:
    """The configured outputs this machine can never run (FAIL), or, with none configured,
    which kinds it could."""
    from .outputs import missing_requirements, parse_output_uri

    if config.output.video:
        problems = missing_requirements([parse_output_uri(uri) for uri in config.output.video])
        if problems:
            return Finding("video outputs", FAIL, "; ".join(problems),
                           "install what the message names, or drop the output")
        return Finding("video outputs", OK, ", ".join(config.output.video))
    kinds = ["display://", "file://", "rtsp://", "rtp://"]
    able = [kind for kind in kinds
            if not missing_requirements([parse_output_uri(_EXAMPLE_OUTPUTS[kind])])]
    return Finding("video outputs", OK, "none configured; this machine can run %s"
                   % (", ".join(able) or "none"))


_EXAMPLE_OUTPUTS = {"display://": "display://0", "file://": "file:///tmp/x.mkv",
                    "rtsp://": "rtsp://@:8554/live", "rtp://": "rtp://127.0.0.1:5000"}


def check_daemon(endpoint: str) -> Finding:
    from .control.client import ControlClient, DaemonError, Unreachable

    try:
        reply = ControlClient(endpoint, timeout_s=1.0, retries=1).call("ping")
        return Finding("daemon", OK, "answers on %s (pid %s)" % (endpoint, reply.get("pid")))
    except (Unreachable, DaemonError) as exc:
        return Finding("daemon", OK, "none answers on %s (%s)" % (endpoint,
                                                                  type(exc).__name__))


def run_checks(config, root: Path = Path("/")) -> List[Finding]:
    from .checkpoints import default_directory
    from .control.server import endpoints_for
    from .control.security import MODES, default_runtime_dir

    runtime = Path(config.control.runtime_dir or default_runtime_dir())
    state = Path(config.checkpoints.directory or default_directory())
    dir_mode = MODES[config.control.socket_access][0]
    checks: List[Callable[[], object]] = [
        lambda: check_platform(root), lambda: check_torch(root), lambda: check_opencv(root),
        lambda: check_zmq(root), lambda: check_memory_probes(root),
        lambda: check_allocator(config.memory.allocator),
        lambda: check_directory("runtime dir", runtime, dir_mode),
        lambda: check_directory("checkpoint dir", state, 0o750),
        lambda: check_devices(root), lambda: check_config(config),
        lambda: check_source(config), lambda: check_video_outputs(config),
        lambda: check_daemon(endpoints_for(config.control)[0])]
    findings: List[Finding] = []
    for check in checks:
        result = check()
        findings += result if isinstance(result, list) else [result]
    return findings


def format_findings(findings: List[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append("%-4s %-15s %s" % (f.status.upper(), f.check, f.detail))
        if f.fix and f.status != OK:
            lines.append("     %-15s fix: %s" % ("", f.fix))
    failed = sum(f.status == FAIL for f in findings)
    warned = sum(f.status == WARN for f in findings)
    lines.append("%d checks: %d failed, %d warnings" % (len(findings), failed, warned))
    return "\n".join(lines)


def as_dicts(findings: List[Finding]) -> List[dict]:
    return [asdict(f) for f in findings]
