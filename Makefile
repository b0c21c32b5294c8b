# Set-up and checks. `make test` and `make demo` create the virtual environment they need.
PYTHON ?= python3.11
VENV ?= .venv
VENV38 ?= .venv38
TORCH ?= torch==2.14.1 torchvision==0.29.1
TORCH38 ?= torch==2.0.1 torchvision==0.15.2
PY38 = PYENV_VERSION=3.8.18 python3.8
# JetPack 6 (L4T R36, Orin): Python 3.10; NVIDIA's wheel for JetPack 6.1/6.2 is torch 2.5.0
VENV310 ?= .venv310
TORCH310 ?= torch==2.5.1 torchvision==0.20.1
PY310 = PYENV_VERSION=3.10.13 python3.10
FROST = imagecorruptions==1.1.2   # only its frost textures are used (surgeon_core/data/frost.py)

.PHONY: test test-py38 test-py310 test-gst gst-debs demo stress bench-memory bench-continual clean

# The GStreamer lane: Debian's python3-opencv is built with GStreamer (PyPI's wheels are not),
# as Jetson's system OpenCV is; these packages also serve a local RTSP stream for the tests.
GSTVENV ?= .venv-gst
SYSPY = /usr/bin/python3
GST_DEBS = python3-opencv python3-gi python3-venv python3-yaml python3-psutil python3-scipy \
	python3-numpy gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
	gstreamer1.0-plugins-bad gstreamer1.0-libav gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 xvfb

# A torch venv in $(@D): $(1) the interpreter, $(2) the torch pins (and numpy's, where needed)
torch_venv = $(1) -m venv $(@D) \
	&& $(@D)/bin/pip install --quiet $(2) \
	&& $(@D)/bin/pip install --quiet -e '.[torch,bench,dev,opencv,metrics]' \
	&& $(@D)/bin/pip install --quiet --no-deps $(FROST) \
	&& touch $@

$(VENV)/.installed: pyproject.toml
	$(call torch_venv,$(PYTHON),$(TORCH))

$(VENV38)/.installed: pyproject.toml
	$(call torch_venv,$(PY38),$(TORCH38) 'numpy<2')

$(VENV310)/.installed: pyproject.toml
	$(call torch_venv,$(PY310),$(TORCH310) 'numpy<2')

$(GSTVENV)/.installed: pyproject.toml
	$(SYSPY) -m venv --system-site-packages $(GSTVENV)
	$(GSTVENV)/bin/pip install --quiet --no-deps -e .
	$(GSTVENV)/bin/pip install --quiet 'pydantic>=2' 'pytest>=7' 'pytest-timeout>=2.1'
	touch $@

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

# The JetPack 5 generation: Python 3.8 with torch 2.0 (the Xavier NX ceiling).
test-py38: $(VENV38)/.installed
	$(VENV38)/bin/python -m pytest -q

# The JetPack 6 generation: Python 3.10 with torch 2.5 (Orin on JetPack 6.1/6.2).
test-py310: $(VENV310)/.installed
	$(VENV310)/bin/python -m pytest -q

# 50 rounds of kill -9 during checkpoint saves and restart (the suite runs 3); about 4 minutes.
stress: $(VENV)/.installed
	SURGEON_KILL_ROUNDS=50 $(VENV)/bin/python -m pytest -q --timeout 1800 tests/daemon/test_kill.py

gst-debs:
	apt-get install -y -q $(GST_DEBS)

# Real pipelines (gst://, file via decodebin, RTSP that dies and returns) with no torch.
test-gst: $(GSTVENV)/.installed
	SURGEON_REQUIRE_GSTREAMER=1 $(GSTVENV)/bin/python -m pytest -q tests/daemon/test_gstreamer.py \
		tests/daemon/test_sources.py tests/daemon/test_tegrastats.py \
		tests/daemon/test_camera_pipelines.py tests/daemon/test_video_gst.py

# The main job on its embedded default: surgeond on the replay stream (clean, then corruptions),
# ResNet-20 adapted by SURGEON under a cache budget beside the frozen model; about three minutes.
demo: $(VENV)/.installed
	$(VENV)/bin/surgeond demo --out demo-out $(DEMO_ARGS)

bench-memory: $(VENV)/.installed
	$(VENV)/bin/surgeon-bench memory --arch resnet20 --batch-size 200 --budget-mb 15 --json

# The paper's table on this machine (long: see BENCHMARKS.md for wall times).
bench-continual: $(VENV)/.installed
	$(VENV)/bin/surgeon-bench continual --arch resnet20 --batch-size 200 --severity 5 \
		--methods source,bn,tent,eata,cotta,mecta,static,surgeon --out bench-out/continual

clean:
	rm -rf $(VENV) $(VENV38) $(VENV310) $(GSTVENV) *.egg-info .pytest_cache
