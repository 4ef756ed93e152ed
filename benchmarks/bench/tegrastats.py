"""tegrastats on a Jetson: RAM in use, GPU load and power rails, sampled
while the systems run and attributed to the system whose run was in
progress. Elsewhere (no `tegrastats` on PATH) it does nothing.

Lines look like (JetPack 5/6; older releases write POM_5V_IN 2342/2342):
  RAM 2728/7620MB (lfb 1x4MB) SWAP 0/3810MB ... GR3D_FREQ 12% ... VDD_IN 4811mW/4811mW ...
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from typing import Any

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%")
_RAIL = re.compile(r"\b((?:VDD|POM)_[A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?")
_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")


def parse(line: str) -> dict[str, float]:
    """One tegrastats line -> {ram_used_mb, gpu_load_pct, power_mw, <rail>_mw}."""
    out: dict[str, float] = {}
    if m := _RAM.search(line):
        out["ram_used_mb"] = float(m.group(1))
    if m := _GR3D.search(line):
        out["gpu_load_pct"] = float(m.group(1))
    for rail, now, _avg in _RAIL.findall(line):
        out[f"{rail.lower()}_mw"] = float(now)
        if rail in _TOTAL_RAILS:
            out["power_mw"] = float(now)
    return out


class Tegrastats:
    """Samples tegrastats every `interval_ms` in the background."""

    def __init__(self, interval_ms: int = 100):
        self.available = shutil.which("tegrastats") is not None
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._proc = None

    def __enter__(self):
        if self.available:
            self._proc = subprocess.Popen(["tegrastats", "--interval", str(self.interval_ms)],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          text=True)
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            self.samples.append((time.perf_counter(), parse(line)))

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)

    def summary(self, windows: list[tuple[float, float]]) -> dict[str, Any] | None:
        """Mean power and GPU load, max RAM, over the samples inside `windows`."""
        picked = [s for t, s in self.samples if any(a <= t <= b for a, b in windows)]
        if not picked:
            return None
        out: dict[str, Any] = {"samples": len(picked)}
        keys = {k for s in picked for k in s}
        for k in sorted(keys):
            vals = [s[k] for s in picked if k in s]
            out[k] = max(vals) if k == "ram_used_mb" else sum(vals) / len(vals)
        return out
