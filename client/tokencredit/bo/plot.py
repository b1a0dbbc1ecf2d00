"""A PNG of a study: the objective by trial with the best so far, and the weights of the best trial."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from tokencredit.bo.study import COMPLETE, FAILED, Study, Trial, atomic_write

__all__ = ["save_plot"]


def save_plot(study: Study, path: Union[str, Path], best: Optional[Trial] = None) -> Path:
    """Write the plot to `path` atomically (a killed run never leaves a truncated PNG); returns the path.

    `best` is the trial whose weights are drawn (default: the best observed value).
    """
    # The object API renders with Agg without pyplot: no display, no global backend switch, no shared state.
    from matplotlib.figure import Figure

    trials = list(study.trials)
    best = best if best is not None else study.best_observed()
    fig = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    ax, bx = fig.subplots(1, 2, width_ratios=[3, 2])

    done = [t for t in trials if t.status == COMPLETE]
    for source, marker in (("sobol", "s"), ("bo", "o")):
        pts = [t for t in done if t.source == source]
        if pts:
            ax.errorbar([t.id for t in pts], [t.value for t in pts], yerr=[t.noise or 0.0 for t in pts],
                        fmt=marker, ms=5, capsize=2, label=f"{source} trials")
    failed = [t.id for t in trials if t.status == FAILED]
    if failed and done:
        ax.plot(failed, [min(t.value for t in done)] * len(failed), "x", color="tab:red", label="failed")
    so_far = study.best_so_far()
    ax.step(range(len(trials)), [float("nan") if v is None else v for v in so_far], where="post", color="black",
            label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"objective ({study.direction})")
    ax.set_title(f"{len(done)} complete, {len(failed)} failed, {len(trials) - len(done) - len(failed)} pending")
    if done:
        ax.legend(loc="best", fontsize=8)

    comps = study.components
    heights = [best.weights[c] for c in comps] if best is not None else [0.0] * len(comps)
    bx.bar(comps, heights, color="tab:green")
    bx.set_ylim(0, 1)
    bx.set_ylabel("weight")
    bx.set_title("best weights" + (f" (trial {best.id}, {best.value:.4g})" if best is not None else " (none yet)"))
    bx.tick_params(axis="x", labelrotation=30)

    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), suffix=".png")
    return path
