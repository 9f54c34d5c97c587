"""Linear probes reach scikit-learn-level accuracy and choose their regularisation on held-out data."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dinov2.eval.linear import (
    LogisticRegressionConfig,
    TorchLinearConfig,
    logistic_regression_probe,
    torch_linear_probe,
)


def _data(n=600, d=20, c=4, seed=0, noise=1.0, scale=None):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, c))
    x = rng.normal(size=(n, d))
    y = (x @ w + noise * rng.normal(size=(n, c))).argmax(1)
    if scale is not None:  # badly scaled dimensions: standardisation must handle them
        x = x * scale
    return x.astype(np.float32), y


def _sklearn_reference_accuracy(xtr, ytr, xte, yte):
    ref = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(xtr, ytr)
    return (ref.predict(xte) == yte).mean()


def test_logreg_probe_reaches_sklearn_accuracy():
    scale = np.logspace(-3, 3, 20)
    x, y = _data(scale=scale)
    xtr, ytr, xte, yte = x[:450], y[:450], x[450:], y[450:]
    probe = logistic_regression_probe(xtr, ytr, config=LogisticRegressionConfig(Cs=(0.01, 0.1, 1.0, 10.0)))
    acc = (probe.predict(xte) == yte).mean()
    assert acc >= _sklearn_reference_accuracy(xtr, ytr, xte, yte) - 0.02
    assert acc > 0.8
    assert probe.params["C"] in (0.01, 0.1, 1.0, 10.0)
    assert set(probe.search) == {"0.01", "0.1", "1.0", "10.0"}
    assert probe.predict_proba(xte).shape == (150, 4)


def test_logreg_choice_on_validation_and_refit_on_train_plus_val():
    x, y = _data(n=500, d=30, noise=0.3)
    xtr, ytr, xva, yva, xte = x[:100], y[:100], x[100:300], y[100:300], x[300:]
    cfg = LogisticRegressionConfig(Cs=(1e-4, 10.0), scoring="accuracy")
    probe = logistic_regression_probe(xtr, ytr, x_val=xva, y_val=yva, config=cfg)
    # C=1e-4 shrinks every weight to ~0 on standardised inputs: it must lose on validation.
    assert probe.search["0.0001"] < probe.search["10.0"]
    assert probe.params["C"] == 10.0
    refit = make_pipeline(StandardScaler(), LogisticRegression(C=10.0, max_iter=1000, random_state=0))
    refit.fit(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]))
    np.testing.assert_array_equal(probe.predict(xte), refit.predict(xte))


def test_logreg_inner_cv_prefers_smaller_c_on_ties():
    x, y = _data(n=200, d=5, noise=0.0)
    x[np.arange(len(y)), y] += 20.0  # one dimension per class: every C scores 1.0
    probe = logistic_regression_probe(x, y, config=LogisticRegressionConfig(Cs=(1.0, 0.1, 10.0)))
    assert all(v == 1.0 for v in probe.search.values())
    assert probe.params["C"] == 0.1


@pytest.mark.parametrize(
    "cfg",
    [
        TorchLinearConfig(epochs=80, lrs=(1e-2, 1e-1), weight_decays=(0.0, 1e-3), device="cpu"),
        TorchLinearConfig(
            epochs=20, batch_size=64, optimizer="sgd", lrs=(0.05,), weight_decays=(0.0,), device="cpu"
        ),
    ],
    ids=["adamw-fullbatch", "sgd-minibatch"],
)
def test_torch_probe_reaches_sklearn_accuracy(cfg):
    scale = np.logspace(-2, 2, 20)
    x, y = _data(scale=scale)
    xtr, ytr, xte, yte = x[:450], y[:450], x[450:], y[450:]
    head = torch_linear_probe(xtr, ytr, config=cfg)
    acc = (head.predict(xte) == yte).mean()
    assert acc >= _sklearn_reference_accuracy(xtr, ytr, xte, yte) - 0.03
    assert len(head.search) == len(cfg.lrs) * len(cfg.weight_decays)
    proba = head.predict_proba(xte)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)


def test_torch_probe_search_picks_best_validation_pair():
    x, y = _data(n=400, d=10)
    cfg = TorchLinearConfig(
        epochs=40, lrs=(1e-6, 1e-1), weight_decays=(0.0,), scoring="accuracy", device="cpu"
    )
    head = torch_linear_probe(x[:200], y[:200], x_val=x[200:], y_val=y[200:], config=cfg)
    # lr=1e-6 barely moves from the ~0 initialisation, so it must lose.
    assert head.search["lr=1e-06,wd=0"] < head.search["lr=0.1,wd=0"]
    assert head.params == {"lr": 0.1, "weight_decay": 0.0}


def test_linear_errors():
    x, y = _data(n=50)
    with pytest.raises(ValueError, match="positive"):
        logistic_regression_probe(x, y, config=LogisticRegressionConfig(Cs=(0.0, 1.0)))
    with pytest.raises(ValueError, match="expected features"):
        logistic_regression_probe(x, y[:10])
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        logistic_regression_probe(bad, y)
    with pytest.raises(ValueError, match="optimizer"):
        torch_linear_probe(x, y, config=TorchLinearConfig(optimizer="lamb", epochs=1, device="cpu"))
