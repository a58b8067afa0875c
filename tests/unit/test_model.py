"""The packed isolation forest (detector.core.model): exactness against scikit-learn, the artefact,
feature-name checks, hot reload, thresholding and explanations."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.ensemble import IsolationForest
from sklearn.ensemble._iforest import _average_path_length

from detector.core.decide import DecisionContext
from detector.core.errors import ModelError
from detector.core.features import FEATURE_NAMES
from detector.core.model import (
    ForestScorer,
    ModelWatcher,
    PackedForest,
    artefact_paths,
    average_path_length,
    load_model,
)
from detector.core.parse import parse_request
from detector.core.pipeline import Detector
from detector.core.policy import load_policy, parse_policy
from detector.evaluate import simulator_intel
from detector.sim import SimConfig, simulate
from detector.train import build_matrix, calibrate_threshold, export, scorer_for, train

N_FEATURES = len(FEATURE_NAMES)
POLICY = load_policy()


def random_data(seed: int, n: int, d: int = N_FEATURES) -> np.ndarray:
    """Continuous, discrete and constant columns, like the real features."""
    rs = np.random.RandomState(seed)
    X = rs.randn(n, d)
    X[:, 1] = rs.randint(0, 2, n)  # indicator
    X[:, 2] = np.log1p(rs.poisson(1.0, n))  # log count
    X[:, 3] = 1.0  # constant: never split on
    return X


@pytest.fixture(scope="module")
def sim_items():
    """A small simulated morning, 08:00-11:00 UTC (legit + every attack, ~1,500 requests)."""
    return simulate(SimConfig(seed=11, start=1795334400.0, duration_s=3 * 3600.0, legit_per_day=8000))


@pytest.fixture(scope="module")
def sim_features(sim_items) -> tuple[np.ndarray, list[str]]:
    """Real feature rows of ``sim_items``, as the trainer builds them."""
    with simulator_intel() as intel:
        return build_matrix(sim_items, POLICY, intel)


@pytest.fixture(scope="module")
def fitted(sim_features) -> IsolationForest:
    X, scen = sim_features
    legit = np.array([s.startswith("legit") for s in scen])
    return train(X[legit], n_estimators=60, seed=3)


def make_card_dir(tmp_path: Path, forest: IsolationForest, name: str = "m", threshold: float = 0.6) -> Path:
    export(forest, tmp_path, name, {"training": {"rows": 1}}, threshold=threshold)
    return tmp_path


# --------------------------------------------------------------------------- exactness


def test_average_path_length_matches_sklearn():
    n = np.arange(0, 5000)
    assert np.array_equal(average_path_length(n), _average_path_length(n))


@pytest.mark.parametrize("max_features", [1.0, 0.5, 7, 1])
def test_packed_forest_equals_sklearn_on_random_data(max_features):
    X = random_data(0, 1500)
    forest = IsolationForest(n_estimators=40, max_features=max_features, random_state=1).fit(X)
    packed = PackedForest.from_sklearn(forest)
    Y = random_data(1, 800) * 2.0  # wider than the training range: exercises both extremes
    Y[::7, 5] = np.nan  # missing values follow missing_go_to_left, as in sklearn
    np.testing.assert_allclose(packed.score_samples(Y), forest.score_samples(Y), rtol=0, atol=1e-12)
    np.testing.assert_allclose(packed.score_samples(X[:1]), forest.score_samples(X[:1]), rtol=0, atol=1e-12)


def test_packed_forest_equals_sklearn_on_simulator_features(sim_features, fitted):
    X, _ = sim_features
    packed = PackedForest.from_sklearn(fitted)
    np.testing.assert_allclose(packed.score_samples(X), fitted.score_samples(X), rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float64, (3, 6), elements=st.floats(-1e6, 1e6, allow_nan=False, width=64)))
def test_packed_forest_equals_sklearn_on_arbitrary_rows(rows):
    # float32 rounding of x is the subtle part: thresholds sit between float32 values
    forest = _small_forest()
    np.testing.assert_allclose(PackedForest.from_sklearn(forest).score_samples(rows),
                               forest.score_samples(rows), rtol=0, atol=1e-12)  # fmt: skip


_FOREST: list[IsolationForest] = []


def _small_forest() -> IsolationForest:
    if not _FOREST:
        X = np.random.RandomState(5).standard_cauchy((400, 6)) * 10
        _FOREST.append(IsolationForest(n_estimators=20, max_features=0.5, random_state=0).fit(X))
    return _FOREST[0]


def test_wrong_row_width_is_a_model_error(fitted):
    packed = PackedForest.from_sklearn(fitted)
    with pytest.raises(ModelError, match=rf"expected feature rows of length {N_FEATURES}, got .*\(1, 3\)"):
        packed.score_samples([[1.0, 2.0, 3.0]])


# --------------------------------------------------------------------------- artefact


def test_artefact_round_trip(tmp_path, sim_features, fitted):
    X, _ = sim_features
    make_card_dir(tmp_path, fitted, "default", threshold=0.61)
    scorer = load_model(tmp_path)  # a directory means <dir>/default.{npz,json}
    assert re.fullmatch(r"default-\d{14}-[0-9a-f]{8}", scorer.version)
    assert scorer.threshold == 0.61
    assert scorer.feature_names == FEATURE_NAMES
    np.testing.assert_allclose(scorer.anomaly(X), -fitted.score_samples(X), rtol=0, atol=1e-12)
    # the same artefact by either file name
    assert load_model(tmp_path / "default.npz").version == scorer.version
    assert load_model(tmp_path / "default.json").version == scorer.version
    # plain arrays only: loadable without pickle, no object dtypes
    with np.load(tmp_path / "default.npz", allow_pickle=False) as data:
        assert all(data[k].dtype != object for k in data.files)
    card = json.loads((tmp_path / "default.json").read_text())
    assert card["feature_names"] == list(FEATURE_NAMES)
    assert card["sklearn_version"] and card["arrays_sha256"].startswith(scorer.version[-8:])


def test_export_is_reproducible(tmp_path, sim_features):
    X, _ = sim_features
    a = export(train(X, n_estimators=10, seed=4), tmp_path / "a", "m", threshold=0.5)
    b = export(train(X, n_estimators=10, seed=4), tmp_path / "b", "m", threshold=0.5)
    card_a, card_b = json.loads(a.read_text()), json.loads(b.read_text())
    assert card_a["arrays_sha256"] == card_b["arrays_sha256"]
    with np.load(a.with_suffix(".npz")) as na, np.load(b.with_suffix(".npz")) as nb:
        assert all(np.array_equal(na[k], nb[k]) for k in na.files)


def _edit_card(path: Path, **changes) -> None:
    card = json.loads(path.read_text())
    card.update(changes)
    path.write_text(json.dumps(card))


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (list(FEATURE_NAMES[:-1]), rf"model has {len(FEATURE_NAMES) - 1}, detector has {len(FEATURE_NAMES)}\); missing from the model: \['pending'\]"),
        (list(FEATURE_NAMES[:-1]) + ["ua_is_script"],
         r"missing from the model: \['pending'\]; unknown to the detector: \['ua_is_script'\]"),
        ([FEATURE_NAMES[1], FEATURE_NAMES[0], *FEATURE_NAMES[2:]],
         r"another order; first difference at position 0: model has 'log_number_1h', "
         r"detector expects 'log_number_15m'"),
    ],
    ids=["missing", "renamed", "reordered"],
)
def test_feature_name_mismatch_is_explained(tmp_path, fitted, names, message):
    make_card_dir(tmp_path, fitted)
    _edit_card(tmp_path / "m.json", feature_names=names)
    with pytest.raises(ModelError, match=message) as err:
        load_model(tmp_path, "m")
    assert "feature names do not match this detector's FEATURE_NAMES" in str(err.value)
    assert "retrain" in str(err.value)


def test_arrays_from_another_run_are_rejected(tmp_path, sim_features):
    X, _ = sim_features
    export(train(X, n_estimators=10, seed=1), tmp_path / "one", "m", threshold=0.5)
    export(train(X, n_estimators=10, seed=2), tmp_path / "two", "m", threshold=0.5)
    (tmp_path / "one" / "m.npz").replace(tmp_path / "two" / "m.npz")
    with pytest.raises(ModelError, match=r"do not belong to card .*different training runs"):
        load_model(tmp_path / "two", "m")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: (d / "m.npz").write_bytes(b"PK\x03\x04 not really a zip"), "unreadable or corrupt"),
        (lambda d: (d / "m.npz").unlink(), "do not exist"),
        (lambda d: (d / "m.json").write_text("{"), "not valid JSON"),
        (lambda d: _edit_card(d / "m.json", threshold=7), r"threshold must be a number in \[0, 1\]"),
        (lambda d: _edit_card(d / "m.json", format="pickle"), "format 'pickle' is not supported"),
    ],
    ids=["corrupt-npz", "missing-npz", "bad-json", "bad-threshold", "bad-format"],
)
def test_broken_artefacts_raise_model_error(tmp_path, fitted, breakage, message):
    make_card_dir(tmp_path, fitted)
    breakage(tmp_path)
    with pytest.raises(ModelError, match=message):
        load_model(tmp_path, "m")


def test_artefact_paths():
    assert artefact_paths("models/x.npz") == (Path("models/x.npz"), Path("models/x.json"))
    assert artefact_paths("models/x") == (Path("models/x.npz"), Path("models/x.json"))


# --------------------------------------------------------------------------- hot reload


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_watcher_reloads_new_artefact_and_survives_a_corrupt_one(tmp_path, sim_features, caplog):
    X, _ = sim_features
    clock = Clock()
    watcher = ModelWatcher(tmp_path, "m", reload_s=5.0, clock=clock)
    assert watcher.current() is None  # nothing trained yet: rules only, no crash

    export(train(X, n_estimators=10, seed=1), tmp_path, "m", threshold=0.5)
    clock.t += 5.0
    first = watcher.current()
    assert first is not None

    export(train(X, n_estimators=10, seed=2), tmp_path, "m", threshold=0.5)
    clock.t += 1.0
    assert watcher.current() is first  # not re-checked before reload_s
    clock.t += 5.0
    second = watcher.current()
    assert second is not None and second.version != first.version
    assert watcher.reloads == 1

    (tmp_path / "m.npz").write_bytes(b"garbage")
    clock.t += 5.0
    with caplog.at_level("ERROR"):
        assert watcher.current() is second  # the broken artefact is logged, the old model kept
    assert "new artefact rejected" in caplog.text and watcher.failures == 1
    clock.t += 5.0
    watcher.current()
    assert watcher.failures == 1  # an unchanged broken file is not retried (nor logged) again

    export(train(X, n_estimators=10, seed=3), tmp_path, "m", threshold=0.5)
    clock.t += 5.0
    assert watcher.current() not in (None, first, second)


def test_watcher_shadow(tmp_path, fitted):
    export(fitted, tmp_path, "main", threshold=0.5)
    export(fitted, tmp_path, "next", threshold=0.7)
    watcher = ModelWatcher(tmp_path, "main", "next", reload_s=60.0)
    assert watcher.current().threshold == 0.5
    assert watcher.shadow().threshold == 0.7


# --------------------------------------------------------------------------- scoring


def test_threshold_decides_is_anomalous(sim_features, fitted):
    X, _ = sim_features
    scorer = scorer_for(fitted)
    anomaly = scorer.anomaly(X)
    scorer.threshold = calibrate_threshold(anomaly, 0.05)
    results = scorer.score_batch(X)
    assert [r.is_anomalous for r in results] == list(anomaly >= scorer.threshold)
    assert 0 < sum(r.is_anomalous for r in results) <= 0.05 * len(X)
    assert all(0.0 < r.anomaly <= 1.0 for r in results)


def test_calibrate_threshold_bounds_the_false_positive_rate():
    scores = np.random.RandomState(0).rand(10_000)
    for fpr in (0.0, 0.001, 0.005, 0.1):
        thr = calibrate_threshold(scores, fpr)
        assert (scores >= thr).mean() <= fpr
        below = scores[scores < thr].max()  # the next lower threshold would flag too many
        assert (scores >= below).mean() > fpr


def test_score_and_top_features_are_deterministic(sim_features, fitted):
    X, _ = sim_features
    scorer = scorer_for(fitted, threshold=0.55, version="v1")
    rows = [list(map(float, x)) for x in X[:200]]
    batch = scorer.score_batch(rows)
    single = [scorer.score(x) for x in rows]
    assert batch == single == scorer.score_batch(rows)
    for r in batch:
        assert r.version == "v1"
        assert len(r.top_features) <= 3 and set(r.top_features) <= set(FEATURE_NAMES)


def test_contributions_decompose_the_score(sim_features, fitted):
    """Per row, the credits sum to c(psi) - mean path length = c(psi) * (1 + log2(anomaly))."""
    X, _ = sim_features
    packed = PackedForest.from_sklearn(fitted)
    leaves = packed.leaves(X)
    anomaly = -packed.score_samples(X)
    c = average_path_length([packed.max_samples])[0]
    # credits are stored as float32 (they only rank features)
    np.testing.assert_allclose(packed.contributions(leaves).sum(axis=1), c * (1 + np.log2(anomaly)),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_top_feature_names_the_outlying_feature():
    X = random_data(0, 2000)
    forest = train(X, n_estimators=100, seed=0)
    scorer = ForestScorer(PackedForest.from_sklearn(forest), 0.5, "t", FEATURE_NAMES)
    x = np.median(X, axis=0)
    normal = scorer.score(list(x))
    x[FEATURE_NAMES.index("log_range_24h")] = 9.0
    result = scorer.score(list(x))
    assert result.anomaly > normal.anomaly
    assert result.top_features[0] == "log_range_24h"
    assert scorer.explain(list(x))[0][0] == "log_range_24h"


def test_decide_reports_anomalous_pattern(sim_items, sim_features, fitted):
    X, _ = sim_features
    scorer = scorer_for(fitted, version="t")
    scorer.threshold = float(np.quantile(scorer.anomaly(X), 0.9))
    with simulator_intel() as intel:
        acting = parse_policy({"rules": {"anomalous_pattern": {"action": "deflect", "weight": 0.6}}})
        det = Detector(DecisionContext(acting, model=scorer, use_rules=False), intel)
        decisions = [det.process(parse_request(i.request)) for i in sim_items[:800]]
    flagged = [d for d in decisions if d.model and d.model["is_anomalous"]]
    assert flagged and all("anomalous_pattern" in d.reasons and d.action != "allow" for d in flagged)
    assert all(d.model_version == "t" and d.model["top_features"] for d in flagged)


def test_a_node_no_split_reaches_is_refused():
    """The walk renumbers the nodes from the roots down: an artefact with an orphan node (here
    node 1, while both children of the root are node 2) is refused with a clear error."""

    arrays = {
        "children_left": np.array([2, -1, -1], dtype=np.int32),
        "children_right": np.array([2, -1, -1], dtype=np.int32),
        "feature": np.array([0, -2, -2], dtype=np.int32),
        "threshold": np.array([0.5, -2.0, -2.0]),
        "n_node_samples": np.array([2, 1, 1], dtype=np.int64),
        "missing_go_to_left": np.array([1, 1, 1], dtype=np.uint8),
        "tree_offsets": np.array([0, 3], dtype=np.int64),
        "estimators_features": np.array([[0]], dtype=np.int32),
        "max_samples": np.asarray(2, dtype=np.int64),
        "n_features": np.asarray(1, dtype=np.int64),
    }
    with pytest.raises(ModelError, match="not reachable"):
        PackedForest(arrays)


def _numpy_twin(packed: PackedForest) -> PackedForest:
    twin = copy.copy(packed)
    twin.native = False
    return twin


def test_the_forest_extension_is_built():
    """``make setup`` builds it; a test environment must not fall back to numpy unnoticed."""
    from detector.core import model

    assert model._forest is not None, \
        "detector.core._forest is not built: pip install -e . with a C compiler"
    assert PackedForest.native


@pytest.mark.parametrize("max_features", [1.0, 0.5, 7, 1])
def test_the_c_walk_and_credits_equal_numpys(max_features):
    """core/_forest.c against the numpy reference: the same leaves, bit-identical credits and
    scores, on rows inside and far outside the training range, NaN in places, any batch size."""
    X = random_data(0, 1500)
    forest = IsolationForest(n_estimators=40, max_features=max_features, random_state=1).fit(X)
    packed = PackedForest.from_sklearn(forest)
    assert packed.native
    ref = _numpy_twin(packed)
    Y = random_data(1, 800) * 2.0
    Y[::7, 5] = np.nan
    Y[::11] = np.nan
    Y[3] = np.inf
    Y[4] = -np.inf
    for rows in (Y, Y[:1], Y[:257], X[:300]):
        leaves = packed.leaves(rows)
        assert np.array_equal(leaves, ref.leaves(rows))
        assert np.array_equal(packed.contributions(leaves), ref.contributions(leaves))
        assert np.array_equal(packed.score_samples(rows), ref.score_samples(rows))
        for form in (rows, rows.tolist()):  # (a list: converted in C)
            got, depths = packed.leaves_and_depths(form)
            assert np.array_equal(got, leaves)
            assert np.array_equal(packed._scores_from_leaves(got, depths), ref.score_samples(rows))
    assert packed.leaves(Y[:0]).shape == (40, 0)


def test_rows_are_converted_to_float32_as_numpy_converts_them(fitted):
    """The scorers' rows (lists of floats) go to the C walk without numpy's conversion: the same
    float32 values (rounding to nearest, ints, NaN, infinities, -0.0, subnormals, values past
    float32's range), and anything else (bools, numpy scalars, ragged rows) through numpy."""
    from detector.core import model

    packed = PackedForest.from_sklearn(fitted)
    nf = packed.n_features
    rng = np.random.RandomState(3)
    rows = [list(map(float, rng.standard_cauchy(nf) * 10.0 ** rng.randint(-40, 40))) for _ in range(300)]
    rows[0][:6] = [np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.5e38]
    rows[1][:4] = [7, -(2**60) + 1, 2**70, 16777217]  # ints, some not exact in float32
    rows[2][:3] = [1.0000000596046448, 1.0000001788139343, 0.1]  # ties and near-ties at float32
    out = np.empty((len(rows), nf), dtype=np.float32)
    model._forest.rows(rows, nf, out)
    with np.errstate(over="ignore"):  # (3.5e38 and 2**70 are past float32: inf in both)
        want = np.ascontiguousarray(np.asarray(rows), dtype=np.float32)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32))
    ref = _numpy_twin(packed)
    for odd in ([[True] * nf], [[np.float64(0.5)] * nf], [[0.5] * (nf - 1)], [(0.5,) * nf]):
        if len(odd[0]) == nf:
            assert np.array_equal(packed.leaves(odd), ref.leaves(odd))
        else:
            with pytest.raises(ModelError, match="expected feature rows"):
                packed.leaves(odd)
    with np.errstate(over="ignore"):
        leaves, depths = packed.leaves_and_depths(rows)
        assert np.array_equal(leaves, ref.leaves(rows))
        assert np.array_equal(packed._scores_from_leaves(leaves, depths), ref.score_samples(rows))


