"""The per-epoch measurement of the training-time examples (``training.epoch_measure``): what it
stores, that its rows are an independent recomputation's, that it leaves the training alone, and
its wiring into the workflow."""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from host_syncs import HostSyncs
from workflow_helpers import cell_dir, run_snakemake, tiny_config, write_tiny_config

from ncrobust import data as datasets
from ncrobust.attacks import ThreatModel, perturb
from ncrobust.cell import Cell
from ncrobust.collapse import nc_metrics, perturbation_metrics
from ncrobust.columns import METRIC_COLUMNS, PENULTIMATE, RESULT_COLUMNS
from ncrobust.config import ConfigError, validate_config
from ncrobust.evaluation.checkpoint import EvaluationPlan, evaluate_checkpoint, input_metrics
from ncrobust.jobs.experiment import build_model
from ncrobust.losses import get_loss
from ncrobust.models.base import eval_mode, tap_activations
from ncrobust.seeding import generator
from ncrobust.training import epoch_measure
from ncrobust.training.train import Recipe, initial_checkpoint, train_segment

CONFIG = {"models": {"mlp": {"depth": 2, "width": 32}, "convnet": {"channels": [8, 16], "width": 32}}}
THREAT = ThreatModel(norm="linf", eps=0.1, step_size=0.05, steps=2)
KIND = {"st": "st", "pgd-linf": "pgd", "trades-linf": "trades"}


def _setup(digits, adversary, *, model="convnet", epochs=2, threat=THREAT, **options):
    cell = Cell("digits", model, "ce", adversary, 3)
    net = build_model(CONFIG, cell, digits)
    recipe = Recipe(adversary=adversary, loss=get_loss("ce"), threat=threat, epochs=epochs, batch_size=256, **options)
    x, y = datasets.as_float(digits, "train")
    return cell, net, recipe, x, y


def _train(digits, adversary, *, spy=None, monkeypatch=None, **options):
    """Train 2 epochs; with ``spy`` (a list), record at each measurement the stored order and
    perturbed images and a copy of the model the measurement saw."""
    cell, net, recipe, x, y = _setup(digits, adversary, **options)
    if spy is not None:
        measure = epoch_measure.EpochInputs.measure

        def recording(self, model, *args, **kwargs):
            saw = {k: v.clone() for k, v in model.state_dict().items()}
            frame = measure(self, model, *args, **kwargs)
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in saw.items())  # BN statistics untouched
            perturbed = None if self.perturbed is None else self.perturbed.clone()
            spy.append({"order": self.order.clone(), "perturbed": perturbed, "state": saw, "frame": frame})
            return frame

        monkeypatch.setattr(epoch_measure.EpochInputs, "measure", recording)
    measured = [] if recipe.epoch_measure else None
    ckpt, rows = train_segment(net, initial_checkpoint(net, recipe), x, y, recipe=recipe, end_epoch=2, seed=cell.seed,
                               epoch_metrics=measured, num_classes=10)
    return cell, net, recipe, x, y, ckpt, rows, measured


def _metric(frame: pd.DataFrame, perturbation: str, metric: str, klass=None) -> float:
    d = frame[(frame["perturbation"] == perturbation) & (frame["metric"] == metric)]
    d = d[d["class"].isna()] if klass is None else d[d["class"] == klass]
    assert len(d) == 1, (perturbation, metric, klass, len(d))
    return float(d["value"].iloc[0])


# --------------------------------------------------------------------------------------------
# the rows against an independent recomputation


