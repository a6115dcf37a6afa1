"""Airflow glue for the mlops loop: the operator that runs `mlops` commands, and its connection.

Nothing here imports the ML runtime (torch, kserve, onnxruntime, ...): that lives in another
environment (or image) and is reached only through the `mlops` command line.
"""

from mlops_airflow.operators import MlopsOperator, MlopsReportOperator, MlopsSensor
from mlops_airflow.runtime import MlopsRuntimeHook, RuntimeConfig

__all__ = ["MlopsOperator", "MlopsReportOperator", "MlopsRuntimeHook", "MlopsSensor", "RuntimeConfig"]
