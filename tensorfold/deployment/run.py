"""`tf.deploy`: a trained model -> a compressed, built and measured artifact for one target.

Stages (each cached in OUT/stages/, keyed by a fingerprint of its inputs): latency table,
selection, compressed model, fine-tuned model, int8 decision, artifact; then the measure of the
original against the result, end to end on the target, and the reports.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from tensorfold.ir import Graph
from tensorfold.ir.errors import TensorfoldError
from tensorfold.runtime.engines import default_threads

from . import candidates as cand
from . import latency as lat
from .recipe import FINETUNE_LR, LayerChoice, Recipe, read as read_recipe
from .select import Group, Option, select
from .stages import Stages, fingerprint, graph_fingerprint


@dataclass
class DeployResult:
    out: str
    report: dict[str, Any]
    graph: Graph

    @property
    def met(self) -> bool:
        return bool(self.report["verdict"]["met"])


def deploy(model: Any, target: str = "x86", out: str = "deploy", speedup: float | None = None,
           latency_ms: float | None = None, max_drop: float = 1.0, data: Any = None, calibration: Any = None,
           train_data: Any = None, engine: str | None = None, tune_trials: int = 0, recipe: str | None = None,
           finetune_epochs: int = 1, finetune_lr: float = FINETUNE_LR, threads: int | None = None,
           rates=cand.RATES, rpc_tracker: str | None = None, rpc_key: str | None = None, input_shape=None,
           weights: str | None = None, rounds: int = 20, progress: bool = True) -> DeployResult:
    """Compress `model` for `target` to reach `speedup` (x, default 2) or `latency_ms`, measured on the target.

    model: what `tensorfold compress` takes (a task name, .onnx, torchvision:<arch>, pkg.mod:fn) or a Graph.
    The choice of layers and ranks minimises the summed layer error under a latency budget predicted from
    per-layer latencies measured on `engine` (default onnxruntime on x86, TVM over RPC for remote targets);
    see docs/deploy.md. Writes OUT/model.onnx, OUT/artifact/, OUT/report.json, OUT/report.md,
    OUT/recipe.toml and OUT/stages/. `recipe`: a recipe.toml that fixes every choice (no latency table,
    no selection). With `train_data`, the result is fine-tuned for `finetune_epochs` at Adam `finetune_lr`,
    distilled from the original, keeping its best held-out weights. Raises TensorfoldError before writing
    anything when an input is bad.
    """
    plan = _validate(model, target, out, speedup, latency_ms, max_drop, data, calibration, train_data, engine,
                     recipe, finetune_epochs, finetune_lr, threads, rpc_tracker, rpc_key, input_shape, weights,
                     tune_trials)
    run = _Deploy(plan, rates, rounds, progress, _Say(progress))
    if plan["target"].placement.kind != "local" and plan["recipe"] is None:
        run.engine  # an unreachable tracker or server fails here, before OUT is written
    os.makedirs(plan["out"], exist_ok=True)
    try:
        return run.run()
    finally:
        if run._engine is not None:
            run._engine.release()  # the device is free for the next client as soon as the deploy returns


# ---- validation: everything that can fail on bad input fails here, before OUT is touched ----------

def _validate(model, target, out, speedup, latency_ms, max_drop, data, calibration, train_data, engine, recipe,
              finetune_epochs, finetune_lr, threads, rpc_tracker, rpc_key, input_shape, weights, tune_trials) -> dict:
    from tensorfold.targets import get_target
    from tensorfold.targets.rpc import placed

    if speedup is not None and latency_ms is not None:
        raise TensorfoldError("deploy: give --speedup or --latency, not both")
    if speedup is not None and not speedup > 1:
        raise TensorfoldError(f"deploy: --speedup {speedup:g} must be greater than 1 (1.5 asks for 1.5x faster)")
    if latency_ms is not None and not latency_ms > 0:
        raise TensorfoldError(f"deploy: --latency {latency_ms:g} ms must be positive")
    if speedup is None and latency_ms is None:
        speedup = 2.0
    if not max_drop >= 0:
        raise TensorfoldError(f"deploy: --max-drop {max_drop:g} must be >= 0 (accuracy points)")
    if tune_trials < 0 or finetune_epochs < 0:
        raise TensorfoldError("deploy: --tune-trials and --finetune-epochs must be >= 0")
    if not finetune_lr > 0:
        raise TensorfoldError(f"deploy: --finetune-lr {finetune_lr:g} must be positive")
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise TensorfoldError(f"deploy: -o {out} is a file; give a folder")
    resolved_target = placed(get_target(target), rpc_tracker, rpc_key)
    engine = lat.check_engine(engine, resolved_target)
    fixed = read_recipe(recipe) if recipe else None
    from tensorfold.models import parse_shape, resolve, task_name

    task = task_name(model)
    if isinstance(model, Graph):
        graph = model
    else:
        graph = resolve(os.fspath(model), parse_shape(input_shape) if isinstance(input_shape, str) else input_shape,
                        weights)
    shape = tuple(graph.inputs[0].shape)
    eval_data = data if data is not None else task
    images = labels = None
    data_name = "random inputs (fidelity only)"
    if eval_data is not None:
        from tensorfold.runtime.datasets import load_data

        images, labels, data_name = load_data(eval_data, shape)
    feeds, calibration_name = None, None
    calibration = calibration if calibration is not None else task
    if calibration is not None:
        from tensorfold.runtime.calibration import calibration_feeds

        feeds = calibration_feeds(calibration, graph)
        calibration_name = calibration if isinstance(calibration, str) else "given data"
    training = None
    if train_data is not None and (fixed is None or fixed.finetune_epochs):
        import tensorfold as tf

        training = tf._labelled(train_data, graph)
    if fixed is not None and fixed.int8 and feeds is None:
        raise TensorfoldError(f"deploy: the recipe {recipe} asks for int8, which needs --calibration data")
    if fixed is not None and fixed.finetune_epochs and training is None:
        raise TensorfoldError(f"deploy: the recipe {recipe} fine-tunes, which needs --train-data")
    if fixed is not None:
        known = {l.name for l in graph.layers()}
        unknown = [c.layer for c in fixed.layers if c.layer not in known]
        if unknown:
            raise TensorfoldError(f"deploy: the recipe names layers this model has not: {', '.join(unknown)}")
    return {"graph": graph, "model": model if isinstance(model, str) else graph.source, "task": task,
            "target": resolved_target, "engine": engine, "out": out, "speedup": speedup, "latency_ms": latency_ms,
            "max_drop": max_drop, "images": images, "labels": labels, "data_name": data_name,
            "eval_data": (images, labels) if labels is not None else None, "feeds": feeds,
            "calibration_name": calibration_name, "training": training, "train_name": _train_name(train_data),
            "recipe": fixed, "recipe_path": recipe, "finetune_epochs": finetune_epochs if training else 0,
            "finetune_lr": finetune_lr,
            "threads": threads or default_threads(), "tune_trials": tune_trials}


def _train_name(train_data) -> str | None:
    return None if train_data is None else (train_data if isinstance(train_data, str) else "given data")


class _Say:
    def __init__(self, enabled: bool):
        import time

        # stage lines go with the progress bars: quiet when stderr is not a terminal, or with -q
        self.enabled = enabled and sys.stderr.isatty()
        self.clock, self.start = time.perf_counter, time.perf_counter()

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(f"deploy [{self.clock() - self.start:6.1f} s]: {text}", file=sys.stderr, flush=True)


# ---- the stages ---------------------------------------------------------------------------------

class _Deploy:
    def __init__(self, plan: dict, rates, rounds: int, progress: bool, say: _Say):
        self.plan, self.rates, self.rounds, self.progress, self.say = plan, tuple(rates), rounds, progress, say
        self.stages = Stages(plan["out"])
        self.target, self.engine_name = plan["target"], plan["engine"]
        self.threads = plan["threads"] if self.target.placement.kind == "local" else None
        os.environ.setdefault("TVM_NUM_THREADS", str(plan["threads"]))
        self.work = tempfile.mkdtemp(prefix="tensorfold-deploy-")
        self._engine = None
        self._cache = None
        self.first = None  # int8 on the original (int8_first), when a selection runs
        self.int8_gain = 1.0  # what int8 is counted on to divide the latency by (factor_goal_ms)
        self.finetune = None  # the fine-tune's summary (held-out before / after, the weights kept), when it ran

    @property
    def cache(self) -> lat.LatencyCache:
        """The latency cache of this (target, engine, threads): layer timings and whole-model timings."""
        if self._cache is None:
            self._cache = lat.LatencyCache(self.target, self.engine_name, self.threads, emulated=self.engine.emulated)
        return self._cache

    @property
    def engine(self) -> lat.LatencyEngine:
        if self._engine is None:
            self._engine = lat.open_engine(self.engine_name, self.target, self.plan["threads"], self.work)
        return self._engine

    def run(self) -> DeployResult:
        import tensorfold as tf

        plan = self.plan
        original = plan["graph"]
        folded, _ = tf.compress(original, "fold_bn")
        self.calibration_key = _feeds_fingerprint(plan["feeds"])
        table = selection = None
        if plan["recipe"] is None:
            table = self.latency_table(folded)
            self.first = self.int8_first(folded)
            self.int8_gain = self.first["gain"]
            for attempt in range(2):
                selection = self.selection(table)
                recipe = self.recipe_of(table, selection)
                compressed, compress_report, key = self.compressed(original, recipe)
                if not table["emulated"] and any(c != "original" for c in selection["choices"].values()):
                    selection, recipe, compressed, compress_report, key = self.corrected(
                        original, folded, table, selection, recipe, compressed, compress_report, key)
                tuned, key = self.finetuned(compressed, folded, key, recipe)
                unchanged = all(c == "original" for c in selection["choices"].values()) and tuned is compressed
                final, int8, key = self.int8(tuned, key, recipe, unchanged=unchanged)
                realized = _int8_gain(int8)
                if attempt or self.int8_gain <= 1.0 or realized >= INT8_GAIN_KEPT * self.int8_gain:
                    break
                # the factors were asked for less because int8 was to give the rest; it gave less on the
                # factorized model (or was not kept there): ask them again for what int8 did give
                self.say(f"int8 gave {realized:.2f}x on the factorized model, not the original's "
                         f"{self.int8_gain:.2f}x: selecting again")
                self.first["shortfall"] = {"expected_gain": self.int8_gain, "realized_gain": realized}
                self.int8_gain = realized
        else:
            recipe = plan["recipe"]
            self.say(f"recipe {plan['recipe_path']}: no latency table, no selection")
            compressed, compress_report, key = self.compressed(original, recipe)
            tuned, key = self.finetuned(compressed, folded, key, recipe)
            final, int8, key = self.int8(tuned, key, recipe)
        recipe.int8 = bool(int8["int8"])
        recipe.notes = {"target": self.target.name, "engine": self.engine_name, "model": str(plan["model"])}
        final.save(os.path.join(plan["out"], "model.onnx"))
        artifact = self.artifact(final, key)
        measured = self.measure(original, final, artifact)
        if not self.engine.emulated:  # the speed-up checked as the decisions were: a precise paired ratio
            self.say("timing original and deployed interleaved until their ratio is precise (the verdict)")
            # as many rounds as tf.measure's, up to four times that while the ratio is not precise
            measured["paired"] = lat.end_to_end({"original": folded, "deployed": final}, self.engine,
                                                rounds=self.rounds, ratio=("original", "deployed"),
                                                max_rounds=VERDICT_BLOCKS * self.rounds)["ratio"]
        if table is not None:  # the steady state as well: back to back, like the layers of the table
            self.say("timing original and deployed back to back (steady state)")
            measured["warm"] = lat.end_to_end({"original": folded, "deployed": final}, self.engine, warm=True)
        from .report import assemble, write

        report = assemble(plan, self, table, selection, recipe, compress_report, int8, artifact, measured)
        write(plan["out"], report, recipe)
        self.say(f"{'MET' if report['verdict']['met'] else 'NOT MET'}: {report['verdict']['summary']}")
        self.say(f"wrote {plan['out']}/report.md, report.json, recipe.toml, model.onnx, artifact/")
        return DeployResult(plan["out"], report, final)

    # -- latency table
    def latency_table(self, folded: Graph) -> dict:
        plan = self.plan
        model_key = graph_fingerprint(folded)
        key = fingerprint("latency-table/3", model_key, self.target.name, self.engine_name, self.threads,
                          self.rates, self.calibration_key, cand.ERROR_SAMPLES, lat.ROUNDS, lat.SAMPLE_MS)
        self.table_key = key
        stored = self.stages.load("latency_table", key)
        if stored is not None:
            self.say("latency table: reused from stages/ (nothing measured)")
            stored["cache"] = {**stored["cache"], "hits": 0, "misses": 0, "stage_reused": True}
            return stored
        self.say(f"latency table: candidates per layer at ratio rates {', '.join(map(str, self.rates))}")
        groups = cand.layer_groups(folded, self.rates)
        error_measure = cand.add_errors(folded, groups, plan["feeds"])
        cache = self.cache
        e2e_key = f"model {model_key} {list(folded.inputs[0].shape)} | end-to-end, single calls after a pause, least loaded of 3 blocks"
        whole = cache.get(e2e_key)
        blocks = []  # the original end to end in blocks before, amid and after the layers: the least loaded kept

        def block() -> None:
            if whole is None:
                blocks.append(lat.end_to_end({"original": folded}, self.engine, rounds=lat.BLOCK_ROUNDS)["original"])
        block()
        half = len(groups) // 2
        lat.measure_groups(groups[:half], self.engine, cache, self.progress)
        block()
        lat.measure_groups(groups[half:], self.engine, cache, self.progress)
        block()
        if whole is None:
            whole = dict(min(blocks, key=lambda b: b["median_ms"]),
                         blocks_median_ms=[b["median_ms"] for b in blocks])
            cache.put({e2e_key: whole})
        layer_sum = sum(g.original.latency_ms for g in groups)
        table = {"layers": [_group_json(g) for g in groups], "error_measure": error_measure,
                 "original_ms": whole, "layers_ms": layer_sum, "overhead_ms": whole["median_ms"] - layer_sum,
                 "engine": self.engine_name, "emulated": self.engine.emulated, "threads": self.threads,
                 "rounds": lat.ROUNDS, "sample_ms": lat.SAMPLE_MS, "rates": list(self.rates),
                 "cache": {"path": cache.path, "hits": cache.hits, "misses": cache.misses, "stage_reused": False}}
        self.stages.save("latency_table", key, table)
        self.say(f"latency table: {len(groups)} layers, {sum(len(g.candidates) for g in groups)} candidates; "
                 f"cache {cache.hits} hits, {cache.misses} measured")
        return table

    # -- int8 on the original, decided before the factors
    def int8_first(self, folded: Graph) -> dict:
        """int8 on the original: its end-to-end gain and accuracy drop on this engine. When it is kept, the
        factors are asked only for the speed-up int8 does not give (a goal `gain` times looser), so the
        accuracy they cost is not spent on speed that int8 gives cheaper."""
        import tensorfold as tf

        plan = self.plan
        key = fingerprint("int8-first/2", graph_fingerprint(folded), self.calibration_key, plan["max_drop"],
                          self.engine_name, self.threads)
        stored = self.stages.load("int8_first", key)
        if stored is not None:
            self.say("int8 on the original: reused from stages/")
            return stored
        if plan["feeds"] is None:
            decision = {"int8": False, "reason": "no calibration data (--calibration)"}
        elif self.target.device != "cpu":
            decision = {"int8": False, "reason": f"int8 is not built for {self.target.name} here"}
        else:
            self.say("int8 on the original: quantizing on the calibration data")
            quantized, _ = tf.compress(folded, "int8", calibration=plan["feeds"])
            decision = self._int8_pays(folded, quantized)
        decision["gain"] = _int8_gain(decision)
        # the quantized original is kept: when no layer is factorized, the int8 stage reuses it and this decision
        files = [self.stages.save_graph("int8_first", quantized)] if decision["int8"] else []
        self.stages.save("int8_first", key, decision, files)
        if decision["int8"]:
            self.say(f"int8 on the original: {decision['gain']:.2f}x; the factors are asked for the rest")
        return decision

    # -- selection
    def goal_ms(self, table: dict) -> float:
        """The deployed model's latency goal (int8 included)."""
        plan = self.plan
        return plan["latency_ms"] if plan["latency_ms"] is not None else table["original_ms"]["median_ms"] / plan["speedup"]

    def factor_goal_ms(self, table: dict) -> float:
        """The goal for the fp32 factorized model: int8, when kept, divides its latency by `int8_gain`."""
        return self.goal_ms(table) * self.int8_gain

    def selection(self, table: dict, correction: float = 1.0) -> dict:
        """The least-error choices whose predicted latency is within the goal, the goal divided by
        `correction` (> 1 when the compressed model measured slower than predicted: see `corrected`)."""
        original_ms = table["original_ms"]["median_ms"]
        goal_ms = self.factor_goal_ms(table) / correction
        key = fingerprint("selection/2", self.table_key, goal_ms)
        stored = self.stages.load("selection", key)
        if stored is not None:
            self.say("selection: reused from stages/")
            return stored
        groups = [Group(l["layer"], Option("original", l["candidates"][0]["latency_ms"], 0.0),
                        [Option(c["key"], c["latency_ms"], c["error"]) for c in l["candidates"][1:]])
                  for l in table["layers"]]
        model = LatencyModel(original_ms, table["layers_ms"])
        chosen = select(groups, model.layer_budget(goal_ms))
        predicted = model.predict(chosen.latency_ms)
        result = {"goal_ms": goal_ms, "correction": correction, "latency_model": model.describe(), "layer_budget_ms": chosen.budget_ms, "resolution_ms": chosen.resolution_ms,
                  "met": chosen.met, "predicted_ms": predicted, "predicted_speedup": original_ms / predicted
                  if predicted > 0 else None, "total_error": chosen.error,
                  "choices": {layer: o.key for layer, o in chosen.choices.items()}, "refused": chosen.refused}
        self.stages.save("selection", key, result)
        self.say(f"selection: predicted {predicted:.3f} ms against a goal of {goal_ms:.3f} ms"
                 + ("" if chosen.met else " (NOT reachable: the fastest choices are taken)"))
        return result

    def recipe_of(self, table: dict, selection: dict) -> Recipe:
        return Recipe([LayerChoice(l["layer"], *_parse_key(selection["choices"][l["layer"]]))
                       for l in table["layers"]], finetune_epochs=self.plan["finetune_epochs"],
                      finetune_lr=self.plan["finetune_lr"])

    def corrected(self, original: Graph, folded: Graph, table: dict, selection: dict, recipe: Recipe,
                  compressed: Graph, compress_report: dict, key: str):
        """Close the loop on the whole model: time the compressed fp32 model against the original (one
        interleaved run, as tf.measure times them), and select again with the goal scaled by the
        prediction's error (measured ratio / predicted ratio, within 1/MAX_STEP..MAX_STEP per check),
        at most MAX_CORRECTIONS times: tighter
        when the model missed the goal that the prediction met, looser when it beat the goal by more
        than RELAX (speed nobody asked for, paid in accuracy). The attempt delivered is the one with the
        least summed layer error among those that met the goal as measured, else the fastest measured.
        The layers timed alone do not add up exactly to the model (fused activations, caches, a call's
        overhead, a neighbour's load while the table was timed); this is where that error is paid for."""
        goal_ratio = self.factor_goal_ms(table) / table["original_ms"]["median_ms"]
        attempts, correction = [], 1.0
        for attempt in range(MAX_CORRECTIONS + 1):
            check = self.check(folded, compressed, key, attempt)
            predicted_ratio = selection["predicted_ms"] / table["original_ms"]["median_ms"]
            check.update(predicted_ratio=predicted_ratio, goal_ratio=goal_ratio, correction=correction,
                         total_error=selection["total_error"])
            attempts.append((selection, recipe, compressed, compress_report, key, check))
            measured = check["measured_ratio"]
            self.say(f"check: compressed fp32 model at {measured:.3f} of the original's time, "
                     f"predicted {predicted_ratio:.3f}, goal {goal_ratio:.3f}")
            if attempt == MAX_CORRECTIONS or (measured > goal_ratio and not selection["met"]) or \
                    RELAX * goal_ratio <= measured <= goal_ratio:
                break  # nothing faster to ask for, or met without much speed to spare
            # a trust region: one whole-model timing moves the goal by at most MAX_STEP either way (a
            # single disturbed timing, 1.34 measured for 0.43 predicted, once tripled it)
            correction *= min(max(measured / predicted_ratio, 1 / MAX_STEP), MAX_STEP)
            again = self.selection(table, correction)
            if any(again["choices"] == tried[0]["choices"] for tried in attempts):
                break  # the latency model offers nothing new
            selection = again
            recipe = self.recipe_of(table, selection)
            compressed, compress_report, key = self.compressed(original, recipe)
        met = [a for a in attempts if a[5]["measured_ratio"] <= goal_ratio]
        chosen = min(met, key=lambda a: a[0]["total_error"]) if met else min(attempts, key=lambda a: a[5]["measured_ratio"])
        for tried in attempts:
            tried[5]["delivered"] = tried is chosen
        selection, recipe, compressed, compress_report, key, _ = chosen
        if chosen is not attempts[-1]:  # stages/compressed.onnx holds the delivered model, not the last one tried
            self.stages.save("compressed", key, compress_report, [self.stages.save_graph("compressed", compressed)])
        return {**selection, "checks": [a[5] for a in attempts]}, recipe, compressed, compress_report, key

    def check(self, folded: Graph, compressed: Graph, key: str, attempt: int) -> dict:
        key = fingerprint("check/2", key, self.engine_name, self.threads)
        name = f"check-{attempt}"
        stored = self.stages.load(name, key)
        if stored is not None:
            return stored
        timed, cached = lat.cached_end_to_end(
            {"original": folded, "compressed": compressed}, self.engine, self.cache,
            f"check | original {graph_fingerprint(folded)} | compressed {graph_fingerprint(compressed)}",
            ratio=("original", "compressed"))
        ratio = timed["ratio"]
        result = {"cached": cached, "original_ms": timed["original"]["median_ms"],
                  "compressed_ms": timed["compressed"]["median_ms"], "measured_ratio": ratio["median"],
                  "ratio_interval": [ratio["low"], ratio["high"]], "rounds": ratio["rounds"]}
        self.stages.save(name, key, result)
        return result

    # -- compress, fine-tune, int8
    def compressed(self, original: Graph, recipe: Recipe):
        import tensorfold as tf

        key = fingerprint("compressed/1", graph_fingerprint(original), recipe.steps())
        stored = self.stages.load("compressed", key)
        if stored is not None:
            self.say("compress: reused from stages/")
            return self.stages.load_graph("compressed"), stored, key
        self.say(f"compress: {recipe.pipeline_text()}")
        # no calibration here: the candidates' errors were measured on it already, and the pipeline's own
        # error report on calibration data costs minutes on a large model (its errors on random inputs stay)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):  # the decompositions again: see candidates.layer_groups
            graph, report = tf.compress(original, recipe.steps(), progress=self.progress)
        files = [self.stages.save_graph("compressed", graph)]
        summary = json.loads(json.dumps(report.to_dict(), default=str))
        self.stages.save("compressed", key, summary, files)
        return self.stages.load_graph("compressed"), summary, key

    def finetuned(self, graph: Graph, teacher: Graph, key: str, recipe: Recipe):
        plan = self.plan
        if not plan["training"] or not recipe.finetune_epochs:
            return graph, key
        if all(choice.method == "original" for choice in recipe.layers):
            # the model is the original (int8 alone, say, reached the goal): distilling it from itself
            # would cost the epochs and change nothing worth having
            self.say("fine-tune: skipped, no layer was replaced")
            recipe.finetune_epochs = 0
            return graph, key
        import tensorfold as tf

        # "/2": fine-tunes keep their best held-out weights since fe567f8; older stages do not
        key = fingerprint("finetuned/2", key, plan["train_name"], recipe.finetune_epochs, recipe.finetune_lr)
        stored = self.stages.load("finetuned", key)
        if stored is not None:
            self.say("fine-tune: reused from stages/")
            self.finetune = stored.get("summary")
            return self.stages.load_graph("finetuned"), key
        self.say(f"fine-tune: {recipe.finetune_epochs} epoch(s) at lr {recipe.finetune_lr:g} on "
                 f"{plan['training'].what}, distilled from the original")
        trained, report = tf.finetune(graph, _pair(plan["training"]),
                                      epochs=recipe.finetune_epochs, lr=recipe.finetune_lr, teacher=teacher,
                                      progress=self.progress)
        files = [self.stages.save_graph("finetuned", trained)]
        self.finetune = json.loads(json.dumps(report.summary, default=str))
        self.stages.save("finetuned", key, {"summary": self.finetune}, files)
        return self.stages.load_graph("finetuned"), key

    def int8(self, graph: Graph, key: str, recipe: Recipe, unchanged: bool = False):
        """unchanged: `graph` computes what the original int8_first decided on (no layer replaced or
        fine-tuned), so that decision and its quantized graph are reused instead of timed again."""
        import tensorfold as tf

        plan = self.plan
        fixed = plan["recipe"]
        key = fingerprint("int8/2", key, self.calibration_key, plan["max_drop"], self.engine_name,
                          None if fixed is None else fixed.int8, None if self.first is None else self.first["int8"])
        stored = self.stages.load("int8", key)
        if stored is not None:
            self.say("int8 decision: reused from stages/")
            return (self.stages.load_graph("int8") if stored["int8"] else graph), stored, key
        quantized = None
        if plan["feeds"] is None:
            decision = {"int8": False, "reason": "no calibration data (--calibration)"}
        elif fixed is not None:
            decision = {"int8": fixed.int8, "reason": "fixed by the recipe"}
        elif self.target.device != "cpu":
            decision = {"int8": False, "reason": f"int8 is not built for {self.target.name} here"}
        elif self.first is not None and not self.first["int8"]:
            decision = {"int8": False, "reason": f"not kept on the original: {self.first['reason']}"}
        elif unchanged and self.first is not None and os.path.isfile(self.stages.path("int8_first", ".onnx")):
            # nothing was factorized or fine-tuned: the decision on the original is this graph's
            self.say("int8: no layer changed since the decision on the original; reusing it")
            decision = {k: v for k, v in self.first.items() if k not in ("gain", "shortfall")}
            decision["reason"] += " (decided on the original: no layer was changed)"
            quantized = self.stages.load_graph("int8_first")
        else:
            decision = None
        if quantized is None and (decision is None or decision["int8"]):
            self.say("int8: quantizing on the calibration data")
            quantized, _ = tf.compress(graph, "int8", calibration=plan["feeds"])
        if decision is None:
            decision = self._int8_pays(graph, quantized)
        files = [self.stages.save_graph("int8", quantized)] if decision["int8"] else []
        self.stages.save("int8", key, decision, files)
        return (self.stages.load_graph("int8") if decision["int8"] else graph), decision, key

    def _int8_pays(self, fp32: Graph, int8: Graph) -> dict:
        from tensorfold.runtime import accuracy as acc

        # int8 is a function of the fp32 graph and the calibration data: both name the pair in the cache
        timings, cached = lat.cached_end_to_end(
            {"fp32": fp32, "int8": int8}, self.engine, self.cache,
            f"int8 vs fp32 | model {graph_fingerprint(fp32)} | calibration {self.calibration_key}",
            ratio=("fp32", "int8"))
        fp32_ms, int8_ms, ratio = timings["fp32"]["median_ms"], timings["int8"]["median_ms"], timings["ratio"]
        decision = {"fp32_ms": fp32_ms, "int8_ms": int8_ms, "int8_ratio": ratio["median"],
                    "ratio_interval": [ratio["low"], ratio["high"]], "rounds": ratio["rounds"],
                    "engine": self.engine_name, "emulated": self.engine.emulated, "timing_cached": cached}
        images, labels = self.plan["images"], self.plan["labels"]
        if images is None:
            images = np.random.default_rng(0).standard_normal((64, *fp32.inputs[0].shape[1:])).astype(np.float32)
        outputs = {}
        for name, graph in (("fp32", fp32), ("int8", int8)):
            runner = self.engine.prepare(graph, f"int8 decision {name} {id(graph)}")
            try:
                outputs[name] = acc.outputs_on(runner, images)
            finally:
                runner.close()
        if labels is not None:
            before = acc.classification(outputs["fp32"], labels)["top1"]
            after = acc.classification(outputs["int8"], labels)["top1"]
            drop, what = 100 * (before - after), f"top-1 {100 * before:.2f} % -> {100 * after:.2f} %"
        else:
            agreement = acc.fidelity(outputs["int8"], outputs["fp32"])["top1_agreement"]
            drop, what = 100 * (1 - agreement), f"top-1 agreement with fp32 {100 * agreement:.2f} % (no labels)"
        faster, within = ratio["median"] < 1.0, drop <= self.plan["max_drop"]
        decision.update(int8=bool(faster and within), drop_points=drop, accuracy=what,
                        reason=("int8 is faster and within --max-drop" if faster and within else
                                "; ".join(r for r in (None if faster else f"int8 {int8_ms:.3f} ms is not faster than "
                                                      f"fp32 {fp32_ms:.3f} ms",
                                                      None if within else f"drop {drop:.2f} points exceeds --max-drop "
                                                      f"{self.plan['max_drop']:g}") if r)))
        self.say(f"int8: {'kept' if decision['int8'] else 'not kept'} ({decision['reason']}; fp32 against int8 end "
                 f"to end on {self.engine_name}{', timings from the latency cache' if cached else ''})")
        return decision

    # -- artifact and measure
    def artifact(self, graph: Graph, key: str) -> dict:
        from tensorfold.build import build

        plan = self.plan
        folder = os.path.join(plan["out"], "artifact")
        key = fingerprint("artifact/1", key, self.target.name, plan["tune_trials"])
        stored = self.stages.load("artifact", key)
        if stored is not None and os.path.isfile(os.path.join(folder, "manifest.json")):
            self.say("artifact: reused")
            return stored
        self.say(f"build: TVM for {self.target.name}, {plan['tune_trials']} tuning trials")
        built = build(graph, self.target, folder, tune_trials=plan["tune_trials"], progress=self.progress)
        tuning = built.manifest["tuning"]
        result = {"path": built.path, "tasks": len(tuning["tasks"]), "untuned": len(tuning["untuned"]),
                  "trials": tuning["trials_spent"], "build_seconds": built.manifest.get("build_seconds")}
        self.stages.save("artifact", key, result)
        return result

    def measure(self, original: Graph, final: Graph, artifact: dict) -> dict:
        from tensorfold.measure import Candidate, measure

        plan = self.plan
        engines = [self.engine_name]
        if self._engine is not None:
            self._engine.release()  # one session per device: the measure asks the tracker for its own
        self.say(f"measure: original vs deployed on {self.target.name} ({', '.join(engines)}), {self.rounds} rounds")
        deployed = Candidate("deployed", final, {self.target.name: artifact["path"]})
        report = measure([("original", original), deployed], self.target, data=plan["eval_data"], rounds=self.rounds,
                         threads=plan["threads"], report=os.path.join(plan["out"], "measure", "measure.json"),
                         progress=self.progress, engines=engines,
                         rpc_timeout=lat.RECONNECT_TIMEOUT if self._engine is not None else 5.0)
        return report.to_json()


