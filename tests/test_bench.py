"""`gigamim bench`: the harness end to end (smoke profile), the reference SimMIM against
gigamim's on identical weights (fp64), and the CPU peak-memory measurement against
allocations of known size. No timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch

from gigamim.models import SimMIM, create_model
from tests.helpers.randomize import randomize_weights
from gigamim_benchmarks.memory import profiled_peak_bytes
from gigamim_benchmarks.reference import reference_for

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("kw", [
    dict(img_size=96, window_size=6),  # shifted windows in stages 0-1, shrunk windows after
    dict(img_size=128, window_size=4, pretrained_window_sizes=(8, 8, 4, 2)),  # CPB rescaling too
])
def test_reference_simmim_loss_and_grads_equal_gigamim_fp64(kw):
    torch.manual_seed(0)
    ours = randomize_weights(SimMIM(create_model("swinv2_nano", drop_path_rate=0.0, **kw)), seed=2).double()
    ref = reference_for(ours)  # timm encoder + the official-style head, strict weight copy
    assert set(ref.state_dict()) == set(ours.state_dict())
    size = kw["img_size"]
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    mask = torch.rand(2, size // 4, size // 4) > 0.4
    la, lb = ours(x, mask), ref(x, mask)
    assert la.item() > 0.1
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-10)
    la.backward()
    lb.backward()
    grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_profiled_peak_matches_known_allocations():
    # Independent reference: tensors of known size, one freed before the next is made.
    mib = 2**20

    def fn():
        a = torch.empty(8 * mib, dtype=torch.uint8)
        a.fill_(1)
        del a
        b = torch.empty(3 * mib, dtype=torch.uint8)
        c = torch.empty(2 * mib, dtype=torch.uint8)
        del b, c

    peak = profiled_peak_bytes(fn)
    assert 8 * mib <= peak < 8 * mib + 64 * 1024


def test_smoke_profile_writes_json_markdown_png(tmp_path):
    from gigamim_benchmarks.run import main

    out = tmp_path / "bench"
    assert main(["--profile", "smoke", "--out", str(out), "--threads", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed_cases"] == []
    for key in ("train_step_ratio", "peak_mem_ratio"):
        assert isinstance(summary[key], float) and summary[key] > 0
    assert summary["machine"]["cpu_cores"] and summary["versions"]["torch"] == torch.__version__
    assert "gigamim bench --profile smoke" in summary["command"]
    cases = [json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "summary.json"]
    assert {c["case"]["impl"] for c in cases} == {"gigamim", "reference"}
    for c in cases:
        assert c["images_per_sec"] > 0 and c["peak_mem_bytes"] > 0
        assert set(c["breakdown_s"]) == {"data", "forward", "backward", "optimizer"}
        # The step's phases add up to the step (medians of each phase: allow slack).
        assert sum(c["breakdown_s"].values()) == pytest.approx(c["step_time_s"], rel=0.5)
        # Resident parameters alone (4 bytes each) are a floor for the measured peak.
        assert c["peak_mem_bytes"] > 4 * c["params"]
    report = (out / "report.md").read_text()
    assert "| case | model | px | batch | images/s" in report and "train_step_ratio" in report
    for png in summary["plots"]:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # Rebuilding the report from the case files gives the same headline.
    again = tmp_path / "rebuilt"
    assert main(["--report-from", str(out), "--out", str(again)]) == 0
    rebuilt = json.loads((again / "summary.json").read_text())
    assert rebuilt["train_step_ratio"] == summary["train_step_ratio"]
    assert (again / "report.md").exists()


def test_bench_rejects_unknown_profile(capsys):
    from gigamim_benchmarks.run import main

    with pytest.raises(SystemExit):
        main(["--profile", "nope"])
    assert "invalid choice" in capsys.readouterr().err
