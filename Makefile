# Two commands matter: `make demo` (set up + run the main job) and `make test` (set up + run the suite).
# Everything installs into .venv from pyproject.toml; constraints.txt pins the CPU build of torch.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
CONSTRAINTS := constraints.txt
WHEELHOUSE := wheelhouse
LLAMA_CPP_VERSION := 0.3.36
# Portable AVX2 build: a wheel built with the host's native flags can crash on an older CPU.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF

.PHONY: demo test check bench wheelhouse clean data

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip setuptools wheel

# Stamps re-run the install whenever the declared dependencies change.
# The llm extra takes llama-cpp-python from the local wheelhouse (built once, below) and the model from PyPI.
$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS) | $(BIN)/python wheelhouse
	$(PIP) install -q -c $(CONSTRAINTS) --find-links $(WHEELHOUSE) -e '.[test,llm,llm-bench]'
	touch $@

$(VENV)/.installed-demo: pyproject.toml $(CONSTRAINTS) | $(BIN)/python wheelhouse
	$(PIP) install -q -c $(CONSTRAINTS) --find-links $(WHEELHOUSE) -e '.[llm]'
	touch $@

# llama-cpp-python has no wheel on PyPI; build it once from the sdist (3-4 min on 2 cores) and keep it.
wheelhouse: | $(BIN)/python
	@mkdir -p $(WHEELHOUSE)
	@if ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "wheelhouse: llama-cpp-python $(LLAMA_CPP_VERSION) already built"; \
	else \
		echo "wheelhouse: building llama-cpp-python $(LLAMA_CPP_VERSION) from source (takes a few minutes)"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel --no-deps -w $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION); \
	fi

# The case files of the packaged case-file scenarios (TG-119 from the pyRadPlan 0.5.0 wheel, the Alderson pelvis CT
# from the pydosert 1.5.0 sdist), downloaded with pip into ~/.cache/m2m/data ($$M2M_DATA_DIR) and sha256-checked.
data: $(VENV)/.installed-demo
	$(BIN)/m2m data

check: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/mypy agents bus physics scenarios session stack experiment cli

# The main job: bring the agent stack up (broker, dose engines, evaluator, DRL advisor, LLM planner on the
# embedded model), run one guided planning session on prostate case 0, write runs/<session>/, take the stack down.
demo: $(VENV)/.installed-demo
	$(BIN)/m2m plan --scenario prostate-basic --case 0 --mode guided

# pytest exits 5 when it selects no test: that must fail, never pass as an empty green run.
test: check
	@$(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest selected no test: failing" >&2; exit 1; fi; exit $$rc

bench: $(VENV)/.installed-test
	$(BIN)/m2m bench physics
	$(BIN)/m2m bench bus

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
