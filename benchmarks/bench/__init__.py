"""`vae bench`: side-by-side speed benchmark of the VAE service (see benchmarks.bench.cli for what it measures).

machine (process and machine facts) -> inputs (models, photos) -> systems (in-process, HTTP server)
-> timing (latency, throughput) and quality (Kodak, tiling, large images) -> report (Markdown, plot).
"""
