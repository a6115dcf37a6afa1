"""Verification: the first step of a deployment, before any traffic reaches a version.

``verify_version`` takes a registered version and refuses it, naming the reason, unless:

- its artifact's bytes are the ones the registry recorded the first time (the sha256 of its model
  file, kept in the version's tag ``mlops.sha256``; recorded on first verification), fetched anew
  from the registry's store rather than from a cache;
- it has an MLflow signature (what requests are validated against);
- it loads in its runtime and answers a smoke input;
- its input example, when it has one, is answered with finite values;
- its great-expectations suite, when one is registered (the monitoring step registers them),
  passes on that example: the hook is here, the suites are not yet.

It deploys nothing: the deploy DAG runs it first and goes on only when it passes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import InvalidInput, ModelNotFound
from common.settings import Settings

SHA256_TAG = "mlops.sha256"


@dataclass(frozen=True)
class Verification:
    model: str
    version: str
    uri: str
    sha256: str
    sha256_recorded: bool  # True: this was the first verification, and it recorded the sha256
    flavor: str
    provider: str
    signature: str
    smoke: str  # what the version answered, in words
    expectations: str  # the great-expectations hook's answer
    converted_from: str | None = None  # another framework's version, served as its ONNX conversion
    parity: dict[str, Any] | None = None  # the conversion against the native model


def verify_version(model: str, version: str, settings: Settings) -> Verification:
    """Verify a registered version (see the module's docstring); InvalidInput names a refusal."""
    from serving.bundle import read_bundle
    from serving.model import VersionModel
    from serving.registry import Registry
    from serving.sources import fetch

    where = f"model '{model}' version {version}"
    registry = Registry(settings.mlflow_url)
    registered = registry.version(model, version)
    uri = f"models:/{model}/{version}"
    with tempfile.TemporaryDirectory(prefix="mlops-verify-") as fresh:  # the store's bytes, not a cache's
        try:
            bundle = read_bundle(fetch(uri, Path(fresh), settings.mlflow_url))
        except (InvalidInput, ModelNotFound) as exc:
            raise InvalidInput(f"{where}: its artifact cannot be read: {exc}") from exc
        recorded = registered.tags.get(SHA256_TAG)
        if recorded is not None and recorded != bundle.sha256:
            raise InvalidInput(
                f"{where}: its model file's sha256 is {bundle.sha256}, not the {recorded} recorded when it"
                " was first verified: its bytes changed since"
            )
        if bundle.signature is None:
            raise InvalidInput(f"{where} has no MLflow signature: requests could not be validated against it")
        loaded = VersionModel(
            model, str(version), bundle, settings.serving.max_request_rows, settings.serving.threads
        )
        try:
            loaded.load()  # opens the runtime and answers a smoke input of zeros
        except Exception as exc:
            raise InvalidInput(f"{where} does not load: {exc}") from exc
        smoke = _example_answer(loaded, bundle.path, where)
        expectations = "no great-expectations suite registered for this version"
        if recorded is None:
            registry.tag(model, version, {SHA256_TAG: bundle.sha256})
        return Verification(
            model=model,
            version=str(version),
            uri=uri,
            sha256=bundle.sha256,
            sha256_recorded=recorded is None,
            flavor=bundle.flavor,
            converted_from=bundle.converted_from,
            parity=bundle.parity,
            provider=loaded.provider,
            signature="mlflow",
            smoke=smoke,
            expectations=expectations,
        )


def _example_answer(model: Any, folder: Path, where: str) -> str:
    """Answer the version's input example, if it has one: finite values, or InvalidInput."""
    from serving.bundle import input_example

    instances = input_example(folder, where)
    if instances is None:
        return "no input example: answered a smoke input of zeros"
    try:
        outputs = model.compute(model.decoder.v1({"instances": instances}))
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: its own input example is refused: {exc}") from exc
    rows = len(next(iter(outputs.values())))
    return f"answered its input example ({rows} rows) with finite values"
