# `make test` and `make demo` each work on a fresh machine: they create .venv and install requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo clean-demo mutants app test-app

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Two processes (the CI machine has two cores); each test file stays on one, so its module fixtures are built once.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile

# The whole method on synthetic forgeries, on the CPU, in minutes: data → stage 1 → stage 2 → test → inference.
DEMO := demo_out
DEMO_TRAIN := $(DEMO)/train/synth_train_400.npy
DEMO_TEST := $(DEMO)/test/synth_test_100.npy
# splicing and copy-move with a glaring noise mismatch on plain scenes (no sharp-edged shapes to confuse with it):
# what a 1.7 M-parameter model can learn in CPU minutes
DEMO_DATA := --kinds splice,copymove --difficulty 0 --shapes 0

demo: $(VENV)/.installed
	@if [ -e $(DEMO) ]; then echo "moving the previous demo to $(DEMO).previous"; rm -rf $(DEMO).previous; mv $(DEMO) $(DEMO).previous; fi
	$(PY) generate_flist.py --synthetic 400 --out $(DEMO)/train --size 128 --seed 0 --name synth_train $(DEMO_DATA)
	$(PY) generate_flist.py --synthetic 100 --out $(DEMO)/test --size 128 --seed 1 --name synth_test $(DEMO_DATA)
	$(PY) stage1/train.py --config configs/demo_stage1.yaml --out $(DEMO)/stage1
	$(PY) stage2/train.py --config configs/demo_stage2.yaml --out $(DEMO)/stage2
	$(PY) stage2/test.py --weights $(DEMO)/stage2/best.pth --flist $(DEMO_TEST) --out $(DEMO)/test_results --save-masks --baselines
	$(PY) stage2/infer.py --input "$(DEMO)/test/images/0000[0-5]_*.png" --weights $(DEMO)/stage2/best.pth --out $(DEMO)/infer
	@echo
	@cat $(DEMO)/test_results/table.txt 2>/dev/null || true
	@echo "pictures: $(DEMO)/infer (masks, heat maps), $(DEMO)/stage2/previews (validation), $(DEMO)/test_results"

# Mutation testing, a developer's habit (never part of `make test` or CI); see docs/DEVELOPMENT.md.
#   make mutants MUTATE="losses/ utils/evaluation/metrics.py"    (folders end in /; run one module at a time)
#   make mutants MUTATE=datasets/io.py TESTS="tests/test_io_edges.py"
# mutmut 3 runs in a snapshot of the tree in $(MUTANTS_DIR)/ (its own config, its mutants/ inside): for each mutant
# it forks and runs only those of TESTS that call the mutated function. Survivors: cd $(MUTANTS_DIR) and
# ../$(VENV)/bin/mutmut show NAME (or browse).
MUTATE ?= losses/ utils/evaluation/metrics.py datasets/io.py
MUTANTS_DIR := .mutmut
MUTANTS_JOBS ?= 1
# The fast tests that cover each module. test_metrics' scikit-learn sweep (~7 s) is left out: it would run for
# almost every mutant, and its checks are repeated on small hand-made maps by the faster tests.
MUTANT_TESTS_losses := tests/test_losses.py tests/test_head_losses.py tests/test_losses_edges.py \
	tests/test_losses_backward.py
MUTANT_TESTS_utils/evaluation/metrics.py := tests/test_metrics.py tests/test_metrics_edges.py \
	--deselect tests/test_metrics.py::test_every_variant_and_dataset_scores_against_sklearn
MUTANT_TESTS_datasets/io.py := tests/test_io_edges.py tests/test_boundaries.py tests/test_hostile_input.py \
	tests/test_flist.py tests/test_dataset.py
MUTANT_TESTS_datasets/dataset.py := tests/test_dataset.py tests/test_boundaries.py tests/test_hostile_input.py
TESTS ?= $(foreach m,$(MUTATE),$(or $(MUTANT_TESTS_$(patsubst %/,%,$(m))),\
	$(error no default tests for $(m): name them, e.g. make mutants MUTATE=$(m) TESTS="tests/test_x.py")))
# The whole tree the tests import is copied; only MUTATE is mutated (folders as folder/*).
MUTANTS_TREE := losses datasets utils models
MUTANTS_COPY := tests configs weights stage1 stage2 generate_flist.py pytest.ini

$(VENV)/.mutmut-installed: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

mutants: $(VENV)/.mutmut-installed
	rm -rf $(MUTANTS_DIR) && mkdir -p $(MUTANTS_DIR)
	cp -a $(MUTANTS_TREE) $(MUTANTS_COPY) $(MUTANTS_DIR)/
	find $(MUTANTS_DIR) -name __pycache__ -prune -exec rm -rf {} +
	{ echo "[mutmut]"; \
	  echo "source_paths ="; for p in $(MUTANTS_TREE); do echo "    $$p/"; done; \
	  echo "only_mutate ="; for m in $(MUTATE); do case $$m in */) echo "    $${m}*";; *) echo "    $$m";; esac; done; \
	  echo "also_copy ="; for p in $(MUTANTS_COPY); do echo "    $$p"; done; \
	  echo "pytest_add_cli_args_test_selection ="; for t in $(TESTS); do echo "    $$t"; done; \
	  echo "pytest_add_cli_args ="; echo "    -p"; echo "    no:cacheprovider"; \
	  echo "use_git_change_detection = false"; \
	} > $(MUTANTS_DIR)/setup.cfg
	@echo "mutating: $(MUTATE)"; echo "tests: $(TESTS)"
	start=$$(date +%s); \
	cd $(MUTANTS_DIR) && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ../$(VENV)/bin/mutmut run --max-children $(MUTANTS_JOBS); \
	status=$$?; echo; echo "wall time: $$(( $$(date +%s) - start )) s"; exit $$status
	@echo; echo "mutants per module (killed / survived / other statuses):"
	@cd $(MUTANTS_DIR) && ../$(VENV)/bin/mutmut results --all true | awk -F': ' \
	  '{ name = $$1; sub(/^ +/, "", name); sub(/\.x(_|ǁ).*/, "", name); n[name]++; c[name, $$2]++; s[$$2] = 1 } \
	  END { for (m in n) { line = sprintf("  %-32s %4d mutants:", m, n[m]); \
	        for (k in s) if (c[m, k]) line = line sprintf("  %s %d", k, c[m, k]); print line } }' | sort
	@echo; echo "not killed:"; cd $(MUTANTS_DIR) && ../$(VENV)/bin/mutmut results

# The interactive viewer (README, "Interactive viewer"): gradio and selenium from requirements-app.txt, installed by
# stage2/install_app.py without changing torch, torchvision, numpy, pillow or opencv. `make test` never needs them.
APP_WEIGHTS ?= weights/mpc_demo_hrt_nano_stage2.pth
APP_PORT ?= 7860
APP_FOLDER ?=

$(VENV)/.app-installed: $(VENV)/.installed requirements-app.txt stage2/install_app.py
	$(PY) stage2/install_app.py requirements-app.txt
	touch $@

# http://127.0.0.1:$(APP_PORT) with the shipped demo weights; APP_FOLDER=photos/ offers that folder's images.
app: $(VENV)/.app-installed
	$(PY) stage2/app.py --weights $(APP_WEIGHTS) --port $(APP_PORT) $(if $(APP_FOLDER),--folder $(APP_FOLDER))

# The viewer's tests: its functions, then the page in headless Chromium (Debian's chromium and chromium-driver).
test-app: $(VENV)/.app-installed
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider tests_app

