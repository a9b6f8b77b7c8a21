"""The `moe-cluster` command run as a user runs it: demo checkpoints, generation, one-line user errors.

Every run is a real subprocess (about 2 s each, mostly imports), so independent runs are started
together and the tests read their results from module fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.demo import SIZES
from mixtral.checkpoint import INDEX_FILE, SINGLE_FILE, expected_shapes
from mixtral.config import ModelConfig
from router.tokenizer import ChatMessage, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_LOG_LEVEL": "WARNING"}
PROMPT_IDS = (1, 100, 200, 300)
NUM_GREEDY = 4
SHARD_BYTES = 4_000_000
TEXT = "Mixtral routes each token to two experts."
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Which experts?"}]
# The session checkpoint of conftest (hidden 64, 4 heads): q_proj is [64, 64].
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EXPERT_W2 = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


@dataclass(frozen=True)
class Run:
    argv: Sequence[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        """The single JSON object of `generate --json`, which must be all of stdout."""
        assert self.returncode == 0, self.stderr
        lines = self.stdout.splitlines()
        assert len(lines) == 1, self.stdout
        result: dict[str, Any] = json.loads(lines[0])
        return result


def run_together(commands: dict[str, Sequence[object]]) -> dict[str, Run]:
    """Run `python -m cluster.cli ARGS` for each entry at the same time; wait for all."""
    argvs = {key: [sys.executable, "-m", "cluster.cli", *map(str, args)] for key, args in commands.items()}
    procs = {key: subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
             for key, argv in argvs.items()}
    runs = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        runs[key] = Run(argvs[key], proc.returncode, stdout, stderr)
    return runs


def generate(model: Path, *args: object) -> list[object]:
    return ["generate", "--model", model, "--device", "cpu", "--dtype", "float32", *args]


# --- demo-model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Run, Path]]:
    """{"single": (run, dir), "sharded": (run, dir)}: the tiny demo model written both ways."""
    root = tmp_path_factory.mktemp("demo")
    dirs = {"single": root / "single", "sharded": root / "sharded"}
    runs = run_together({
        "single": ["demo-model", "--out", dirs["single"], "--size", "tiny"],
        "sharded": ["demo-model", "--out", dirs["sharded"], "--size", "tiny", "--shard-size", SHARD_BYTES],
    })
    return {key: (runs[key], dirs[key]) for key in dirs}


def test_demo_model_writes_config_and_one_safetensors_file(demo: dict[str, tuple[Run, Path]]) -> None:
    run, model_dir = demo["single"]
    assert run.returncode == 0, run.stderr

    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", SINGLE_FILE]
    config = ModelConfig.from_json(model_dir / "config.json")
    assert {key: getattr(config, key) for key in SIZES["tiny"]} == SIZES["tiny"]
    tensors = load_file(str(model_dir / SINGLE_FILE))
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected_shapes(config)


def test_demo_model_with_shard_size_writes_shards_and_index(demo: dict[str, tuple[Run, Path]]) -> None:
    run, model_dir = demo["sharded"]
    assert run.returncode == 0, run.stderr

    weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) > 1
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(["config.json", INDEX_FILE, *shards])
    config = ModelConfig.from_json(model_dir / "config.json")
    assert set(weight_map) == set(expected_shapes(config))
    single = load_file(str(demo["single"][1] / SINGLE_FILE))
    for shard in shards:
        tensors = load_file(str(model_dir / shard))
        assert set(tensors) == {name for name, file in weight_map.items() if file == shard}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert nbytes <= SHARD_BYTES or len(tensors) == 1, shard
        for name, tensor in tensors.items():  # same seed: the same weights as the single file
            assert torch.equal(tensor, single[name]), name


# --- generate --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generations(demo: dict[str, tuple[Run, Path]], tmp_path_factory: pytest.TempPathFactory
                ) -> dict[str, Run]:
    """Independent `generate` runs on the sharded demo model."""
    model = demo["sharded"][1]
    chat = tmp_path_factory.mktemp("chat") / "chat.json"
    chat.write_text(json.dumps(CHAT))
    ids = ",".join(map(str, PROMPT_IDS))
    sampled = ["--token-ids", ids, "--temperature", "1", "--seed", "7", "--max-new-tokens", NUM_GREEDY, "--json"]
    return run_together({
        "greedy": generate(model, "--token-ids", ids, "--temperature", "0", "--max-new-tokens", NUM_GREEDY,
                           "--json"),
        "sampled": generate(model, *sampled),
        "sampled_again": generate(model, *sampled),
        "prompt": generate(model, "--prompt", TEXT, "--max-new-tokens", 2, "--json"),
        "chat": generate(model, "--chat", chat, "--max-new-tokens", 2, "--json"),
    })


def test_generate_json_reports_tokens_text_logprobs_and_finish_reason(generations: dict[str, Run]) -> None:
    result = generations["greedy"].json()

    assert len(result["token_ids"]) == NUM_GREEDY  # generated tokens only, not the prompt
    assert all(isinstance(t, int) and 0 <= t < 32000 for t in result["token_ids"])
    assert result["text"] == load_tokenizer(None, 32000).decode(result["token_ids"])
    assert len(result["logprobs"]) == NUM_GREEDY
    assert all(isinstance(lp, float) and lp <= 0 for lp in result["logprobs"])
    assert result["finish_reason"] == "length"
    assert result["usage"] == {"prompt_tokens": len(PROMPT_IDS), "completion_tokens": NUM_GREEDY}


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_transformers_loads_the_demo_model_and_agrees_on_greedy_tokens(
        demo: dict[str, tuple[Run, Path]], generations: dict[str, Run], layout: str) -> None:
    from transformers import MixtralForCausalLM

    model, info = MixtralForCausalLM.from_pretrained(demo[layout][1], output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    ours = generations["greedy"].json()

    tokens, logprobs = list(PROMPT_IDS), []
    with torch.no_grad():
        for _ in range(NUM_GREEDY):  # greedy decoding, one full forward per token
            last = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), dim=-1)
            tokens.append(int(last.argmax()))
            logprobs.append(float(last.max()))

    assert ours["token_ids"] == tokens[len(PROMPT_IDS):]
    torch.testing.assert_close(torch.tensor(ours["logprobs"]), torch.tensor(logprobs), rtol=0, atol=1e-4)


def test_seed_makes_sampling_reproducible(generations: dict[str, Run]) -> None:
    first, again = generations["sampled"].json(), generations["sampled_again"].json()

    assert first["token_ids"] == again["token_ids"]
    assert first["logprobs"] == again["logprobs"]
    assert first["token_ids"] != generations["greedy"].json()["token_ids"]  # it really sampled


def test_prompt_text_is_tokenized_with_bos(generations: dict[str, Run]) -> None:
    result = generations["prompt"].json()

    prompt = load_tokenizer(None, 32000).encode(TEXT)
    assert prompt[0] == 1
    assert result["usage"]["prompt_tokens"] == len(prompt)
    assert len(result["token_ids"]) == 2
    assert isinstance(result["text"], str)


def test_chat_file_is_formatted_as_mistral_instruct(generations: dict[str, Run]) -> None:
    result = generations["chat"].json()

    messages = [ChatMessage(m["role"], m["content"]) for m in CHAT]
    assert result["usage"]["prompt_tokens"] == len(load_tokenizer(None, 32000).encode_chat(messages))
    assert len(result["token_ids"]) == 2
    assert result["finish_reason"] == "length"


def test_stop_token_ends_generation_after_it(demo: dict[str, tuple[Run, Path]],
                                             generations: dict[str, Run]) -> None:
    greedy = generations["greedy"].json()["token_ids"]
    assert greedy[2] not in greedy[:2]  # else generation would stop earlier

    run = run_together({"stop": generate(
        demo["sharded"][1], "--token-ids", ",".join(map(str, PROMPT_IDS)), "--temperature", "0",
        "--max-new-tokens", 8, "--stop-token-ids", greedy[2], "--json")})["stop"]

    result = run.json()
    assert result["token_ids"] == greedy[:3]  # the stop token is included
    assert result["finish_reason"] == "stop"
    assert len(result["logprobs"]) == 3


# --- user errors -----------------------------------------------------------------------------------
# Every case runs in-process through `cluster.cli.main` (cheap); a few also run as the real command.


@dataclass(frozen=True)
class ErrorCase:
    """A user mistake: its command line (given a scratch dir and a good model dir) and what stderr names."""

    argv: Callable[[Path, Path], list[object]]
    mentions: Callable[[Path, Path], list[str]]
    never_mentions: tuple[str, ...] = ()


def broken_copy(good: Path, root: Path, name: str, edit: Callable[[Path], None]) -> Path:
    model_dir = Path(shutil.copytree(good, root / name))
    edit(model_dir)
    return model_dir


def truncate_half(model_dir: Path) -> None:
    path = model_dir / SINGLE_FILE
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def edit_tensors(edit: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], None]:
    def apply(model_dir: Path) -> None:
        tensors = load_file(str(model_dir / SINGLE_FILE))
        edit(tensors)
        save_file(tensors, str(model_dir / SINGLE_FILE), metadata={"format": "pt"})
    return apply


def edit_config(**changes: object) -> Callable[[Path], None]:
    def apply(model_dir: Path) -> None:
        raw = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**raw, **changes}))
    return apply


def malformed_chat(root: Path) -> Path:
    path = root / "chat.json"
    path.write_text('[{"role": "user", "content": ')
    return path


ERRORS: dict[str, ErrorCase] = {
    "truncated-safetensors": ErrorCase(
        lambda root, good: generate(broken_copy(good, root, "truncated", truncate_half), "--token-ids", "1"),
        lambda root, _: [str(root / "truncated" / SINGLE_FILE), "truncated"]),
    "missing-tensor": ErrorCase(
        lambda root, good: generate(broken_copy(good, root, "missing", edit_tensors(
            lambda t: t.pop(EXPERT_W2))), "--token-ids", "1"),
        lambda root, _: [EXPERT_W2, str(root / "missing")]),
    "shape-mismatch": ErrorCase(
        lambda root, good: generate(broken_copy(good, root, "shape", edit_tensors(
            lambda t: t.update({Q_PROJ: torch.zeros(32, 64)}))), "--token-ids", "1"),
        lambda root, _: [str(root / "shape" / SINGLE_FILE), Q_PROJ, "[32, 64]", "[64, 64]"]),
    "unsupported-config": ErrorCase(
        lambda root, good: generate(broken_copy(good, root, "gelu", edit_config(hidden_act="gelu")),
                                    "--token-ids", "1"),
        lambda root, _: [str(root / "gelu" / "config.json"), "hidden_act", "gelu"]),
    "missing-model-dir": ErrorCase(
        lambda root, _: generate(root / "no-such-model", "--token-ids", "1"),
        lambda root, _: [str(root / "no-such-model")]),
    "unknown-flag": ErrorCase(
        lambda _, good: [*generate(good, "--token-ids", "1"), "--no-such-flag"],
        lambda *_: ["--no-such-flag"]),
    "token-id-beyond-vocab": ErrorCase(
        lambda _, good: generate(good, "--token-ids", "1,40000"),
        lambda *_: ["40000", "vocabulary"]),
    "malformed-chat": ErrorCase(
        lambda root, good: generate(good, "--chat", malformed_chat(root)),
        lambda root, _: ["--chat", str(root / "chat.json")]),
    "unknown-device": ErrorCase(
        lambda _, good: ["generate", "--model", good, "--device", "nodevice", "--token-ids", "1"],
        lambda *_: ["nodevice"], never_mentions=("corrupt", "copy it again")),
    "cuda-without-cuda": ErrorCase(
        lambda _, good: ["generate", "--model", good, "--device", "cuda", "--token-ids", "1",
                         "--max-new-tokens", 1],
        lambda *_: ["cuda"]),
}
RUN_AS_COMMAND = ("truncated-safetensors", "unknown-flag", "malformed-chat")


@pytest.fixture(scope="module")
def error_argv(hf_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, Path, dict[str, list[str]]]:
    """(scratch dir, good model dir, {case: command line}), broken copies made once."""
    root, good = tmp_path_factory.mktemp("errors"), hf_checkpoint()
    return root, good, {name: list(map(str, case.argv(root, good))) for name, case in ERRORS.items()}


@pytest.fixture(scope="module")
def error_commands(error_argv: tuple[Path, Path, dict[str, list[str]]]) -> dict[str, Run]:
    return run_together({name: error_argv[2][name] for name in RUN_AS_COMMAND})


def assert_one_line_naming(stderr: str, name: str, root: Path, good: Path) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    for text in ERRORS[name].mentions(root, good):
        assert text in lines[0]
    for text in ERRORS[name].never_mentions:
        assert text not in lines[0]


def error_case(name: str) -> Any:
    if name == "cuda-without-cuda":
        return pytest.param(name, marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                           reason="this machine has CUDA"))
    return name


@pytest.mark.parametrize("name", RUN_AS_COMMAND)
def test_command_user_error_is_one_line_with_exit_code_2(
        error_argv: tuple[Path, Path, dict[str, list[str]]], error_commands: dict[str, Run],
        name: str) -> None:
    root, good, _ = error_argv
    run = error_commands[name]

    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    assert_one_line_naming(run.stderr, name, root, good)


@pytest.mark.parametrize("name", [error_case(name) for name in ERRORS])
def test_user_error_is_one_line_naming_the_culprit(
        error_argv: tuple[Path, Path, dict[str, list[str]]], capsys: pytest.CaptureFixture[str],
        name: str) -> None:
    from cluster.cli import main

    root, good, argv = error_argv

    returncode = main(argv[name])

    out, err = capsys.readouterr()
    assert returncode == 2, err
    assert out == ""
    assert_one_line_naming(err, name, root, good)


def test_generate_on_an_embedded_ray_cluster_equals_the_local_run(tiny_checkpoint: Path) -> None:
    # No --ray-address: the command starts its own local Ray instance, 2 expert hosts, and stops them.
    args = ["generate", "--model", str(tiny_checkpoint), "--token-ids", "1,415,5565,302", "--temperature", "0",
            "--max-new-tokens", "6", "--json"]
    local, remote = run_together({"local": args, "cluster": [*args, "--backend", "cluster", "--hosts", "2",
                                                             "--replicas", "2"]}).values()
    assert remote.json()["token_ids"] == local.json()["token_ids"]


def test_a_plan_over_the_host_memory_budget_is_refused_before_anything_starts(tiny_checkpoint: Path,
                                                                               capsys: pytest.CaptureFixture[str]
                                                                               ) -> None:
    from cluster.cli import main

    code = main(["generate", "--model", str(tiny_checkpoint), "--token-ids", "1", "--backend", "cluster",
                 "--hosts", "2", "--host-memory", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "host-0" in err and "more than its memory budget of 100000 bytes" in err


# Imports ray and kubernetes fail in this interpreter, as on a machine that has neither installed.
WITHOUT_RAY = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("ray", "kubernetes"):
            raise ImportError(f"{name} is not installed here")
sys.meta_path.insert(0, Refuse())
from cluster.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_local_backend_and_the_client_commands_run_without_ray(tiny_checkpoint: Path) -> None:
    # A router process with every expert in it (--backend local) and `generate --server` clients need
    # no Ray: Ray is imported only where the cluster backend starts or a controller is reached.
    args = ["generate", "--model", str(tiny_checkpoint), "--token-ids", "1,415,5565,302", "--temperature", "0",
            "--max-new-tokens", "3", "--json"]
    proc = subprocess.run([sys.executable, "-c", WITHOUT_RAY, *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(Run(args, proc.returncode, proc.stdout, proc.stderr).json()["token_ids"]) == 3
    cluster = subprocess.run([sys.executable, "-c", WITHOUT_RAY, *args, "--backend", "cluster"], cwd=REPO,
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert cluster.returncode != 0 and "ray is not installed here" in cluster.stderr
