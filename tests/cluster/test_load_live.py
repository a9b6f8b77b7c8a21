"""`moe-cluster load --server` and `moe-cluster rebalance`, run in-process (`cluster.cli.main`) as a user runs them.

The live export of a router that served a prompt file equals the offline measurement of the same file,
row for row; bad input is one line on stderr and exit code 2; an unreachable server is exit code 1.
The slow test re-places the experts of a real cluster (the session's 2-node Ray cluster) through the
controller (--ray-address) and through a router (--server).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cluster.cli import main
from cluster.deploy import ClusterConfig, load_cluster_model
from cluster.load import ExpertLoad
from cluster.placement import HostPlan, HostResources, PlacementPlan
from mixtral.block import Experts
from mixtral.config import ModelConfig
from router.api import ServerConfig
from router.expert_load import CountingExperts
from tests.raynodes import RayNodes
from tests.serving import ServerHandle, request, start_server

TOKEN = "load-token-for-tests"
DEFAULT_NEW_TOKENS = 3
PROMPT_LINES: list[dict[str, Any]] = [
    {"token_ids": [1, 100, 200, 300]},
    {"token_ids": [1, 7, 8, 9, 10, 11, 12], "max_new_tokens": 6},
    {"token_ids": [1, 31999], "max_new_tokens": 1},
    {"prompt": "Mixtral routes each token to two experts."},
    {"messages": [{"role": "user", "content": "Which experts?"}], "max_new_tokens": 4},
]


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def fresh(tiny_checkpoint: Path) -> Iterator[ServerHandle]:
    """A server that has served nothing yet, with a bearer token."""
    with start_server(tiny_checkpoint, server=ServerConfig(auth_token=TOKEN)) as srv:
        yield srv


def send(srv: ServerHandle, line: dict[str, Any]) -> None:
    """One prompt line as the offline measurement runs it: greedy, EOS ignored, its max_new_tokens."""
    if "messages" in line:
        req = request(chat=[(m["role"], m["content"]) for m in line["messages"]])
    else:
        req = request(line.get("prompt", line.get("token_ids")))
    req.max_new_tokens = line.get("max_new_tokens", DEFAULT_NEW_TOKENS)
    reply = srv.stub().Generate(req, timeout=60, metadata=[("authorization", f"Bearer {TOKEN}")])
    assert len(reply.token_ids) == req.max_new_tokens


def test_offline_and_live_load_files_agree_on_the_same_prompts(fresh: ServerHandle, tiny_checkpoint: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in PROMPT_LINES))
    (tmp_path / "token").write_text(TOKEN + "\n")
    with ThreadPoolExecutor(len(PROMPT_LINES)) as pool:  # concurrently: the router batches them
        list(pool.map(lambda line: send(fresh, line), PROMPT_LINES))

    offline = run(capsys, "load", "--model", tiny_checkpoint, "--prompts", prompts, "--out", tmp_path / "offline.json",
                  "--max-new-tokens", DEFAULT_NEW_TOKENS, "--dtype", "float32", "--device", "cpu")
    live = run(capsys, "load", "--server", fresh.address, "--auth-token-file", tmp_path / "token",
               "--out", tmp_path / "live.json")

    assert offline[0] == live[0] == 0, (offline, live)
    measured, exported = ExpertLoad.read(tmp_path / "offline.json"), ExpertLoad.read(tmp_path / "live.json")
    assert exported.rows == measured.rows and exported.tokens == measured.tokens
    assert exported.experts_per_token == measured.experts_per_token == 2
    assert (exported.source, measured.source) == ("live", "offline")
    assert exported.window_s is not None and 0 < exported.window_s <= 300
    assert live[2] == (f"wrote {tmp_path / 'live.json'}: 2 layers x 4 experts, {exported.tokens} tokens over the "
                       f"last {exported.window_s:.1f} s on {fresh.address}\n")


def test_load_from_a_server_without_the_token_is_exit_2(fresh: ServerHandle, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "load", "--server", fresh.address, "--out", tmp_path / "live.json")

    assert (code, out) == (2, "")
    assert err == ("moe-cluster: error: UNAUTHENTICATED: missing or wrong bearer token: send metadata "
                   "'authorization: Bearer <token>'\n")
    assert not (tmp_path / "live.json").exists()


def test_load_from_an_unreachable_server_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "load", "--server", "127.0.0.1:1", "--out", tmp_path / "l.json", "--timeout", 10)

    assert code == 1 and err.startswith("moe-cluster: failed: UNAVAILABLE: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "l.json").exists()


BAD_LOAD = [
    (["--server", "h:1", "--prompts", "p.jsonl"], "moe-cluster: error: moe-cluster load: --prompts is for --model"),
    (["--model", "m"], "moe-cluster: error: moe-cluster load: --model needs --prompts"),
    (["--model", "m", "--prompts", "p.jsonl", "--window", "5"],
     "moe-cluster: error: moe-cluster load: --window is for --server"),
    (["--server", "h:1", "--window", "-1"], "moe-cluster load: argument --window: -1.0 must be a finite number"),
    (["--server", "h:1", "--window", "soon"], "moe-cluster load: argument --window: 'soon' is not a number"),
    (["--server", "h:1", "--model", "m"], "moe-cluster load: argument --model: not allowed with argument --server"),
    (["--prompts", "p.jsonl"], "moe-cluster load: one of the arguments --model --server is required"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_LOAD)
def test_bad_load_flags_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                argv: list[str], message: str) -> None:
    code, out, err = run(capsys, "load", *argv, "--out", tmp_path / "l.json")

    assert (code, out) == (2, "") and err.startswith(message) and len(err.splitlines()) == 1, err


def write_plan(path: Path, hosts: dict[str, list[tuple[int, int]]]) -> Path:
    PlacementPlan(2, 4, tuple(HostPlan(h, tuple(e)) for h, e in hosts.items())).save(path)
    return path


BAD_REBALANCE = [
    (["--server", "h:1"], "moe-cluster rebalance: the following arguments are required: --plan"),
    (["--plan", "{plan}"], "moe-cluster rebalance: one of the arguments --server --ray-address is required"),
    (["--plan", "{plan}", "--server", "h:1", "--ray-address", "a:1"],
     "moe-cluster rebalance: argument --ray-address: not allowed with argument --server"),
    (["--plan", "{plan}", "--server", "h:1", "--host-memory", "0"],
     "moe-cluster rebalance: argument --host-memory: 0 must be at least 1"),
    (["--plan", "{missing}", "--server", "h:1"], "moe-cluster: error: [Errno 2] No such file or directory"),
    (["--plan", "{garbled}", "--server", "h:1"], "moe-cluster: error: {garbled}: not a placement plan"),
    (["--plan", "{orphan}", "--server", "h:1"], "moe-cluster: error: layer 1 expert 1 has no host in the plan"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_REBALANCE)
def test_bad_rebalance_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    argv: list[str], message: str) -> None:
    files = {"plan": write_plan(tmp_path / "plan.json", {"host-0": [(layer, e) for layer in (0, 1) for e in range(4)]}),
             "missing": tmp_path / "missing.json", "garbled": tmp_path / "garbled.json",
             "orphan": write_plan(tmp_path / "orphan.json", {"host-0": [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]})}
    files["garbled"].write_text("{not json")

    code, out, err = run(capsys, "rebalance", *(a.format(**files) for a in argv))

    assert (code, out) == (2, "") and err.startswith(message.format(**files)) and len(err.splitlines()) == 1, err


def test_rebalance_of_a_local_backend_router_is_exit_2_naming_the_reason(
        fresh: ServerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = write_plan(tmp_path / "plan.json", {"host-0": [(layer, e) for layer in (0, 1) for e in range(4)]})
    (tmp_path / "token").write_text(TOKEN)

    code, out, err = run(capsys, "rebalance", "--plan", plan, "--server", fresh.address,
                         "--auth-token-file", tmp_path / "token")

    assert (code, out) == (2, "")
    assert err == ("moe-cluster: error: FAILED_PRECONDITION: the local backend has no expert hosts to re-place: "
                   "every expert runs in the router process\n")


# --- a real cluster ------------------------------------------------------------------------------------------

ROUND_ROBIN = {"host-0": [(0, 0), (0, 2), (1, 0), (1, 2)], "host-1": [(0, 1), (0, 3), (1, 1), (1, 3)]}
REPLICATED = {"host-0": ROUND_ROBIN["host-0"], "host-1": [*ROUND_ROBIN["host-1"], (1, 0)]}  # layer 1 expert 0 twice


def served_entries(plan: PlacementPlan) -> dict[str, set[tuple[int, int]]]:
    return {h.host_id: set(h.entries) for h in plan.hosts}


@pytest.mark.slow
def test_rebalance_through_the_controller_and_through_a_router(ray_cluster: RayNodes, tiny_checkpoint: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    config = ModelConfig.from_json(tiny_checkpoint / "config.json")
    counting: list[CountingExperts] = []

    def wrap(experts: Experts) -> Experts:
        counting.append(CountingExperts(experts, config.num_hidden_layers, config.num_local_experts))
        return counting[0]

    cfg = ClusterConfig(tiny_checkpoint, num_hosts=2, dtype="float32", device="cpu",
                        hosts=HostResources(num_cpus=1), name=f"load-live-{uuid.uuid4().hex[:8]}")
    model, cluster = load_cluster_model(cfg, wrap)
    with cluster:
        on_ray = ["--ray-address", ray_cluster.address, "--controller", cfg.name, "--namespace", cfg.namespace]
        code, out, err = run(capsys, "rebalance", "--plan", write_plan(tmp_path / "r.json", REPLICATED), *on_ray,
                             "--json")
        assert code == 0, err
        assert json.loads(out)["steps"] == 1 and served_entries(cluster.placement()) == {
            h: set(e) for h, e in REPLICATED.items()}

        with start_server(model=(model, counting[0]), is_healthy=cluster.is_serving, cluster=cluster) as srv:
            code, out, err = run(capsys, "rebalance", "--plan", write_plan(tmp_path / "rr.json", ROUND_ROBIN),
                                 "--server", srv.address, "--host-memory", 2**30)
            assert code == 0 and out.startswith("re-placed in 1 steps"), (out, err)
            assert served_entries(cluster.placement()) == {h: set(e) for h, e in ROUND_ROBIN.items()}
            assert srv.stub().Generate(request([1, 2, 3], max_new_tokens=4), timeout=60).token_ids

        code, out, err = run(capsys, "rebalance", "--plan", tmp_path / "rr.json", *on_ray[:2],
                             "--controller", "no-such-controller", "--namespace", cfg.namespace)
        assert (code, out) == (2, "") and err.startswith("moe-cluster: error: no controller actor 'no-such-controller'")
