# The first two commands a newcomer runs: `make serve` and `make test`.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed

.PHONY: setup test lint serve embedded data clean

setup: $(STAMP)

# torch first, pinned: the CPU build is on disk, and an unpinned torch would pull gigabytes of CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	.venv/bin/ruff check .

test: setup lint
	$(PY) -m pytest -q
	@if [ -f ../shared/checks/heads_contract.py ]; then $(PY) ../shared/checks/heads_contract.py; fi

serve: setup
	$(PY) -m server

data: setup
	$(PY) -m training.synth --out data/math --train 2000 --test 200 --seed 0

# Rebuilds the embedded default base, the committed heads and their report (about 40 minutes on
# 2 cores). The committed heads train on 20,000 synthetic problems; the test split is the same
# 200 problems as data/math (same seed).
embedded: setup
	$(PY) -m training.pretrain --out models/mini-gpt2
	$(PY) -m training.synth --out data/math-20k --train 20000 --test 200 --seed 0
	$(PY) -m training.fit --data data/math-20k --task math --kind backward_attention --epochs 2 \
		--eval-every 200 --out registry/math
	$(PY) -m training.fit --data data/math-20k --task math --kind linear --epochs 2 \
		--eval-every 200 --out registry/math-linear
	$(PY) -m training.evaluate --heads registry/math registry/math-linear --data data/math-20k \
		--out reports/math

clean:
	rm -rf .venv .pytest_cache .ruff_cache data
