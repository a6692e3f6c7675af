"""Cold start of ``ipadapter demo`` (import + tiny models + first image): fresh model cache vs built cache.

Each run is a new process (``python -m``-free: the installed ``ipadapter`` script beside this Python), timed
from launch to exit. "fresh" runs get an empty models folder, so they build the tiny model set first;
"built" runs reuse one folder built beforehand. Rounds alternate the two so machine load hits both alike;
it prints medians with the spread and their ratio, and the import time alone (``python -c "import ..."``).

Run: ``python benchmarks/cold_start.py [--rounds 3]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _summary(values: list[float]) -> str:
    return f"median {statistics.median(values):.1f} s (min {min(values):.1f}, max {max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    script = str(Path(sys.executable).with_name("ipadapter"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    work = Path(tempfile.mkdtemp(prefix="ipadapter-cold-start-"))
    try:
        built = work / "built" / "models"
        _run([script, "demo", "--models-dir", str(built), "--output-dir", str(work / "out")], env)  # build once
        times: dict[str, list[float]] = {"fresh": [], "built": [], "import": []}
        for n in range(args.rounds):
            fresh = work / f"fresh{n}" / "models"
            times["fresh"].append(_run([script, "demo", "--models-dir", str(fresh), "--output-dir",
                                        str(work / "out")], env))
            times["built"].append(_run([script, "demo", "--models-dir", str(built), "--output-dir",
                                        str(work / "out")], env))
            times["import"].append(_run([sys.executable, "-c", "import ipadapter_nodes.runtime.registry as r; "
                                         "r.node_classes()"], env))
            shutil.rmtree(fresh.parent, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"`ipadapter demo`, {args.rounds} rounds, process launch to exit")
    print(f"fresh models folder (builds the tiny models): {_summary(times['fresh'])}")
    print(f"built models folder:                          {_summary(times['built'])}")
    print(f"import + node registry only:                  {_summary(times['import'])}")
    print(f"fresh/built ratio: {statistics.median(times['fresh']) / statistics.median(times['built']):.2f}x")


if __name__ == "__main__":
    main()
