# Every target installs what it needs into .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test

.PHONY: test demo bench bench-uncertainty bench-loop install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU wheel on this machine kind; a GPU server installs its own torch first.
# The browser test drives Debian's Chromium: installed here when missing and we may (root); otherwise the test skips
# and says why.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the browser test will be skipped"; }
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest Testing -q

demo: $(STAMP)
	$(BIN)/sslsegment demo --out runs/demo

bench: $(STAMP)
	$(BIN)/python -m benchmarks.ssl_methods --profile $${PROFILE:-quick}

clean:
	rm -rf runs benchmarks/work

# Backend: correction → promoted model latency and REST requests/s on loopback (benchmarks/results/backend.{json,md}).
.PHONY: bench-backend
bench-backend: $(STAMP)
	$(BIN)/python -m benchmarks.backend --profile $${PROFILE:-quick}

# Backend under attack: malformed requests, races, faults, submissions across server kills
# (benchmarks/results/backend-attack.{json,md}).
.PHONY: bench-backend-attack
bench-backend-attack: $(STAMP)
	$(BIN)/python -m benchmarks.backend_attack

# Uncertainty estimators: time, memory and error detection on the CPU (benchmarks/results/uncertainty.{json,md}).
# A GPU column comes from `python -m benchmarks.uncertainty --device cuda --parts speed --json-out X` on a GPU
# machine, merged with `--merge-gpu X`.
bench-uncertainty: $(STAMP)
	$(BIN)/python -m benchmarks.uncertainty

# Refinement loop: simulated clinician, guided vs random vs oracle corrections, fold-in comparison
# (benchmarks/results/loop.{json,md} on phantoms with 3 seeds, loop-la.{json,md} on LA2018 at half resolution;
# PROFILES="quick" skips LA2018, whose h5 layout is read from ../shared/data/LA2018 or $$SSLSEGMENT_LA2018).
bench-loop: $(STAMP)
	for p in $${PROFILES:-quick la}; do nice $(BIN)/python -m benchmarks.loop --profile $$p || exit 1; done

# Training speed: ms per step of the bare MONAI UNet, the default network, every method's Trainer.train_step and its
# floor (the network passes it needs), and the uncertainty map (benchmarks/results/training-speed.{json,md}).
.PHONY: bench-speed
bench-speed: $(STAMP)
	$(BIN)/python -m benchmarks.speed
