"""Which 8-bit integer (or bf16) multiply instructions a compiled library holds, read from its disassembly.

The proof that an int8 build computes in int8 on the machine, not only in the TIR: x86
VNNI (`vpdpbusd`: u8 x s8 dot products into s32) and its 16-bit forms, or AArch64
widening multiply-accumulates and dot products; and that a bf16 build multiplies in bf16
(`vdpbf16ps`, AMX's `tdpbf16ps`). objdump comes with binutils (the host's, or the aarch64
cross toolchain's); without it the census is None and says why.
"""
from __future__ import annotations

import collections
import re
import shutil
import subprocess

INT8_INSTRUCTIONS = {
    "x86": ("tdpbusd", "vpdpbusd", "vpdpbusds", "vpdpwssd", "vpdpwssds", "vpmaddubsw", "vpmaddwd", "pmaddubsw", "pmaddwd"),
    "aarch64": ("sdot", "udot", "usdot", "smlal", "smlal2", "umlal", "umlal2", "smull", "smull2", "umull", "umull2"),
}
BF16_INSTRUCTIONS = {"x86": ("vdpbf16ps", "tdpbf16ps")}


def census(library: str, mtriple: str | None, instructions: dict = INT8_INSTRUCTIONS) -> dict:
    """{"objdump": tool, "instructions": {mnemonic: count}} or {"unavailable": why}."""
    arch = "aarch64" if (mtriple or "").startswith("aarch64") else "x86" if "x86" in (mtriple or "x86") else None
    if arch is None or arch not in instructions:
        return {"unavailable": f"no instruction list for {mtriple}"}
    tool = next((t for t in (("aarch64-linux-gnu-objdump", "llvm-objdump") if arch == "aarch64" else ("objdump", "llvm-objdump"))
                 if shutil.which(t)), None)
    if tool is None:
        return {"unavailable": "objdump not found (install binutils to list the int8 instructions)"}
    try:
        text = subprocess.run([tool, "-d", library], capture_output=True, text=True, check=True, timeout=300).stdout
    except (subprocess.SubprocessError, OSError) as e:
        return {"unavailable": f"{tool} -d {library} failed: {e}"}
    names = "|".join(instructions[arch])
    counts = collections.Counter(re.findall(rf"\t({names})\b", text))
    return {"objdump": tool, "instructions": dict(counts.most_common())}
