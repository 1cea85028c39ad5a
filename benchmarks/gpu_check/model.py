"""Section `model` (and `compile`): in-process encode/decode timings of every variant, a CUDA
graph of the eager model, torch.compile with and without CUDA graphs; one row per timing."""

from __future__ import annotations

import time

from benchmarks.gpu_check.timing import Budget, _sync, time_fn
from benchmarks.gpu_check.variants import _build, _error, _inputs, _op_fn, _variants


class ModelBench:
    """In-process timings: `eager()` (eager variants, CUDA graphs) first; `compile()` later, with
    whatever time is left after the other sections. Rows go to one shared result dict."""

    def __init__(self, base, args, budget: Budget, log):
        import torch

        self.base, self.args, self.budget, self.log = base, args, budget, log
        self.device, self.cuda = args.device, args.device.startswith("cuda")
        self.ops = ["decode", "encode"]
        q = args.quick
        self.timing = dict(warmup=1 if q else 3, min_runs=2 if q else 10, min_seconds=0.0 if q else 1.0)
        self.refs: dict = {}
        flags = {}
        if self.cuda:
            flags = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                     "matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn.benchmark": torch.backends.cudnn.benchmark}
        self.result = {"rows": [], "notes": [], "flags": flags, "half_for_fast_paths": None}
        self.on_row = lambda: None  # main() writes the files after every row: a killed run keeps them

    def _references(self):
        """Strict float32 (no TF32) outputs, one per op and size."""
        import torch

        with torch.inference_mode():
            ref_model = _build(self.base, "float32", False, self.device)
            if self.cuda:
                tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
                torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            try:
                for op in self.ops:
                    for size in self.args.sizes:
                        x = _inputs(op, size, self.device, torch.float32, False)[0]
                        self.refs[(op, size)] = _op_fn(ref_model, op)(x).float()
            finally:
                if self.cuda:
                    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
            del ref_model

    def record(self, variant: str, op: str, size: int, fn, inputs, extra: dict | None = None) -> dict:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        k = [0]

        def call():
            k[0] += 1
            return fn(inputs[k[0] % len(inputs)])

        with torch.inference_mode():
            t = time_fn(call, self.device, **self.timing)
            out = fn(inputs[0]).clone()
            _sync(self.device)
        row = {"variant": variant, "op": op, "size": size, **t, **_error(out, self.refs[(op, size)]), **(extra or {})}
        if self.cuda:
            row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        self.result["rows"].append(row)
        self.on_row()
        self.log(f"model {variant:>24} {op} {size}: {row['median_ms']:.2f} ms (min {row['min_ms']:.2f}), "
                 f"rel err {row['rel_l2']}")
        return row

    @property
    def half(self) -> tuple[str, str]:
        tag = self.result["half_for_fast_paths"] or "bf16-cl"
        return tag, {"fp16-cl": "float16"}.get(tag, "bfloat16")

    def eager(self) -> dict:
        import torch

        self._references()
        notes = self.result["notes"]
        for v in _variants(self.device, self.args.quick):
            if not self.budget.allows(20):
                notes.append(f"{v['name']}: skipped, time budget")
                continue
            with torch.inference_mode():
                vae = _build(self.base, v["dtype"], v["cl"], self.device)
            for op in self.ops:
                for size in self.args.sizes:
                    self.record(v["name"], op, size, _op_fn(vae, op), _inputs(op, size, self.device, vae.dtype, v["cl"]))
            del vae
            if self.cuda:
                torch.cuda.empty_cache()
        # the faster half-precision channels_last variant at the largest decode carries on
        self.result["half_for_fast_paths"] = _best_half(self.result["rows"])
        tag, hd = self.half
        if self.cuda and not self.args.skip_cudagraph:  # a CUDA graph of the eager model
            with torch.inference_mode():
                vae = _build(self.base, hd, True, self.device)
            for op in self.ops:
                for size in self.args.sizes:
                    if not self.budget.allows(15):
                        notes.append(f"{tag}+cudagraph {op} {size}: skipped, time budget")
                        continue
                    try:
                        fn = _graphed(_op_fn(vae, op), _inputs(op, size, self.device, vae.dtype, True)[0])
                        self.record(f"{tag}+cudagraph", op, size, fn, [None])
                    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                        notes.append(f"{tag}+cudagraph {op} {size}: {type(exc).__name__}: {str(exc)[:200]}")
            del vae
            torch.cuda.empty_cache()
        return self.result

    def compile(self) -> dict:
        """torch.compile (decoder first: the goals), then with CUDA graphs, then the encoder."""
        import torch

        a, notes = self.args, self.result["notes"]
        tag, hd = self.half
        if a.skip_compile or (not self.cuda and not a.compile_on_cpu):
            notes.append("torch.compile: not run" + (" (--skip-compile)" if a.skip_compile else " on a CPU"))
            return self.result
        plan = [("default", "decode"), ("reduce-overhead", "decode")] if self.cuda else [("default", "decode")]
        if not a.compile_decode_only:
            plan += [("default", "encode")]
        for mode, op in plan:
            for size in a.sizes:
                need = a.compile_estimate_s * (0.5 if mode == "reduce-overhead" else 1.0)
                name = f"{tag}+compile" + ("+cudagraphs" if mode == "reduce-overhead" else "")
                if not self.budget.allows(need):
                    notes.append(f"{name} {op} {size}: skipped, time budget ({self.budget.left:.0f} s left, "
                                 f"~{need:.0f} s needed)")
                    continue
                try:
                    _compiled_row(self.base, hd, mode, op, size, self.device, self.record, name)
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"{name} {op} {size}: {type(exc).__name__}: {str(exc)[:300]}")
                if self.cuda:
                    torch.cuda.empty_cache()
        return self.result


def _best_half(rows) -> str | None:
    cands = [r for r in rows if r["variant"] in ("fp16-cl", "bf16-cl") and r["op"] == "decode" and r["finite"]]
    if not cands:
        return None
    size = max(r["size"] for r in cands)
    return min((r for r in cands if r["size"] == size), key=lambda r: r["median_ms"])["variant"]


def _graphed(fn, static_in):
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode():
        with torch.cuda.stream(s):
            for _ in range(2):
                fn(static_in)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = fn(static_in)

    def replay(_ignored=None):
        g.replay()
        return static_out

    return replay


def _compiled_row(base, dtype: str, mode: str, op: str, size: int, device: str, record, name: str):
    import torch

    with torch.inference_mode():
        vae = _build(base, dtype, True, device)
    part = "decoder" if op == "decode" else "encoder"
    setattr(vae, part, torch.compile(getattr(vae, part), mode=mode, dynamic=False))
    fn0 = _op_fn(vae, op)
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None)

    def fn(t):
        if mode == "reduce-overhead" and mark is not None:
            mark()
        return fn0(t)

    inputs = _inputs(op, size, device, vae.dtype, True)
    t0 = time.monotonic()
    with torch.inference_mode():
        for t in inputs:  # compile (and record the graphs) before timing
            fn(t)
        _sync(device)
    record(name, op, size, fn, inputs, {"compile_s": time.monotonic() - t0})
