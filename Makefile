# The two commands of README.md: `make demo` and `make test`.
# Each creates .venv if missing and installs distad (with MPICH from PyPI) into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
STAMP  := $(VENV)/.distad-installed
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[mpich,plot,test]'
	touch $@

# The main job: data-parallel training on the bundled digits data set, 4 ranks.
DEMO_ARGS ?= --epochs 40 --lr 0.2 --hidden 256 --out runs/demo
demo: $(STAMP)
	$(MPIEXEC) -n 4 $(VENV)/bin/distad train $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests
	$(MPIEXEC) -n 2 $(PY) -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests
	$(MPIEXEC) -n 4 $(PY) -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests

lint: $(STAMP)
	$(VENV)/bin/ruff check distad tests examples

clean:
	rm -rf $(VENV) build *.egg-info
