"""moepack.gguf.kernels and moepack.gguf.llama_quantize against llama.cpp itself: gguf's numpy quantizers and
`llama_model_quantize` on a tiny GGUF."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from moepack.errors import MoepackError
from moepack.gguf import kernels as ggml
from moepack.gguf import types as gt
from moepack.gguf.llama_quantize import quantize_gguf_ftype

ROWS, N = 64, 512
N_LAYER, EMBD, FF, N_EXP, VOCAB = 2, 256, 96, 4, 512  # FF = 96: ffn_down rows exercise the K-quant fallback
GGUF_NUMPY = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.BF16, T.MXFP4, T.TQ1_0, T.TQ2_0}  # gguf.quants.quantize


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((ROWS, N)).astype(np.float32)  # (rows, n)


@pytest.fixture(scope="module")
def imat() -> np.ndarray:
    return np.random.default_rng(1).uniform(0.1, 4.0, N).astype(np.float32)  # (n,)


def _quantize(x: np.ndarray, t: T, imat: np.ndarray, threads: int | None = None) -> np.ndarray:
    return ggml.quantize(x, t, imatrix=imat if ggml.requires_imatrix(t) else None, threads=threads)


SLOW_INIT = {T.IQ1_S, T.IQ1_M, T.IQ2_S, T.IQ2_XS}  # ggml builds their search grids once per process: seconds


@pytest.mark.parametrize("t", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW_INIT else t
                               for t in gt.QUANT_TYPES], ids=lambda t: t.name)
def test_round_trip(t: T, x: np.ndarray, imat: np.ndarray) -> None:
    q = _quantize(x, t, imat)
    assert q.dtype == np.uint8 and q.shape == (ROWS, gt.row_bytes(t, N))
    assert q.shape[1] == N // GGML_QUANT_SIZES[t][0] * GGML_QUANT_SIZES[t][1]
    y = ggml.dequantize(q, t, x.shape)
    rel = float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2)))
    bpw = gt.bits_per_weight(t)
    # a b-bit quantizer of Gaussian data leaves about 2^-b relative RMS error; floats: half an ulp of the mantissa;
    # the ternary types are meant for ternary-trained weights, so only sanity-checked on Gaussian data
    bound = {T.F32: 1e-7, T.F16: 2.0**-11, T.BF16: 2.0**-8, T.TQ1_0: 0.85, T.TQ2_0: 0.85}.get(t, 3.0 * 2.0**-bpw)
    assert rel < bound, f"{t.name}: relative RMS error {rel:.4f} at {bpw:.2f} bpw"
    try:
        ref = gguf.quants.dequantize(q, t)
    except NotImplementedError:
        return  # a type this gguf version cannot read
    np.testing.assert_array_equal(y, ref.reshape(x.shape))


@pytest.mark.parametrize("t", sorted(GGUF_NUMPY | {T.F16}, key=lambda t: t.value), ids=lambda t: t.name)
def test_bytes_match_gguf_numpy(t: T, x: np.ndarray) -> None:
    ref = gguf.quants.quantize(x, t)
    np.testing.assert_array_equal(ggml.quantize(x, t), np.ascontiguousarray(ref).view(np.uint8))


@pytest.mark.parametrize("t", [T.Q4_K, T.IQ2_XXS, T.Q8_0, T.F16])
def test_threads_identical(t: T, x: np.ndarray, imat: np.ndarray) -> None:
    big = np.tile(x, (8, 1))  # (512, n): several chunks per thread
    one = _quantize(big, t, imat, threads=1)
    np.testing.assert_array_equal(one, _quantize(big, t, imat, threads=2))
    np.testing.assert_array_equal(one, _quantize(big, t, imat, threads=5))
    y = ggml.dequantize(one, t, big.shape, threads=1)
    np.testing.assert_array_equal(y, ggml.dequantize(one, t, big.shape, threads=3))


def test_experts_use_their_own_imatrix(x: np.ndarray, imat: np.ndarray) -> None:
    w = np.stack([x, x[::-1]])  # (E=2, rows, n)
    im = np.stack([imat, imat[::-1]])  # (E, n)
    q = ggml.quantize(w, T.IQ3_S, imatrix=im)
    assert q.shape == (2, ROWS, gt.row_bytes(T.IQ3_S, N))
    np.testing.assert_array_equal(q[1], ggml.quantize(x[::-1], T.IQ3_S, imatrix=imat[::-1]))
    assert not np.array_equal(q[0], ggml.quantize(x, T.IQ3_S))  # the imatrix changes the choice


def test_types_and_errors(x: np.ndarray) -> None:
    assert gt.parse_type("q4_k") == T.Q4_K and gt.parse_type(T.IQ2_XXS) == T.IQ2_XXS
    with pytest.raises(MoepackError, match="Q4_K"):
        gt.parse_type("Q4_Z")
    with pytest.raises(MoepackError, match="Q4_K_M"):
        ggml.parse_ftype("Q4_KM")
    assert ggml.parse_ftype("q4_k") == ggml.parse_ftype("Q4_K_M")
    assert ggml.requires_imatrix(T.IQ2_XXS) and not ggml.requires_imatrix(T.Q4_K)
    with pytest.raises(MoepackError, match="importance matrix"):
        ggml.quantize(x, T.IQ1_S)
    with pytest.raises(MoepackError, match="multiples of 256"):
        ggml.quantize(x[:, :96], T.Q4_K)
    assert gt.bits_per_weight(T.Q8_0) == 8.5 and gt.bits_per_weight("Q4_K") == 4.5
    assert gt.row_bytes(T.Q6_K, 512) == 420


@pytest.mark.parametrize(("t", "n", "want"), [
    (T.Q4_K, 256, T.Q4_K), (T.Q4_K, 96, T.Q5_0), (T.Q5_K, 96, T.Q5_1), (T.Q6_K, 96, T.Q8_0),
    (T.Q2_K, 96, T.Q4_0), (T.Q3_K, 96, T.Q4_0), (T.IQ2_XXS, 96, T.IQ4_NL), (T.IQ4_XS, 96, T.IQ4_NL),
    (T.TQ1_0, 96, T.Q4_0), (T.Q4_K, 100, T.F16), (T.F16, 7, T.F16),
])
def test_fallback_type(t: T, n: int, want: T) -> None:
    assert gt.fallback_type(t, n) == want


def test_no_fallback_like_llama_cpp() -> None:
    with pytest.raises(MoepackError, match="no fallback"):  # llama.cpp: "no tensor type fallback is defined"
        gt.fallback_type(T.Q8_0, 100)


# ------------------------------------------------------------------------ llama_model_quantize on a tiny GGUF

def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    w = {"token_embd.weight": r(VOCAB, EMBD), "output_norm.weight": np.ones(EMBD, np.float32),
         "output.weight": r(VOCAB, EMBD)}
    for b in range(N_LAYER):
        w |= {f"blk.{b}.attn_norm.weight": np.ones(EMBD, np.float32), f"blk.{b}.attn_q.weight": r(EMBD, EMBD),
              f"blk.{b}.attn_k.weight": r(EMBD // 2, EMBD), f"blk.{b}.attn_v.weight": r(EMBD // 2, EMBD),
              f"blk.{b}.attn_output.weight": r(EMBD, EMBD), f"blk.{b}.ffn_norm.weight": np.ones(EMBD, np.float32),
              f"blk.{b}.ffn_gate_inp.weight": r(N_EXP, EMBD),
              f"blk.{b}.ffn_gate_exps.weight": r(N_EXP, FF, EMBD), f"blk.{b}.ffn_up_exps.weight": r(N_EXP, FF, EMBD),
              f"blk.{b}.ffn_down_exps.weight": r(N_EXP, EMBD, FF)}  # numpy shapes: ggml ne reversed
    return w


def _write_model(path: Path, weights: dict[str, np.ndarray]) -> None:
    """A tiny Mixtral-style 'llama' GGUF: all llama_model_quantize's loader needs is hparams and tensors."""
    wr = gguf.GGUFWriter(path, "llama")
    wr.add_context_length(256)
    wr.add_embedding_length(EMBD)
    wr.add_block_count(N_LAYER)
    wr.add_feed_forward_length(FF)
    wr.add_head_count(4)
    wr.add_head_count_kv(2)
    wr.add_rope_dimension_count(EMBD // 4)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_expert_count(N_EXP)
    wr.add_expert_used_count(2)
    wr.add_file_type(gguf.LlamaFileType.ALL_F32)
    wr.add_tokenizer_model("gpt2")  # a minimal byte-level vocab, so the file is a complete model
    wr.add_token_list([f"<t{i}>" for i in range(VOCAB)])
    wr.add_token_types([gguf.TokenType.NORMAL] * VOCAB)
    wr.add_token_merges([])
    for name, arr in weights.items():
        wr.add_tensor(name, arr)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def _write_imatrix(path: Path, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """llama-imatrix's GGUF layout: <name>.in_sum2 (E, n) and <name>.counts (E, 1); returns sums / counts."""
    rng = np.random.default_rng(3)
    wr = gguf.GGUFWriter(path, "imatrix")
    wr.add_type(gguf.GGUFType.IMATRIX)
    wr.add_array(gguf.Keys.IMatrix.DATASETS, ["tiny.txt"])
    wr.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, 3)
    want = {}
    for name, arr in weights.items():
        if arr.ndim < 2 or "norm" in name or "gate_inp" in name or name in ("token_embd.weight", "output.weight"):
            continue
        n_exp = arr.shape[0] if arr.ndim == 3 else 1
        counts = np.full((n_exp, 1), 12, np.float32)  # (E, 1)
        counts[-1] = 0 if n_exp > 1 else 12  # an expert that never saw a token gets ones
        sums = rng.uniform(0.1, 50, (n_exp, arr.shape[-1])).astype(np.float32)  # (E, n)
        wr.add_tensor(name + ".in_sum2", sums)
        wr.add_tensor(name + ".counts", counts)
        want[name] = np.where(counts > 0, sums / np.maximum(counts, 1), 1).astype(np.float32)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return want


def _compare(out: Path, weights: dict[str, np.ndarray], imatrix: dict[str, np.ndarray] | None) -> set[T]:
    seen = set()
    for t in gguf.GGUFReader(out).tensors:
        src, qtype = weights[t.name], T(t.tensor_type)
        seen.add(qtype)
        got = np.asarray(t.data).view(np.uint8).reshape(-1)
        if qtype == T.F32:
            np.testing.assert_array_equal(got, src.view(np.uint8).reshape(-1), err_msg=t.name)
            continue
        assert qtype == gt.fallback_type(qtype, src.shape[-1])
        im = None if imatrix is None else imatrix.get(t.name)
        if im is not None and src.ndim == 2:
            im = im[0]  # (n,)
        mine = ggml.quantize(src, qtype, imatrix=im)
        np.testing.assert_array_equal(got, mine.reshape(-1), err_msg=f"{t.name} as {qtype.name}")
    return seen


def test_matches_llama_model_quantize(tmp_path: Path) -> None:
    weights = _weights()
    _write_model(src := tmp_path / "f32.gguf", weights)
    quantize_gguf_ftype(src, out := tmp_path / "q4km.gguf", "Q4_K_M", threads=2)
    assert not (tmp_path / "q4km.gguf.tmp").exists()
    seen = _compare(out, weights, None)
    assert {T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0} <= seen  # the mixture, and both fallbacks of the FF=96 rows


def test_matches_llama_model_quantize_with_imatrix(tmp_path: Path) -> None:
    weights = _weights()
    _write_model(src := tmp_path / "f32.gguf", weights)
    want = _write_imatrix(im_path := tmp_path / "imatrix.gguf", weights)
    from moepack.gguf.imatrix import read_imatrix

    found = read_imatrix(im_path)
    values = found.means()
    assert found.chunk_count == 3 and found.datasets == ["tiny.txt"] and values.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(values[k], want[k])
    with pytest.raises(MoepackError, match="imatrix"):
        quantize_gguf_ftype(src, tmp_path / "no.gguf", "IQ2_XXS")
    assert not (tmp_path / "no.gguf").exists()
    quantize_gguf_ftype(src, out := tmp_path / "iq2.gguf", "IQ2_XXS", imatrix=im_path, threads=2)
    seen = _compare(out, weights, want)
    assert {T.IQ2_XXS, T.Q2_K, T.Q5_K, T.IQ4_NL} <= seen
    kv = gguf.GGUFReader(out).get_field("quantize.imatrix.entries_count")
    assert kv is not None and kv.contents() == len(want)


def test_unknown_ftype_and_overrides(tmp_path: Path) -> None:
    weights = _weights()
    _write_model(src := tmp_path / "f32.gguf", weights)
    with pytest.raises(MoepackError, match="Q4_K_M"):
        quantize_gguf_ftype(src, tmp_path / "x.gguf", "Q4_K_X")
    quantize_gguf_ftype(src, out := tmp_path / "q8.gguf", "Q8_0",
                        tensor_types={r"attn_q\.weight": "Q4_0", r"ffn_up_exps": T.Q5_K})
    types = {t.name: T(t.tensor_type) for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == T.Q4_0 and types["blk.1.ffn_up_exps.weight"] == T.Q5_K
    assert types["blk.0.attn_k.weight"] == T.Q8_0
    _compare(out, weights, None)
