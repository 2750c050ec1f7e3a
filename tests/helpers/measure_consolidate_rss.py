"""Peak memory of `gigamim consolidate` on a real checkpoint (used for the issue-5 report).

    python tests/helpers/measure_consolidate_rss.py CKPT_DIR OUT [consolidate options...]

Runs the CLI in a child process and reports:
  * ru_maxrss of the child (the kernel's peak RSS: anonymous + file-backed pages);
  * peaks of RssAnon (memory the process really owns) and RssFile (page-cache pages of the
    memory-mapped partition files, reclaimable) sampled from /proc every 20 ms;
  * the same for a child that only imports torch + deepspeed + gigamim's consolidate
    (the baseline a Python process pays before touching any weight);
  * the fp32 size of the consolidated weights (sum of the output files).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS", "RssAnon", "RssFile", "RssShmem")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except FileNotFoundError:
        pass
    return out


def measure(cmd: list[str]) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[str, int] = {}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            for k, v in _status(proc.pid).items():
                peaks[k] = max(peaks.get(k, 0), v)
            time.sleep(0.02)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t0 = time.time()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    stop.set()
    t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": round(wall, 1), "ru_maxrss": usage.ru_maxrss * 1024,
            "peak_rss_anon": peaks.get("RssAnon", 0), "peak_rss_file": peaks.get("RssFile", 0),
            "peak_vmrss_sampled": peaks.get("VmRSS", 0), "output_tail": out[-600:]}


def main() -> None:
    ckpt, out, *rest = sys.argv[1:]
    base = measure([sys.executable, "-c", "import torch, deepspeed, gigamim.checkpoint.consolidate"])
    run = measure([sys.executable, "-m", "gigamim", "consolidate", ckpt, out, *rest])
    size = 0
    if os.path.isdir(out):
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    elif os.path.exists(out):
        size = os.path.getsize(out)
    gib = 2**30
    report = {"checkpoint": ckpt, "args": rest, "fp32_output_bytes": size, "baseline_import": base,
              "consolidate": run}
    print(json.dumps(report, indent=1))
    if size:
        print(f"fp32 weights {size / gib:.3f} GiB | consolidate peak RSS {run['ru_maxrss'] / gib:.3f} GiB "
              f"({run['ru_maxrss'] / size:.2f}x), of which anon peak {run['peak_rss_anon'] / gib:.3f} GiB, "
              f"file-backed (mmap page cache) peak {run['peak_rss_file'] / gib:.3f} GiB | "
              f"import-only baseline {base['ru_maxrss'] / gib:.3f} GiB | "
              f"above baseline {(run['ru_maxrss'] - base['ru_maxrss']) / size:.2f}x | wall {run['wall_s']} s")


if __name__ == "__main__":
    main()