INT8_GAIN_KEPT = 0.95  # int8 on the factorized model giving less than this share of its gain on the original: select again
MAX_CORRECTIONS = 2  # re-selections after timing the compressed model against the original
VERDICT_BLOCKS = 4  # the verdict's paired timing: at most this many times tf.measure's rounds
MAX_STEP = 1.5  # the most one whole-model check scales the goal by (either way)
RELAX = 0.9  # a model measured faster than this fraction of the goal gives speed back for accuracy


def _int8_gain(decision: dict) -> float:
    """fp32 time / int8 time (the paired ratio's inverse) of an int8 decision that kept int8 on its own
    timing; 1 otherwise (not kept, or kept by a recipe without timing)."""
    if not decision["int8"] or "int8_ms" not in decision:
        return 1.0
    return 1.0 / decision["int8_ratio"] if "int8_ratio" in decision else decision["fp32_ms"] / decision["int8_ms"]


def _pair(labelled) -> tuple[np.ndarray, np.ndarray]:
    return labelled.x, labelled.y


def _feeds_fingerprint(feeds) -> str | None:
    if not feeds:
        return None
    import hashlib

    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(feed[name]).tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class LatencyModel:
    """The model's latency from its candidate layers' latencies, each timed alone.

    When the layers timed alone sum to less than the whole model, the rest (pooling, additions, the
    cost of one call after idle) is a constant: predicted = rest + the chosen layers. When they sum to
    more (a layer alone pays a call's overhead and runs unfused; a cache filled in a loaded hour
    inflates every entry), a constant would be negative and every millisecond saved alone would count
    in full; the layers are then taken as the whole model's time in proportion: predicted = whole x
    chosen / originals. Both are `whole x (chosen + rest) / (originals + rest)` with rest >= 0.
    """
    whole_ms: float
    layers_ms: float

    @property
    def rest_ms(self) -> float:
        return max(self.whole_ms - self.layers_ms, 0.0)

    @property
    def scale(self) -> float:
        return self.whole_ms / (self.layers_ms + self.rest_ms) if self.layers_ms + self.rest_ms > 0 else 1.0

    def predict(self, chosen_ms: float) -> float:
        return self.scale * (chosen_ms + self.rest_ms)

    def layer_budget(self, goal_ms: float) -> float:
        """The largest sum of chosen layer latencies whose prediction stays within `goal_ms`."""
        return goal_ms / self.scale - self.rest_ms

    def describe(self) -> str:
        if self.scale >= 1.0 - 1e-12:
            return f"rest of the model {self.rest_ms:.3f} ms + the chosen layers"
        return (f"the layers alone sum to {self.layers_ms:.3f} ms, more than the whole model's {self.whole_ms:.3f} ms: "
                f"predicted = {self.scale:.3f} x the chosen layers")


def _group_json(group: cand.LayerCandidates) -> dict:
    return {"layer": group.layer, "kind": group.kind, "in_shape": list(group.in_shape),
            "candidates": [{"key": c.key, "method": c.method, "ranks": list(c.ranks), "latency_ms": c.latency_ms,
                            "iqr_ms": c.iqr_ms, "error": c.error, "flops": int(c.flops), "params": int(c.params),
                            "cached": c.cached, "emulated": c.emulated, "noisy": c.noisy} for c in group.candidates]}


def _parse_key(key: str) -> tuple[str, tuple[int, ...]]:
    if key == "original":
        return "original", ()
    method, _, ranks = key.partition("(")
    return method, tuple(int(r) for r in ranks.rstrip(")").split(",") if r)
