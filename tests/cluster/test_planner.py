"""The placement planner: balance on a skewed load, memory budgets, determinism, and `moe-cluster plan`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.cli import main
from cluster.load import zipf_load
from cluster.packing import LayerPacking, pack_layer, replica_order
from cluster.placement import PlacementPlan
from cluster.plan_plot import LOAD_TITLE, PLAN_TITLE, ROUND_ROBIN_TITLE, plan_figure
from cluster.planner import (
    PlanError,
    PlannerConfig,
    compare_with_round_robin,
    host_loads,
    plan_placement,
    slot_quotas,
    spread_over_hosts,
)

EXPERT_BYTES = 352_321_536  # one Mixtral 8x7B expert in bfloat16 (3 * 4096 * 14336 * 2)


def slots_used(plan: PlacementPlan) -> list[int]:
    return [len(set(h.entries)) for h in plan.hosts]


@pytest.mark.parametrize("host_slots", [48, None], ids=["tight-memory", "unlimited-memory"])
def test_zipf_load_is_balanced_within_15_percent_in_every_layer(host_slots: int | None) -> None:
    # 32 layers x 8 experts, Zipf s=1.2 with a different hot expert per layer (42.9% of a layer's rows);
    # 8 hosts, 4 spare slots per layer. 48 slots per host is exactly 32 * (8 + 4) / 8: no slack at all.
    load = zipf_load(32, 8, tokens=4096, s=1.2)
    memory = None if host_slots is None else host_slots * EXPERT_BYTES
    cfg = PlannerConfig(num_hosts=8, expert_bytes=EXPERT_BYTES, host_memory_bytes=memory, spare_slots=4)

    plan = plan_placement(load.rows, cfg)
    report = compare_with_round_robin(plan, load.rows)

    print(f"\n{report.to_text()}")  # plan beside round-robin, per layer (pytest -s shows it)
    for layer, (mine, rr) in enumerate(zip(report.plan.layers, report.round_robin.layers)):
        assert mine.max_over_mean <= 1.15, f"layer {layer}: plan {mine.max_over_mean:.3f}, rr {rr.max_over_mean:.3f}"
    assert report.round_robin.max_over_mean == pytest.approx(0.4286 * 8, abs=0.01)
    assert report.step_time_ratio < 0.35
    plan.validate(EXPERT_BYTES, memory)
    if host_slots is not None:
        assert max(slots_used(plan)) <= host_slots
    assert plan_placement(load.rows, cfg).to_json() == plan.to_json()  # same input, same plan


def test_the_plan_is_a_placement_plan_the_controller_reads() -> None:
    load = zipf_load(4, 8)
    plan = plan_placement(load.rows, PlannerConfig(num_hosts=3, expert_bytes=1, spare_slots=2))

    assert PlacementPlan.from_json(plan.to_json()) == plan
    assert [h.host_id for h in plan.hosts] == ["host-0", "host-1", "host-2"]
    assert all(len(set(h.entries)) == len(h.entries) for h in plan.hosts)  # a replica per host at most
    assert all(list(h.entries) == sorted(h.entries) for h in plan.hosts)


def test_the_packing_docstring_example() -> None:
    # rows [8, 2, 1, 1], 2 hosts: without a spare the busiest host has 8 (mean 6); with one, 6 and 6.
    assert pack_layer([8, 2, 1, 1], [4, 4], 0).max_load == 8
    assert pack_layer([8, 2, 1, 1], [4, 4], 1) == LayerPacking(((0, 1), (0, 2, 3)), (6.0, 6.0))
    assert replica_order([9, 4], 3, max_replicas=4) == [0, 0, 1]


def test_a_spare_that_does_not_help_is_not_used() -> None:
    # [6, 2, 2, 2] on 2 hosts balances without replicas; a replica would only cost memory.
    assert pack_layer([6, 2, 2, 2], [4, 4], 3) == LayerPacking(((0,), (1, 2, 3)), (6.0, 6.0))


def test_idle_experts_get_one_replica_and_no_spare() -> None:
    assert replica_order([0, 0, 5], 4, max_replicas=3) == [2, 2]
    packing = pack_layer([0, 0, 5], [3, 3, 3], 4)
    assert sorted(e for host in packing.experts for e in host) == [0, 1, 2, 2, 2]


def test_quotas_share_each_host_slots_evenly_over_layers() -> None:
    cfg = PlannerConfig(num_hosts=2, expert_bytes=10, host_memory_bytes=30)
    assert slot_quotas(cfg, num_layers=2, num_experts=2) == [[2, 1], [1, 2]]  # the docstring example
    quotas = slot_quotas(PlannerConfig(num_hosts=5, expert_bytes=1, host_memory_bytes=7), 3, 8)
    assert [sum(q[h] for q in quotas) for h in range(5)] == [7] * 5
    assert sorted(sum(q) for q in quotas) == [11, 12, 12]  # floor or ceil of 35 / 3


def test_spreading_puts_each_layer_hot_host_on_a_different_host() -> None:
    packing = LayerPacking(((0,), (1,), (2,)), (9.0, 1.0, 1.0))
    spread = spread_over_hosts([packing] * 3, [[1, 1, 1]] * 3)
    assert [p.loads for p in spread] == [(9.0, 1.0, 1.0), (1.0, 9.0, 1.0), (1.0, 1.0, 9.0)]
    assert spread[1].experts == ((2,), (0,), (1,))  # the busiest to the idlest so far, the rest in turn


def test_report_against_round_robin_by_hand() -> None:
    # round-robin on 2 hosts: host-0 serves experts 0 and 2 (8 + 1), host-1 experts 1 and 3 (2 + 1).
    load = [[8, 2, 1, 1]]
    plan = plan_placement(load, PlannerConfig(num_hosts=2, expert_bytes=1, spare_slots=1))

    report = compare_with_round_robin(plan, load)

    assert report.round_robin.layers[0].max_load == 9 and report.round_robin.max_over_mean == 1.5
    assert report.plan.max_over_mean == 1.0
    assert report.step_time_ratio == pytest.approx(6 / 9)
    assert report.num_entries == 5
    assert host_loads(plan, load) == [[6.0, 6.0]]


def test_too_little_memory_is_an_error_naming_what_to_give() -> None:
    cfg = PlannerConfig(num_hosts=3, expert_bytes=10, host_memory_bytes=20)
    with pytest.raises(PlanError, match=r"need 32: give each host at least 110 bytes \(--host-memory\)"):
        plan_placement(zipf_load(4, 8).rows, cfg)


@pytest.mark.parametrize(("load", "message"), [
    ([], "no layers"),
    ([[1, 2], [3]], "layer 1 has 1 experts"),
    ([[1, -2]], "negative"),
])
def test_a_malformed_load_is_refused(load: list[list[float]], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan_placement(load, PlannerConfig(num_hosts=2, expert_bytes=1))


@pytest.mark.parametrize(("field", "value"), [("num_hosts", 0), ("expert_bytes", 0), ("host_memory_bytes", 0),
                                              ("spare_slots", -1)])
def test_config_names_the_bad_field(field: str, value: int) -> None:
    args = {"num_hosts": 2, "expert_bytes": 1, field: value}
    with pytest.raises(ValueError, match=f"{field}={value}"):
        PlannerConfig(**args)


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[list[int]], PlannerConfig]:
    num_layers, num_experts = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    rows = st.integers(0, 1000) | st.sampled_from([0, 1])
    load = [[draw(rows) for _ in range(num_experts)] for _ in range(num_layers)]
    num_hosts = draw(st.integers(1, 6))
    least = math.ceil(num_layers * num_experts / num_hosts)
    slots = draw(st.none() | st.integers(least, least + num_layers * 3))
    memory = None if slots is None else slots * 10 + draw(st.integers(0, 9))  # budgets need not be multiples
    return load, PlannerConfig(num_hosts, 10, memory, draw(st.integers(0, 6)))


@settings(max_examples=150, deadline=None)
@given(problems())
def test_every_expert_is_served_and_no_host_is_over_budget(problem: tuple[list[list[int]], PlannerConfig]) -> None:
    load, cfg = problem

    plan = plan_placement(load, cfg)

    plan.validate(cfg.expert_bytes, cfg.host_memory_bytes)
    for layer in range(len(load)):
        for expert in range(len(load[0])):
            assert plan.replicas(layer, expert), (layer, expert)
    if cfg.host_memory_bytes is not None:
        assert all(n * cfg.expert_bytes <= cfg.host_memory_bytes for n in slots_used(plan))
    assert all(len(set(h.entries)) == len(h.entries) for h in plan.hosts)
    assert len(plan.hosts) == cfg.num_hosts
    assert plan_placement(load, cfg) == plan


@settings(max_examples=150, deadline=None)
@given(problems(), st.integers(1, 4))
def test_more_spare_slots_never_make_the_worst_layer_worse(problem: tuple[list[list[int]], PlannerConfig],
                                                          more: int) -> None:
    load, cfg = problem
    richer = PlannerConfig(cfg.num_hosts, cfg.expert_bytes, cfg.host_memory_bytes, cfg.spare_slots + more)

    before = compare_with_round_robin(plan_placement(load, cfg), load).plan
    after = compare_with_round_robin(plan_placement(load, richer), load).plan

    assert after.max_over_mean <= before.max_over_mean * (1 + 1e-9)
    for mine, theirs in zip(after.layers, before.layers):
        assert mine.max_load <= theirs.max_load * (1 + 1e-9)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 40))
def test_memory_below_one_replica_per_expert_is_refused(num_layers: int, num_experts: int, num_hosts: int,
                                                        slots: int) -> None:
    cfg = PlannerConfig(num_hosts, 3, slots * 3 + 2)
    load = [[1] * num_experts for _ in range(num_layers)]
    if num_hosts * slots < num_layers * num_experts:
        with pytest.raises(PlanError, match="--host-memory"):
            plan_placement(load, cfg)
    else:
        plan_placement(load, cfg).validate(3, slots * 3 + 2)


def test_the_figure_has_the_load_panel_and_round_robin_beside_the_plan() -> None:
    load = zipf_load(8, 8)
    plan = plan_placement(load.rows, PlannerConfig(num_hosts=8, expert_bytes=1, spare_slots=4))

    fig = plan_figure(plan, load.rows)

    load_panel, hosts_panel = fig.subfigs
    load_axes = [ax for ax in load_panel.axes if ax.get_title()]
    host_axes = [ax for ax in hosts_panel.axes if ax.get_title()]
    assert [ax.get_title() for ax in load_axes] == [LOAD_TITLE]
    assert [ax.get_title().splitlines()[0] for ax in host_axes] == [ROUND_ROBIN_TITLE, PLAN_TITLE]
    load_image, rr_image, plan_image = (np.asarray(ax.images[0].get_array()) for ax in [*load_axes, *host_axes])
    assert load_image.shape == (8, 8) and load_image.max() == max(map(max, load.rows))  # layer x expert
    assert rr_image.shape == plan_image.shape == (8, 8)  # layer x host
    assert rr_image.max() > 2.5 * plan_image.max()  # round-robin has the hot spots (3.4 vs 1.14 x mean)
    assert host_axes[0].images[0].get_clim() == host_axes[1].images[0].get_clim()  # one colour scale


def run_cli(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_command_writes_plan_report_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zipf_load(32, 8).save(tmp_path / "load.json")
    argv = ["plan", "--load", tmp_path / "load.json", "--expert-bytes", EXPERT_BYTES, "--hosts", 8,
            "--spare-slots", 4, "--host-memory", 48 * EXPERT_BYTES, "--out", tmp_path / "plan.json",
            "--plot", tmp_path / "plan.png", "--json"]

    code, out, err = run_cli(argv, capsys)

    assert code == 0, err
    report = json.loads(out)
    assert report["plan"]["max_over_mean"] <= 1.15 and report["round_robin"]["max_over_mean"] > 3
    assert {"worst_layer", "layers"} <= report["plan"].keys() and 0 < report["step_time_ratio"] < 0.35
    PlacementPlan.load(tmp_path / "plan.json").validate(EXPERT_BYTES, 48 * EXPERT_BYTES)
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_command_reads_the_expert_size_from_the_model(tiny_checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    zipf_load(2, 4).save(tmp_path / "load.json")  # the tiny model: 2 layers x 4 experts, 3*64*128 parameters
    base = ["plan", "--load", tmp_path / "load.json", "--model", tiny_checkpoint, "--hosts", 2,
            "--out", tmp_path / "plan.json"]

    assert run_cli([*base, "--host-memory", 4 * 3 * 64 * 128 * 2], capsys)[0] == 0
    code, out, err = run_cli([*base, "--host-memory", 4 * 3 * 64 * 128 * 2 - 1], capsys)

    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "--host-memory" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--hosts", "0"], "must be at least 1"),
    (["--hosts", "2", "--spare-slots", "-1"], "must not be negative"),
    (["--hosts", "2", "--host-memory", "1"], "give each host at least"),
])
def test_plan_command_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    zipf_load(2, 4).save(tmp_path / "load.json")
    argv = ["plan", "--load", tmp_path / "load.json", "--expert-bytes", "10", "--out", tmp_path / "p.json", *args]

    code, out, err = run_cli(argv, capsys)

    assert code == 2 and out == "" and len(err.splitlines()) == 1 and message in err, err


def test_plan_command_refuses_a_load_that_is_not_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "load.json").write_text('{"layers": 2}')
    argv = ["plan", "--load", tmp_path / "load.json", "--expert-bytes", "1", "--hosts", "2", "--out", tmp_path / "p"]

    code, _, err = run_cli(argv, capsys)

    assert code == 2 and "not a load file" in err and len(err.splitlines()) == 1
