"""Peak memory of forward + backward: batched vs sequential attention vs checkpointing (slow).

Method: each configuration runs in a fresh subprocess (this file's ``__main__``) with
``MALLOC_MMAP_THRESHOLD_=65536``, so glibc serves every allocation above 64 KiB with mmap and
returns it to the OS on free; the process's resident set then tracks live tensor memory,
and ``getrusage(RUSAGE_SELF).ru_maxrss`` is its high-water mark. Reported: peak minus the
resident size just before the forward (model, input and grads' absence included), i.e. the
activation + transient memory of one fwd+bwd. The reference is the batched configuration
in the same run; the numbers go to ``<tmp>/memory.json`` and to stdout (``pytest -s``).
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)

CASES = {
    "batched": {},
    "sequential_s01": dict(sequential_stages=(0, 1), attn_chunk=4),
    "sequential_all": dict(sequential_stages=(0, 1, 2, 3), attn_chunk=4),
    "checkpoint_all": dict(grad_checkpointing=True),
    "checkpoint_all+sequential_s01": dict(grad_checkpointing=True, sequential_stages=(0, 1), attn_chunk=4),
}
MODEL = dict(name="swinv2_base", img_size=512, window_size=16, batch=1)


def _measure(case):
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, HERE, case], env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sequential_attention_and_checkpointing_lower_peak(tmp_path):
    res = {case: _measure(case) for case in CASES}
    (tmp_path / "memory.json").write_text(json.dumps({"model": MODEL, "results": res}, indent=1))
    print(json.dumps(res, indent=1))
    mib = {k: v["peak_minus_base_mib"] for k, v in res.items()}
    assert mib["sequential_all"] < mib["sequential_s01"] < mib["batched"]
    assert mib["checkpoint_all"] < mib["batched"]
    assert mib["checkpoint_all+sequential_s01"] < mib["checkpoint_all"]
    # same loss whatever the memory strategy
    losses = [v["loss"] for v in res.values()]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0])


def _run(case):
    import resource
    import time

    import torch

    from gigamim.models import create_model

    torch.manual_seed(0)
    model = create_model(MODEL["name"], img_size=MODEL["img_size"], window_size=MODEL["window_size"],
                         drop_path_rate=0.0, **CASES[case])
    x = torch.randn(MODEL["batch"], 3, MODEL["img_size"], MODEL["img_size"])

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    base = rss_mib()
    t0 = time.time()
    loss = model.forward_features(x).square().mean()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"case": case, "base_mib": round(base), "peak_mib": round(peak),
                      "peak_minus_base_mib": round(peak - base), "seconds": round(time.time() - t0, 1),
                      "loss": loss.item()}))


if __name__ == "__main__":
    _run(sys.argv[1])
