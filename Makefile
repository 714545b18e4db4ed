# minivseg — `make help` lists the targets. A fresh clone needs only `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LAB    := $(VENV)/.notebooks
DATA   ?=
NGPUS  ?= 1
SYNTH  := data/synthetic
VSPW   := data/synthetic_vspw
YTVIS  := data/synthetic_ytvis
HELDOUT := data/synthetic_heldout
# make demo's data: things up to 20 m away; its held-out sequences come from another seed.
# The VSPW and YouTube-VIS demos keep 30 m: at 20 m their 2 val sequences hold too few tracks.
SYNTH_ARGS   := --train-seqs 16 --val-seqs 2 --frames 30 --seed 0 --z-far 20
HELDOUT_ARGS := --train-seqs 0 --val-seqs 12 --frames 30 --seed 7 --z-far 20 --no-depth
SYNTH30_ARGS := --train-seqs 16 --val-seqs 2 --frames 30 --seed 0
ARGS   ?=
INIT   ?=

# $(call synthetic,DIR,ARGS): the synthetic dataset DIR written with ARGS. DIR is written (into
# DIR.partial, renamed when complete) if it is missing, and rewritten if generator_args.txt shows
# other arguments; a DIR without that file is not ours (or from an older version): kept and used.
define synthetic
	@if [ ! -e $(1) ] || { [ -f $(1)/generator_args.txt ] && \
			[ "$$(cat $(1)/generator_args.txt)" != "$(2)" ]; }; then \
		rm -rf $(1).partial && $(PY) -m minivseg.synthetic --out $(1).partial $(2) && \
		echo "$(2)" > $(1).partial/generator_args.txt && rm -rf $(1) && mv $(1).partial $(1); \
	elif [ ! -f $(1)/generator_args.txt ]; then \
		echo "note: using $(1) as it is; it has no generator_args.txt, so it may not be what"; \
		echo "  'python -m minivseg.synthetic $(2)' writes (delete it to regenerate)"; fi
endef

.DEFAULT_GOAL := help
.PHONY: help demo demo-vspw demo-youtube-vis train-vspw train-youtube-vis test lessons notebooks lab lint format data-samples bench train-kitti clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip >/dev/null
	$(VENV)/bin/pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## synthetic data -> train the tiny TubeFormer on CPU -> STQ/VPQ/mIoU + overlays, val and held out
	$(call synthetic,$(SYNTH),$(SYNTH_ARGS))
	$(call synthetic,$(HELDOUT),$(HELDOUT_ARGS))
	$(PY) -m minivseg.train --preset=demo --data=$(SYNTH) --out_dir=runs/demo --overwrite $(ARGS)
	$(PY) -m minivseg.evaluate --checkpoint runs/demo/last.pt --data $(SYNTH) --split val \
		--out runs/demo/eval
	$(PY) -m minivseg.evaluate --checkpoint runs/demo/last.pt --data $(HELDOUT) --split val \
		--out runs/demo/eval_heldout
	@echo "overlay GIFs: runs/demo/eval/overlays/ and runs/demo/eval_heldout/overlays/  loss curve: runs/demo/loss_curve.png"

demo-vspw: $(STAMP)  ## video semantic segmentation: the synthetic video in VSPW's layout -> mIoU, mVC8, mVC16
	$(call synthetic,$(VSPW),--format vspw $(SYNTH30_ARGS))
	$(PY) -m minivseg.train --preset=vspw_demo --data=$(VSPW) --overwrite $(ARGS)
	$(PY) -m minivseg.evaluate --checkpoint runs/vspw_demo/last.pt --data $(VSPW) --split val \
		--out runs/vspw_demo/eval

demo-youtube-vis: $(STAMP)  ## video instances: the synthetic video in YouTube-VIS's layout, T=5 -> AP, results.json
	$(call synthetic,$(YTVIS),--format youtube-vis $(SYNTH30_ARGS))
	$(PY) -m minivseg.train --preset=youtube_vis_demo --data=$(YTVIS) --overwrite $(ARGS)
	$(PY) -m minivseg.evaluate --checkpoint runs/youtube_vis_demo/last.pt --data $(YTVIS) \
		--split valid --out runs/youtube_vis_demo/eval

