"""Load files and the offline measurement: the rows counted are the gate's real choices (transformers' router)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.cli import main
from cluster.deploy import LocalConfig
from cluster.load import (
    ExpertLoad,
    LoadFileError,
    MeasureConfig,
    Prompt,
    load_from_counter,
    measure_load,
    read_prompts,
    zipf_load,
)
from router.expert_load import CountingExperts
from router.tokenizer import ChatMessage

PROMPTS = [(1, 100, 200, 300), (1, 7, 8, 9, 10, 11, 12), (1, 31999), tuple(range(1, 40))]


def test_a_load_file_round_trips_in_the_documented_format(tmp_path: Path) -> None:
    load = ExpertLoad(((3, 1), (2, 2)), window_s=1.5, tokens=2, experts_per_token=2)
    load.save(tmp_path / "load.json")

    raw = json.loads((tmp_path / "load.json").read_text())

    assert raw == {"layers": 2, "experts": 2, "load": [[3, 1], [2, 2]], "window_s": 1.5, "tokens": 2,
                   "experts_per_token": 2, "source": "offline"}
    assert ExpertLoad.read(tmp_path / "load.json") == load


def test_a_live_style_file_with_only_the_issue_fields_reads() -> None:
    load = ExpertLoad.from_json('{"layers": 1, "experts": 2, "load": [[6.0, 2.0]], "window_s": 60, "tokens": 4,'
                                ' "extra": "ignored"}')
    assert load.rows == ((6.0, 2.0),) and load.token_count() == 4 and load.rows_per_token() == 2


@pytest.mark.parametrize(("text", "message"), [
    ('{"layers": 2, "experts": 2, "load": [[1, 2]]}', "declares 2 layers x 2 experts but its load is 1 x 2"),
    ('{"layers": 2, "experts": 2, "load": [[1, 2], [3]]}', "same number of experts"),
    ('{"layers": 1, "experts": 2, "load": [[1, -2]]}', "must not be negative"),
    ('{"layers": 1, "experts": 2, "load": [[1, true]]}', "not a number"),
    ('{"layers": 1, "experts": 2}', "not a load file"),
    ("[1, 2]", "not a load file"),
    ("not json", "not a load file"),
])
def test_a_malformed_load_file_is_refused(text: str, message: str) -> None:
    with pytest.raises(LoadFileError, match=message):
        ExpertLoad.from_json(text)


def test_a_counter_becomes_a_load_as_a_live_export_would_make_it() -> None:
    def experts(layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return hidden

    counter = CountingExperts(experts, num_layers=2, num_experts=3)  # type: ignore[arg-type]
    counter(0, torch.zeros(2, 4), torch.tensor([[0, 2], [2, 1]]), torch.ones(2, 2))
    counter(1, torch.zeros(2, 4), torch.tensor([[1, 0], [1, 2]]), torch.ones(2, 2))

    load = load_from_counter(counter, top_k=2, window_s=1.23456, source="live")

    assert load == ExpertLoad(((1, 1, 2), (1, 2, 1)), 1.2346, tokens=2, experts_per_token=2, source="live")


def test_token_count_needs_tokens_or_top_k() -> None:
    assert ExpertLoad(((4, 2),), experts_per_token=2).token_count() == 3
    with pytest.raises(LoadFileError, match="neither tokens nor experts_per_token"):
        ExpertLoad(((4, 2),)).token_count()


def test_zipf_load_docstring_example_and_exact_sums() -> None:
    assert zipf_load(2, 2, tokens=3, s=1.0, top_k=1).rows == ((2, 1), (1, 2))
    load = zipf_load(32, 8, tokens=4096)
    assert all(sum(rows) == 4096 * 2 for rows in load.rows)
    assert [rows.index(max(rows)) for rows in load.rows[:9]] == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    assert max(load.rows[0]) / sum(load.rows[0]) == pytest.approx(0.4286, abs=1e-3)


def test_prompt_files_take_text_token_ids_and_chats(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"token_ids": [1, 2], "max_new_tokens": 3}\n'
                    '{"messages": [{"role": "user", "content": "hi"}]}\n')

    assert read_prompts(path) == [Prompt(text="hi"), Prompt(token_ids=(1, 2), max_new_tokens=3),
                                  Prompt(messages=(ChatMessage(role="user", content="hi"),))]


@pytest.mark.parametrize(("text", "message"), [
    ('{"prompt": "a"}\n{"prompt": "b", "token_ids": [1]}', r"p.jsonl:2: each line needs exactly one"),
    ('{"token_ids": [1], "max_new_tokens": 0}', r"p.jsonl:1: max_new_tokens=0 must be a positive integer"),
    ("not json", r"p.jsonl:1:"),
    ('{"messages": [{"role": "user"}]}', r"p.jsonl:1: 'content'"),
    ("\n\n", "no prompts"),
])
def test_a_malformed_prompt_file_names_the_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "p.jsonl").write_text(text)
    with pytest.raises(LoadFileError, match=message):
        read_prompts(tmp_path / "p.jsonl")


def oracle_rows(checkpoint: Path, prompts: list[tuple[int, ...]]) -> list[list[int]]:
    """Rows per (layer, expert) from transformers' own router logits: top-2 of each token, counted."""
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    counts = torch.zeros(model.config.num_hidden_layers, model.config.num_local_experts, dtype=torch.int64)
    with torch.no_grad():
        for ids in prompts:
            logits = model(torch.tensor([ids]), output_router_logits=True).router_logits  # per layer [T, E]
            for layer, layer_logits in enumerate(logits):
                chosen = torch.topk(layer_logits, model.config.num_experts_per_tok, dim=-1).indices
                counts[layer] += torch.bincount(chosen.reshape(-1), minlength=counts.shape[1])
    return [[int(v) for v in row] for row in counts]


