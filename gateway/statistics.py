"""ModelStatistics from the per-model-version statistics hashes that workers keep."""

from __future__ import annotations

from typing import Any

from broker import keys
from broker.messages import Stat
from ferry.repository import ModelVersion
from protos import grpc_service_pb2 as pb


def _dur(stats: dict[str, int], count: str, ns: str) -> Any:
    return pb.StatisticDuration(count=stats.get(count, 0), ns=stats.get(ns, 0))


def build(mv: ModelVersion, raw: dict[bytes, bytes]) -> Any:
    stats = {k.decode(): int(v) for k, v in raw.items()}
    success = stats.get(Stat.SUCCESS_COUNT, 0)
    infer = pb.InferStatistics(
        success=_dur(stats, Stat.SUCCESS_COUNT, Stat.SUCCESS_NS),
        fail=_dur(stats, Stat.FAIL_COUNT, Stat.FAIL_NS),
        queue=pb.StatisticDuration(count=success, ns=stats.get(Stat.QUEUE_NS, 0)),
        compute_input=pb.StatisticDuration(count=success, ns=stats.get(Stat.COMPUTE_INPUT_NS, 0)),
        compute_infer=pb.StatisticDuration(count=success, ns=stats.get(Stat.COMPUTE_INFER_NS, 0)),
        compute_output=pb.StatisticDuration(count=success, ns=stats.get(Stat.COMPUTE_OUTPUT_NS, 0)),
    )
    sizes = sorted({int(k.split(":")[1]) for k in stats if k.startswith("batch:")})
    batch_stats = []
    for size in sizes:
        n = stats.get(Stat.batch(size, "count"), 0)
        batch_stats.append(pb.InferBatchStatistics(
            batch_size=size,
            compute_input=pb.StatisticDuration(count=n, ns=stats.get(Stat.batch(size, "input_ns"), 0)),
            compute_infer=pb.StatisticDuration(count=n, ns=stats.get(Stat.batch(size, "infer_ns"), 0)),
            compute_output=pb.StatisticDuration(count=n, ns=stats.get(Stat.batch(size, "output_ns"), 0)),
        ))
    return pb.ModelStatistics(
        name=mv.name,
        version=str(mv.version),
        last_inference=stats.get(Stat.LAST_INFERENCE_MS, 0),
        inference_count=stats.get(Stat.INFERENCE_COUNT, 0),
        execution_count=stats.get(Stat.EXECUTION_COUNT, 0),
        inference_stats=infer,
        batch_stats=batch_stats,
    )


async def collect(redis: Any, versions: list[ModelVersion]) -> Any:
    pipe = redis.pipeline(transaction=False)
    for mv in versions:
        pipe.hgetall(keys.stats_hash(mv.name, mv.version))
    raws = await pipe.execute()
    return pb.ModelStatisticsResponse(model_stats=[build(mv, raw) for mv, raw in zip(versions, raws, strict=True)])
