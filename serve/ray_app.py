"""The same server as a Ray Serve application: N replicas, each the FastAPI
app of `create_app` with its own session(s), behind Ray's HTTP proxy, so a
fleet's camera traffic spreads over a cluster with Ray's own routing,
autoscaling and health checks.

    vlm-serve ARTIFACT --ray --replicas 4                  # on a running Ray cluster
    serve run vlmedge.serve.ray_app:app artifact=/models/demo-onnx-fp32 replicas=4

The artifact path must exist on every node (a shared volume, or the same
path baked into the image); each replica verifies it as any session does.
"""
from __future__ import annotations

from typing import Any

from vlmedge.lazy import require


def application(artifact: str, replicas: int = 2, cpus_per_replica: float = 1.0,
                **options: Any):
    """A Ray Serve Application of `replicas` copies of the app; `options` are
    ServeOptions fields (workers per replica, queue size, API key, ...)."""
    serve = require("ray.serve", "vlm-serve --ray (pip install 'ray[serve]')")
    artifact = str(artifact)

    def build():  # runs in each replica: its own sessions, queue and metrics
        from vlmedge.serve.app import create_app
        return create_app(artifact, **options)

    @serve.deployment(name="vlmedge", num_replicas=int(replicas),
                      ray_actor_options={"num_cpus": float(cpus_per_replica)},
                      health_check_period_s=10)
    @serve.ingress(build)
    class VLMEdge:
        pass

    return VLMEdge.bind()


def app(args: dict[str, str]):
    """`serve run vlmedge.serve.ray_app:app artifact=PATH replicas=N workers=W`."""
    known = {"artifact", "replicas", "workers", "queue_size", "api_key", "cpus_per_replica"}
    unknown = set(args) - known
    if unknown or "artifact" not in args:
        from vlmedge.errors import UserInputError
        raise UserInputError("serve run arguments", expected=f"artifact=PATH and any of "
                             f"{sorted(known - {'artifact'})}", got=sorted(args))
    opts: dict[str, Any] = {}
    for k in ("workers", "queue_size"):
        if k in args:
            opts[k] = int(args[k])
    if "api_key" in args:
        opts["api_key"] = args["api_key"]
    return application(args["artifact"], int(args.get("replicas", 2)),
                       float(args.get("cpus_per_replica", 1.0)), **opts)
