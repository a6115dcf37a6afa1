"""The reference profile: what it keeps, stored and read back, and the data it refuses."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from common.errors import ConfigError, InvalidInput
from monitoring.profile import Profile, build_profile, read_table


def training(rows: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "amount": rng.normal(50, 10, rows),
            "country": rng.choice(["DE", "FR"], rows),
            "label": rng.choice(["legit", "fraud"], rows),
        }
    )
    frame.loc[:9, "amount"] = np.nan  # 1 % nulls
    return frame


def test_profile_keeps_kinds_ranges_domains_and_a_suite(tmp_path):
    profile = build_profile("fraud", "3", training(), label="label")
    amount, country = profile.feature("amount"), profile.feature("country")
    assert (amount.kind, country.kind) == ("numeric", "categorical")
    assert amount.null_rate == pytest.approx(0.01)
    assert country.categories == ("DE", "FR")
    assert sum(amount.counts) == 990 and len(amount.counts) == len(amount.edges) + 1
    assert profile.label == {
        "column": "label",
        "classes": {"fraud": pytest.approx(500, abs=60), "legit": pytest.approx(500, abs=60)},
    }
    kinds = {(e["type"], e["kwargs"]["column"]) for e in profile.suite["expectations"]}
    assert ("expect_column_values_to_be_in_set", "country") in kinds
    assert ("expect_column_values_to_be_between", "amount") in kinds
    assert "label" not in profile.names

    profile.save(tmp_path)
    back = Profile.load(tmp_path)
    assert back.to_dict() == profile.to_dict()
    assert back.suite == profile.suite
    assert np.array_equal(back.sample["amount"], profile.sample["amount"], equal_nan=True)
    assert list(back.sample["country"]) == list(profile.sample["country"])


def test_a_profile_of_another_layout_is_refused_with_the_command_to_rebuild(tmp_path):
    build_profile("fraud", "3", training()).save(tmp_path)
    data = json.loads((tmp_path / "profile.json").read_text())
    data["profile_version"] = 99
    (tmp_path / "profile.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="mlops profile"):
        Profile.load(tmp_path)


def test_bad_data_names_the_flag(tmp_path):
    with pytest.raises(InvalidInput, match="--data: no file"):
        read_table(tmp_path / "none.csv")
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(InvalidInput, match="expected .csv"):
        read_table(tmp_path / "x.txt")
    with pytest.raises(InvalidInput, match=r"no column\(s\) \['nope'\]"):
        build_profile("m", "1", training(), features=["nope"])
    with pytest.raises(InvalidInput, match="at least 20"):
        build_profile("m", "1", training(5))
    path = tmp_path / "t.csv"
    training().to_csv(path, index=False)
    assert list(read_table(path).columns) == ["amount", "country", "label"]
