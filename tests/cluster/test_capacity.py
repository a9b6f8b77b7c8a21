"""Capacity planning: host rate from the dispatch benchmark, the fewest hosts for a target, `moe-cluster capacity`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.capacity import (
    CapacityConfig,
    CapacityError,
    plan_capacity,
    predicted_tokens_per_s,
    rate_bound,
    read_host_rate,
)
from cluster.cli import main
from cluster.load import zipf_load
from cluster.placement import PlacementPlan
from cluster.planner import PlannerConfig, balance, plan_placement

# A copy of what `bench/dispatch.py --dtype bfloat16` wrote on this machine kind (bench/results is not
# committed, so the tests keep their own).
BENCH = Path(__file__).resolve().parent / "data" / "dispatch-bf16.json"


def test_host_rate_from_the_dispatch_benchmark_is_its_best_in_process_row() -> None:
    rows = [r for r in json.loads(BENCH.read_text()) if r["backend"] == "in-process"]
    best = max(r["batch"] * 2 / (r["layer_expert_us"] * 1e-6) for r in rows)

    rate = read_host_rate(BENCH, rows_per_token=2)

    assert rate.rows_per_s == pytest.approx(best)
    assert "in-process batch" in rate.source


def test_host_rate_given_directly(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text('{"host_rows_per_s": 1234.5}')
    assert read_host_rate(tmp_path / "m.json", rows_per_token=2).rows_per_s == 1234.5


@pytest.mark.parametrize(("text", "message"), [
    ('{"host_rows_per_s": 0}', "not a positive number"),
    ('{"rows": 3}', 'expected {"host_rows_per_s": R}'),
    ('[{"backend": "cluster 2 hosts", "batch": 8, "layer_expert_us": 10}]', '"in-process" rows'),
    ('[{"backend": "in-process", "batch": 8}]', "malformed measurement"),
    ("nope", "not JSON"),
])
def test_a_bad_measurement_file_is_refused(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "m.json").write_text(text)
    with pytest.raises(CapacityError, match=message):
        read_host_rate(tmp_path / "m.json", rows_per_token=2)


def test_one_host_serves_its_rate_divided_by_rows_per_token() -> None:
    # 1000 rows/s, 2 layers x top-2: a token costs 4 rows, so 250 tokens/s on one host.
    load = [[50, 50, 50, 50], [100, 100, 0, 0]]  # 100 tokens
    answer = plan_capacity(load, tokens=100, cfg=CapacityConfig(target_tokens_per_s=200, host_rows_per_s=1000))
    assert answer.num_hosts == 1 and answer.tokens_per_s == pytest.approx(250)
    assert answer.headroom == pytest.approx(0.25)
    assert predicted_tokens_per_s(400, 100, 1000) == 250


def test_the_answer_is_the_fewest_hosts_that_meet_the_target() -> None:
    load = zipf_load(8, 8, tokens=1000)

    answer = plan_capacity(load.rows, 1000, CapacityConfig(target_tokens_per_s=500, host_rows_per_s=1000))

    assert answer.tokens_per_s >= 500 and answer.headroom >= 0
    with pytest.raises(CapacityError):  # every count from 1 to one host fewer falls short
        plan_capacity(load.rows, 1000, CapacityConfig(500, 1000, max_hosts=answer.num_hosts - 1))
    hot = {(layer, layer % 8) for layer in range(8)}
    assert hot <= {(layer, expert) for layer, expert, _ in answer.replicated()}
    answer.plan.validate()


def test_no_plan_beats_the_rate_bound() -> None:
    load = zipf_load(4, 8, tokens=1000)
    for hosts in (1, 3, 8, 12):
        plan = plan_placement(load.rows, PlannerConfig(hosts, 1, None, spare_slots=2))
        rate = predicted_tokens_per_s(balance(plan, load.rows).step_rows, 1000, 1000)
        assert rate <= rate_bound(load.rows, 1000, CapacityConfig(1, 1000, spare_slots=2), hosts) * (1 + 1e-9)


def test_an_unreachable_target_says_what_to_change() -> None:
    # 2 spare slots: the hot expert (42.9% of rows) has at most 3 replicas, whatever the host count.
    cfg = CapacityConfig(target_tokens_per_s=10_000, host_rows_per_s=1000, spare_slots=2)
    with pytest.raises(CapacityError, match="allow more hosts or spare slots"):
        plan_capacity(zipf_load(4, 8).rows, 4096, cfg)


def test_memory_limits_move_the_answer_to_more_hosts() -> None:
    load = zipf_load(4, 8, tokens=1000)
    free = plan_capacity(load.rows, 1000, CapacityConfig(150, 1000))
    tight = plan_capacity(load.rows, 1000, CapacityConfig(150, 1000, expert_bytes=10, host_memory_bytes=80))

    assert free.num_hosts == 2  # one host: 1000 rows/s / 8 rows per token = 125 tokens/s
    assert tight.num_hosts == 4  # 32 entries of 10 bytes, 8 per host
    assert all(len(h.entries) * 10 <= 80 for h in tight.plan.hosts)


def run_cli(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_capacity_command_prints_hosts_replicas_and_headroom(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    zipf_load(32, 8).save(tmp_path / "load.json")
    argv = ["capacity", "--load", tmp_path / "load.json", "--target-tokens-per-s", 200, "--measured", BENCH,
            "--out", tmp_path / "plan.json", "--json"]

    code, out, err = run_cli(argv, capsys)

    assert code == 0, err
    answer = json.loads(out)
    assert answer["tokens_per_s"] >= 200 and answer["headroom"] == pytest.approx(answer["tokens_per_s"] / 200 - 1,
                                                                                 abs=1e-3)
    assert answer["hosts"] == len(PlacementPlan.load(tmp_path / "plan.json").hosts)
    assert answer["replicas"] and {"layer", "expert", "hosts"} == answer["replicas"][0].keys()
    assert answer["measured"].endswith("in-process batch 32")

    code, out, _ = run_cli(argv[:-3], capsys)
    assert code == 0 and "headroom" in out and "replicated experts: L0E0x" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--target-tokens-per-s", "0"], "must be a positive number"),
    (["--target-tokens-per-s", "100", "--host-memory", "10"], "--host-memory needs --model or --expert-bytes"),
    (["--target-tokens-per-s", "1e9", "--max-hosts", "4"], "allow more hosts or spare slots"),
])
def test_capacity_command_bad_input_is_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    zipf_load(2, 4).save(tmp_path / "load.json")
    argv = ["capacity", "--load", tmp_path / "load.json", "--measured", BENCH, *args]

    code, out, err = run_cli(argv, capsys)

    assert code == 2 and out == "" and len(err.splitlines()) == 1 and message in err, err
