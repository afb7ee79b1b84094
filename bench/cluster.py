"""Ray orchestration cost: actor start-up and per-step overhead, against a plain single-process run; and
the weight transfer to a separate engine, torch.distributed broadcast against Ray's object store.

    .venv/bin/python bench/cluster.py [--steps 4] [--num-cpus 4]
    .venv/bin/python bench/cluster.py --model /models/Qwen2.5-0.5B-Instruct --gpu   # on a GPU machine
    .venv/bin/python bench/cluster.py --transport [--pushes 3] [--bucket-mib 512]   # weight transfer, 0.5B shape

``--transport``: this process is the feeding rank of a Qwen2.5-0.5B-shaped Megatron model (TP=1, fp32 on
CPU, random weights; on GPU bf16) and one separate engine actor hosts a vLLM engine of the same shape
(dummy weights, ``cpu_gemm='plain'``: a push copies in place). Two proxies reach the same actor: one with a
weight-transfer group (gloo on CPU, NCCL on GPU), one through Ray's object store (the older path). Pushes
alternate between them (each after an "optimizer step" that changes every parameter), so both see the
same machine load; the first push of each is a warm-up. Printed: push seconds (median) of each, their
ratio, and the memory-copy floor of the same bytes measured right after each push.

Two runs of the same GRPO steps (tiny 1-layer model on CPU by default, 2 prompts x 2 responses):

* baseline: ``megatron-rl train`` in one process, no Ray, TP=1, colocated vLLM engine;
* Ray: ``megatron_rl.cluster.launch`` with 2 trainer-rank actors (TP=2) and a separate vLLM engine actor.

Per step, the orchestration overhead is ``time/step_s`` minus the phases the loop times itself
(``time/generate_s``, ``time/score_s``, ``time/logprob_s``, ``time/update_s``, ``time/sync_s``: every
``time/*`` key but the step and checkpoint); the first step (warm-up) is left out. Printed: start-up
seconds of the Ray run (joining Ray, the placement group, the trainer actors up to their first
answer), the start of one engine actor (process, imports, model load: ``connect_engine``), and the
mean overhead per step of both runs with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = ["model.tiny_layers=1", "data.builtin_num_train=32", "data.builtin_num_test=4", "data.batch_size=2",
        "rollout.n=2", "rollout.max_response_length=8", "rollout.kv_cache_gib=0.25", "algorithm.micro_batch_size=4",
        "trainer.sft_warmup_steps=0", "trainer.test_freq=0", "trainer.export_hf=false", "trainer.progress_bar=false",
        "trainer.save_freq=0"]
PHASE_EXCLUDED = ("time/step_s", "time/checkpoint_s")


def step_times(metrics_file: Path) -> dict[str, list[float]]:
    """Per logged step after the first: 'overhead' (time/step_s minus the timed phases), 'step', 'generate',
    'sync' seconds."""
    out: dict[str, list[float]] = {"overhead": [], "step": [], "generate": [], "sync": []}
    for line in metrics_file.read_text().splitlines()[1:]:
        metrics = json.loads(line)
        phases = sum(v for k, v in metrics.items() if k.startswith("time/") and k not in PHASE_EXCLUDED)
        out["overhead"].append(metrics["time/step_s"] - phases)
        for key in ("step", "generate", "sync"):
            out[key].append(metrics[f"time/{key}_s"])
    return out


def baseline_run(run_dir: Path, overrides: list[str]) -> dict[str, list[float]]:
    subprocess.run([sys.executable, "-m", "megatron_rl.cli", "train", str(REPO / "examples" / "quickstart.yaml"),
                    *overrides, f"trainer.output_dir={run_dir}"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return step_times(run_dir / "metrics.jsonl")


def ray_run(run_dir: Path, overrides: list[str]) -> tuple[dict[str, float], dict[str, list[float]], float]:
    """(launch start-up seconds, per-step times, seconds to start one engine actor)."""
    import ray

    from megatron_rl.cluster.engine import connect_engine
    from megatron_rl.cluster.launch import launch
    from megatron_rl.config import load_config

    cfg = load_config(REPO / "examples" / "quickstart.yaml", [*overrides, f"trainer.output_dir={run_dir}"])
    result = launch(cfg)
    start = time.perf_counter()
    engine = connect_engine(cfg, run_dir / "tiny_model" if cfg.model.path == "tiny" else cfg.model.path)
    engine_start = time.perf_counter() - start
    engine.close()
    ray.shutdown()
    return result.startup_s, step_times(run_dir / "metrics.jsonl"), engine_start


def transport_run(args: argparse.Namespace) -> None:
    """Separate-engine weight sync, broadcast vs object store, on one engine actor (see the module doc)."""
    import ray
    import torch
    from ray import cloudpickle
    from transformers import AutoConfig

    sys.path.insert(0, str(REPO / "bench"))
    from weight_sync import QWEN2_05B, CopyFloor, make_model_dir  # noqa: E402 (bench/ is no package)

    from megatron_rl.cluster.config import ClusterConfig
    from megatron_rl.cluster.engine import EngineActor, RemoteEngine, _join_transfer
    from megatron_rl.megatron.model import build_gpt_model
    from megatron_rl.megatron.parallel import destroy_parallel, init_parallel
    from megatron_rl.weight_sync import WeightSync

    class DummyWeightsEngineActor(EngineActor):
        """EngineActor around a vLLM engine with dummy weights (no checkpoint to read)."""

        def __init__(self, model_dir: str, dtype: str) -> None:  # noqa: D107
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
            from megatron_rl.rollout.vllm_engine import VLLMEngine

            kwargs = {"gpu_memory_utilization": 0.4} if torch.cuda.is_available() else \
                {"kv_cache_memory_bytes": 256 << 20, "cpu_gemm": "plain"}
            self.engine = VLLMEngine(model_dir, dtype=dtype, max_model_len=512, seed=0, load_format="dummy", **kwargs)
            self.transfer = self.receiver = None
            self._outgoing = []

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    gpu = args.gpu and torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp), QWEN2_05B)
        init_parallel(tp=1)
        dtype = torch.bfloat16 if gpu else torch.float32
        hf_config = AutoConfig.from_pretrained(model_dir)
        model = build_gpt_model(hf_config, params_dtype=dtype)
        sync = WeightSync(model, hf_config, bucket_bytes=args.bucket_mib << 20, dtype=dtype)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, namespace="bench-transport", log_to_driver=False)
        cluster = ClusterConfig(engine_call_timeout_s=1800.0, engine_start_timeout_s=1800.0)
        start = time.perf_counter()
        actor = ray.remote(DummyWeightsEngineActor).options(num_cpus=1, num_gpus=1 if gpu else 0).remote(
            str(model_dir), str(dtype).removeprefix("torch."))
        node_ip = ray.get(actor.node_ip.remote())
        engine_start = time.perf_counter() - start
        engines = {"broadcast": RemoteEngine(actor, name="bench", node_ip=node_ip, call_timeout_s=1800.0,
                                             transfer=_join_transfer(actor, name="bench", node_ip=node_ip,
                                                                     cluster=cluster)),
                   "object_store": RemoteEngine(actor, name="bench", node_ip=node_ip, call_timeout_s=1800.0)}
        floor = CopyFloor(sync.plan.num_bytes, sync.device)
        times: dict[str, list[float]] = {name: [] for name in engines}
        floors: list[float] = []
        for step in range(args.pushes + 1):
            for name, engine in engines.items():
                with torch.no_grad():  # the optimizer step: every parameter changes in place
                    for param in model.parameters():
                        param.add_(1e-3)
                stats = sync.push(engine)
                if step:  # step 0 is the warm-up of both
                    times[name].append(stats["seconds"])
                    floors.append(floor.seconds())
        if args.check:
            sync.check(engines["broadcast"])
        engines["broadcast"].close()
        ray.shutdown()
        destroy_parallel()
    gib = sync.plan.num_bytes / (1 << 30)
    print(f"\nseparate-engine weight sync, Qwen2.5-0.5B shape ({gib:.2f} GiB {str(dtype).removeprefix('torch.')}, "
          f"{len(sync.plan.buckets)} buckets of <= {args.bucket_mib} MiB, {'GPU' if gpu else 'CPU'}); engine actor "
          f"start {engine_start:.1f} s; median of {args.pushes} pushes each, alternating:")
    for name, values in times.items():
        print(f"  {name:<13} {statistics.median(values):7.3f} s  ({gib / statistics.median(values):.2f} GiB/s; "
              f"pushes {', '.join(f'{v:.3f}' for v in values)})")
    ratio = statistics.median(times["object_store"]) / statistics.median(times["broadcast"])
    print(f"  copy floor    {statistics.median(floors):7.3f} s  (one memcpy of the same bytes)")
    print(f"object store / broadcast: {ratio:.2f}x" + (" (engine weights checked equal)" if args.check else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", action="store_true", help="weight transfer to a separate engine, broadcast "
                        "vs object store (0.5B shape)")
    parser.add_argument("--pushes", type=int, default=3, help="--transport: timed pushes per transport")
    parser.add_argument("--bucket-mib", type=int, default=512, help="--transport: weight-sync bucket size")
    parser.add_argument("--check", action="store_true", help="--transport: check the engine weights at the end")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--model", default="tiny", help="HF model directory (default: the tiny model)")
    parser.add_argument("--gpu", action="store_true", help="trainer ranks and engine on GPUs")
    args = parser.parse_args()
    if args.transport:
        transport_run(args)
        return
    common = [*TINY, f"model.path={args.model}", f"trainer.total_steps={args.steps}"]
    ray_overrides = [*common, "parallel.tp=2", "cluster.num_trainers=2", "rollout.mode=separate",
                     f"cluster.local_num_cpus={args.num_cpus}", f"cluster.device={'gpu' if args.gpu else 'cpu'}"]
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        base = baseline_run(Path(tmp) / "baseline", common)
        startup, ray_steps, engine_start = ray_run(Path(tmp) / "ray", ray_overrides)
    print("\nRay start-up (s): " + ", ".join(f"{k} {v:.2f}" for k, v in startup.items() if k != "train"))
    print(f"engine actor start (s, connect_engine: process + imports + model load): {engine_start:.2f}")
    print(f"mean seconds per step over steps 2..{args.steps}:")
    print(f"{'run':<36}{'overhead':>10}{'step':>9}{'generate':>10}{'sync':>9}")
    for name, times in (("baseline: 1 process, colocated", base), ("Ray: 2 rank actors + engine actor", ray_steps)):
        print(f"{name:<36}" + "".join(f"{statistics.mean(times[k]):>{w}.4f}"
                                      for k, w in (("overhead", 10), ("step", 9), ("generate", 10), ("sync", 9))))
    base_mean, ray_mean = statistics.mean(base["overhead"]), statistics.mean(ray_steps["overhead"])
    print(f"overhead ratio Ray / baseline: {ray_mean / base_mean:.2f}x (difference {ray_mean - base_mean:+.4f} s "
          f"per step); step time ratio {statistics.mean(ray_steps['step']) / statistics.mean(base['step']):.2f}x")

if __name__ == "__main__":
    main()
