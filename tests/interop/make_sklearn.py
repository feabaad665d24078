"""Train a tiny scikit-learn classifier and save it the way a model server loads it.

Run with the model server's own interpreter (its venv has scikit-learn and the server):
``python make_sklearn.py mlflow OUT_DIR=T ...`` (``mlflow.sklearn.save_model``) or
``python make_sklearn.py mlserver --name NAME OUT_DIR=T ...`` (a joblib file plus
``model-settings.json`` for ``mlserver_sklearn``). Each model answers 1 when the first
feature is above its threshold T: two thresholds make two versions that agree on some
inputs and differ on others. For mlflow, ``OUT_DIR=crash`` saves instead a pyfunc model
whose predict always raises (a broken canary). It imports nothing from flipback.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression


def train(threshold: float) -> LogisticRegression:
    rng = np.random.default_rng(7)
    x = rng.uniform(-6, 6, size=(400, 2))
    y = (x[:, 0] > threshold).astype(np.int64)
    return LogisticRegression(C=1e4, max_iter=2000).fit(x, y)


def save_mlflow(model: LogisticRegression, out: Path) -> None:
    import mlflow.sklearn
    from mlflow.models import infer_signature

    sample = np.array([[0.0, 0.0], [1.0, 1.0]])
    mlflow.sklearn.save_model(model, str(out),
                              signature=infer_signature(sample, model.predict(sample)))


def save_mlflow_crash(out: Path) -> None:
    import mlflow.pyfunc

    class Crash(mlflow.pyfunc.PythonModel):  # pickled by value: this module is __main__
        def predict(self, context, model_input, params=None):
            raise RuntimeError("this model version is broken")

    mlflow.pyfunc.save_model(str(out), python_model=Crash())


def save_mlserver(model: LogisticRegression, out: Path, name: str) -> None:
    import joblib

    out.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, out / "model.joblib")
    settings = {"name": name, "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": "v1"}}
    (out / "model-settings.json").write_text(json.dumps(settings))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["mlflow", "mlserver"])
    parser.add_argument("outs", nargs="+", metavar="OUT_DIR=THRESHOLD")
    parser.add_argument("--name", default="clf")
    args = parser.parse_args()
    for spec in args.outs:
        out, _, threshold = spec.rpartition("=")
        if args.kind == "mlflow" and threshold == "crash":
            save_mlflow_crash(Path(out))
            continue
        trained = train(float(threshold))
        if args.kind == "mlflow":
            save_mlflow(trained, Path(out))
        else:
            save_mlserver(trained, Path(out), args.name)
