import json

import pytest

from daemon.demo import run_demo

cv2 = pytest.importorskip("cv2")


def test_demo_runs_a_short_stream_and_writes_summary_and_plot(tmp_path, capsys):
    final = run_demo(tmp_path, ["source.uri=replay://cifar10?schedule=clean:64,fog:160"
                                "&severity=5&fps=0", "learner.batch_size=16",
                                "learner.fresh_frames=8", "telemetry.interval_s=0.2"],
                     save=tmp_path / "video" / "demo.avi")
    out = capsys.readouterr().out
    assert "accuracy per segment" in out and "fog" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counters"]["frames"] == 224 == final["counters"]["frames"]
    assert set(summary["accuracy"]) == {"adapted", "source"}
    assert summary["accuracy"]["source"]["fog"]["frames"] == 160
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert (tmp_path / "telemetry.jsonl").read_text().count("\n") >= 1
    capture = cv2.VideoCapture(str(tmp_path / "video" / "demo.avi"))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == final["video"]["written"] > 0
    assert final["video"]["written"] + final["video"]["drops"] == 224
