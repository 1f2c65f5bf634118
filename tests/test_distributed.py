"""The Ray backend gives exactly the local backend's numbers: calibration shards and sensitivity probes on a local
2-CPU Ray cluster, compared bitwise with the same work in-process; backend errors; the --ray / --shards CLI."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np
import pytest

from moepack.backends import (DistributedError, LocalBackend, RayBackend, ViewRef, make_backend, open_view,
                              partition, running_cluster)
from moepack.cli import main
from moepack.errors import MoepackError
from moepack.model.checkpoint import open_checkpoint
from moepack.schema import CalibStats
from moepack.stages.calibrate import calibrate, shard_bounds
from moepack.stages.sensitivity.measure import SensitivityConfig, measure_sensitivity

if os.environ.get("CI"):
    import ray  # CI installs moepack[ray] (the Makefile's install step): without it these tests fail, not skip
else:
    ray = pytest.importorskip("ray", reason="the Ray tests need moepack[ray] (make install puts it in .venv)")

ARCHS = ("qwen3_moe", "deepseek_v3")
IDS = np.random.default_rng(0).integers(0, 256, (7, 16))  # (N, L): 4 batches of 2 → shards of whole batches


@pytest.fixture(scope="module")
def ray_backend():
    """A new local Ray cluster of 2 CPUs for this module (never one `ray start` left running), shut down at the end."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield RayBackend()
    finally:
        ray.shutdown()


def _arrays(st: CalibStats) -> dict[str, np.ndarray]:
    out = {f"imatrix.{k}.{a}": getattr(e, a) for k, e in st.imatrix.items() for a in ("sums", "counts")}
    out.update({f"router.{layer}.{a}": getattr(r, a) for layer, r in st.router.items()
                for a in ("counts", "weight_sum", "saliency_sum")})
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_on_ray_equals_local(arch, shared_tiny_model, ray_backend) -> None:
    view = open_checkpoint(shared_tiny_model(arch))
    kw: dict[str, Any] = dict(batch_size=2, threads=1, progress=False)
    local = _arrays(calibrate(view, IDS, shards=2, **kw))
    remote_stats = calibrate(view, IDS, shards=2, backend=ray_backend, **kw)
    remote = _arrays(remote_stats)
    assert remote_stats.manifest.shards == 2 and remote_stats.manifest.backend == "ray"
    assert sorted(local) == sorted(remote)
    for k in local:
        assert np.array_equal(local[k], remote[k]), k
    one = _arrays(calibrate(view, IDS, shards=1, **kw))  # the same batches; only the float64 sums' order differs
    for k in local:
        np.testing.assert_allclose(local[k], one[k], rtol=1e-12, atol=0, err_msg=k)


@pytest.mark.parametrize("arch", ARCHS)
def test_sensitivity_on_ray_equals_local(arch, shared_tiny_model, ray_backend, tmp_path) -> None:
    """Quantization and probes split into 3 tasks on Ray (bytes in the object store, or written under a shared
    cache_dir) give the table of one in-process task, field for field."""
    view = open_checkpoint(shared_tiny_model(arch))
    rng = np.random.default_rng(1)
    stats = calibrate(view, rng.integers(0, 256, (4, 16)), progress=False)
    ids = rng.integers(0, 256, (2, 16))
    cfg = SensitivityConfig(ladder=("IQ2_XXS", "IQ3_S", "Q8_0"), threads=1, progress=False)

    def measure(backend: Any = None, **over: Any) -> dict[str, Any]:
        return measure_sensitivity(view, ids, dataclasses.replace(cfg, **over), imatrix=stats,
                                   backend=backend).to_dict()

    local = measure()
    remote = measure(ray_backend, tasks=3)
    assert local["timing"]["probes"] > 10 and remote["timing"]["backend"] == "ray"
    strip = [json.dumps({k: v for k, v in t.items() if k != "timing"}, sort_keys=True) for t in (local, remote)]
    assert strip[0] == strip[1]
    if arch == "qwen3_moe":
        cached = measure(ray_backend, tasks=2, cache_dir=tmp_path)
        assert json.dumps({k: v for k, v in cached.items() if k != "timing"}, sort_keys=True) == strip[0]
        assert len(list(tmp_path.rglob("*.safetensors"))) >= sum(len(g["tensors"]) for g in local["groups"])


