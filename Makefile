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
	$(PY) bench/convert.py

# Both stages on this machine (2 gloo processes, data parallel): the synthetic corpus and both
# tokenizers (kept between runs), then stage 1 (held-out retrieval and zero-shot classification
# of single shapes, 32 colour x kind classes, before and after), then stage 2 from stage 1's
# encoder with a toy LLM from scratch (generated answers per FineCap task, before and after).
DEMO_DIR ?= corpora/demo
DEMO_RUN ?= runs/demo_cpu
DEMO_RUN2 ?= runs/demo_cpu_stage2
DEMO_TORCHRUN = OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=2 -m finevit.cli train
demo: install
	test -f $(DEMO_DIR)/finecap/heldout/finevit_corpus.json || $(PY) data_tools/make_demo_corpus.py \
		--out $(DEMO_DIR) --train 2000 --heldout 200 --schemas recaption classify finecap --overwrite --quiet
	test -f $(DEMO_DIR)/caption.model || $(PY) data_tools/train_tokenizer.py $(DEMO_DIR)/recaption/train \
		--model-type bpe --vocab-size 1024 --out $(DEMO_DIR)/caption.model --quiet
	test -f $(DEMO_DIR)/llm_tokenizer/tokenizer.json || $(PY) data_tools/train_tokenizer.py \
		$(DEMO_DIR)/finecap/train --kind llm --vocab-size 1024 --out $(DEMO_DIR)/llm_tokenizer --quiet
	rm -rf $(DEMO_RUN) $(DEMO_RUN2)
	$(DEMO_TORCHRUN) configs/stage1/demo_cpu.yaml logging.run_dir=$(DEMO_RUN) \
		data.corpora='[{path: $(DEMO_DIR)/recaption/train}]' data.tokenizer=$(DEMO_DIR)/caption.model \
		eval.corpora='[{path: $(DEMO_DIR)/recaption/heldout}, {path: $(DEMO_DIR)/classify/heldout, name: shapes}]'
	$(DEMO_TORCHRUN) configs/stage2/demo_cpu.yaml logging.run_dir=$(DEMO_RUN2) model.vision.init_from=$(DEMO_RUN) \
		data.corpora='[{path: $(DEMO_DIR)/finecap/train}]' data.llm.tokenizer=$(DEMO_DIR)/llm_tokenizer \
		eval.corpora='[{path: $(DEMO_DIR)/finecap/heldout}]'
	@echo "== stage 1 ($(DEMO_RUN))"; $(VENV)/bin/finevit report $(DEMO_RUN)
	@echo "== stage 2 ($(DEMO_RUN2))"; $(VENV)/bin/finevit report $(DEMO_RUN2)

# A trained run as Hugging Face directories: make convert-checkpoint RUN=runs/x [STEP=1000] OUT=dir
convert-checkpoint: install
	@test -n "$(RUN)" -a -n "$(OUT)" || { echo "usage: make convert-checkpoint RUN=<run dir> OUT=<dir> [STEP=<step>] [OVERWRITE=1]"; exit 2; }
	$(VENV)/bin/finevit convert $(RUN) --out $(OUT) $(if $(STEP),--step $(STEP)) $(if $(OVERWRITE),--overwrite)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
