"""GStreamer pipeline strings for cameras and streams (research/jetson.md section 4.2).

Every pipeline ends in an appsink that drops stale buffers (``drop=true max-buffers=1
sync=false``): with OpenCV's default unbounded queue, latency and memory grow without limit.
GStreamer 1.16 on JetPack 5 has no ``leaky-type``, so ``drop``/``max-buffers`` it is.
"""

from pathlib import Path

__all__ = ["APPSINK", "on_jetson", "csi_pipeline", "v4l2_pipeline", "rtsp_pipeline",
           "file_pipeline", "h264_decoder"]

APPSINK = "appsink drop=true max-buffers=1 sync=false"
TO_BGR = "videoconvert ! video/x-raw,format=BGR"


def on_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


def h264_decoder(choice: str = "auto") -> str:
    """nvv4l2decoder on Jetson (pinned: decodebin may pick a software decoder), else decodebin."""
    if choice != "auto":
        return choice
    return "nvv4l2decoder enable-max-performance=1 ! nvvidconv ! video/x-raw,format=BGRx" \
        if on_jetson() else "decodebin"


def csi_pipeline(sensor_id: int, width: int, height: int, fps: int) -> str:
    return ("nvarguscamerasrc sensor-id=%d ! video/x-raw(memory:NVMM),width=%d,height=%d,"
            "framerate=%d/1,format=NV12 ! nvvidconv flip-method=0 ! video/x-raw,format=BGRx ! "
            "%s ! %s" % (sensor_id, width, height, fps, TO_BGR, APPSINK))


def v4l2_pipeline(device: str, width: int, height: int, fps: int) -> str:
    return ("v4l2src device=%s do-timestamp=true ! video/x-raw,width=%d,height=%d,framerate=%d/1"
            " ! %s ! %s" % (device, width, height, fps, TO_BGR, APPSINK))


def rtsp_pipeline(url: str, latency_ms: int, decoder: str = "auto") -> str:
    dec = h264_decoder(decoder)
    depay = "rtph264depay ! h264parse ! " if dec.startswith("nvv4l2decoder") else ""
    return ("rtspsrc location=%s latency=%d drop-on-latency=true ! %s%s ! %s ! %s"
            % (url, latency_ms, depay, dec, TO_BGR, APPSINK))


def file_pipeline(path: str) -> str:
    # a file is not live: back-pressure instead of dropping, so every frame is served
    return "filesrc location=%s ! decodebin ! %s ! appsink sync=false max-buffers=4" % (
        path, TO_BGR)
