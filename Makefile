# Set-up and checks. `make test` and `make demo` work on a fresh machine with only Python:
# they create .venv and install what they need.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTEST  := $(BIN)/python -m pytest --durations=10
XDIST   ?= -n 2 --dist loadfile
EXTRAS  ?= cpu,legacy-keras,kfp,k8s,demo,onnx,serve,test,torch
# The demo needs only TensorFlow (CPU), kfp and scikit-learn's digits: 1.9 GB instead of 8.5.
DEMO_VENV   ?= .venv-demo
DEMO_EXTRAS ?= cpu,kfp,demo
LINT_VENV       ?= .venv-lint
KFP_ASCEND_VENV ?= .venv-kfp-ascend

.PHONY: setup test lint test-keras3 test-keras2 test-containers containers-run demo bench clean

setup: $(VENV)/.installed

# $(call venv,DIR,EXTRAS): DIR with this project installed (editable) and EXTRAS.
define venv
	@echo "make: installing $(1) with .[$(2)]"
	@$(PY) -m venv $(1)
	@$(1)/bin/pip install -qq --upgrade pip
	@$(1)/bin/pip install -qq -e '.[$(2)]'
	@touch $(1)/.installed
endef

$(VENV)/.installed: pyproject.toml
	$(call venv,$(VENV),$(EXTRAS))

$(DEMO_VENV)/.installed: pyproject.toml
	$(call venv,$(DEMO_VENV),$(DEMO_EXTRAS))

lint: setup
	$(BIN)/ruff check hrnet components pipelines tests benchmarks
	$(BIN)/vermin -q --no-tips --violations -t=3.9- hrnet

# Everything under Keras 3 (TF 2.21), then what differs between Keras versions (model build,
# weight import, training, resume, export: the keras2 mark) again under legacy Keras 2
# (tf-keras), which stands in for the Ascend image's TF 2.6 / Keras 2. The infra tests need
# every tool present (kubectl, kubernetes-validate and hadolint come with the test extra; the
# Ascend image's older kfp lives in its own venv). Two pytest-xdist workers, a test module
# each (its module fixtures made once): most of a training test is one core importing and
# tracing, so two of them share the 2 cores of CI well.
test-keras3: setup $(KFP_ASCEND_VENV)/.installed browser
	HRNET_REQUIRE_INFRA_TOOLS=1 HRNET_KFP_ASCEND_PYTHON=$(abspath $(KFP_ASCEND_VENV))/bin/python $(PYTEST) -q -m "not containers" $(XDIST)

test-keras2: setup
	TF_USE_LEGACY_KERAS=1 $(PYTEST) -q -m keras2 $(XDIST)

# The steps in their images (tests/test_containers.py): a Docker engine (started here, and
# stopped after, when none runs), the registry-free bases, the cpu image and the Ascend stand-in.
test-containers: setup
	images/with-docker.sh $(MAKE) images-local containers-run

containers-run:
	HRNET_REQUIRE_CONTAINERS=1 $(PYTEST) -q -m containers

test: lint lint-infra test-keras3 test-keras2 test-containers

demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/python -m pipelines run-local

# Each prints its figure; model_throughput_keras3.py / gpu_check.sh are for GPU machines without TF.
bench: setup
	for b in model_throughput model_vs_timm convert_throughput input_throughput stream_startup serving_latency inference_runtimes; do $(BIN)/python benchmarks/$$b.py || exit 1; done

# ---- images/ and manifests/ (infra) -------------------------------------------------------
# `make images [IMAGE_TARGETS="cpu gpu ascend"] [REGISTRY=...] [TAG=...] [PUSH=1]`: the step images,
# named <REGISTRY>/hrnet-<target>:<TAG> as components/images.py names them for the pipeline, built
# with docker, podman or buildah (CONTAINER_TOOL). The ascend image needs CANN_BASE: an
# ascend-toolkit (or ascend-tensorflow) image with Python 3.9 (see images/ascend/Dockerfile).
IMAGE_DEFAULT    = $(shell $(PY) -c "import runpy; print(runpy.run_path('components/images.py')['$(1)'])")
REGISTRY        ?= $(call IMAGE_DEFAULT,REGISTRY)
TAG             ?= $(call IMAGE_DEFAULT,TAG)
IMAGE_TARGETS   ?= cpu gpu ascend
CANN_BASE       ?=
# cpu / gpu: the image they build FROM (default the public python:3.11-slim); ascend: NPU_ADAPTER=optional
# builds on a base without the CANN TF adapter (the stand-in of make images-local).
BASE_IMAGE      ?=
NPU_ADAPTER     ?= required
IMAGE_NAME      ?= $(REGISTRY)/hrnet-$$t:$(TAG)
CONTAINER_TOOL  ?= $(firstword $(shell command -v docker podman buildah 2>/dev/null))
CHECKOV_VERSION ?= 3.3.30

