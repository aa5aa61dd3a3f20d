"""`tensorfold deploy` / `tf.deploy`: latency-aware compression for one target, measured end to end (docs/deploy.md)."""
from .run import DeployResult, deploy

__all__ = ["DeployResult", "deploy"]
