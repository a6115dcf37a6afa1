"""Servers shared by the integration tests of one session."""

from __future__ import annotations

import pytest

from tests.esproxy import ElasticsearchProxy
from tests.servers import osmem_server


@pytest.fixture(scope="session")
def osmem(tmp_path_factory):
    with osmem_server(tmp_path_factory.mktemp("osmem")) as server:
        yield server


@pytest.fixture(scope="session")
def es_proxy(osmem):
    with ElasticsearchProxy(osmem.url) as proxy:
        yield proxy


def store_url(kind: str, tmp_path, osmem, es_proxy) -> str:
    """A fresh, empty store of one kind (search stores: a fresh index prefix on the shared server)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'inference.db'}"
    if kind == "opensearch":
        return f"opensearch://{osmem.url.split('//')[1]}"
    return f"elasticsearch://{es_proxy.url.split('//')[1]}"
