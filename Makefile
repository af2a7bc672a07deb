# `make test` and `make demo` each work on a fresh machine: they create .venv and install requirements.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo clean-demo

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The whole method on synthetic forgeries, on the CPU, in minutes: data → stage 1 → stage 2 → test → inference.
DEMO := demo_out
DEMO_TRAIN := $(DEMO)/train/synth_train_400.npy
DEMO_TEST := $(DEMO)/test/synth_test_100.npy
# splicing and copy-move with a glaring noise mismatch on plain scenes (no sharp-edged shapes to confuse with it):
# what a 1.7 M-parameter model can learn in CPU minutes
DEMO_DATA := --kinds splice,copymove --difficulty 0 --shapes 0

demo: $(VENV)/.installed
	@if [ -e $(DEMO) ]; then echo "moving the previous demo to $(DEMO).previous"; rm -rf $(DEMO).previous; mv $(DEMO) $(DEMO).previous; fi
	$(PY) datasets/synthetic.py --out $(DEMO)/train --num 400 --size 128 --seed 0 --name synth_train $(DEMO_DATA)
	$(PY) datasets/synthetic.py --out $(DEMO)/test --num 100 --size 128 --seed 1 --name synth_test $(DEMO_DATA)
	$(PY) stage1/train.py --config configs/demo_stage1.yaml --out $(DEMO)/stage1
	$(PY) stage2/train.py --config configs/demo_stage2.yaml --out $(DEMO)/stage2
	$(PY) stage2/test.py --weights $(DEMO)/stage2/best.pth --flist $(DEMO_TEST) --out $(DEMO)/test_results --save-masks --baselines
	$(PY) stage2/infer.py --input "$(DEMO)/test/images/0000[0-5]_*.png" --weights $(DEMO)/stage2/best.pth --out $(DEMO)/infer
	@echo
	@cat $(DEMO)/test_results/table.txt 2>/dev/null || true
	@echo "pictures: $(DEMO)/infer (masks, heat maps), $(DEMO)/stage2/previews (validation), $(DEMO)/test_results"
