"""The benchmarks' measuring subprocesses: one function of a benchmark's own script, run in a fresh interpreter so
that its peak memory (VmHWM) is its own, its result read back as one marked line of JSON on stdout.

A script lists its child functions in a dict, passes `--child NAME KWARGS_JSON` to child_main(), and starts one with
in_subprocess(__file__, NAME, **kwargs); whatever else the child prints is passed on.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD_MARK = "@@result "  # prefix of the one stdout line a child reports on
REPO = Path(__file__).resolve().parents[1]


def in_subprocess(script: str, child: str, env: dict | None = None, **kwargs) -> dict:
    """Run `child` of `script` (its --child NAME KWARGS_JSON) in a fresh interpreter; its result."""
    cmd = [sys.executable, str(Path(script).resolve()), "--child", child, json.dumps(kwargs)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    lines = proc.stdout.splitlines()
    for line in lines:
        if not line.startswith(CHILD_MARK):
            print(line, flush=True)
    results = [line for line in lines if line.startswith(CHILD_MARK)]
    if proc.returncode or not results:
        raise RuntimeError(f"subprocess failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(results[-1][len(CHILD_MARK):])


def child_main(children: dict, name: str, kwargs_json: str) -> None:
    """In the child: run children[name] and print its result as the marked line."""
    print(CHILD_MARK + json.dumps(children[name](**json.loads(kwargs_json))), flush=True)
