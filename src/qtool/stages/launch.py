"""`--nproc N`: run a stage on N ranks of this host and return rank 0's result.

`launch` starts N copies of this module (`python -m qtool.stages.launch`), one per rank, with the
environment torchrun would give them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and a
task file naming the stage and its parameters; each copy runs the stage, which joins the others
through `qtool.core.distributed`. A rank that dies stops the others and the run ends with one line
naming it; the journal stays, so the same command resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qtool.core import distributed
from qtool.core.errors import QtoolError, save_trace

_TASK_ENV = "QTOOL_DIST_TASK"  # the launcher's task file (stage name and parameters)
_GRACE_S = 10  # seconds the other ranks get to fail on their own after one died, before they are stopped
SRC = Path(__file__).resolve().parents[2]  # the qtool the ranks import: this one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a rank, before it starts: end it (SIGTERM) when the launching process dies, even by
    SIGKILL, so no rank outlives its run (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def launch(stage, params, nproc: int):
    """Run `stage(params)` in `nproc` ranks on this host and return rank 0's result. A rank that dies
    stops the others and ends the run with one line (the journal stays: the same command resumes)."""
    folder = Path(tempfile.mkdtemp(prefix="qtool-dist-"))
    task = folder / "task.json"
    task.write_text(json.dumps({"stage": stage.name, "params": dataclasses.asdict(params)}))
    port = _free_port()
    procs = []
    try:
        for r in range(nproc):
            env = {
                **os.environ,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                _TASK_ENV: str(task),
                "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]),
            }
            # the CPU cores are shared out (N ranks with all the cores each would oversubscribe them)
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
            # c10d's C++ log repeats, with stack frames, what the rank's one-line error already says
            env.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
            procs.append(
                subprocess.Popen([sys.executable, "-m", "qtool.stages.launch"], env=env, preexec_fn=_die_with_parent)
            )
        failed, stopped, deadline = [], set(), None
        while any(p.poll() is None for p in procs):
            failed += [r for r, p in enumerate(procs) if p.returncode not in (None, 0) and r not in failed]
            if failed and deadline is None:
                deadline = time.time() + _GRACE_S  # the others end by themselves when their peer is gone
            elif deadline is not None and time.time() > deadline:
                stopped = _stop(procs)
            time.sleep(0.05)
        failed += [r for r, p in enumerate(procs) if p.returncode != 0 and r not in failed and r not in stopped]
        if not failed and not stopped:
            return _read_result(stage, folder / "result-0.json")
        raise QtoolError(_failure(folder, procs, failed or sorted(stopped), nproc))
    except KeyboardInterrupt:
        _stop(procs)
        raise
    finally:
        _stop(procs)
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()


def _read_result(stage, path: Path):
    """Rank 0's result as the stage's own result type (a plain dataclass, passed as JSON: qtool never
    unpickles)."""
    kind = json.loads(path.read_text())
    return getattr(sys.modules[type(stage).__module__], kind["type"])(**kind["fields"])


def _stop(procs) -> set[int]:
    """Terminate the ranks still running (kill those that do not end within 10 s); returns them."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.time() + 10
    for p in alive:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return {r for r, p in enumerate(procs) if p in alive}


def _failure(folder: Path, procs, failed: list[int], nproc: int) -> str:
    """The line that ends a failed run (`failed`: the ranks that failed, in the order seen): a rank's
    own refusal (bad input, a diverging loss) if one gave it, else the first rank that died without
    a word (killed, out of memory), else the first rank's unexpected error (the others' errors are
    usually the lost connection to it)."""
    errors = {}
    for r in range(nproc):
        path = folder / f"error-{r}.json"
        if path.exists():
            errors[r] = json.loads(path.read_text())
    refusal = next((e["message"] for r, e in sorted(errors.items()) if e["kind"] == "qtool"), None)
    if refusal:
        return refusal
    silent = [r for r in failed if r not in errors]
    if silent:
        r = silent[0]
        return (
            f"rank {r} of {nproc} died ({_how(procs[r].returncode)}); the other ranks were stopped; "
            "run the same command again to resume from the last finished block"
        )
    return f"rank {failed[0]} of {nproc}: {errors[failed[0]]['message']}"


def _worker() -> int:
    """One rank started by `launch`: run the stage, leave rank 0's result (or the rank's error) in the
    launcher's folder."""
    from qtool.stages import STAGES

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    task_path = Path(os.environ[_TASK_ENV])
    me = int(os.environ["RANK"])
    task = json.loads(task_path.read_text())
    stage = STAGES[task["stage"]]

    def leave(kind: str, message: str) -> None:
        (task_path.parent / f"error-{me}.json").write_text(json.dumps({"kind": kind, "message": message}))

    try:
        result = stage(stage.params(**task["params"]))
        if me == 0:
            kind = {"type": type(result).__name__, "fields": dataclasses.asdict(result)}
            (task_path.parent / "result-0.json").write_text(json.dumps(kind))
        return 0
    except QtoolError as exc:
        leave("qtool", str(exc))
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        where = save_trace(f"qtool {task['stage']} (rank {me})")
        first = str(exc).splitlines()[0] if str(exc) else ""
        leave("bug", f"unexpected {type(exc).__name__}: {first} (trace in {where})")
        return 1
    finally:
        if distributed.active():
            distributed.leave()
        from qtool.core.progress import console

        console.file.flush()


if __name__ == "__main__":
    code = _worker()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything is written; skip the interpreter's slow teardown of torch
