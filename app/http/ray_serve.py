"""`vae serve --ray`: the same FastAPI app (app.http.app.create_app) as a Ray Serve deployment.

Each replica builds the app itself from the settings (`serve.ingress` with a builder function:
the models load on the replica's own device instead of being pickled from the driver) and runs
its lifespan, so warm-up and /readyz behave as under uvicorn. Ray Serve adds replicas,
autoscaling between --min-replicas and --max-replicas, and per-replica CPUs / GPUs.

From a Serve config file (`serve run config.yaml`), use the application builder:
    import_path: app.http.ray_serve:app_builder
    args: {models: ["default=/models/vae"], device: cuda, num_gpus: 1, max_replicas: 4}
"""

from __future__ import annotations

import argparse
import sys

from app.http.settings import Settings

# Deployment options taken from `vae serve` flags or `serve run` args (the rest are Settings).
RAY_KEYS = ("ray_address", "replicas", "min_replicas", "max_replicas", "num_cpus", "num_gpus", "target_ongoing_requests")


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve (pip install 'sd-vae-service[ray]')")
    g.add_argument("--ray", action="store_true", help="deploy with Ray Serve instead of uvicorn")
    g.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray)")
    g.add_argument("--replicas", type=int, default=1, help="replicas (fixed; default 1)")
    g.add_argument("--min-replicas", type=int, help="autoscaling lower bound (with --max-replicas)")
    g.add_argument("--max-replicas", type=int, help="autoscaling upper bound: enables autoscaling")
    g.add_argument("--target-ongoing-requests", type=float, default=2.0, help="autoscaling target per replica")
    g.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    g.add_argument("--num-gpus", type=float, help="GPUs per replica (default 1 with --device cuda, else 0)")


def deployment_options(opts: dict, device: str) -> dict:
    """Ray Serve deployment options: replicas or autoscaling, and each replica's CPUs / GPUs."""
    num_gpus = opts.get("num_gpus")
    if num_gpus is None:
        num_gpus = 1 if str(device).startswith("cuda") else 0
    options: dict = {
        "name": "vae",
        "ray_actor_options": {"num_cpus": opts.get("num_cpus", 1.0), "num_gpus": num_gpus},
    }
    if opts.get("max_replicas"):
        options["autoscaling_config"] = {
            "min_replicas": opts.get("min_replicas") or 1,
            "max_replicas": opts["max_replicas"],
            "target_ongoing_requests": opts.get("target_ongoing_requests", 2.0),
        }
    else:
        options["num_replicas"] = opts.get("replicas", 1)
    return options


def build_application(settings: Settings, opts: dict):
    """A bound Ray Serve application serving `create_app(settings)` on every replica."""
    from ray import serve

    values = settings.model_dump()

    def build_app():  # runs on each replica: loads that replica's models
        from app.http.app import create_app
        from app.http.settings import Settings

        return create_app(Settings(**values))

    deployment = serve.deployment(serve.ingress(build_app)())
    return deployment.options(**deployment_options(opts, settings.device)).bind()


def app_builder(args: dict):
    """`serve run` entry point: `args` holds Settings fields plus the deployment keys of RAY_KEYS."""
    args = dict(args)
    opts = {k: args.pop(k) for k in RAY_KEYS if k in args}
    return build_application(Settings(**args), opts)


def run(settings: Settings, args: argparse.Namespace) -> int:
    """Start (or join) Ray, deploy, and block until interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print("vae serve: error: --ray needs Ray: pip install 'sd-vae-service[ray]'", file=sys.stderr)
        return 2
    opts = {k: getattr(args, k, None) for k in RAY_KEYS}
    opts = {k: v for k, v in opts.items() if v is not None}
    ray.init(address=opts.get("ray_address"), include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    print(f"vae serve: Ray Serve on http://{settings.host}:{settings.port} "
          f"({deployment_options(opts, settings.device)})", file=sys.stderr)
    try:
        serve.run(build_application(settings, opts), name="vae", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
