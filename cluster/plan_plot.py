"""Picture of a plan: the measured load beside the rows each host serves, round-robin vs the plan.

Two panels: the load heat map (layer x expert), and the per-host load (layer x host) of round-robin
next to the plan's, on one colour scale so the hot spots compare by eye. matplotlib draws through
its Agg canvas on a Figure of our own: no pyplot, no global figure state, no display needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from cluster.placement import PlacementPlan
from cluster.planner import Load, compare_with_round_robin, host_loads

LOAD_TITLE = "load: rows per layer x expert"
ROUND_ROBIN_TITLE = "round-robin: rows per host"
PLAN_TITLE = "plan: rows per host"


def plan_figure(plan: PlacementPlan, load: Load) -> Figure:
    """The load heat map (left panel) and per-host loads, round-robin beside the plan (right panel)."""
    report = compare_with_round_robin(plan, load)
    rr = PlacementPlan.round_robin(plan.num_layers, plan.num_experts, len(plan.hosts))
    planned, dealt = host_loads(plan, load), host_loads(rr, load)
    fig = Figure(figsize=(13, 0.16 * plan.num_layers + 3), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subfigures(1, 2, squeeze=False, width_ratios=[1, 2])
    load_panel, hosts_panel = panels[0, 0], panels[0, 1]
    load_image = _heat_map(load_panel.subplots(), load, LOAD_TITLE, "expert", None)
    load_panel.colorbar(load_image, label="rows per expert")
    top = max(max(map(max, planned)), max(map(max, dealt)))
    left, right = hosts_panel.subplots(1, 2, sharey=True)
    _heat_map(left, dealt, f"{ROUND_ROBIN_TITLE}\nworst layer max/mean {report.round_robin.max_over_mean:.2f}",
              "host", top)
    image = _heat_map(right, planned, f"{PLAN_TITLE}\nworst layer max/mean {report.plan.max_over_mean:.2f}, "
                      f"step time x{report.step_time_ratio:.2f}", "host", top)
    hosts_panel.colorbar(image, ax=[left, right], label="rows per host")
    hosts_panel.suptitle(f"{len(plan.hosts)} hosts, {report.num_entries} entries "
                         f"({report.num_entries - plan.num_layers * plan.num_experts} spare replicas)")
    return fig


def _heat_map(ax: Axes, values: Sequence[Sequence[float]], title: str, xlabel: str, vmax: float | None
              ) -> AxesImage:
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    return image


def save_plan_plot(plan: PlacementPlan, load: Load, path: Path) -> None:
    """Write the figure of `plan_figure` to `path` (format from the suffix, e.g. .png)."""
    plan_figure(plan, load).savefig(path, dpi=110)
