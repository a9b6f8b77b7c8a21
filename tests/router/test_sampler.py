"""Sampling: truncation, temperature and seeds."""

from __future__ import annotations

import pytest
import torch

from router.sampler import SamplingParams, _sample_on_device, new_generator, sample

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def draw(params: SamplingParams, n: int = 4000) -> torch.Tensor:
    g = new_generator(params.seed)
    tokens = [sample(LOGITS, [params], [g])[0][0] for _ in range(n)]
    return torch.bincount(torch.tensor(tokens), minlength=4).float() / n


def test_temperature_one_samples_the_model_distribution() -> None:
    freq = draw(SamplingParams(seed=1))
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.25, 0.15, 0.1]), atol=0.03, rtol=0)


def test_top_k_keeps_only_the_k_most_likely_renormalised() -> None:
    freq = draw(SamplingParams(seed=2, top_k=2))
    torch.testing.assert_close(freq, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.03, rtol=0)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    freq = draw(SamplingParams(seed=3, top_p=0.7))  # 0.5 + 0.25 reaches 0.7
    torch.testing.assert_close(freq, torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=0.03, rtol=0)


def test_low_temperature_sharpens() -> None:
    assert draw(SamplingParams(seed=4, temperature=0.2))[0] > 0.95


def test_logprob_is_under_the_model_not_the_tempered_distribution() -> None:
    _, logprobs = sample(LOGITS, [SamplingParams(temperature=0.0)], [new_generator(0)])
    assert logprobs[0] == pytest.approx(float(torch.log(torch.tensor(0.5))), abs=1e-6)


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0),
                                 dict(max_new_tokens=0)])
def test_invalid_parameters_are_refused_naming_the_field(bad: dict[str, float]) -> None:
    (field,) = bad
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)


def test_the_gpu_path_picks_the_host_paths_tokens_and_logprobs() -> None:
    # `sample` of logits on a GPU finds greedy rows there and copies back only the rows that sample at random;
    # run here on CPU tensors, it must give what the host path gives: greedy and seeded rows alike.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 32000, generator=g) * 3
    params = [SamplingParams(temperature=0.0), SamplingParams(seed=7), SamplingParams(top_k=1),
              SamplingParams(seed=8, top_p=0.5, temperature=0.7), SamplingParams(temperature=0.0),
              SamplingParams(seed=9, top_k=40)]
    host = sample(logits, params, [new_generator(p.seed) for p in params])
    device = _sample_on_device(logits, params, [new_generator(p.seed) for p in params])
    assert device[0] == host[0]
    torch.testing.assert_close(torch.tensor(device[1]), torch.tensor(host[1]), atol=1e-5, rtol=0)
    assert all(isinstance(t, int) for t in device[0])
