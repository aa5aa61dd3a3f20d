"""The deploy recipe (TOML): every choice a deploy made, so `deploy --recipe r.toml` repeats it
without the latency table and the selection, and a reviewer reads what was chosen."""
from __future__ import annotations

import fnmatch
import json
import tomllib
from dataclasses import dataclass, field

from tensorfold.ir.errors import TensorfoldError

FORMAT = "tensorfold-deploy-recipe/1"
# Adam's rate for deploy's fine-tune. At finetune's own default (1e-3) deploy's 4x Tucker-2 resnet18-digits
# went 92.8 % -> 85.6 -> 91.9 -> 93.3 % held out in 3 epochs, and the FLOP-based model at the same FLOPs
# collapsed in its first; at 1e-4 they reached 96.8 % and 96.1 % in 2. A deploy fine-tunes a model its
# selection kept close to the original, which wants the smaller steps.
FINETUNE_LR = 1e-4
LEGACY_FINETUNE_LR = 1e-3  # what recipes written before finetune_lr existed were fine-tuned at


@dataclass
class LayerChoice:
    layer: str
    method: str                      # "original", "tucker2" or "svd"
    ranks: tuple[int, ...] = ()


@dataclass
class Recipe:
    layers: list[LayerChoice]
    int8: bool = False
    finetune_epochs: int = 0         # 0: no fine-tuning
    finetune_lr: float = FINETUNE_LR
    notes: dict = field(default_factory=dict)

    def steps(self) -> list[tuple[str, dict]]:
        """fold_bn, then one factorization step per replaced layer (include= its name, force=true)."""
        steps: list[tuple[str, dict]] = [("fold_bn", {})]
        for choice in self.layers:
            if choice.method == "original":
                continue
            rank = choice.ranks[0] if len(choice.ranks) == 1 else "(" + ",".join(map(str, choice.ranks)) + ")"
            steps.append((choice.method, {"rank": str(rank), "include": _literal(choice.layer), "force": True}))
        return steps

    def pipeline_text(self) -> str:
        parts = []
        for name, options in self.steps():
            inner = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items())
            parts.append(f"{name}({inner})" if inner else name)
        return ", ".join(parts)

    def to_toml(self) -> str:
        lines = [f"# tensorfold deploy recipe: `tensorfold deploy MODEL --recipe THIS_FILE` repeats these choices",
                 f'format = "{FORMAT}"', f"int8 = {str(self.int8).lower()}",
                 f"finetune_epochs = {self.finetune_epochs}", f"finetune_lr = {self.finetune_lr!r}",
                 f"pipeline = {json.dumps(self.pipeline_text())}", ""]
        if self.notes:
            lines += ["[notes]"] + [f"{json.dumps(str(k))} = {json.dumps(v)}" for k, v in self.notes.items()] + [""]
        for choice in self.layers:
            lines += ["[[layers]]", f"name = {json.dumps(choice.layer)}", f'method = "{choice.method}"',
                      f"ranks = [{', '.join(map(str, choice.ranks))}]", ""]
        return "\n".join(lines)

    @classmethod
    def from_toml(cls, text: str, where: str = "recipe") -> "Recipe":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise TensorfoldError(f"{where}: not a valid TOML file: {e}") from e
        if data.get("format") != FORMAT:
            raise TensorfoldError(f"{where}: format {data.get('format')!r}, expected {FORMAT!r}")
        layers = []
        for item in data.get("layers", []):
            method = item.get("method")
            if method not in ("original", "tucker2", "svd") or "name" not in item:
                raise TensorfoldError(f"{where}: layer entry {item!r} needs a name and a method "
                                      "(original, tucker2 or svd)")
            layers.append(LayerChoice(item["name"], method, tuple(int(r) for r in item.get("ranks", []))))
        lr = data.get("finetune_lr", LEGACY_FINETUNE_LR)
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise TensorfoldError(f"{where}: finetune_lr = {lr!r}; expected a positive number")
        return cls(layers, bool(data.get("int8", False)), int(data.get("finetune_epochs", 0)), float(lr),
                   dict(data.get("notes", {})))


def _literal(name: str) -> str:
    """A glob pattern matching exactly `name` (brackets escape the glob's special characters)."""
    escaped = "".join(f"[{c}]" if c in "*?[" else c for c in name)
    assert fnmatch.fnmatchcase(name, escaped)
    return escaped


def read(path: str) -> Recipe:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise TensorfoldError(f"--recipe {path}: {e.strerror or e}") from e
    return Recipe.from_toml(text, f"--recipe {path}")