def test_offline_load_counts_the_gate_choices_of_the_reference_model(tiny_checkpoint: Path) -> None:
    cfg = MeasureConfig(LocalConfig(tiny_checkpoint, dtype="float32", device="cpu"))

    load = measure_load([Prompt(token_ids=p) for p in PROMPTS], cfg)

    assert [list(r) for r in load.rows] == oracle_rows(tiny_checkpoint, PROMPTS)
    assert load.tokens == sum(map(len, PROMPTS)) and load.experts_per_token == 2
    assert all(sum(rows) == load.tokens * 2 for rows in load.rows)
    assert load.window_s is not None and load.window_s > 0 and load.source == "offline"


def test_decoded_tokens_are_counted_and_batching_does_not_change_the_counts(tiny_checkpoint: Path) -> None:
    prompts = [Prompt(token_ids=p, max_new_tokens=n) for p, n in zip(PROMPTS, (3, 1, 5, 2))]
    local = LocalConfig(tiny_checkpoint, dtype="float32", device="cpu")

    together = measure_load(prompts, MeasureConfig(local, batch_size=8))
    one_by_one = measure_load(prompts, MeasureConfig(local, batch_size=1))

    assert together.tokens == sum(map(len, PROMPTS)) + (2 + 0 + 4 + 1)  # the last token is sampled, not fed
    assert together.rows == one_by_one.rows


def test_load_command_writes_the_file(tiny_checkpoint: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"token_ids": list(p)}) + "\n" for p in PROMPTS)
                       + '{"prompt": "Mixtral routes each token to two experts."}\n')
    argv = ["load", "--model", tiny_checkpoint, "--prompts", prompts, "--out", tmp_path / "load.json",
            "--dtype", "float32", "--device", "cpu"]

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()

    assert code == 0 and out == "", err
    load = ExpertLoad.read(tmp_path / "load.json")
    assert (load.num_layers, load.num_experts) == (2, 4) and load.tokens is not None
    assert load.tokens > sum(map(len, PROMPTS))  # the text prompt was tokenized and counted too
    assert f"wrote {tmp_path / 'load.json'}: 2 layers x 4 experts, {load.tokens} tokens" in err


def test_load_command_bad_prompt_file_is_one_line_and_exit_2(tiny_checkpoint: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    argv = ["load", "--model", tiny_checkpoint, "--prompts", tmp_path / "prompts.jsonl", "--out", tmp_path / "l"]

    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()

    assert code == 2 and len(err.splitlines()) == 1 and "prompts.jsonl:2:" in err, err
    assert not (tmp_path / "l").exists()
