"""Training a candidate: the transformer spec from the data, the splits, a seeded PyTorch MLP with
early stopping, the ONNX export and its parity check, and scoring a model as it will be served.

The candidate is a version in the serving layer's format: an ONNX graph from the encoded tensor
to ``probabilities``, and a transformer spec (the features' scaling and categories, the labels)
that maps raw named features to that tensor, the same spec the model server applies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InvalidInput, MLOpsError
from retraining.config import RetrainConfig
from serving.transformer import Transformer

INPUT, OUTPUT = "input", "probabilities"
OPSET = 17


class CandidateRefused(MLOpsError):
    """A candidate that failed a check (parity): retrying will not change it; nothing is registered."""

    exit_code = 2


@dataclass(frozen=True)
class Splits:
    """Row positions in the dataset's frame: trained on, early-stopped on, held out, recent."""

    train: list[int]
    val: list[int]
    test: list[int]
    recent: list[int]  # the newest labelled traffic: never trained on

    def to_dict(self) -> dict[str, list[int]]:
        return {"train": self.train, "val": self.val, "test": self.test, "recent": self.recent}

    @classmethod
    def from_dict(cls, data: dict[str, list[int]]) -> Splits:
        return cls(data["train"], data["val"], data["test"], data["recent"])


def transformer_spec(
    frame: Any, features: Sequence[str], label: str, categorical: Sequence[str] = ()
) -> dict:
    """Scaling and categories learnt from ``frame`` (the training rows), the labels sorted."""
    from monitoring.profile import column_kind

    specs = []
    for name in features:
        column = frame[name]
        if name in categorical or column_kind(column) == "categorical":
            categories = sorted({str(v) for v in column.dropna()})
            specs.append({"name": name, "type": "categorical", "categories": categories})
        else:
            values = column.astype("float64").to_numpy()
            scale = float(np.std(values))
            specs.append(
                {
                    "name": name,
                    "type": "numeric",
                    "mean": float(np.mean(values)),
                    "scale": scale if scale > 1e-9 else 1.0,
                }
            )
    labels = sorted({str(v) for v in frame[label]}, key=_label_order)
    return {"version": 1, "input": INPUT, "features": specs, "output": {"name": OUTPUT, "labels": labels}}


def _label_order(label: str) -> tuple[int, float | str]:
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def split(sources: Sequence[str], config: RetrainConfig) -> Splits:
    """The newest ``recent_share`` of the traffic rows (the frame keeps traffic in time order) as
    the recent window; the rest shuffled (seeded) into train, validation and held-out test."""
    traffic = [i for i, source in enumerate(sources) if source == "traffic"]
    recent = traffic[len(traffic) - int(round(len(traffic) * config.recent_share)) :] if traffic else []
    taken = set(recent)
    rest = np.asarray([i for i in range(len(sources)) if i not in taken])
    rng = np.random.default_rng(config.seed)
    rng.shuffle(rest)
    n_test, n_val = int(round(len(rest) * config.test_share)), int(round(len(rest) * config.val_share))
    test, val, train = rest[:n_test], rest[n_test : n_test + n_val], rest[n_test + n_val :]
    if len(train) < 2 or len(val) < 1 or len(test) < 1:
        raise InvalidInput(
            f"the dataset's {len(sources)} rows are too few to split into train, validation and test"
        )
    return Splits(sorted(train.tolist()), sorted(val.tolist()), sorted(test.tolist()), recent)


def encode(transformer: Transformer, frame: Any) -> np.ndarray:
    """Raw named feature columns -> the model's input tensor, as the model server encodes them."""
    columns = {}
    for feature in transformer.features:
        if feature.name not in frame.columns:
            raise InvalidInput(f"the data has no feature column '{feature.name}'")
        values = frame[feature.name]
        columns[feature.name] = (
            values.astype("float64").to_numpy()
            if feature.type == "numeric"
            else values.astype(str).to_numpy()
        )
    tensors, _ = transformer.encode(columns)
    return tensors[transformer.input]


def targets(transformer: Transformer, labels: Any) -> np.ndarray:
    """Labels -> class positions in the transformer's label order (-1 for a label it does not have)."""
    index = {label: i for i, label in enumerate(transformer.labels)}
    return np.asarray([index.get(str(label), -1) for label in labels], dtype=np.int64)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_module(width: int, hidden: Sequence[int], classes: int) -> Any:
    """The MLP: Linear/ReLU per hidden layer, then the logits."""
    import torch

    layers: list[Any] = []
    for size in hidden:
        layers += [torch.nn.Linear(width, size), torch.nn.ReLU()]
        width = size
    layers.append(torch.nn.Linear(width, classes))
    return torch.nn.Sequential(*layers)


