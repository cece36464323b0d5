# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs on first use (CPU build of torch, faiss-cpu; see README for GPUs).
VENV   := .venv
PY     := $(VENV)/bin/python
GENSR  := $(VENV)/bin/gensr
STAMP  := $(VENV)/.installed
DATA   ?= data/ml100k
RUN    ?= runs/demo

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch==2.13.0 must be resolved in the same command as everything that depends on it
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[cpu,test]'
	touch $(STAMP)

install: $(STAMP)

# prepare (if missing) -> LightGCN -> GenSR training -> SASRec (if missing) -> evaluation
# beside the baselines
demo: $(STAMP)
	@test ! -e $(RUN) || echo "make demo: removing the previous run in $(RUN) (RUN=DIR keeps it)"
	rm -rf $(RUN)
	$(GENSR) train --config configs/demo.yaml --out $(RUN) --set data.path=$(DATA)
	test -f $(DATA)/cf/sasrec.pt || $(GENSR) pretrain-sasrec --data $(DATA)
	$(GENSR) eval --checkpoint $(RUN) --baselines --out $(RUN)/results.json

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf $(VENV) data runs .pytest_cache
