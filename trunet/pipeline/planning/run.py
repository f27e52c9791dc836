"""``trunet plan``: the estimate of the config as given, the search, and the chosen values as YAML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from trunet.atomic import write_yaml
from trunet.config import Config
from trunet.errors import TrunetError
from trunet.pipeline.planning.memory import GB, estimate_memory
from trunet.pipeline.planning.search import PlanResult, check_budget, plan

__all__ = ["run_plan"]


def _table(result: PlanResult) -> str:
    lines = ["  time window | batch | patch (x, y, z)     | sample voxels | estimate GB | fits",
             "  ------------|-------|---------------------|---------------|-------------|-----"]
    for c in result.candidates:
        mark = "*" if c == result.chosen else ""
        lines.append(f"  {c.time_window:11d} | {c.batch_size:5d} | {str(list(c.patch_size)):19s} | "
                     f"{c.sample_voxels:13,d} | {c.total / GB:11.2f} | {'yes' if c.fits else 'no'}{mark}")
    return "\n".join(lines)


def run_plan(
    config: Config,
    vram_gb: float = 40.0,
    headroom: float = 0.1,
    out: Optional[str | os.PathLike] = None,
    overwrite: bool = False,
) -> PlanResult:
    """``trunet plan``: print the estimate of ``config`` as given, search, print the candidates, write the
    chosen values as a YAML fragment to ``out`` (atomically) when given; an existing ``out`` is replaced only
    with ``overwrite`` (refused before any work otherwise). Returns the :class:`PlanResult`."""
    budget = check_budget(vram_gb, headroom)
    if out is not None and Path(out).exists() and not overwrite:
        raise TrunetError(f"{out}: exists (an earlier plan?); pass --overwrite to replace it or choose another --out")
    try:
        given = estimate_memory(config)
    except TrunetError as exc:  # e.g. a patch the strides do not divide: still plan
        print(f"the config as given cannot be estimated: {exc}")
    else:
        print(f"estimated peak training memory of the config as given (GB = 1e9 bytes):\n{given.summary()}")
        verdict = "fits" if given.total <= budget else "does NOT fit"
        print(f"budget: {vram_gb:g} GB x (1 - {headroom:g}) = {budget / GB:.2f} GB -> "
              f"the config as given {verdict}")
    result = plan(config, vram_gb, headroom)
    print(f"\npatch cap: median shape {list(result.median_shape)} at spacing {list(result.spacing)} mm "
          f"({result.shape_source}); size divisor {list(result.ladder[0])}; time windows "
          f"{result.time_windows[0]}..{result.time_windows[-1]}")
    print("candidates: per time window the largest fitting patch and the next larger one; at the caps, the "
          "next larger batch (* = chosen)")
    print(_table(result))
    c = result.chosen
    print(f"\nchosen: patch {list(c.patch_size)}, time window {c.time_window}, batch {c.batch_size}\n"
          f"{result.estimate.summary()}")
    if out is not None:
        path = write_yaml(out, result.fragment())
        print(f"wrote {path}")
    return result