def test_cli_ray_round_trip_and_resume(shared_tiny_model, ray_backend, tmp_path, capsys, caplog) -> None:
    model = shared_tiny_model("qwen3_moe", tokenizer=True, vocab=512)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and the dog sleeps. " * 60)
    args = ["calibrate", str(model), "--calib-text", str(text), "--calib-tokens", "96", "--seq-len", "16",
            "--batch-size", "2", "--sens-tokens", "0", "--threads", "1", "--shards", "2"]
    assert main(args + ["--ray", "auto", "-o", str(tmp_path / "ray")]) == 0  # this process's Ray connection
    assert "2 shard(s)" in capsys.readouterr().out
    assert main(args + ["-o", str(tmp_path / "local")]) == 0
    a, b = (_arrays(CalibStats.read(tmp_path / d)) for d in ("ray", "local"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    man = json.loads((tmp_path / "ray" / "calib" / "manifest.json").read_text())
    assert man["shards"] == 2 and man["backend"] == "ray" and man["threads"] == 1
    # resume: another explicit --shards recomputes; no --shards takes statistics of any shard count
    assert main(args[:-1] + ["3", "-o", str(tmp_path / "local")]) == 0
    assert json.loads((tmp_path / "local" / "calib" / "manifest.json").read_text())["shards"] == 3
    caplog.set_level(logging.INFO, logger="moepack.stages.calibrate")
    assert main(args[:-2] + ["-o", str(tmp_path / "local")]) == 0
    assert "reusing calibration statistics" in caplog.text
    assert json.loads((tmp_path / "local" / "calib" / "manifest.json").read_text())["shards"] == 3


def test_backend_errors(shared_tiny_model, tmp_path, capsys, monkeypatch) -> None:
    assert isinstance(make_backend(None), LocalBackend)
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match="nothing answers there"):
        _fresh_ray("127.0.0.1:1", monkeypatch)
    assert time.monotonic() - t0 < 15
    with pytest.raises(DistributedError, match="expected auto, HOST:PORT"):
        _fresh_ray("head-without-port", monkeypatch)
    with monkeypatch.context() as m:  # --ray auto with RAY_ADDRESS naming a stopped cluster: an error, not a wait
        m.setenv("RAY_ADDRESS", "127.0.0.1:1")
        with pytest.raises(DistributedError, match="nothing answers there"):
            _fresh_ray("auto", monkeypatch)
        m.delenv("RAY_ADDRESS")
        m.setenv("RAY_TMPDIR", str(tmp_path))  # where a killed `ray start` left its address behind
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
        assert running_cluster() == ("127.0.0.1:1", str(tmp_path / "ray" / "ray_current_cluster"))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray", None)  # as if installed without the extra
        with pytest.raises(DistributedError, match=r"moepack\[ray\]"):
            make_backend("auto")
    model = shared_tiny_model("qwen3_moe")
    rc = main(["calibrate", str(model), "--calib-text", str(tmp_path / "none.txt"), "--shards", "0", "-o", str(tmp_path)])
    assert rc == 2 and "--shards must be at least 1" in capsys.readouterr().err
    with pytest.raises(MoepackError, match="not the checkpoint the driver opened"):
        open_view(ViewRef(str(model), "0" * 16))


def _fresh_ray(address: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """RayBackend(address) as in a process without a Ray connection (this module's cluster stays up)."""
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    return RayBackend(address, timeout_s=2.0)


def test_view_ref_of_a_pruned_view_and_helpers(shared_tiny_model) -> None:
    from moepack.model.pruned import pruned_view
    from moepack.stages.prune import PruneOptions, make_plan

    view = open_checkpoint(shared_tiny_model("qwen3_moe"))
    pv = pruned_view(view, make_plan(view, calibrate(view, IDS, progress=False), PruneOptions(keep=0.5)))
    ref = ViewRef.of(pv)
    assert ref.root == str(view.root.resolve()) and open_view(ref).fingerprint() == pv.fingerprint()
    other_k = ViewRef.of(pruned_view(view, pv.plan, top_k=1))  # a k' other than the plan's travels too
    assert other_k.top_k == 1 and open_view(other_k).facts.top_k == 1
    assert shard_bounds(7, 2, 2) == [(0, 4), (4, 7)] and shard_bounds(7, 9, 2) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert shard_bounds(7, 1, 8) == [(0, 7)]
    bins = partition([5, 1, 1, 1, 4, 2], 3)
    assert sorted(i for b in bins for i in b) == list(range(6)) and len(bins) == 3
    assert sorted(sum([5, 1, 1, 1, 4, 2][i] for i in b) for b in bins) == [4, 5, 5]


def test_calibration_on_ray_reads_fp8_checkpoints(shared_tiny_model, ray_backend, tmp_path) -> None:
    """Workers re-open an FP8 block-scaled checkpoint from its path and dequantize per tensor as the driver does:
    the Ray calibration of the FP8 release equals the local calibration of its dequantized copy."""
    from test_stored_formats import to_fp8

    fp8, deq = to_fp8(shared_tiny_model("deepseek_v3"), tmp_path, (48, 48))
    kw: dict[str, Any] = dict(batch_size=2, threads=1, progress=False)
    remote = _arrays(calibrate(open_checkpoint(fp8), IDS, shards=2, backend=ray_backend, **kw))
    local = _arrays(calibrate(open_checkpoint(deq), IDS, shards=2, **kw))
    assert sorted(local) == sorted(remote)
    for k in local:
        assert np.array_equal(local[k], remote[k]), k
