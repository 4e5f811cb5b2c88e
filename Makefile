# Python 3.12 from PATH when there is one, else pyenv's 3.12 (megatron-core 0.19 needs >= 3.12).
PYTHON312 ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' 2>/dev/null && echo python3.12 || echo "env PYENV_VERSION=$$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1) python3")
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-fast bench doctor demo convert-checkpoint clean

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

# Stage 1 on this machine: synthetic corpus + tokenizer (kept between runs), then a fresh run
# with TP=2 on two gloo processes; held-out retrieval and zero-shot classification of single
# shapes (32 colour x kind classes) before and after.
DEMO_DIR ?= corpora/demo
DEMO_RUN ?= runs/demo_cpu
demo: install
	test -f $(DEMO_DIR)/classify/heldout/finevit_corpus.json || $(PY) data_tools/make_demo_corpus.py \
		--out $(DEMO_DIR) --train 2000 --heldout 200 --schemas recaption classify --overwrite --quiet
	test -f $(DEMO_DIR)/caption.model || $(PY) data_tools/train_tokenizer.py $(DEMO_DIR)/recaption/train \
		--vocab-size 512 --out $(DEMO_DIR)/caption.model --quiet
	rm -rf $(DEMO_RUN)
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m finevit.cli \
		train configs/stage1/demo_cpu.yaml logging.run_dir=$(DEMO_RUN) \
		data.corpora='[{path: $(DEMO_DIR)/recaption/train}]' data.tokenizer=$(DEMO_DIR)/caption.model \
		eval.corpora='[{path: $(DEMO_DIR)/recaption/heldout}, {path: $(DEMO_DIR)/classify/heldout, name: shapes}]'
	$(VENV)/bin/finevit report $(DEMO_RUN)

# A trained run as Hugging Face directories: make convert-checkpoint RUN=runs/x [STEP=1000] OUT=dir
convert-checkpoint: install
	@test -n "$(RUN)" -a -n "$(OUT)" || { echo "usage: make convert-checkpoint RUN=<run dir> OUT=<dir> [STEP=<step>] [OVERWRITE=1]"; exit 2; }
	$(VENV)/bin/finevit convert $(RUN) --out $(OUT) $(if $(STEP),--step $(STEP)) $(if $(OVERWRITE),--overwrite)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
