"""TransformersEngine (the fallback without vLLM) with the tiny fp32 Qwen2: the same checks as
the vLLM engine's, against a separately loaded transformers model."""

from __future__ import annotations

import pytest
import torch
from rollout_reference import (
    LOGPROB_ATOL,
    PROMPTS,
    STOP_IDS,
    check_renormalised_logprobs,
    checkpoint_weights,
    eos_heavy_weights,
    hf_model,
    max_logprob_error,
)

from megatron_rl.rollout import RolloutEngine, SamplingConfig
from megatron_rl.rollout.hf_engine import TransformersEngine


@pytest.fixture(scope="module")
def engine(tiny_dir):
    engine = TransformersEngine(tiny_dir)
    yield engine
    engine.close()


def test_is_a_rollout_engine(engine: TransformersEngine) -> None:
    assert isinstance(engine, RolloutEngine)
    assert engine.eos_token_ids == frozenset(STOP_IDS)
    engine.sleep()
    engine.wake_up()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_samples_and_logprobs_match_teacher_forced_forward(engine, reference, temperature: float) -> None:
    rng_state = torch.get_rng_state()
    rollouts = engine.generate(PROMPTS, SamplingConfig(n=3, temperature=temperature, max_tokens=10, seed=1))
    assert torch.equal(torch.get_rng_state(), rng_state)  # seeded runs leave the global RNG alone

    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, j) for i in range(3) for j in range(3)]
    for r in rollouts:
        assert 1 <= len(r.token_ids) <= 10
        assert r.finish_reason == ("stop" if r.token_ids[-1] in STOP_IDS else "length")
        assert r.finish_reason == "stop" or len(r.token_ids) == 10
        assert r.text == engine.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    assert len({r.token_ids for r in rollouts if r.prompt_index == 0}) == 3

    error = max_logprob_error(reference, PROMPTS, rollouts, temperature)
    print(f"transformers generate vs teacher-forced, T={temperature}: max |logprob diff| = {error:.2e}")
    assert error < LOGPROB_ATOL


@pytest.mark.parametrize(("top_k", "top_p"), [(20, 1.0), (-1, 0.9), (50, 0.8)])
def test_logprobs_are_renormalised_over_top_k_top_p(engine, reference, top_k: int, top_p: float) -> None:
    check_renormalised_logprobs(engine, reference, PROMPTS, top_k=top_k, top_p=top_p)


def test_same_seed_same_rollouts(engine: TransformersEngine) -> None:
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=123)
    assert engine.generate(PROMPTS[:2], sampling) == engine.generate(PROMPTS[:2], sampling)


GREEDY = [SamplingConfig(temperature=0.0, max_tokens=12), SamplingConfig(top_k=1, max_tokens=12)]


@pytest.mark.parametrize("sampling", GREEDY, ids=["temperature0", "top_k1"])
def test_greedy_equals_transformers_greedy(engine, reference, sampling: SamplingConfig) -> None:
    rollouts = engine.generate(PROMPTS, sampling)
    for prompt, rollout in zip(PROMPTS, rollouts, strict=True):
        out = reference.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=list(STOP_IDS),
            pad_token_id=STOP_IDS[0],
        )
        assert rollout.token_ids == tuple(out[0, len(prompt):].tolist())
    if sampling.temperature == 0.0:
        assert max_logprob_error(reference, PROMPTS, rollouts, 1.0) < LOGPROB_ATOL
    else:
        assert all(lp == 0.0 for r in rollouts for lp in r.logprobs)


def test_load_weights_in_place_then_back(engine, reference, tiny_dir, other_dir) -> None:
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=5)
    engine.load_weights(checkpoint_weights(other_dir))
    rollouts = engine.generate(PROMPTS, sampling)
    assert max_logprob_error(hf_model(other_dir), PROMPTS, rollouts, 1.0) < LOGPROB_ATOL
    assert max_logprob_error(reference, PROMPTS, rollouts, 1.0) > 0.1
    engine.load_weights(checkpoint_weights(tiny_dir))
    rollouts = engine.generate(PROMPTS, sampling)
    assert max_logprob_error(reference, PROMPTS, rollouts, 1.0) < LOGPROB_ATOL


def test_load_weights_names_unknown_and_misshapen_tensors(engine: TransformersEngine) -> None:
    with pytest.raises(KeyError, match="model.layers.9.mlp.up_proj.weight"):
        engine.load_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\)"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])


def test_stops_on_eos(engine, tiny_dir) -> None:
    weights = eos_heavy_weights(tiny_dir)
    engine.load_weights(weights)
    try:
        rollouts = engine.generate(PROMPTS, SamplingConfig(n=8, temperature=1.0, max_tokens=6, seed=0))
    finally:
        engine.load_weights(checkpoint_weights(tiny_dir))
    assert {r.finish_reason for r in rollouts} == {"stop", "length"}
    for r in rollouts:
        assert (r.finish_reason == "stop") == (r.token_ids[-1] in STOP_IDS)
        assert all(t not in STOP_IDS for t in r.token_ids[:-1])
    assert max_logprob_error(hf_model(tiny_dir, weights), PROMPTS, rollouts, 1.0) < LOGPROB_ATOL