@pytest.mark.parametrize("adversary", ["st", "pgd-linf", "trades-linf"])
def test_each_epochs_rows_are_the_dense_metrics_of_the_stored_inputs_through_the_end_of_epoch_model(digits, adversary, monkeypatch):
    """Train 2 epochs with the measurement; for each epoch, rebuild the end-of-epoch model from the
    state the measurement saw, extract its penultimate features of the epoch's clean inputs (in the
    epoch's order) and of the stored perturbed ones with ``tap_activations`` in eval mode, and
    recompute with ``nc_metrics`` and ``perturbation_metrics``: equal to float64 rounding."""
    spy = []
    cell, net, recipe, x, y, ckpt, rows, measured = _train(digits, adversary, spy=spy, monkeypatch=monkeypatch, epoch_measure=True)
    assert [e for e, _ in measured] == [1, 2] and len(spy) == 2
    # the end-of-epoch model: the last measurement saw the checkpoint's weights and statistics
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in spy[-1]["state"].items())
    for epoch, (e, frame), seen in zip((1, 2), measured, spy):
        assert e == epoch and frame is seen["frame"]
        # the clean inputs are the dataset's rows in the epoch's order
        assert torch.equal(seen["order"], torch.randperm(len(x), generator=generator(cell.seed, "epoch", epoch)))
        model = build_model(CONFIG, cell, digits)
        model.load_state_dict(seen["state"])
        labels = y[seen["order"]]
        W = model.classifier.weight.detach()
        with eval_mode(model):
            logits, taps = tap_activations(model, x[seen["order"]], [PENULTIMATE])
        H = taps[PENULTIMATE]
        ref = nc_metrics(H, labels, num_classes=10, weight=W, logits=logits)
        assert set(frame["perturbation"]) == ({"clean"} if adversary == "st" else {"clean", epoch_measure.TRAINING_PERTURBATION[KIND[adversary]]})
        for name, value in ref.items():
            got = _metric(frame, "clean", name)
            assert got == pytest.approx(value, rel=1e-9, abs=1e-12), name
        if adversary == "st":
            assert seen["perturbed"] is None
            continue
        xp = seen["perturbed"]
        assert xp.dtype == x.dtype and xp.shape == x.shape
        assert float((xp - x[seen["order"]]).abs().max()) <= THREAT.eps + 1e-6 and 0.0 <= float(xp.min()) <= float(xp.max()) <= 1.0
        assert not torch.equal(xp, x[seen["order"]])  # the attack moved them
        name = epoch_measure.TRAINING_PERTURBATION[KIND[adversary]]
        with eval_mode(model):
            logits_p, taps_p = tap_activations(model, xp, [PENULTIMATE])
        Hp = taps_p[PENULTIMATE]
        own = nc_metrics(Hp, labels, num_classes=10, weight=W, logits=logits_p)
        for metric, value in own.items():
            assert _metric(frame, name, metric) == pytest.approx(value, rel=1e-9, abs=1e-12), metric
        moved = perturbation_metrics(H, labels, Hp, labels, num_classes=10, logits=logits_p)
        # the authors' per-epoch outputs: per-class mean distances, the global mean's distance and angle
        assert {"class_mean_distance_per_class", "class_mean_distance", "global_mean_distance", "global_mean_angle"} <= set(moved)
        for metric, value in moved.items():
            if isinstance(value, torch.Tensor) and value.dim() == 1:  # per class
                for c, v in enumerate(value.tolist()):
                    assert _metric(frame, name, metric, c) == pytest.approx(v, rel=1e-9, abs=1e-9), (metric, c)
            elif isinstance(value, torch.Tensor):  # the leap matrix
                d = frame[(frame["perturbation"] == name) & (frame["metric"] == metric)]
                got = np.zeros((10, 10))
                got[d["row"].astype(int), d["col"].astype(int)] = d["value"]
                np.testing.assert_allclose(got, value.numpy(), rtol=0, atol=1e-12)
            else:
                assert _metric(frame, name, metric) == pytest.approx(value, rel=1e-9, abs=1e-9), metric
        assert _metric(frame, name, "accuracy_true_labels") == pytest.approx(float((logits_p.argmax(1) == labels).double().mean()))


