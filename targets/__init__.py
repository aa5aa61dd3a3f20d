"""Targets (TVM target dict, linker, where it runs), building with TVM, tuning, artifacts."""
from .artifact import Artifact, LoadedModel, load_artifact
from .build import build
from .registry import Placement, Target, get_target, list_targets
from .tuning.tune import default_database_dir

__all__ = ["Artifact", "LoadedModel", "Placement", "Target", "build", "default_database_dir", "get_target",
           "list_targets", "load_artifact"]
