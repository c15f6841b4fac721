# air-reg: `make help` lists the targets.
PYTHON ?= python3
STAMP := .install.stamp

.DEFAULT_GOAL := help
.PHONY: help install train test test-all lint format clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -e ".[dev,brain,classical,families,nifti,peers,sweep,tensorboard]"
	-$(PYTHON) -m air_reg.speed build  # air-reg's CPU kernels; without a compiler: PyTorch ops
	@touch $(STAMP)

install: $(STAMP) ## Install the package (editable) with dev extras, if not yet done

train: $(STAMP) ## Train the default model (AiR-single on MNIST, CPU, a few minutes)
	$(PYTHON) -m air_reg.train $(ARGS)

# pytest exits 5 when it collects no tests: that must fail, not pass quietly.
PYTEST = $(PYTHON) -m pytest -q $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test: $(STAMP) ## Run the default suite: fast tests plus the bounded slow ones (not `heavy`)
	@$(call PYTEST,-m "not heavy")

test-all: $(STAMP) ## Run every test: heavy ones (DDP, sweeps, kill/resume), 20x the fuzzing
	@AIR_REG_FUZZ=long $(call PYTEST,)

lint: $(STAMP) ## Check style with ruff
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

format: $(STAMP) ## Format and auto-fix with ruff
	$(PYTHON) -m ruff format . && $(PYTHON) -m ruff check --fix .

clean: ## Remove run outputs and caches
	rm -rf logs outputs multirun wandb .pytest_cache .ruff_cache $(STAMP)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
