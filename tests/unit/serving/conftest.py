from __future__ import annotations

import pytest

from serving.bundle import read_bundle
from serving.examples import fraud_transformer, save_mlp
from serving.model import VersionModel


@pytest.fixture(scope="session")
def mlp_dir(tmp_path_factory):
    return save_mlp(tmp_path_factory.mktemp("models") / "mlp", features=16, seed=1)


@pytest.fixture(scope="session")
def fraud_dir(tmp_path_factory):
    return save_mlp(tmp_path_factory.mktemp("models") / "fraud", seed=2, transformer=fraud_transformer())


@pytest.fixture(scope="session")
def mlp(mlp_dir) -> VersionModel:
    model = VersionModel("mlp", "1", read_bundle(mlp_dir), max_batch_rows=8)
    model.load()
    return model


@pytest.fixture(scope="session")
def fraud(fraud_dir) -> VersionModel:
    model = VersionModel("fraud", "3", read_bundle(fraud_dir))
    model.load()
    return model