def fit(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    classes: int,
    config: RetrainConfig,
    progress: Callable[[str], None],
) -> tuple[Any, dict[str, Any]]:
    """Adam on cross-entropy, seeded; the weights of the best validation loss, once ``patience``
    epochs bring no better one. Returns the module (on the CPU) and the training history."""
    import torch

    torch.manual_seed(config.seed)
    where = device()
    module = build_module(x_train.shape[1], config.hidden, classes).to(where)
    optimiser = torch.optim.Adam(
        module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_train).to(where), torch.from_numpy(y_train).to(where)
    xv, yv = torch.from_numpy(x_val).to(where), torch.from_numpy(y_val).to(where)
    generator = torch.Generator().manual_seed(config.seed)
    best, best_state, best_epoch, epochs = math.inf, None, 0, []
    began = time.monotonic()
    for epoch in range(1, config.epochs + 1):
        module.train()
        order = torch.randperm(len(xt), generator=generator).to(where)
        total = 0.0
        for first in range(0, len(xt), config.batch_size):
            batch = order[first : first + config.batch_size]
            optimiser.zero_grad()
            loss = loss_fn(module(xt[batch]), yt[batch])
            loss.backward()
            optimiser.step()
            total += float(loss) * len(batch)
        module.eval()
        with torch.no_grad():
            logits = module(xv)
            val_loss = float(loss_fn(logits, yv))
            val_accuracy = float((logits.argmax(dim=1) == yv).float().mean())
        epochs.append(
            {
                "epoch": epoch,
                "train_loss": total / len(xt),
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
            }
        )
        better = val_loss < best - 1e-6
        if better:
            best, best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        progress(
            f"    epoch {epoch:3d}: train loss {total / len(xt):.4f}, validation loss {val_loss:.4f},"
            f" accuracy {val_accuracy:.3f}{' (best)' if better else ''}"
        )
        if epoch - best_epoch >= config.patience:
            progress(f"    early stop: no better validation loss for {config.patience} epochs")
            break
    assert best_state is not None
    module.load_state_dict(best_state)
    module = module.cpu().eval()
    history = {
        "device": where,
        "epochs": len(epochs),
        "best_epoch": best_epoch,
        "best_val_loss": best,
        "seconds": round(time.monotonic() - began, 2),
        "per_epoch": epochs,
    }
    return module, history


def save_module(module: Any, architecture: dict[str, Any], folder: Path) -> None:
    """The weights as a state dict (tensors only: read back with ``weights_only``, no code runs)."""
    import json

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), folder / "weights.pt")
    (folder / "architecture.json").write_text(json.dumps(architecture))


def load_module(folder: Path) -> tuple[Any, dict[str, Any]]:
    import json

    import torch

    architecture = json.loads((folder / "architecture.json").read_text())
    module = build_module(architecture["width"], architecture["hidden"], architecture["classes"])
    module.load_state_dict(torch.load(folder / "weights.pt", weights_only=True, map_location="cpu"))
    return module.eval(), architecture


def export_onnx(module: Any, width: int, path: Path) -> Path:
    """The module with a softmax on top, to ONNX (opset 17, a dynamic batch), checked by onnx."""
    import warnings

    import onnx
    import torch

    wrapped = torch.nn.Sequential(module, torch.nn.Softmax(dim=1)).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            wrapped, (torch.zeros(2, width),), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT], output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
        )  # fmt: skip
    onnx.checker.check_model(onnx.load(str(path)))
    return path


def onnx_probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {name: x.astype(np.float32)})[0])


def parity(path: Path, module: Any, x: np.ndarray, atol: float) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on the same batch: the largest difference of a probability,
    and how many rows' best class agree; ``passed`` when within ``atol`` and all agree."""
    import torch

    with torch.no_grad():
        expected = torch.softmax(module(torch.from_numpy(x.astype(np.float32))), dim=1).numpy()
    got = onnx_probabilities(path, x)
    if got.shape != expected.shape:
        return {
            "passed": False,
            "rows": len(x),
            "atol": atol,
            "reason": f"shape {got.shape} != {expected.shape}",
        }
    difference = float(np.max(np.abs(got - expected))) if len(x) else 0.0
    agree = float(np.mean(got.argmax(axis=1) == expected.argmax(axis=1))) if len(x) else 1.0
    return {
        "passed": difference <= atol and agree == 1.0,
        "rows": len(x),
        "atol": atol,
        "max_abs_diff": difference,
        "argmax_agreement": agree,
    }


def metrics(probabilities: np.ndarray, labels: Sequence[str], model_labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro F1 (over the true labels present) and log loss of ``probabilities`` (one
    column per ``model_labels``) against ``labels``; a label the model lacks counts as wrong."""
    truth = np.asarray([str(label) for label in labels], dtype=object)
    if len(truth) == 0:
        return {"rows": 0}
    names = np.asarray(list(model_labels), dtype=object)
    predicted = names[probabilities.argmax(axis=1)]
    index = {label: i for i, label in enumerate(model_labels)}
    position = np.asarray([index.get(label, -1) for label in truth])
    chosen = np.where(position >= 0, probabilities[np.arange(len(truth)), np.maximum(position, 0)], 0.0)
    f1s = []
    for label in sorted(set(truth)):
        tp = float(np.sum((predicted == label) & (truth == label)))
        fp, fn = (
            float(np.sum((predicted == label) & (truth != label))),
            float(np.sum((predicted != label) & (truth == label))),
        )
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {
        "rows": int(len(truth)),
        "accuracy": float(np.mean(predicted == truth)),
        "macro_f1": float(np.mean(f1s)),
        "log_loss": float(-np.mean(np.log(np.clip(chosen, 1e-7, 1.0)))),
    }