.PHONY: images images-local lint-infra browser
# Debian's chromium: the HTML report is checked as drawn (tests/browser.py). Installed as root
# where missing; elsewhere those tests skip (and fail under HRNET_REQUIRE_INFRA_TOOLS).
browser:
	@command -v chromium > /dev/null || [ "$$(id -u)" != 0 ] || { echo "make: installing Debian's chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium > /dev/null; }

images:
	@test -n "$(CONTAINER_TOOL)" || { echo "make images: no docker, podman or buildah (set CONTAINER_TOOL)" >&2; exit 2; }
	@set -e; for t in $(IMAGE_TARGETS); do \
	  case $$t in \
	    cpu|gpu) args="$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE))";; \
	    ascend) test -n "$(CANN_BASE)" || { echo "make images: the ascend image needs CANN_BASE=<ascend-toolkit image with Python 3.9>" >&2; exit 2; }; \
	            args="--build-arg CANN_BASE=$(CANN_BASE) --build-arg NPU_ADAPTER=$(NPU_ADAPTER)";; \
	    *) echo "make images: unknown target $$t (cpu, gpu, ascend)" >&2; exit 2;; \
	  esac; \
	  $(CONTAINER_TOOL) build $$args -f images/$$t/Dockerfile -t $(IMAGE_NAME) .; \
	  if [ -n "$(PUSH)" ]; then $(CONTAINER_TOOL) push $(IMAGE_NAME); fi; \
	done

# Without a registry: Debian-made bases (images/base/make-base.sh), the cpu image on bookworm,
# and the Ascend image's Python layer on a bullseye (Python 3.9) stand-in for the CANN base,
# named hrnet-ascend-standin (it has no adapter, so it is not hrnet-ascend). With the classic
# builder (DOCKER_BUILDKIT=0), which needs no registry for a Dockerfile frontend.
images-local:
	images/base/make-base.sh bookworm hrnet-base:bookworm
	images/base/make-base.sh bullseye hrnet-base:bullseye
	DOCKER_BUILDKIT=0 $(MAKE) images IMAGE_TARGETS=cpu BASE_IMAGE=hrnet-base:bookworm
	DOCKER_BUILDKIT=0 $(MAKE) images IMAGE_TARGETS=ascend CANN_BASE=hrnet-base:bullseye NPU_ADAPTER=optional \
	    IMAGE_NAME=hrnet-ascend-standin:$(TAG)

# checkov over manifests and Dockerfiles, in its own venv (its pins clash with kfp's); hadolint,
# kustomize and the schema checks run in the test suite (tests/test_manifests.py, test_images.py).
lint-infra: $(LINT_VENV)/.installed
	$(LINT_VENV)/bin/checkov --config-file .checkov.yaml

$(LINT_VENV)/.installed:
	$(PY) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install -q "checkov==$(CHECKOV_VERSION)"
	touch $@

# kfp, kfp-pipeline-spec and protobuf as pinned in the Ascend image.
$(KFP_ASCEND_VENV)/.installed: images/ascend/requirements.txt
	$(PY) -m venv $(KFP_ASCEND_VENV)
	$(KFP_ASCEND_VENV)/bin/pip install -q $$(grep -E '^(kfp|kfp-pipeline-spec|protobuf)==' $< | cut -d' ' -f1)
	touch $@

clean:
	rm -rf $(VENV) $(DEMO_VENV) $(LINT_VENV) $(KFP_ASCEND_VENV) .pytest_cache .ruff_cache *.egg-info
