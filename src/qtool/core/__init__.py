"""Ground layer: what every other layer stands on (errors, paths, specs, stage directories, text
data, the quantization arithmetic, devices, progress). It imports nothing else of qtool."""

__version__ = "0.1.0"  # recorded in every manifest; pyproject.toml holds the same
