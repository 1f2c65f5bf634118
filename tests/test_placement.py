"""GPU + RAM budgets: what llama.cpp keeps where under -ngl 99 -ot exps=CPU, two knapsacks over one sensitivity
table, infeasible pairs failing before calibration, and a compressed DeepSeek file that loads with the printed
placement override."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from conftest import fixture_dir, small_compress_options
from moepack.cli import main
from moepack.gguf.runtime import llama_command, parse_overrides
from moepack.model.checkpoint import open_checkpoint
from moepack.schema import Group, Option, SensitivityTable
from moepack.stages.allocate import allocate
from moepack.stages.budget import (DEFAULT_RESERVE_FRACTION, BudgetError, BudgetRequest, budget_for, check_floors,
                                   parse_size, smallest_memories)
from moepack.stages.fit import uniform_bytes
from moepack.stages.footprint import compute_buffer_bytes, gguf_overhead_bytes, kv_cache_bytes
from moepack.stages.placement import allocate_placed, on_gpu, resident_bytes, split_table

CTX, UBATCH = 256, 64
SMALL = small_compress_options("--keep", "1.0", "-c", str(CTX), "--ubatch-size", str(UBATCH), ladder="IQ2_XXS,Q4_K")


@pytest.fixture(scope="module")
def deepseek() -> Path:
    return fixture_dir("tiny-deepseek-v3")


def test_what_stays_in_ram() -> None:
    """The routed experts (llama.cpp's -ot exps=CPU) and the input layer; shared experts, routers and the output
    head go to the GPU."""
    ram = ["blk.3.ffn_down_exps.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight", "token_embd.weight"]
    gpu = ["blk.1.ffn_down_shexp.weight", "blk.1.exp_probs_b.bias", "blk.1.ffn_gate_inp.weight", "output.weight",
           "blk.0.attn_kv_b.weight", "blk.0.attn_k_b.weight", "blk.0.ffn_down.weight", "output_norm.weight"]
    assert not any(on_gpu(n) for n in ram) and all(on_gpu(n) for n in gpu)
    assert resident_bytes([(ram[0], 5), (gpu[0], 7), (ram[3], 11)]) == (7, 16)


def test_placement_by_name_is_the_routed_experts_and_embedding(deepseek: Path) -> None:
    from moepack.gguf.names import gguf_tensor_name
    from moepack.model.arch import Role

    view = open_checkpoint(deepseek)
    in_ram = {t.role for t in view.tensors.values() if not on_gpu(gguf_tensor_name(view, t))}
    assert in_ram == {Role.ROUTED_EXPERTS, Role.EMBEDDING}
    for t in ("IQ2_XXS", "Q8_0"):  # the two sides partition the model
        assert uniform_bytes(view, t, side="gpu") + uniform_bytes(view, t, side="ram") == uniform_bytes(view, t)
    assert uniform_bytes(view, "IQ2_XXS", 0.5, "gpu") == uniform_bytes(view, "IQ2_XXS", 1.0, "gpu")  # keep: experts only
    assert uniform_bytes(view, "IQ2_XXS", 0.5, "ram") < uniform_bytes(view, "IQ2_XXS", 1.0, "ram")


def test_placed_budget_by_hand(deepseek: Path) -> None:
    view = open_checkpoint(deepseek)
    gpu, ram = 30_000_000, 50_000_000
    b = budget_for(BudgetRequest(memory=ram, gpu_memory=gpu, ctx=CTX, n_ubatch=UBATCH), view)
    kv, compute = kv_cache_bytes(view, CTX), compute_buffer_bytes(view, CTX, UBATCH)
    overhead = gguf_overhead_bytes(view)
    assert b.gpu_weights == gpu - kv - compute - int(gpu * DEFAULT_RESERVE_FRACTION)
    assert b.weights - b.gpu_weights == ram - compute - int(ram * DEFAULT_RESERVE_FRACTION) - overhead
    assert (b.memory, b.gpu_memory, b.kv_cache, b.ctx) == (ram, gpu, kv, CTX)
    assert "GPU memory" in b.describe() and "RAM tensors" in b.describe()
    with_reserve = budget_for(BudgetRequest(memory=ram, gpu_memory=gpu, ctx=CTX, n_ubatch=UBATCH, reserve="1MB"),
                              view)
    assert with_reserve.weights - with_reserve.gpu_weights == ram - compute - 1_000_000 - overhead
    assert budget_for(BudgetRequest(memory=ram, ctx=CTX), view).gpu_weights is None  # --memory alone: as before


@pytest.mark.parametrize("request_, message", [
    (BudgetRequest(gpu_memory="24GB", ctx=CTX), "needs --memory"),
    (BudgetRequest(gpu_memory="24GB", memory="64GB"), "needs --ctx-size"),
    (BudgetRequest(gpu_memory="24GB", target_size="1GB", ctx=CTX), "does not combine"),
    (BudgetRequest(gpu_memory="1MB", memory="1GB", ctx=CTX), "GPU: nothing is left"),
])
def test_placed_budget_rejects(deepseek: Path, request_: BudgetRequest, message: str) -> None:
    with pytest.raises(BudgetError, match=message):
        budget_for(request_, open_checkpoint(deepseek))


def test_smallest_memories_are_tight(deepseek: Path) -> None:
    """The sizes an infeasible pair's message suggests fit exactly: one byte less on either side does not."""
    view = open_checkpoint(deepseek)
    gpu_floor, ram_floor = uniform_bytes(view, "IQ2_XXS", side="gpu"), uniform_bytes(view, "IQ2_XXS", side="ram")
    small = budget_for(BudgetRequest(memory="20MB", gpu_memory="10MB", ctx=CTX, n_ubatch=UBATCH), view)
    gpu, ram = smallest_memories(small, gpu_floor, ram_floor)

    def budget(g: int, r: int):
        return budget_for(BudgetRequest(memory=r, gpu_memory=g, ctx=CTX, n_ubatch=UBATCH), view)

    check_floors(budget(gpu, ram), gpu_floor, ram_floor, "x")
    with pytest.raises(BudgetError, match="GPU: x needs") as e:
        check_floors(budget(gpu - 1, ram), gpu_floor, ram_floor, "x")
    assert "RAM:" not in str(e.value) and f"{gpu:,} and {ram:,} bytes" in str(e.value)
    typed = re.search(r"--gpu-memory (\S+) --memory (\S+)", str(e.value))  # rounded up, to type: also fits
    check_floors(budget(parse_size(typed[1]), parse_size(typed[2])), gpu_floor, ram_floor, "x")
    assert parse_size(typed[1]) - gpu < 2**20 // 100 and parse_size(typed[2]) - ram < 2**20 // 100
    with pytest.raises(BudgetError, match="RAM: x needs"):
        check_floors(budget(gpu, ram - 1), gpu_floor, ram_floor, "x")


def _table() -> SensitivityTable:
    """Two GPU groups and two expert groups; attention saves the most KLD per byte."""
    def group(name: str, base: int, dklds: tuple[float, float]) -> Group:
        opts = (Option("IQ2_XXS", base, 0.0), Option("Q4_K", 2 * base, dklds[0]), Option("Q8_0", 4 * base, dklds[1]))
        return Group(name, (f"{name}.weight",), opts)

    return SensitivityTable((group("blk.0.attn_q", 100, (-0.5, -0.8)), group("blk.0.attn_output", 100, (-0.4, -0.6)),
                             group("blk.0.ffn_down_exps", 400, (-0.2, -0.3)),
                             group("blk.0.ffn_up_exps", 400, (-0.1, -0.15))),
                            fixed_bytes=50, fixed={"blk.0.attn_norm.weight": "F32"}, base={"kld": 1.0})


@pytest.mark.parametrize("solver", ["greedy", "exact"])
def test_two_knapsacks_bind(solver: str) -> None:
    table = _table()
    gpu_t, ram_t = split_table(table)
    assert [g.name for g in gpu_t.groups] == ["blk.0.attn_q", "blk.0.attn_output"] and gpu_t.fixed_bytes == 50
    assert ram_t.fixed_bytes == 0 and not ram_t.fixed
    gpu_budget, ram_budget = 50 + 300, 1200  # GPU: one attention upgrade to Q4_K; RAM: one expert upgrade
    plan = allocate_placed(table, gpu_budget, ram_budget, solver)
    size = {(g.name, o.type): o.bytes for g in table.groups for o in g.options}
    gpu, ram = resident_bytes([(f"{n}.weight", size[n, t]) for n, t in plan.groups.items()])
    assert gpu + 50 <= gpu_budget and ram <= ram_budget
    assert plan.groups == {"blk.0.attn_q": "Q4_K", "blk.0.attn_output": "IQ2_XXS", "blk.0.ffn_down_exps": "Q4_K",
                           "blk.0.ffn_up_exps": "IQ2_XXS"}
    assert plan.predicted_bytes == gpu + 50 + ram and plan.predicted_kld == pytest.approx(1.0 - 0.7)
    assert plan.tensors["blk.0.attn_norm.weight"] == "F32" and plan.base["placement"]["gpu"]["bytes"] == gpu + 50
    single = allocate(table, gpu_budget + ram_budget, solver)  # one budget spends the experts' bytes on attention
    s_gpu, _ = resident_bytes([(f"{n}.weight", size[n, t]) for n, t in single.groups.items()])
    assert single.groups != plan.groups and s_gpu + 50 > gpu_budget


def test_llama_command_places_the_experts() -> None:
    assert llama_command("/m/x.gguf", 32768, offload_experts=True) == \
        "llama-server -m /m/x.gguf -c 32768 -ngl 99 -ot exps=CPU --no-repack"
    assert llama_command("/m/x.gguf", 4096) == "llama-server -m /m/x.gguf -c 4096 --no-repack"
    assert parse_overrides("exps=CPU") == {"exps": "CPU"}
    with pytest.raises(Exception, match="PATTERN=DEVICE"):
        parse_overrides("exps")


@pytest.mark.parametrize("short", ["GPU", "RAM"])
def test_infeasible_pair_fails_before_calibration(deepseek: Path, tmp_path: Path, capsys, short: str) -> None:
    out = tmp_path / "x.gguf"
    view = open_checkpoint(deepseek)
    b = budget_for(BudgetRequest(memory="100MB", gpu_memory="100MB", ctx=CTX, n_ubatch=UBATCH), view)
    need = smallest_memories(b, uniform_bytes(view, "IQ2_XXS", side="gpu"), uniform_bytes(view, "IQ2_XXS", side="ram"))
    gpu, ram = (f"{need[0] - 1000}B", "100MB") if short == "GPU" else ("100MB", f"{need[1] - 1000}B")
    t0 = time.time()
    assert main(["compress", str(deepseek), "--gpu-memory", str(gpu), "--memory", str(ram), "-o", str(out),
                 *SMALL]) == 2
    err = capsys.readouterr().err
    other = "RAM" if short == "GPU" else "GPU"
    assert f"{short}: --keep 1 with every tensor at IQ2_XXS needs" in err and f"{other}:" not in err
    assert re.search(r"the smallest that fits: --gpu-memory \S+ --memory \S+", err), err
    assert time.time() - t0 < 30 and not out.exists() and not (tmp_path / "x.gguf.run").exists()


# ------------------------------------------------------------------------------------------ end to end (minutes)

def _sizes(deepseek: Path) -> tuple[int, int]:
    """GPU memory and RAM whose tensor budgets lie between each side's all-IQ2_XXS and all-Q8_0 sizes."""
    view = open_checkpoint(deepseek)
    kv, compute = kv_cache_bytes(view, CTX), compute_buffer_bytes(view, CTX, UBATCH)
    mid = {s: (uniform_bytes(view, "IQ2_XXS", side=s) + uniform_bytes(view, "Q4_K", side=s)) // 2 for s in ("gpu", "ram")}
    f = 1 - DEFAULT_RESERVE_FRACTION
    return int((mid["gpu"] + kv + compute) / f), int((mid["ram"] + compute + gguf_overhead_bytes(view)) / f)


@pytest.fixture(scope="module")
def placed_run(deepseek: Path, tmp_path_factory) -> tuple[Path, tuple[int, int], str]:
    import contextlib
    import io

    out = tmp_path_factory.mktemp("placed") / "x.gguf"
    gpu, ram = _sizes(deepseek)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["compress", str(deepseek), "--gpu-memory", f"{gpu}B", "--memory", f"{ram}B", "-o", str(out),
                     *SMALL]) == 0
    return out, (gpu, ram), printed.getvalue()


@pytest.mark.slow
def test_placed_compress_fits_both_budgets(deepseek: Path, placed_run) -> None:
    out, (gpu_mem, ram_mem), _ = placed_run
    view = open_checkpoint(deepseek)
    reader = gguf.GGUFReader(out)
    gpu, ram = resident_bytes((t.name, int(t.n_bytes)) for t in reader.tensors)
    overhead = out.stat().st_size - gpu - ram
    kv, compute = kv_cache_bytes(view, CTX), compute_buffer_bytes(view, CTX, UBATCH)
    assert gpu + kv + compute + int(gpu_mem * DEFAULT_RESERVE_FRACTION) <= gpu_mem
    assert ram + compute + int(ram_mem * DEFAULT_RESERVE_FRACTION) + overhead <= ram_mem
    # Both bind: one budget of the same total spends differently and overfills one side.
    run = out.with_name(out.name + ".run")
    table = SensitivityTable.read(run / "sensitivity-r1.json")
    plan = json.loads((run / "quant_plan-r1.json").read_text())
    single = allocate(table, plan["budget_bytes"])
    size = {(g.name, o.type): (g.tensors, o.bytes) for g in table.groups for o in g.options}
    s_gpu, s_ram = resident_bytes((ts[0], n) for ts, n in (size[k] for k in single.groups.items()))
    assert single.groups != plan["groups"]
    assert s_gpu + table.fixed_bytes > plan["base"]["placement"]["gpu"]["budget_bytes"] or \
        s_ram > plan["base"]["placement"]["ram"]["budget_bytes"]


_LOAD = """
import sys
from moepack.gguf.runtime import load_llama
llm = load_llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_gpu_layers=int(sys.argv[3]), overrides=eval(sys.argv[4]),
                 verbose=True)
llm.eval([1, 2, 3])
llm.close()
"""


def test_printed_command_loads_with_its_override(placed_run) -> None:
    """The command in summary.json and the printed summary; llama.cpp (llama-cpp-python) loads the file with its
    -ngl and -ot, and its log names every routed-expert tensor as overridden to the CPU (so the override parsed)."""
    out, _, printed = placed_run
    cmd = json.loads((out.with_name(out.name + ".run") / "summary.json").read_text())["llama_command"]
    assert f"run it:        {cmd}" in printed and "placement     GPU tensors" in printed
    argv = shlex.split(cmd)
    assert argv[:3] == ["llama-server", "-m", str(out)] and "--no-repack" in argv
    arg = {k: argv[argv.index(k) + 1] for k in ("-c", "-ngl", "-ot")}
    overrides = parse_overrides(arg["-ot"])
    assert overrides == {"exps": "CPU"} and int(arg["-c"]) == CTX
    r = subprocess.run([sys.executable, "-c", _LOAD, str(out), arg["-c"], arg["-ngl"], repr(overrides)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    overridden = set(re.findall(r"tensor (\S+) \(.*\) buffer type overridden to CPU", r.stderr))
    experts = {t.name for t in gguf.GGUFReader(out).tensors if "exps" in t.name}
    assert experts and overridden == experts