test: $(STAMP)  ## run the whole test suite (unit tests, lessons as notebooks, training smoke runs)
	$(PY) -m pytest

lessons: $(STAMP)  ## run every lesson as a script (headless)
	@for f in lessons/[0-9][0-9]_*.py; do echo "== $$f"; MPLBACKEND=Agg $(PY) $$f || exit 1; done

$(LAB): $(STAMP)  # the notebooks extra: JupyterLab
	$(VENV)/bin/pip install -e '.[dev,notebooks]'
	touch $(LAB)

notebooks: $(LAB)  ## lessons -> .ipynb notebooks (git-ignored, outputs kept), install JupyterLab
	$(VENV)/bin/jupytext --update --set-kernel python3 --to ipynb lessons/[0-9][0-9]_*.py

lab: notebooks  ## open the lesson notebooks in JupyterLab (its flags: ARGS="--port=8889 ...")
	$(VENV)/bin/jupyter lab lessons $(ARGS)

lint: $(STAMP)  ## ruff lint + format check
	$(VENV)/bin/ruff check minivseg tests lessons
	$(VENV)/bin/ruff format --check minivseg tests lessons

format: $(STAMP)  ## apply ruff formatting
	$(VENV)/bin/ruff format minivseg tests lessons

data-samples: $(STAMP)  ## regenerate data_samples/ with the synthetic generator
	rm -rf data_samples/images data_samples/panoptic_maps data_samples/depth
	$(PY) -m minivseg.synthetic --out data_samples --train-seqs 2 --val-seqs 1 --frames 8 --seed 0

bench: $(STAMP)  ## benchmarks: metrics vs reference, sparse vs dense temporal attention, the demo's training step
	$(PY) tests/benchmarks/bench_metrics.py
	$(PY) tests/benchmarks/bench_sparse_temporal.py
	$(PY) tests/benchmarks/bench_train_step.py

train-kitti: $(STAMP)  ## full TubeFormer-DeepLab-B1 on KITTI-STEP: make train-kitti DATA=/path [NGPUS=k] [INIT=file.pt]
	@test -n "$(DATA)" || { echo "error: set DATA=/path/to/kitti-step (see README: KITTI-STEP)"; exit 2; }
	$(PY) -m minivseg.data --check $(DATA) --splits train val
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NGPUS) -m minivseg.train --preset=kitti --data=$(DATA) \
		$(if $(INIT),--init=$(INIT)) $(ARGS)

train-vspw: $(STAMP)  ## TubeFormer on VSPW_480p (VSS): make train-vspw DATA=/path/VSPW_480p [NGPUS=k] [INIT=file.pt]
	@test -n "$(DATA)" || { echo "error: set DATA=/path/to/VSPW_480p (see README: VSPW)"; exit 2; }
	$(PY) -m minivseg.vspw --check $(DATA) --splits train val
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NGPUS) -m minivseg.train --preset=vspw --data=$(DATA) \
		$(if $(INIT),--init=$(INIT)) $(ARGS)

train-youtube-vis: $(STAMP)  ## TubeFormer on YouTube-VIS, T=5: make train-youtube-vis DATA=/path/ytvis_2021 [NGPUS=k] [INIT=file.pt]
	@test -n "$(DATA)" || { echo "error: set DATA=/path/to/ytvis_2019 or ytvis_2021 (see README: YouTube-VIS)"; exit 2; }
	$(PY) -m minivseg.youtube_vis --check $(DATA) --splits train
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NGPUS) -m minivseg.train --preset=youtube_vis --data=$(DATA) \
		$(if $(INIT),--init=$(INIT)) $(ARGS)

clean:  ## remove generated data, runs and notebooks (keeps .venv)
	rm -rf data runs outputs lessons/*.ipynb .pytest_cache .ruff_cache
