# The Airflow image: Airflow 3 in its own environment (/opt/mlops/.venv-airflow), beside the
# runtime environment it launches `mlops` commands from (the `subprocess` launcher of the
# mlops_runtime connection). With the `kubernetes` launcher the commands run in pods of the
# runtime image instead. Same files and layout as `make setup`.
#   docker build -f docker/airflow.Dockerfile -t mlops-airflow:latest .
ARG RUNTIME_IMAGE=mlops-runtime:latest
FROM ${RUNTIME_IMAGE}

USER 0
WORKDIR /opt/mlops
COPY requirements-airflow.txt constraints-airflow.txt ./
RUN python3.11 -m venv .venv-airflow \
 && .venv-airflow/bin/pip install --upgrade "pip==26.0.1" \
 && .venv-airflow/bin/pip install -r requirements-airflow.txt -c constraints-airflow.txt

COPY dags ./dags
COPY plugins ./plugins

USER 10001
ENV MLOPS_AIRFLOW__VENV=/opt/mlops/.venv-airflow
CMD ["mlops", "stack", "run", "airflow-api-server"]