def test_with_a_zero_radius_the_stored_perturbed_inputs_are_the_clean_ones_in_the_epoch_order(digits, monkeypatch):
    """With eps = 0 PGD's examples are the batch itself: the stored images are ``x[order]`` to
    the bit (each step's rows land at its offset), and the perturbed rows equal the clean ones."""
    spy = []
    zero = ThreatModel(norm="linf", eps=0.0, step_size=0.01, steps=2)
    *_, x, y, ckpt, rows, measured = _train(digits, "pgd-linf", model="mlp", threat=zero, spy=spy, monkeypatch=monkeypatch,
                                            epoch_measure=True)
    for seen in spy:
        assert torch.equal(seen["perturbed"], x[seen["order"]])
    frame = measured[-1][1]
    clean = frame[frame["perturbation"] == "clean"].set_index(["metric", "class", "row", "col"])["value"]
    pgd = frame[frame["perturbation"] == "pgd"].set_index(["metric", "class", "row", "col"])["value"]
    shared = clean.index.intersection(pgd.index)
    assert len(shared) > 20
    np.testing.assert_allclose(pgd[shared].to_numpy(), clean[shared].to_numpy(), rtol=1e-12)
    assert _metric(frame, "pgd", "alignment_angle") == pytest.approx(0.0, abs=1e-4)


def test_input_metrics_are_the_evaluations_penultimate_rows(digits):
    """One evaluation core: the same clean and perturbed inputs give the evaluation's penultimate
    rows to the bit, whether measured by ``evaluate_checkpoint`` or ``input_metrics``."""
    cell, net, recipe, x, y = _setup(digits, "pgd-linf", model="mlp")
    net.eval()
    plan = EvaluationPlan(threats=(THREAT,), perturbations={"clean": {}, "pgd": {}}, splits=("train",), batch_size=500)
    evaluated = evaluate_checkpoint(net, digits, plan, seed=cell.seed, epoch=0).metrics
    evaluated = evaluated[evaluated["layer"] == PENULTIMATE].reset_index(drop=True)
    xp = perturb("pgd", net, x, y, threat=THREAT, num_classes=10, generator=generator(cell.seed, "evaluate", 0, "train", "pgd"),
                 batch_size=500)
    got = input_metrics(net, x, y, ("pgd", xp, y), split="train", norm="linf", class_counts=digits["class_counts"], batch_size=500)
    assert list(got.columns) == RESULT_COLUMNS
    pd.testing.assert_frame_equal(got, evaluated, check_exact=True)


# --------------------------------------------------------------------------------------------
# the training is untouched


@pytest.mark.parametrize("adversary, switches", [
    ("st", {}), ("pgd-linf", {}), ("trades-linf", {}),
    ("pgd-linf", {"pgd_clean_bn_pass": True, "track_collapse": True}), ("trades-linf", {"trades_bn": "eval", "track_collapse": True}),
])
def test_the_measurement_changes_neither_the_checkpoint_nor_the_log(digits, adversary, switches):
    """Bit-identical weights, BatchNorm statistics, optimizer state and log rows (but the timing)
    with the measurement on and off: it runs in eval mode, without gradients or random draws."""
    out = {}
    for on in (False, True):
        *_, ckpt, rows, measured = _train(digits, adversary, epoch_measure=on, **switches)
        out[on] = ckpt, rows
        assert (measured is not None and len(measured) == 2) == on
    (a, rows_a), (b, rows_b) = out[False], out[True]
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    assert all(torch.equal(u, v) for u, v in zip(a["optimizer"]["momentum_buffer"], b["optimizer"]["momentum_buffer"]))
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert repr(strip(rows_a)) == repr(strip(rows_b))  # repr: NaN columns compare equal too


def test_storing_the_inputs_adds_no_host_synchronisation_per_step(digits):
    """8x more steps with the measurement on: no call that would synchronise with a GPU is added
    (the stores are slice copies; the measurement is once per epoch, in batches of its own)."""
    counts = []
    for batch_size in (512, 64):
        cell, net, recipe, x, y = _setup(digits, "pgd-linf", model="mlp", epochs=1, epoch_measure=True)
        recipe = dataclasses.replace(recipe, batch_size=batch_size)
        with HostSyncs() as syncs:
            train_segment(net, initial_checkpoint(net, recipe), x, y, recipe=recipe, end_epoch=1, seed=cell.seed,
                          epoch_metrics=[], class_counts=digits["class_counts"])
        counts.append(collections.Counter(syncs.calls))
    assert counts[0] == counts[1]


def test_the_measurement_needs_a_list_and_refuses_mixup(digits):
    cell, net, recipe, x, y = _setup(digits, "st", model="mlp", epochs=1, epoch_measure=True)
    with pytest.raises(ValueError, match="epoch_measure: pass a list as epoch_metrics"):
        train_segment(net, initial_checkpoint(net, recipe), x, y, recipe=recipe, end_epoch=1, seed=1)
    with pytest.raises(ValueError, match="training.epoch_measure with training.mixup"):
        dataclasses.replace(recipe, mixup_alpha=0.4)


def test_the_config_refuses_the_measurement_with_mixup_and_in_a_variant():
    config = tiny_config()
    config["training"] = {**config["training"], "epoch_measure": True, "mixup": {"alpha": 0.2}}
    with pytest.raises(ConfigError, match="training.epoch_measure with training.mixup"):
        validate_config(config)
    config = tiny_config(variants={"measured": {"training": {"epoch_measure": True}}})
    config["grid"] = {**config["grid"], "variant": ["base", "measured"]}
    with pytest.raises(ConfigError, match=r"variants\.measured\.training\.epoch_measure: the per-epoch measurement is the grid's"):
        validate_config(config)
    assert validate_config(tiny_config())["training"]["epoch_measure"] is False


@pytest.mark.gpu
@pytest.mark.parametrize("adversary", ["st", "pgd-linf", "trades-linf"])
def test_the_captured_step_stores_the_same_inputs_and_rows_as_the_eager_one_on_gpu(digits, adversary, monkeypatch):
    """CUDA-graph replay: the perturbed images are copied out of the graph's static output after
    every replay; the stored images and the epoch's rows match the eager step's."""
    from ncrobust.jobs.pipeline import setup

    setup({"device": "cuda", "threads": 1}, deterministic=True)
    seen, frames = {}, {}
    for graphed in (False, True):
        spy = []
        cell, net, recipe, x, y = _setup(digits, adversary, cuda_graph=graphed, epoch_measure=True)
        net, x, y = net.cuda(), x.cuda(), y.cuda()
        measure = epoch_measure.EpochInputs.measure

        def recording(self, *args, _measure=measure, _spy=spy, **kwargs):
            _spy.append(None if self.perturbed is None else self.perturbed.clone())
            return _measure(self, *args, **kwargs)

        monkeypatch.setattr(epoch_measure.EpochInputs, "measure", recording)
        measured = []
        train_segment(net, initial_checkpoint(net, recipe), x, y, recipe=recipe, end_epoch=2, seed=1, epoch_metrics=measured)
        seen[graphed], frames[graphed] = spy, measured
    for a, b in zip(seen[False], seen[True]):  # a sign step may flip where the two runs round apart
        assert (a is None) == (b is None) and (a is None or float((a - b).abs().gt(1e-4).double().mean()) < 1e-3)
    for (_, a), (_, b) in zip(frames[False], frames[True]):
        nc1 = a[(a["metric"] == "nc1")]["value"].to_numpy()
        np.testing.assert_allclose(b[(b["metric"] == "nc1")]["value"].to_numpy(), nc1, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# the figure


@pytest.mark.slow
def test_the_epoch_collapse_figure_draws_nc1_to_nc4_and_the_angle_per_adversary(tmp_path):
    """From a synthetic per-epoch table (training split, clean and the training attack): one row
    per metric, one column per adversary, a line per set; an empty table gives a placeholder."""
    from test_plots import check_image_files, synthetic_metrics

    from ncrobust import tables
    from ncrobust.columns import EPOCH_FIGURES
    from ncrobust.figures import plots
    from ncrobust.io import write_parquet
    from ncrobust.jobs.pipeline import epoch_figures

    m = synthetic_metrics()
    m = m[(m["split"] == "train") & m["perturbation"].isin(["clean", "pgd"]) & ~((m["adversary"] == "st") & (m["perturbation"] == "pgd"))]
    curves = tables.epoch_collapse_curves(m)
    assert set(curves["metric"]) == set(tables.EPOCH_COLLAPSE_METRICS) and set(curves["layer"]) == {PENULTIMATE}
    assert set(curves["norm"]) == {"linf"} and curves["class"].isna().all()
    fig = plots.epoch_collapse(curves, tmp_path / "epoch_collapse.png")
    rows = len(tables.EPOCH_COLLAPSE_METRICS)  # NC1-NC4, NC2 of W, the angle
    axes = np.array(fig.axes[: rows * 2]).reshape(rows, 2)
    assert [ax.get_title() for ax in axes[0]] == ["trained with\nst", "trained with\npgd-linf"]
    assert not axes[-1, 0].axison and axes[-1, 1].axison  # st has no perturbed set: no angle
    check_image_files({"epoch_collapse": str(tmp_path / "epoch_collapse.png")})
    write_parquet(m, tmp_path / "table.parquet")
    epoch_figures(str(tmp_path / "table.parquet"), {name: str(tmp_path / f"wf_{name}.png") for name in EPOCH_FIGURES})
    check_image_files({"epoch_collapse": str(tmp_path / "wf_epoch_collapse.png")})
    plots.epoch_collapse(tables.epoch_collapse_curves(pd.DataFrame()), tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# the workflow


@pytest.mark.workflow
@pytest.mark.slow
def test_the_workflow_writes_and_aggregates_the_per_epoch_measurement(tmp_path):
    """A tiny grid with the measurement: every train job writes its segment's epochs, the
    aggregate stacks them into tables/epoch_metrics.parquet, and the epoch_collapse figure is
    drawn and on the front page."""
    base = tiny_config()
    config = write_tiny_config(
        tmp_path, training={**base["training"], "epoch_measure": True},
        evaluation={**base["evaluation"], "splits": ["test"], "perturbations": {"clean": {}, "pgd": {}}, "strong": {"enabled": False}},
    )
    run_snakemake(tmp_path, configfile=config)
    segments = []
    for adversary in ("st", "pgd-linf"):
        for epoch, trained in ((2, {1, 2}), (4, {3, 4})):
            f = pd.read_parquet(tmp_path / cell_dir(adversary=adversary) / f"epoch_metrics/epoch{epoch}.parquet")
            assert list(f.columns) == METRIC_COLUMNS and set(f["epoch"]) == trained
            assert set(f["perturbation"]) == ({"clean"} if adversary == "st" else {"clean", "pgd"})
            assert set(f["split"]) == {"train"} and set(f["layer"]) == {PENULTIMATE}
            assert {"nc1", "nc2_equiangle_W", "nc3", "nc4", "ncc_accuracy_clean_means"} <= set(f["metric"])
            segments.append(f)
    table = pd.read_parquet(tmp_path / "results/tables/epoch_metrics.parquet")
    ordered = lambda f: f.sort_values(METRIC_COLUMNS[:-1], na_position="first").reset_index(drop=True)  # noqa: E731
    pd.testing.assert_frame_equal(ordered(table), ordered(pd.concat(segments, ignore_index=True)), check_exact=True)
    assert math.isfinite(_metric(table[(table["adversary"] == "pgd-linf") & (table["epoch"] == 4)], "pgd", "alignment_angle"))
    assert (tmp_path / "results/figures/epoch_collapse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "epoch_collapse" in (tmp_path / "results/report/front_page.html").read_text()
