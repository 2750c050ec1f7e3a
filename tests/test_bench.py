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


def _count_worker(rank, world, port, out):
    import os

    import torch.distributed as dist

    from gigamim_benchmarks.zero_sweep import CollectiveCounter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    counter = CollectiveCounter()
    counter.install()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.ones(1000)  # 4000 bytes
    gathered = torch.empty(2000)
    dist.all_gather_into_tensor(gathered, x)
    dist.all_reduce(x)
    dist.all_reduce(x)
    # The c10d module path, as DeepSpeed's comm layer calls it.
    dist.distributed_c10d.all_gather_into_tensor(gathered, x)
    calls, nbytes = counter.snapshot()
    # What PyTorch FSDP2 calls on torch >= 2.12 (all_gather_into_tensor forwards to it there:
    # counted once above all the same).
    fsdp = None
    if hasattr(dist, "all_gather_single"):
        counter.reset()
        dist.all_gather_single(gathered, x)
        half = torch.empty(500)
        dist.reduce_scatter_single(half, x)
        fsdp = counter.snapshot()
    dist.destroy_process_group()
    if rank == 0:
        out.put((calls, nbytes, gathered[:2].tolist(), fsdp))


def test_collective_counter_counts_real_gloo_calls():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_count_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    calls, nbytes, head, fsdp = q.get(timeout=120)
    for p in procs:
        p.join(60)
    assert calls == {"all_gather": 2, "all_reduce": 2}
    assert nbytes == {"all_gather": 2 * 8000, "all_reduce": 2 * 4000}  # the gathered output; the reduced tensor
    assert head == [4.0, 4.0]  # the wrapped calls did their work: x = 1 -> 2 -> 4 (two all-reduces), gathered
    if hasattr(torch.distributed, "all_gather_single"):
        # the gathered output; the scattered input (the logical buffers)
        assert fsdp == ({"all_gather": 1, "reduce_scatter": 1}, {"all_gather": 8000, "reduce_scatter": 4000})


def test_compile_and_zero_summaries_from_known_results():
    from gigamim_benchmarks.report import summarize

    def case(impl, comp, times):
        return {"case": {"group": "compile", "impl": impl, "compile": comp, "model": "swinv2_tiny", "img_size": 192,
                         "batch": 8, "precision": "fp32"}, "step_time_s": sorted(times)[1], "step_times_s": times,
                "images_per_sec": 8 / sorted(times)[1]}

    def zc(variant, t, ag):
        return {"case": {"group": "zero_compile", "variant": variant}, "step_time_s": t,
                "collective_calls_per_step": {"all_gather": ag}, "collective_bytes_per_step": {"all_gather": 10 * ag}}

    results = [case("gigamim", False, [2.0, 2.0, 2.0]), case("gigamim", True, [1.0, 1.0, 1.0]),
               case("reference", False, [3.0, 3.0, 3.0]), case("reference", True, [2.4, 2.4, 2.4]),
               zc("zero1_eager", 1.0, 1), zc("zero3_eager", 1.2, 6), zc("zero3_compiled", 0.6, 6)]
    meta = {"profile": "x", "command": "c", "machine": {}, "versions": {}}
    s = summarize(results, meta, None)
    c = s["compile"]
    assert c["gigamim_compiled_over_reference_eager"]["ratio"] == pytest.approx(3.0)
    assert c["gigamim_compiled_over_reference_compiled"]["ratio"] == pytest.approx(2.4)
    assert c["gigamim_eager_over_reference_eager"]["ratio"] == pytest.approx(1.5)
    assert c["gigamim_compiled_over_reference_eager"]["paired_median"] == pytest.approx(3.0)
    assert "compile_model" not in s
    # The whole-model group (torch.compile(model)) is summarised on its own, with the fastest-step
    # and process-CPU-time ratios beside the medians.
    # Its compiled cases are torch.compile(model); the per-block compiles run beside them (same
    # group, compile_scope "blocks") and must not be taken for the whole-model ones.
    def whole_case(r, scope="model"):
        c = dict(r["case"], group="compile_model", compile_scope=scope if r["case"]["compile"] else "blocks")
        return dict(r, case=c, min_step_time_s=min(r["step_times_s"]), cpu_time_per_step_s=2 * r["step_time_s"])

    per_block = [whole_case(case("gigamim", True, [1.2, 1.2, 1.2]), "blocks"),
                 whole_case(case("reference", True, [1.5, 1.5, 1.5]), "blocks")]
    whole = per_block + [whole_case(r) for r in results[:4]]
    w = summarize(whole, meta, None)["compile_model"]
    assert w["gigamim_compiled_over_reference_compiled"]["ratio"] == pytest.approx(2.4)
    assert w["gigamim_compiled_over_reference_compiled"]["best_of"] == pytest.approx(2.4)
    assert w["gigamim_compiled_over_reference_compiled"]["cpu_time"] == pytest.approx(2.4)
    assert w["gigamim_compiled_over_gigamim_compiled_per_block"]["ratio"] == pytest.approx(1.2)
    assert w["gigamim_compiled_per_block_over_reference_compiled_per_block"]["ratio"] == pytest.approx(1.25)
    assert "gigamim_compiled_over_gigamim_compiled_per_block" not in c  # the per-block group has no such pair
    z = s["zero_compile"]
    assert z["zero3_compiled_over_zero3_eager_step_time"] == pytest.approx(0.5)
    assert z["zero3_eager_over_zero1_eager_step_time"] == pytest.approx(1.2)
    assert z["collective_calls_per_step"]["zero3_compiled"]["all_gather"] == 6