def test_the_c_walk_equals_numpys_on_the_shipped_model_and_simulator_traffic(sim_features):
    from detector.config import load_settings

    settings = load_settings()
    scorer = load_model(settings.models_dir, settings.model_name)
    packed = scorer.forest
    ref = _numpy_twin(packed)
    X, _ = sim_features
    leaves = packed.leaves(X)
    assert np.array_equal(leaves, ref.leaves(X))
    assert np.array_equal(packed.contributions(leaves), ref.contributions(leaves))
    rows = [list(map(float, x)) for x in X[:300]]
    ref_scorer = copy.copy(scorer)
    ref_scorer.forest = ref
    assert scorer.score_batch(rows) == ref_scorer.score_batch(rows)


def test_the_c_walk_reaches_every_leaf_of_a_hand_made_forest():
    """Two trees of one split each (the last node of the walk order is a leaf): rows on either
    side of the thresholds, on them, and NaN (left in the first tree, right in the second)."""
    arrays = {
        "children_left": np.array([1, -1, -1, 1, -1, -1], dtype=np.int32),
        "children_right": np.array([2, -1, -1, 2, -1, -1], dtype=np.int32),
        "feature": np.array([0, -2, -2, 1, -2, -2], dtype=np.int32),
        "threshold": np.array([0.5, -2.0, -2.0, -1.25, -2.0, -2.0]),
        "n_node_samples": np.array([4, 1, 3, 4, 2, 2], dtype=np.int64),
        "missing_go_to_left": np.array([1, 1, 1, 0, 1, 1], dtype=np.uint8),
        "tree_offsets": np.array([0, 3, 6], dtype=np.int64),
        "estimators_features": np.array([[0, 1], [0, 1]], dtype=np.int32),
        "max_samples": np.asarray(4, dtype=np.int64),
        "n_features": np.asarray(2, dtype=np.int64),
    }
    packed = PackedForest(arrays)
    ref = _numpy_twin(packed)
    X = np.array([[0.0, -2.0], [1.0, 0.0], [0.5, -1.25], [np.nan, np.nan], [np.inf, -np.inf]])
    leaves = packed.leaves(X)
    assert np.array_equal(leaves, ref.leaves(X))
    assert leaves.tolist() == [[1, 2, 1, 1, 2], [4, 5, 4, 5, 4]]
    assert np.array_equal(packed.contributions(leaves), ref.contributions(leaves))


