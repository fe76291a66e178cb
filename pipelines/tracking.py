"""MLflow tracking: the default store, a run per training, params in batches, step metrics buffered."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from fusion.paths import fusemix_home


def default_tracking_uri(create: bool = False) -> str:
    """MLflow's SQLite store under the home folder. `create` makes its folder (SQLite creates the file
    but not the folder); without it nothing is written, as when the Definitions load."""
    store = fusemix_home() / "mlflow"
    if create:
        store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def default_artifact_root() -> str:
    return str(fusemix_home() / "mlflow" / "artifacts")


class RunLogger:
    """Buffers step metrics and flushes them with log_batch (one SQLite transaction per flush)."""

    def __init__(self, client, run_id: str, flush_every: int = 200) -> None:
        self.client, self.run_id, self.flush_every = client, run_id, flush_every
        self._buffer: list = []

    def params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), ts, step) for k, v in values.items())
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self._buffer[i : i + 1000])
        self._buffer = []


@contextmanager
def mlflow_run(client, experiment_id: str, run_name: str, tags: dict[str, str]) -> Iterator[RunLogger]:
    """Creates a run, yields its logger, and marks it FINISHED or FAILED."""
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    logger = RunLogger(client, run.info.run_id)
    try:
        yield logger
        logger.flush()
        client.set_terminated(run.info.run_id, "FINISHED")
    except BaseException:
        logger.flush()
        client.set_terminated(run.info.run_id, "FAILED")
        raise
