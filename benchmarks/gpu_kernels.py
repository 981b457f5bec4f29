"""Time attnfuse's Triton kernels on a CUDA GPU; print a table and write JSON.

    pip install -e .[gpu] && python benchmarks/gpu_kernels.py [--out gpu_kernels.json] [--heads 16]

Three sections, every time the median of triton.testing.do_bench:
- padding: varlen_attention on the packed tokens vs torch SDPA on the padded batch
  (batch 16, max length 1024 and 4096, average length 0.6 x max, and no padding),
  fp16, head size 64. SDPA is timed twice: with the flash backend, which takes no
  mask and so computes (and wastes) the padded positions, and with the key padding
  mask, letting torch pick its backend.
- window: varlen_attention with window (256, 256) vs dense, one sequence of 8K to 32K.
- token-wise: skip_layernorm and bias_gelu bandwidth vs torch's copy of the same bytes.

Without CUDA it prints one line and exits with code 0.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

BATCH = 16
HEAD_DIM = 64
DTYPE = torch.float16
WINDOW = (256, 256)


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def lengths_with_average(max_len: int, fraction: float) -> torch.Tensor:
    """BATCH lengths evenly spread from (2 * fraction - 1) * max_len to max_len, so that
    their mean is fraction * max_len (fraction >= 0.5; 1.0: no padding)."""
    shortest = (2 * fraction - 1) * max_len
    return torch.linspace(shortest, max_len, BATCH).round().int()


def padded_qkv(lengths: torch.Tensor, max_len: int, heads: int):
    """q, k, v [B, S, H, D] on the GPU, and the key padding mask [B, S]."""
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    q, k, v = (torch.randn(BATCH, max_len, heads, HEAD_DIM, device="cuda", dtype=DTYPE) for _ in range(3))
    return q, k, v, mask.cuda()


def bench_padding(heads: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from attnfuse.kernels.triton import pack, varlen_attention

    rows = []
    for max_len in (1024, 4096):
        for fraction in (0.6, 1.0):
            q, k, v, mask = padded_qkv(lengths_with_average(max_len, fraction), max_len, heads)
            (pq, pk, pv), (indices, cu, max_seqlen) = packed_qkv(q, k, v, mask, pack)
            bq, bk, bv = (x.transpose(1, 2) for x in (q, k, v))  # SDPA wants [B, H, S, D]
            attn_mask = mask[:, None, None, :]

            check_varlen_against_sdpa(varlen_attention(pq, pk, pv, cu, max_seqlen), sdpa(bq, bk, bv, attn_mask=attn_mask), indices)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                flash_ms = median_ms(lambda: sdpa(bq, bk, bv))
            rows.append({
                "section": "padding", "max_len": max_len, "avg_len": round(fraction * max_len),
                "tokens": int(cu[-1]), "varlen_ms": median_ms(lambda: varlen_attention(pq, pk, pv, cu, max_seqlen)),
                "sdpa_flash_padded_ms": flash_ms,
                "sdpa_masked_ms": median_ms(lambda: sdpa(bq, bk, bv, attn_mask=attn_mask)),
            })
    return rows


def packed_qkv(q, k, v, mask, pack):
    """Pack q, k, v with one set of indices: [total, H, D] each, contiguous (so the
    kernel wrapper copies nothing inside the timed region)."""
    tokens, indices, cu, max_seqlen = pack(torch.stack([q, k, v], dim=2), mask)
    return tuple(t.contiguous() for t in tokens.unbind(1)), (indices, cu, max_seqlen)


def check_varlen_against_sdpa(varlen_out, sdpa_out, indices):
    """The kernel's real tokens must equal masked SDPA's before anything is timed."""
    expected = sdpa_out.transpose(1, 2).flatten(0, 1).index_select(0, indices)
    torch.testing.assert_close(varlen_out, expected, atol=2e-2, rtol=2e-2)


def bench_window(heads: int) -> list[dict]:
    from attnfuse.kernels.triton import varlen_attention

    rows = []
    for length in (8192, 16384, 32768):
        q, k, v = (torch.randn(length, heads, HEAD_DIM, device="cuda", dtype=DTYPE) for _ in range(3))
        cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
        rows.append({
            "section": "window", "tokens": length, "window": list(WINDOW),
            "windowed_ms": median_ms(lambda: varlen_attention(q, k, v, cu, length, window=WINDOW)),
            "dense_ms": median_ms(lambda: varlen_attention(q, k, v, cu, length)),
        })
    return rows


def gigabytes_per_s(num_bytes: int, ms: float) -> float:
    return num_bytes / (ms * 1e-3) / 1e9


def bench_tokenwise() -> list[dict]:
    from attnfuse.kernels.triton import bias_gelu, skip_layernorm

    tokens = int(BATCH * 1024 * 0.6)  # the packed tokens of the 1024 padding case
    rows = []
    for hidden in (768, 1024, 4096):
        x, skip = (torch.randn(tokens, hidden, device="cuda", dtype=DTYPE) for _ in range(2))
        bias, weight, beta = (torch.randn(hidden, device="cuda", dtype=DTYPE) for _ in range(3))
        copy_out = torch.empty_like(x)
        tensor_bytes = x.numel() * x.element_size()
        copy_ms = median_ms(lambda: copy_out.copy_(x))
        layernorm_ms = median_ms(lambda: skip_layernorm(x, skip, bias, weight, beta, 1e-5))
        gelu_ms = median_ms(lambda: bias_gelu(x, bias))
        rows.append({
            "section": "tokenwise", "tokens": tokens, "hidden": hidden,
            "copy_GBps": gigabytes_per_s(2 * tensor_bytes, copy_ms),  # read + write
            "skip_layernorm_GBps": gigabytes_per_s(3 * tensor_bytes, layernorm_ms),  # x, skip in; out
            "bias_gelu_GBps": gigabytes_per_s(2 * tensor_bytes, gelu_ms),  # x in; out
        })
    return rows


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    cells = [[format_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print()


def format_cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_kernels.json", help="where to write the JSON results")
    parser.add_argument("--heads", type=int, default=16, help="attention heads (head size is 64)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernels: no CUDA device, nothing to measure.")
        return 0

    torch.manual_seed(0)
    sections = [bench_padding(args.heads), bench_window(args.heads), bench_tokenwise()]
    for rows in sections:
        print_table(rows)
    import triton

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(DTYPE),
        "heads": args.heads,
        "head_dim": HEAD_DIM,
        "rows": [row for rows in sections for row in rows],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
