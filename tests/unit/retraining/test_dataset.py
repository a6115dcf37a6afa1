"""The retraining dataset: reference rows plus the labelled traffic from the log, hashed."""

from __future__ import annotations

import pandas as pd
import pytest

from common.errors import InvalidInput
from monitoring.events import Feedback, InferenceEvent
from monitoring.logstore import get_log_store
from retraining.dataset import assemble, labelled_traffic

T0 = 1_790_000_000_000


@pytest.fixture
def store(tmp_path):
    store = get_log_store(f"sqlite:///{tmp_path / 'inference.db'}")
    store.write(
        [
            InferenceEvent(
                f"e{i}",
                T0 + i,
                "fraud",
                "1",
                "stable",
                f"r{i}",
                0,
                {"amount": 10.0 + i, "country": "DE" if i % 2 else "FR"},
                {"label": "legit"},
                1.0,
            )  # fmt: skip
            for i in range(10)
        ]
    )
    store.write_feedback([Feedback(f"r{i}", 0, "fraud" if i == 3 else "legit") for i in (1, 3, 5)])
    yield store
    store.close()


def reference() -> pd.DataFrame:
    return pd.DataFrame({"amount": [1.5, 2.5], "country": ["US", "DE"], "label": ["legit", "fraud"]})


def test_only_the_labelled_rows_of_the_window_join_the_reference(store):
    traffic = labelled_traffic(store, "fraud", T0, T0 + 10, reference(), "label")
    assert traffic.to_dict("list") == {
        "amount": [11.0, 13.0, 15.0],
        "country": ["DE", "DE", "DE"],
        "label": ["legit", "fraud", "legit"],
    }
    dataset = assemble(reference(), traffic, "label")
    assert dataset.rows_by_source == {"reference": 2, "traffic": 3}
    assert list(dataset.frame["source"]) == ["reference"] * 2 + ["traffic"] * 3
    assert dataset.features == ("amount", "country")


def test_the_hash_is_of_the_content(store, tmp_path):
    traffic = labelled_traffic(store, "fraud", T0, T0 + 10, reference(), "label")
    first, again = assemble(reference(), traffic, "label"), assemble(reference(), traffic.copy(), "label")
    assert first.sha256 == again.sha256 and len(first.sha256) == 64
    fewer = labelled_traffic(store, "fraud", T0, T0 + 4, reference(), "label")
    assert assemble(reference(), fewer, "label").sha256 != first.sha256
    import hashlib

    assert hashlib.sha256(first.save(tmp_path / "d.csv").read_bytes()).hexdigest() == first.sha256


def test_missing_columns_are_named():
    with pytest.raises(InvalidInput, match="no label column 'y'"):
        assemble(reference(), reference(), "y")
    with pytest.raises(InvalidInput, match=r"no column\(s\) \['country'\]"):
        assemble(reference(), reference().drop(columns="country"), "label")
