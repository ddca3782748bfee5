"""`python -m qtool.bench kernels|e2e ...`: the `qtool bench` commands without the main CLI."""

from qtool.bench.cli import app

app(prog_name="python -m qtool.bench")
