# refinevla: `make book` runs the whole study (embedded default) and builds the book; `make test` runs the tests.
# Both create .venv on first use and install everything, system packages included (see README).
#
#   make book                       PRESET=default (the embedded default, ~18 min on 2 cores)
#   make study                      the ablations (study preset, 3 seeds per arm, ~2 h, resumable), then their
#                                   results exported to results/study/ (committed; the book's ablation page)
#   make book PRESET=smoke          seconds per stage
#   make book ARGS="-p lambda_reason 0.5 --run lambda05"
#   make test                       the test suite (~14 min from a fresh clone, set-up included)
#   make base                       re-make the released models/tiny-base, then models/tiny-vla (~90 min, resumable)
#   make lab                        JupyterLab with the project's environment as the kernel
#   make bench                      speed / memory benchmarks -> benchmarks/results/
#   TORCH=cu128 make book           a CUDA build of torch instead of the CPU one (GPU machines)
#   make paper-env                  a second environment for SpatialVLA/OpenVLA bases (transformers 4.47)
#   make constraints                pin the versions installed now (after the tests passed) in constraints.txt

PYTHON ?= python3
VENV   ?= .venv
PRESET ?= default
ARGS   ?=
TORCH  ?= cpu
TORCH_VERSION ?= 2.13.0
# the tested versions of everything else (scripts/constraints.py writes it); CONSTRAINTS= installs the newest allowed
CONSTRAINTS ?= constraints.txt
SYSTEM_PACKAGES = libegl1 libegl-mesa0 libgl1 libgles2 libglvnd0

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

ifeq ($(TORCH),cpu)
TORCH_SPEC := torch==$(TORCH_VERSION)+cpu
else
TORCH_SPEC := torch==$(TORCH_VERSION)
endif

.PHONY: book test base study lab bench setup system clean constraints paper-env

book: setup
	$(BIN)/refinevla book --preset $(PRESET) $(ARGS)

# The released base (refinevla/recipe.py): VLM pre-training on grounding questions, then VLA pre-training on the
# mixture (models/tiny-base); then that base trained further with half of the mixture in randomized scenes
# (models/tiny-vla, the model the default study fine-tunes). Every step resumes where a killed run stopped; each
# folder is written last, whole.
base: setup
	$(BIN)/refinevla base --preset base $(ARGS)
	$(BIN)/refinevla base --preset vla $(ARGS)

# The ablation study: every stage of the study preset (data/study/), then its per-episode results, resolved config
# and stage keys copied to results/study/ (small files, committed: the book shows them without re-running).
study: setup
	$(BIN)/refinevla all --preset study $(ARGS)
	$(BIN)/refinevla export --preset study $(ARGS)

test: setup
	MUJOCO_GL=egl $(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

# The kernel "Python (refinevla)" the notebooks name is registered inside .venv (refinevla.book.ensure_kernel);
# as root, JupyterLab needs --allow-root. LAB_ARGS: more jupyter-lab options (e.g. --no-browser --port 8890).
LAB_ARGS ?=
lab: setup
	$(BIN)/python -c "from refinevla.book import ensure_kernel; ensure_kernel()"
	$(BIN)/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS) notebooks/

bench: setup
	$(BIN)/python benchmarks/annotate_throughput.py
	$(BIN)/python benchmarks/train_memory_speed.py --steps 3 --allocator --grad-checkpointing
	$(BIN)/python benchmarks/eval_overhead.py
	$(BIN)/python benchmarks/eval_throughput.py
	$(BIN)/python benchmarks/finetune_cache.py
	$(BIN)/python benchmarks/threads.py
	$(BIN)/python benchmarks/grounding.py --checkpoint models/tiny-base --checkpoint models/tiny-vla

setup: system $(STAMP) book/_static/mathjax/tex-mml-chtml.js

# EGL/Mesa for offscreen MuJoCo rendering; npm to vendor MathJax for the offline book; Chromium for the browser test.
system:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing system packages:$$missing"; \
	    echo "install them with:  sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

# torch first, from the CPU index (or the CUDA one with TORCH=cu1xx), so no resolver pulls a CUDA build by accident.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --retries 1 --timeout 15 "$(TORCH_SPEC)" --extra-index-url https://download.pytorch.org/whl/$(TORCH)
	$(BIN)/pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[all]"
	$(BIN)/python -c "from refinevla.book import ensure_kernel; ensure_kernel()"
	touch $(STAMP)

book/_static/mathjax/tex-mml-chtml.js:
	bash scripts/vendor_mathjax.sh

constraints:
	$(BIN)/python scripts/constraints.py

# The paper scale on a SpatialVLA / OpenVLA base: their remote code needs transformers 4.47 (envs/paper-spatialvla.txt),
# so it gets its own environment; refinevla itself is installed without its default pins. Its Python is 3.10 or 3.11:
# SimplerEnv asks for one of them (its sapien 2.2.2 wheels; https://github.com/simpler-env/SimplerEnv#installation).
PAPER_VENV ?= .venv-paper
PAPER_PYTHON ?= python3.11
PAPER_PYTHON_CHECK = import sys; v = sys.version_info[:2]; sys.exit(0 if v in ((3, 10), (3, 11)) else \
	"paper-env needs Python 3.10 or 3.11 (SimplerEnv, sapien 2.2.2), not %d.%d: set PAPER_PYTHON" % v)
paper-env:
	test -d $(PAPER_VENV) || $(PAPER_PYTHON) -m venv $(PAPER_VENV)
	$(PAPER_VENV)/bin/python -c '$(PAPER_PYTHON_CHECK)'
	$(PAPER_VENV)/bin/pip install -q --upgrade pip
	$(PAPER_VENV)/bin/pip install -q "$(TORCH_SPEC)" torchvision --extra-index-url https://download.pytorch.org/whl/$(TORCH)
	$(PAPER_VENV)/bin/pip install -q -r envs/paper-spatialvla.txt
	$(PAPER_VENV)/bin/pip install -q --no-deps -e .

clean:
	rm -rf data/*/ _build
