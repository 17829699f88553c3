# Two commands do all set-up on a fresh machine:
#   make run    create the environment if missing, run the example job on this machine
#   make test   create the environment, the test cluster's binaries and the images if missing,
#               run the whole test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
JOB ?= apps/grpo/tiny.yaml
PYTEST_ARGS ?=

# Rebuilt when pyproject.toml changes.
ENV_STAMP := $(VENV)/.kubeforge-installed

.PHONY: env testbed images image-cuda run test test-fast lint crd clean

env: $(ENV_STAMP)

$(ENV_STAMP): pyproject.toml
	@echo "== creating $(VENV) (torch, vLLM, torchtitan: a few minutes the first time)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[runtime,operator,dev]'
	# vLLM without its own pins (see the runtime extra in pyproject.toml).
	$(PY) -m pip install --quiet --no-deps "$$($(PY) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["tool"]["kubeforge"]["vllm"])')"
	$(PY) -c 'import torch, vllm, torchtitan; print("torch", torch.__version__, "| vllm", vllm.__version__, "| torchtitan ok")'
	@touch $@

# The operator tests' cluster, built from Go modules into ~/.cache/kubeforge-testbed: the control
# plane (etcd, kube-apiserver, KCM, scheduler, KWOK), a real node's services (kubelet, kube-proxy,
# CoreDNS, kube-router, local-path-provisioner, pause) and helm; about 20 minutes cold on 2 cores,
# instant when cached. The node's container runtime and network tools come from Debian's packages.
testbed:
	@testbed/node-packages.sh
	@testbed/build.sh > /dev/null

# The operator and CPU runtime images from images/, on a Debian base made with debootstrap, pip
# packages from a wheelhouse made here; each saved as a docker-archive tarball in
# ~/.cache/kubeforge-images/tars. The last stdout lines are `REF TARBALL` per image.
# docs/images.md: about 7 minutes cold on 2 cores, under a second when nothing changed.
images:
	@images/build.sh

# The CUDA runtime image (many GB; imports checked here, runs only on GPUs), not in `images`.
image-cuda:
	@images/build.sh runtime-cuda

# The example jobs' model: a tiny random Qwen3 and tokenizer, made here (nothing is downloaded).
TINY_MODEL := runs/models/tiny-qwen3

$(TINY_MODEL)/config.json: | $(ENV_STAMP)
	$(PY) -m kubeforge.tiny_model $(TINY_MODEL)

run: env $(TINY_MODEL)/config.json
	$(VENV)/bin/kubeforge run $(JOB)

# The real-node tests (e2e/test_real_node.py) run the images `make images` builds.
# pytest exits 5 when it collects nothing: say so instead of failing.
test: env testbed images
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-fast: env testbed
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The chart carries a copy (helm can't read outside its folder); e2e/test_helm.py fails when they differ.
crd: env
	$(VENV)/bin/kubeforge crd > crds/rljob.yaml
	cp crds/rljob.yaml helm/forge-operator/files/rljob.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache
