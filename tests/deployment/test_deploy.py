"""tf.deploy / `tensorfold deploy` on the digits task: the latency cache, resume, honest reports, recipes,
bad input. The artifact stage is a stub here (a plain
tf.build, tested there; test_deploy_cli.py runs it end to end) to stay fast."""
from __future__ import annotations

import os

import pytest

from tensorfold.cli import main
from tensorfold.deployment import deploy
from tensorfold.deployment import latency as lat
from tensorfold.deployment import run as deploy_run

ROUNDS = 3


def _stub_artifact(self, graph, key):
    return {"path": os.path.join(self.plan["out"], "artifact"), "tasks": 0, "untuned": 0, "trials": 0,
            "build_seconds": 0.0, "stub": True}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A private latency cache and a stubbed artifact build for the module; the first deploy, measured."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("deploy")
        mp.setenv("TENSORFOLD_LATENCY_DIR", str(root / "latency-cache"))
        mp.setattr(deploy_run._Deploy, "artifact", _stub_artifact)
        first = deploy("digits", "x86", root / "first", speedup=1.5, rounds=ROUNDS, progress=False)
        yield root, first


def _count_measurements(monkeypatch) -> list:
    """Every timing a deploy decides on: layers (time_runners) and whole models (end_to_end; the timings of
    original and deployed at the end, for the verdict and the steady state, are not decisions)."""
    calls = []
    layers, whole = lat.time_runners, lat.end_to_end

    def counting(runners):
        calls.append(len(runners))
        return layers(runners)

    def counting_whole(graphs, engine, *args, warm=False, **kwargs):
        if sorted(graphs) != ["deployed", "original"]:
            calls.append(sorted(graphs))
        return whole(graphs, engine, *args, warm=warm, **kwargs)
    monkeypatch.setattr(lat, "time_runners", counting)
    monkeypatch.setattr(lat, "end_to_end", counting_whole)
    return calls


def test_first_deploy_measures_every_candidate_and_writes_its_reports(env):
    root, first = env
    table = first.report["latency_table"]
    assert table["cache"]["misses"] > 0 and table["cache"]["hits"] == 0
    assert all(c["latency_ms"] > 0 for layer in table["layers"] for c in layer["candidates"])
    for name in ("model.onnx", "report.json", "report.md", "recipe.toml"):
        assert (root / "first" / name).is_file(), name
    chosen = first.report["selection"]["choices"]
    for layer in table["layers"]:  # a chosen replacement was measured faster than its layer
        by_key = {c["key"]: c for c in layer["candidates"]}
        assert by_key[chosen[layer["layer"]]]["latency_ms"] <= by_key["original"]["latency_ms"]
    assert first.report["prediction"]["predicted_ms"] > 0
    # the speed-up verdict rests on the paired ratio of original and deployed, timed until precise
    paired, verdict = first.report["measure"]["paired"], first.report["verdict"]
    assert ROUNDS <= paired["rounds"] <= deploy_run.VERDICT_BLOCKS * ROUNDS
    assert paired["low"] <= paired["median"] <= paired["high"]
    assert verdict["speedup"] == pytest.approx(1 / paired["median"])
    assert verdict["speedup_interval"] == pytest.approx([1 / paired["high"], 1 / paired["low"]])
    assert verdict["speed_met"] == (verdict["speedup"] >= 1.5)
    assert "median of per-round ratios" in (root / "first" / "report.md").read_text()


def test_a_second_deploy_measures_nothing_again(env, monkeypatch):
    root, first = env
    calls = _count_measurements(monkeypatch)
    second = deploy("digits", "x86", root / "second", speedup=1.5, rounds=ROUNDS, progress=False)
    cache = second.report["latency_table"]["cache"]
    assert cache["misses"] == 0 and cache["hits"] > 0 and not cache["stage_reused"]
    assert calls == []
    assert second.report["pipeline"] == first.report["pipeline"]


def test_an_interrupted_deploy_resumes_after_the_latency_table(env, monkeypatch):
    root, first = env
    out = root / "resumed"

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted during the selection")
    with monkeypatch.context() as m:
        m.setattr(deploy_run, "select", broken)
        with pytest.raises(RuntimeError, match="interrupted"):
            deploy("digits", "x86", out, speedup=1.5, rounds=ROUNDS, progress=False)
    assert (out / "stages" / "latency_table.json").is_file()
    assert not (out / "report.json").exists()
    calls = _count_measurements(monkeypatch)
    resumed = deploy("digits", "x86", out, speedup=1.5, rounds=ROUNDS, progress=False)
    assert calls == []
    assert resumed.report["latency_table"]["cache"]["stage_reused"]
    assert "latency_table" in resumed.report["stages_reused"]
    assert (out / "recipe.toml").read_text() == (root / "first" / "recipe.toml").read_text()


def test_an_unreachable_speedup_is_reported_not_met_with_the_best_reached(env):
    root, _ = env
    result = deploy("digits", "x86", root / "unreachable", speedup=100, rounds=ROUNDS, progress=False)
    verdict = result.report["verdict"]
    assert not result.met and not verdict["speed_met"]
    assert result.report["selection"]["met"] is False
    assert 0 < verdict["speedup"] < 100  # the best reached, measured
    text = (root / "unreachable" / "report.md").read_text()
    assert "NOT MET" in text and "NOT reachable" in text
    assert f"{verdict['speedup']:.2f}x" in text


def test_the_recipe_reproduces_the_pipeline(env, monkeypatch):
    root, first = env
    calls = _count_measurements(monkeypatch)
    again = deploy("digits", "x86", root / "from-recipe", recipe=str(root / "first" / "recipe.toml"),
                   rounds=ROUNDS, progress=False)
    assert calls == []  # no latency table
    assert again.report["latency_table"] is None and again.report["selection"] is None
    assert again.report["pipeline"] == first.report["pipeline"]
    assert again.report["int8"]["int8"] == first.report["int8"]["int8"]
    assert (root / "from-recipe" / "recipe.toml").read_text().split("[notes]")[1] == \
        (root / "first" / "recipe.toml").read_text().split("[notes]")[1]


@pytest.mark.parametrize("argv, message", [
    (["--target", "nosuchtarget", "--speedup", "2"], "nosuchtarget"),
    (["--target", "x86", "--speedup", "1"], "greater than 1"),
    (["--target", "x86", "--speedup", "0.5"], "greater than 1"),
    (["--target", "x86", "--speedup", "2", "--latency", "1"], "not both"),
    (["--target", "x86", "--speedup", "2", "--data", "mnist1d-mlp"], "shape"),
    (["--target", "x86", "--speedup", "2", "--engine", "openvino"], "engine"),
    (["--target", "arm64", "--speedup", "2", "--rpc-tracker", "127.0.0.1:9"], "unreachable"),
])
def test_bad_input_fails_with_status_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["deploy", "digits", *argv, "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_noisy_layer_is_timed_again_and_keeps_each_candidates_lowest_median(tmp_path, monkeypatch):
    import tensorfold as tf
    from tensorfold.deployment import candidates as cand
    from tensorfold.models import resolve
    from tensorfold.targets import get_target

    folded, _ = tf.compress(resolve("digits"), "fold_bn")
    group = cand.layer_groups(folded, (2.0, 4.0))[0]
    n = len(group.candidates)
    # scripted timings: the first pass is disturbed for every candidate; later passes only for the last one
    passes = [[{"median_ms": 1.0, "iqr_ms": 0.9}] * n,
              [{"median_ms": 0.5, "iqr_ms": 0.01}] * (n - 1) + [{"median_ms": 2.0, "iqr_ms": 0.9}],
              [{"median_ms": 0.6, "iqr_ms": 0.01}] * (n - 1) + [{"median_ms": 3.0, "iqr_ms": 1.5}]]
    calls = []

    def scripted(runners):
        calls.append(len(runners))
        return [dict(t) for t in passes[len(calls) - 1]]
    monkeypatch.setattr(lat, "time_runners", scripted)
    target = get_target("x86")
    cache = lat.LatencyCache(target, "onnxruntime", 1, directory=str(tmp_path))
    lat.measure_groups([group], lat.open_engine("onnxruntime", target, 1, str(tmp_path)), cache, progress=False)

    assert calls == [n] * (1 + lat.RETRIES)  # retried while a candidate stayed noisy, then gave up
    assert [c.latency_ms for c in group.candidates] == [0.5] * (n - 1) + [1.0]
    assert [c.noisy for c in group.candidates] == [False] * (n - 1) + [True]
    stored = lat.LatencyCache(target, "onnxruntime", 1, directory=str(tmp_path))
    assert [stored.get(lat.entry_key(group, c))["noisy"] for c in group.candidates] == [False] * (n - 1) + [True]


def _conv_graph():
    import torch
    from torch import nn

    import tensorfold as tf

    # three 64-channel 3x3 convs at 32x32: the layers are most of the model, so a goal is reachable
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10)).eval()
    return tf.capture(model, torch.randn(1, 32, 32, 32))


def _flop_table(monkeypatch, tmp_path):
    """A latency table that does not depend on this machine's load: each candidate's latency proportional to
    its FLOPs, the whole model 10 % over its layers, in a private cache (nothing timed before is reused)."""
    monkeypatch.setenv("TENSORFOLD_LATENCY_DIR", str(tmp_path / "flop-cache"))

    def by_flops(groups, engine, cache, progress):
        for group in groups:
            for c in group.candidates:
                c.latency_ms, c.iqr_ms, c.cached, c.emulated, c.noisy = c.flops * 1e-6, 0.0, False, False, False
    monkeypatch.setattr(lat, "measure_groups", by_flops)
    measured_table = deploy_run._Deploy.latency_table

    def table(self, folded):
        result = measured_table(self, folded)  # the whole model is timed: replaced by a figure from the layers
        result["original_ms"] = {"median_ms": 1.1 * result["layers_ms"], "iqr_ms": 0.0}
        result["overhead_ms"] = 0.1 * result["layers_ms"]
        return result
    monkeypatch.setattr(deploy_run._Deploy, "latency_table", table)


def _scripted_checks(monkeypatch, ratios) -> list:
    """Whole-model checks that return scripted measured ratios: a number is a fraction of the goal ratio,
    "prediction" is the attempt's own predicted ratio. Returns the compressed models checked."""
    checked = []
    original_selection = deploy_run._Deploy.selection

    def remember(self, table, correction=1.0):
        result = original_selection(self, table, correction)
        self.last_prediction = result["predicted_ms"] / table["original_ms"]["median_ms"]
        self.goal_ratio = self.factor_goal_ms(table) / table["original_ms"]["median_ms"]
        return result

    def scripted_check(self, folded, compressed, key, attempt):
        checked.append(compressed)
        ratio = self.last_prediction if ratios[attempt] == "prediction" else ratios[attempt] * self.goal_ratio
        return {"original_ms": 1.0, "compressed_ms": ratio, "measured_ratio": ratio}
    monkeypatch.setattr(deploy_run._Deploy, "check", scripted_check)
    monkeypatch.setattr(deploy_run._Deploy, "selection", remember)
    return checked


def _step(ratio: float) -> float:
    return min(max(ratio, 1 / deploy_run.MAX_STEP), deploy_run.MAX_STEP)


def test_one_disturbed_check_moves_the_goal_by_at_most_the_trust_region(env, monkeypatch, tmp_path):
    root, _ = env
    _flop_table(monkeypatch, tmp_path)
    # the first check measures 3x the goal (a disturbed timing: the model was predicted within it)
    _scripted_checks(monkeypatch, [3.0, 0.95, 0.95])
    result = deploy(_conv_graph(), "x86", root / "disturbed", speedup=1.3, rounds=ROUNDS, progress=False)
    first, second = result.report["selection"]["checks"][:2]
    assert first["measured_ratio"] / first["predicted_ratio"] > 2 * deploy_run.MAX_STEP
    assert second["correction"] == pytest.approx(deploy_run.MAX_STEP)


def test_a_compressed_model_slower_than_predicted_is_selected_again_for_a_tighter_goal(env, monkeypatch, tmp_path):
    root, _ = env
    _flop_table(monkeypatch, tmp_path)
    # the first compressed model measures at 1.3x the goal although its prediction met it
    checked = _scripted_checks(monkeypatch, [1.3, "prediction", "prediction"])
    result = deploy(_conv_graph(), "x86", root / "corrected", speedup=1.3, rounds=ROUNDS, progress=False)

    selection = result.report["selection"]
    first, second = selection["checks"][:2]
    assert first["measured_ratio"] > first["goal_ratio"] >= first["predicted_ratio"]  # promised, missed
    assert second["correction"] == pytest.approx(_step(first["measured_ratio"] / first["predicted_ratio"]))
    assert second["predicted_ratio"] < first["predicted_ratio"]  # a faster set was chosen ...
    assert checked[1] is not checked[0] and not first["delivered"] and second["delivered"]  # ... and delivered
    original_ms = result.report["latency_table"]["original_ms"]["median_ms"]
    assert selection["goal_ms"] == pytest.approx(first["goal_ratio"] * original_ms / second["correction"])
    assert "Checked on the whole model" in (root / "corrected" / "report.md").read_text()


def test_a_model_far_faster_than_asked_gives_speed_back_for_accuracy(env, monkeypatch, tmp_path):
    import numpy as np

    import tensorfold as tf

    root, _ = env
    _flop_table(monkeypatch, tmp_path)
    # the first model is twice as fast as asked (its layer errors paid for speed nobody asked for); the
    # looser second one meets the goal with little to spare and is delivered
    _scripted_checks(monkeypatch, [0.5, 0.95])
    result = deploy(_conv_graph(), "x86", root / "relaxed", speedup=1.3, rounds=ROUNDS, progress=False)
    first, second = result.report["selection"]["checks"]
    assert second["correction"] == pytest.approx(_step(first["measured_ratio"] / first["predicted_ratio"])) and \
        second["correction"] < 1
    assert second["total_error"] < first["total_error"] and second["delivered"] and not first["delivered"]
    # what OUT holds is the delivered model
    stored = tf.load(str(root / "relaxed" / "stages" / "compressed.onnx"))
    x = {stored.inputs[0].name: np.random.default_rng(0).standard_normal((1, 32, 32, 32)).astype(np.float32)}
    assert np.allclose(next(iter(stored.run(x).values())), next(iter(result.graph.run(x).values())), atol=1e-5)


def test_when_the_looser_model_misses_the_goal_the_one_that_met_it_is_delivered(env, monkeypatch, tmp_path):
    root, _ = env
    _flop_table(monkeypatch, tmp_path)
    _scripted_checks(monkeypatch, [0.5, 1.2, 1.1])  # relaxed too far, then still short after tightening
    result = deploy(_conv_graph(), "x86", root / "overshot", speedup=1.3, rounds=ROUNDS, progress=False)
    checks = result.report["selection"]["checks"]
    assert [c["delivered"] for c in checks] == [True] + [False] * (len(checks) - 1)
    assert result.report["selection"]["total_error"] == checks[0]["total_error"]


def _scripted_int8(monkeypatch, gains) -> list:
    """int8 decisions with scripted gains (fp32 1 ms, int8 1/gain ms, no drop): the first call decides on the
    original, later ones on the factorized model. Returns the graphs each call was asked about."""
    asked = []

    def scripted(self, fp32, int8):
        asked.append(fp32)
        gain = gains[min(len(asked), len(gains)) - 1]
        return {"fp32_ms": 1.0, "int8_ms": 1.0 / gain, "engine": self.engine_name, "emulated": False,
                "int8": gain > 1.0, "drop_points": 0.0, "accuracy": "scripted", "reason": "scripted"}
    monkeypatch.setattr(deploy_run._Deploy, "_int8_pays", scripted)
    return asked


def _calibration():
    import numpy as np

    return [np.random.default_rng(i).standard_normal((1, 32, 32, 32)).astype(np.float32) for i in range(2)]


def test_int8_is_decided_on_the_original_first_and_the_factors_are_asked_only_for_the_rest(env, monkeypatch,
                                                                                           tmp_path):
    root, _ = env
    _flop_table(monkeypatch, tmp_path)
    _scripted_checks(monkeypatch, [0.95] * 3)  # each check lands just inside its goal: no correction
    # both deploys measure their layers' errors on the same calibration data: int8 slower on one, 1.5x on the other
    with monkeypatch.context() as m:
        _scripted_int8(m, [0.8])
        plain = deploy(_conv_graph(), "x86", root / "factors-only", speedup=2.0, calibration=_calibration(),
                       rounds=ROUNDS, progress=False)
    _scripted_int8(monkeypatch, [1.5])
    with_int8 = deploy(_conv_graph(), "x86", root / "int8-first", speedup=2.0, calibration=_calibration(),
                       rounds=ROUNDS, progress=False)
    assert not plain.report["int8"]["int8"]

    first = with_int8.report["int8_first"]
    assert first["int8"] and first["gain"] == pytest.approx(1.5)
    original_ms = with_int8.report["latency_table"]["original_ms"]["median_ms"]
    # the fp32 factorized model's goal is the deployed goal times int8's gain: 1/2 x 1.5 of the original
    assert with_int8.report["selection"]["goal_ms"] == pytest.approx(original_ms / 2.0 * 1.5)
    assert plain.report["selection"]["goal_ms"] == pytest.approx(original_ms / 2.0)
    # a looser goal costs less error, and int8 is delivered on top
    assert with_int8.report["selection"]["total_error"] < plain.report["selection"]["total_error"]
    assert with_int8.report["int8"]["int8"] and "int8 first" in (root / "int8-first" / "report.md").read_text()


def test_when_int8_alone_reaches_the_goal_no_layer_is_factorized(env, monkeypatch, tmp_path):
    root, _ = env
    _flop_table(monkeypatch, tmp_path)
    checked = _scripted_checks(monkeypatch, [0.95] * 3)
    asked = _scripted_int8(monkeypatch, [2.5])
    result = deploy(_conv_graph(), "x86", root / "int8-alone", speedup=2.0, calibration=_calibration(),
                    rounds=ROUNDS, progress=False)
    assert set(result.report["selection"]["choices"].values()) == {"original"}
    assert checked == []  # nothing replaced: no whole-model check of a factorized model
    assert result.report["int8"]["int8"] and result.report["selection"]["total_error"] == 0
    # the model int8 is applied to is the original it was decided on: timed once, not twice
    assert len(asked) == 1 and "decided on the original" in result.report["int8"]["reason"]
    assert result.report["int8"]["int8_ms"] == pytest.approx(1 / 2.5)


def test_with_train_data_a_model_with_no_layer_replaced_is_not_fine_tuned(env, monkeypatch, tmp_path):
    import numpy as np

    import tensorfold as tf

    root, _ = env
    _flop_table(monkeypatch, tmp_path)
    _scripted_checks(monkeypatch, [0.95] * 3)
    _scripted_int8(monkeypatch, [2.5])  # int8 alone reaches 2x
    monkeypatch.setattr(tf, "finetune", lambda *a, **k: pytest.fail("fine-tuned a model with no layer replaced"))
    rng = np.random.default_rng(0)
    training = (rng.standard_normal((8, 32, 32, 32)).astype(np.float32), rng.integers(0, 10, 8))
    out = root / "int8-alone-trained"
    result = deploy(_conv_graph(), "x86", out, speedup=2.0, calibration=_calibration(), train_data=training,
                    finetune_epochs=2, rounds=ROUNDS, progress=False)
    assert set(result.report["selection"]["choices"].values()) == {"original"}
    assert result.report["int8"]["int8"] and not (out / "stages" / "finetuned.json").exists()
    assert "finetune_epochs = 0" in (out / "recipe.toml").read_text()  # what was done, not what was asked


def test_the_fine_tune_is_in_the_report_with_the_weights_it_kept(env, monkeypatch, tmp_path):
    import numpy as np

    root, _ = env
    _flop_table(monkeypatch, tmp_path)
    _scripted_checks(monkeypatch, [0.95] * 3)
    _scripted_int8(monkeypatch, [0.8])  # int8 not kept: the factors carry the goal, so layers are replaced
    rng = np.random.default_rng(0)
    training = (rng.standard_normal((40, 32, 32, 32)).astype(np.float32), rng.integers(0, 10, 40))
    out = root / "fine-tuned"
    runs = [deploy(_conv_graph(), "x86", out, speedup=2.0, calibration=_calibration(), train_data=training,
                   finetune_epochs=1, rounds=ROUNDS, progress=False) for _ in range(2)]
    first, again = (r.report for r in runs)
    assert any(v != "original" for v in first["selection"]["choices"].values())
    summary = first["finetune"]
    assert summary["held-out accuracy after"] >= summary["held-out accuracy before"]  # never handed back worse
    assert summary["kept"] and len(summary["epochs"]) >= 1
    text = (out / "report.md").read_text()
    assert "## Fine-tuning" in text and f"kept: {summary['kept']}" in text
    assert "finetuned" in again["stages_reused"] and again["finetune"] == summary  # a resumed deploy says it too


def test_int8_giving_less_on_the_factorized_model_makes_the_factors_selected_again(env, monkeypatch, tmp_path):
    root, _ = env
    _flop_table(monkeypatch, tmp_path)  # goals 0.75 and 0.55 of the original choose different factors
    _scripted_checks(monkeypatch, [0.95] * 3)
    asked = _scripted_int8(monkeypatch, [1.5, 1.1, 1.1])  # 1.5x on the original, 1.1x once factorized
    result = deploy(_conv_graph(), "x86", root / "shortfall", speedup=2.0, calibration=_calibration(),
                    rounds=ROUNDS, progress=False)
    assert len(asked) == 3  # the original, then the factorized model of each selection
    shortfall = result.report["int8_first"]["shortfall"]
    assert shortfall == {"expected_gain": pytest.approx(1.5), "realized_gain": pytest.approx(1.1)}
    original_ms = result.report["latency_table"]["original_ms"]["median_ms"]
    assert result.report["selection"]["goal_ms"] == pytest.approx(original_ms / 2.0 * 1.1)
    assert "selected again" in (root / "shortfall" / "report.md").read_text()


def test_int8_rejected_on_the_original_is_not_measured_again(env, monkeypatch, tmp_path):
    root, _ = env
    _flop_table(monkeypatch, tmp_path)
    _scripted_checks(monkeypatch, [0.95] * 3)
    asked = _scripted_int8(monkeypatch, [0.8])  # int8 slower than fp32 on the original
    result = deploy(_conv_graph(), "x86", root / "int8-rejected", speedup=1.5, calibration=_calibration(),
                    rounds=ROUNDS, progress=False)
    assert len(asked) == 1 and not result.report["int8"]["int8"]
    assert result.report["int8"]["reason"].startswith("not kept on the original")
    original_ms = result.report["latency_table"]["original_ms"]["median_ms"]
    assert result.report["selection"]["goal_ms"] == pytest.approx(original_ms / 1.5)
