# Two entry points (see README): `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The `ffcv` extra compiles against libturbojpeg and OpenCV and loads them at run time.
SYSTEM_LIBS := libturbojpeg0-dev libopencv-dev pkg-config
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install clean system-libs

# Installs Debian's packages only when pkg-config cannot find the libraries (CI: root, clean Debian).
system-libs:
	@if command -v pkg-config >/dev/null && pkg-config --exists libturbojpeg \
	    && { pkg-config --exists opencv4 || pkg-config --exists opencv; }; then :; \
	elif command -v apt-get >/dev/null; then \
	    echo "installing $(SYSTEM_LIBS) (needed by ffcv)"; \
	    $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(SYSTEM_LIBS); \
	else \
	    echo "ffcv needs libjpeg-turbo and OpenCV development files and pkg-config; install them" \
	         "(conda: conda install -c conda-forge libjpeg-turbo opencv pkg-config)" >&2; exit 1; \
	fi

$(STAMP): pyproject.toml constraints.txt Makefile | system-libs
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,ffcv]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/condconv demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs mlruns mlflow.db
