"""Training curves and system metrics stream to the checkpoint's MLflow run while the stage runs."""
import time

from mlflow import MlflowClient

from model.live_metrics import LiveMetrics, open_live_metrics


def test_rows_and_system_metrics_reach_the_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    live = LiveMetrics(uri, run_id)
    live({"step": 1, "loss": 0.9, "lr": 1e-3, "grad_norm": None})
    live({"step": 2, "loss": 0.7, "lr": 1e-3, "grad_norm": 0.4})
    time.sleep(4.5)  # two samples of the system monitor (every 2 s)
    live.close()
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.7)]
    metrics = client.get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics


def test_a_store_that_stops_answering_costs_a_warning_not_the_run(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    live = LiveMetrics(uri, "no-such-run", system_metrics=False)
    live({"step": 1, "loss": 0.9})  # must not raise
    live({"step": 2, "loss": 0.8})
    assert live.failed and "live metrics to MLflow run no-such-run stopped" in caplog.text
    assert open_live_metrics(None) is None and client.get_run(run_id).data.metrics == {}
