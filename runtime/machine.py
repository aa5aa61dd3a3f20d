"""The host CPU, named well enough to tell machines apart: "AMD EPYC" alone hides Zen 4 vs Zen 5, whose
latencies differ by 2x here, so every figure carries the model name with its family / model numbers."""
from __future__ import annotations

import platform


def cpu_fields() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the end of the first processor's block
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_description(*details: str) -> str:
    """e.g. "AMD EPYC 9R14 96-Core Processor (family 25, model 17)", `details` added in the brackets."""
    fields = cpu_fields()
    name = fields.get("model name") or platform.processor() or platform.machine()
    numbers = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model")) if key in fields]
    inside = ", ".join([*numbers, *details])
    return f"{name} ({inside})" if inside else name
