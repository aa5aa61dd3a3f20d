"""Rewrite passes: each `(graph, options, context) -> (graph, PassReport)`, registered by name."""
from __future__ import annotations

import importlib

from .pipeline import normalize, parse, run
from .registry import PASSES, Option, PassContext, register
from .report import LayerRecord, PassReport, Report

# every module that registers passes; imported on first use so `passes` stays cheap to import
PASS_MODULES = ["fold_bn", "substitute.factorize", "substitute.alds", "quantize.int8", "quantize.kmeans", "quantize.huffman",
                 "substitute.lowrank_sparse", "ron", "training.finetune", "training.musco", "training.admm_lowrank", "training.asnet"]


def load_all() -> dict:
    for module in PASS_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return PASSES


__all__ = ["PASSES", "LayerRecord", "Option", "PassContext", "PassReport", "Report", "load_all", "normalize",
           "parse", "register", "run"]
