"""Shared test setup: keep every test's MLflow/Ray/outputs inside its tmp dir, small thread counts."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

# 2-core CI machine: avoid oversubscription across DDP/Ray processes.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Nothing a test logs may land in the checkout's ./mlflow.db: tests that use MLflow set their own
# store; this catches any that forget.
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='condconv-tests-')}/mlflow.db"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU tests on machines without CUDA (each has a CPU twin)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory: pytest.TempPathFactory):
    """The demo's digits data as webdataset shards (made once per test session, ~2 s)."""
    from pipeline.data.digits import write_digits
    from pipeline.data.imagenet_wds import convert_imagenet_to_wds

    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "raw")
    convert_imagenet_to_wds(root / "raw", root / "wds", progress=False)
    return root / "wds"
