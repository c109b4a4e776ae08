"""Training metrics streamed to an MLflow run as they are logged, plus the host's system metrics.

Training writes `metrics.jsonl` either way (the record the registry can replay); this only makes the curves live
in the MLflow UI while a stage runs. A tracking store that stops answering costs a warning, never the training
run. The destination is plain data ({"tracking_uri", "run_id"}) so it travels to torchrun workers in the run config.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class LiveMetrics:
    def __init__(self, tracking_uri: str, run_id: str, system_metrics: bool = True):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.failed = False
        self.monitor = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self.monitor = SystemMetricsMonitor(run_id, sampling_interval=2, resume_logging=True,
                                                    tracking_uri=tracking_uri)
                self.monitor.start()
            except Exception as e:  # psutil missing or the store refuses: curves still go
                log.warning("system metrics not logged to MLflow run %s: %s", run_id, e)
                self.monitor = None

    def __call__(self, row: dict) -> None:
        if self.failed:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(row["step"])
        points = [Metric(k, float(v), now, step) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        try:
            self.client.log_batch(self.run_id, metrics=points, synchronous=True)
        except Exception as e:  # the tracking store is not the record; metrics.jsonl is
            self.failed = True
            log.warning("live metrics to MLflow run %s stopped: %s", self.run_id, e)

    def close(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception as e:
                log.warning("system metrics monitor did not finish cleanly: %s", e)


def open_live_metrics(destination: dict | None) -> LiveMetrics | None:
    if not destination:
        return None
    return LiveMetrics(destination["tracking_uri"], destination["run_id"])
