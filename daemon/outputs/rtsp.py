"""rtsp://@:8554/live: an RTSP server in the daemon (GStreamer's gst-rtsp-server, through
PyGObject: python3-gi and gir1.2-gst-rtsp-server-1.0, which JetPack's images carry).

Clients share one encoding pipeline, built when the first one connects and torn down when the
last one leaves; with no client, frames are not encoded at all. The server runs its own GLib
loop on a thread of its own. A port already taken is reported and retried.
"""

import threading
from typing import Optional

import numpy as np

from .base import OutputUnavailable, VideoSink, gi_rtsp_server, h264_encoders
from .uri import OutputSpec

__all__ = ["RtspSink"]

QUEUED_FRAMES = 3       # frames waiting in appsrc beyond this are dropped (a slow client)


class RtspSink(VideoSink):
    def __init__(self, spec: OutputSpec):
        super().__init__(spec)
        self._lock = threading.Lock()
        self._appsrc = None
        self._frame_bytes = 0
        self._server = self._context = self._loop = self._thread = None
        self._source_id = 0

    @classmethod
    def missing(cls, spec: OutputSpec) -> Optional[str]:
        problem = gi_rtsp_server()
        if problem is None:
            return None
        return ("rtsp:// needs GStreamer's RTSP server through PyGObject (apt-get install "
                "python3-gi gir1.2-gst-rtsp-server-1.0; in a venv, --system-site-packages): %s"
                % problem)

    def open(self, width: int, height: int, fps: float) -> None:
        from gi.repository import GLib, Gst, GstRtspServer

        Gst.init(None)
        encoder = self._encoder(Gst, GLib)
        caps = "video/x-raw,format=BGR,width=%d,height=%d,framerate=%d/1" % (
            width, height, max(1, int(round(fps))))
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch("( appsrc name=frames is-live=true format=time do-timestamp=true "
                           "caps=%s ! %s ! rtph264pay name=pay0 pt=96 config-interval=1 )"
                           % (caps, encoder))
        factory.set_shared(True)
        factory.connect("media-configure", self._on_media)
        server = GstRtspServer.RTSPServer()
        server.set_address(self.spec.host)
        server.set_service(str(self.spec.port))
        server.get_mount_points().add_factory(self.spec.path, factory)
        context = GLib.MainContext.new()
        self._source_id = server.attach(context)
        if not self._source_id:
            raise OutputUnavailable("cannot serve RTSP on %s:%d (is the port taken?)"
                                    % (self.spec.host, self.spec.port))
        self._server, self._context = server, context
        self._loop = GLib.MainLoop.new(context, False)
        self._thread = threading.Thread(target=self._loop.run, name="rtsp-server", daemon=True)
        self._thread.start()
        self._frame_bytes = width * height * 3
        self.detail = "rtsp://%s:%d%s (%s)" % (self.spec.host, self.spec.port, self.spec.path,
                                               encoder.split(" ! ")[-2])

    @staticmethod
    def _encoder(Gst, GLib) -> str:
        """The first H.264 encoder chain whose elements this GStreamer has."""
        for tail in h264_encoders():
            try:
                Gst.parse_launch("appsrc ! %s ! fakesink" % tail)
            except GLib.Error:
                continue
            return tail
        raise OutputUnavailable("no H.264 encoder in this GStreamer (x264enc, openh264enc or "
                                "nvv4l2h264enc)")

    def _on_media(self, factory, media) -> None:
        appsrc = media.get_element().get_child_by_name("frames")
        media.connect("unprepared", self._on_unprepared)
        with self._lock:
            self._appsrc = appsrc

    def _on_unprepared(self, media) -> None:
        with self._lock:
            self._appsrc = None

    def write(self, image: np.ndarray) -> None:
        from gi.repository import Gst

        with self._lock:
            appsrc = self._appsrc
        if appsrc is None:
            return                          # nobody is watching: encode nothing
        if appsrc.get_property("current-level-bytes") > QUEUED_FRAMES * self._frame_bytes:
            self.skipped += 1
            return
        appsrc.emit("push-buffer", Gst.Buffer.new_wrapped(np.ascontiguousarray(image).tobytes()))

    def close(self) -> None:
        server, loop, context = self._server, self._loop, self._context
        self._server = self._loop = self._context = None
        with self._lock:
            self._appsrc = None
        if server is None:
            return
        from gi.repository import GstRtspServer

        server.client_filter(lambda _server, _client: GstRtspServer.RTSPFilterResult.REMOVE)
        source = context.find_source_by_id(self._source_id)
        if source is not None:
            source.destroy()
        loop.quit()
        if self._thread is not None:
            self._thread.join(2.0)
