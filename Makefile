# Python 3.12 from PATH when there is one, else pyenv's 3.12 (megatron-core 0.19 needs >= 3.12).
PYTHON312 ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' 2>/dev/null && echo python3.12 || echo "env PYENV_VERSION=$$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1) python3")
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-fast bench doctor clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	DS_BUILD_OPS=0 $(PY) -m pip install -q 'deepspeed>=0.19,<0.20'
	touch $@

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

doctor: install
	$(VENV)/bin/finevit doctor

bench: install
	$(PY) bench/encoder.py
	$(PY) bench/data_loader.py --images 200

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