def test_a_malformed_walk_raises_instead_of_reading_out_of_bounds(fitted):
    from detector.core import model

    packed = PackedForest.from_sklearn(fitted)
    X = np.zeros((2, packed.n_features), dtype=np.float32)
    out = np.empty((packed.n_trees, 2), dtype=np.intp)
    bad = packed._walk_code.copy()
    bad[0] = (len(bad) + 5) << packed._feat_bits  # a child past the end
    depths = np.empty(2)
    lv = packed._leaf_value
    with pytest.raises(ValueError, match="out of range"):
        model._forest.walk(bad, packed._walk_thr, packed._walk_nan_right, packed._walk_to_global,
                           packed.n_trees, packed._feat_bits, packed.max_depth, X,
                           packed.n_features, out, lv, depths)
    with pytest.raises(ValueError, match="lengths disagree"):
        model._forest.walk(packed._walk_code, packed._walk_thr[:-1], packed._walk_nan_right,
                           packed._walk_to_global, packed.n_trees, packed._feat_bits,
                           packed.max_depth, X, packed.n_features, out, lv, depths)
    with pytest.raises(ValueError, match="lengths disagree"):
        model._forest.walk(packed._walk_code, packed._walk_thr, packed._walk_nan_right,
                           packed._walk_to_global, packed.n_trees, packed._feat_bits,
                           packed.max_depth, X, packed.n_features, out, lv, np.empty(3))
    with pytest.raises(TypeError, match="bytes"):
        model._forest.walk(packed._walk_code.astype(np.int32), packed._walk_thr,
                           packed._walk_nan_right, packed._walk_to_global, packed.n_trees,
                           packed._feat_bits, packed.max_depth, X, packed.n_features, out, lv,
                           depths)
    slots = packed._leaf_slot.copy()
    slots[:] = 10**9
    total = np.empty((2, packed.n_features))
    with pytest.raises(ValueError, match="out of range"):
        model._forest.credits(slots, packed._leaf_credit, packed.n_features,
                              packed.leaves(X), packed.n_trees, total)