def test_engines_summary_from_known_results():
    from gigamim_benchmarks.report import markdown, summarize

    def eng(variant, engine, times, ag, rss):
        return {"case": {"group": "engines", "variant": variant, "model": "swinv2_tiny", "img_size": 192, "batch": 4,
                         "ranks": 2, "engine": engine, "compile": variant.endswith("compiled"), "what": variant},
                "label": variant, "step_time_s": sorted(times)[1], "step_times_s": times, "warmup_s": [9.0, 1.0],
                "loss": [1.0, 0.9, 0.8], "collective_calls_per_step": {"all_gather": 1},
                "collective_bytes_per_step": {"all_gather": ag, "reduce_scatter": 100},
                "load_avg_timed": {"start": [2.0, 2.0, 2.0], "end": [2.5, 2.0, 2.0]},
                "memory": {"peak_rss_bytes": [rss, rss], "rss_before_build_bytes": [1, 1],
                           "load_avg": {"start": [2.0, 2, 2], "end": [2.0, 2, 2]}}}

    results = [eng("zero3_eager", "deepspeed", [2.0, 2.0, 4.0], 100, 2**30),
               eng("fsdp2_eager", "fsdp2", [1.0, 1.5, 1.0], 200, 2**29),
               eng("zero3_compiled", "deepspeed", [1.0, 1.0, 1.0], 100, 2**30),
               eng("fsdp2_compiled", "fsdp2", [2.0, 2.0, 2.0], 200, 2**29)]
    s = summarize(results, {"profile": "engines", "command": "c", "machine": {}, "versions": {}}, None)
    m = s["engines"]["swinv2_tiny_b4"]
    r = m["ratios"]
    assert r["fsdp2_eager_over_zero3_eager_step_time"]["ratio"] == pytest.approx(1.0 / 2.0)
    assert r["fsdp2_eager_over_zero3_eager_step_time"]["paired_median"] == pytest.approx(0.5)  # 0.5, 0.75, 0.25
    assert r["fsdp2_compiled_over_zero3_compiled_step_time"]["ratio"] == pytest.approx(2.0)
    assert r["zero3_compiled_over_zero3_eager_step_time"]["ratio"] == pytest.approx(0.5)
    assert m["collective_bytes_per_step"]["fsdp2_eager"]["all_gather"] == 200
    assert m["peak_rss_gib_per_rank"]["fsdp2_eager"] == [0.5, 0.5]
    s["machine"] = {"cpu_model": "x", "cpu_cores": 2, "torch_threads": 1, "load_avg_1_5_15": [1, 1, 1]}
    text = markdown(results, s, [], None)
    assert "fsdp2 eager over zero3 eager step time = 0.500" in text
    assert "| fsdp2_eager | 1.000 | 0.500 (0.500) | - | - |" in text and "0.50 / 0.50 (0.00)" in text
