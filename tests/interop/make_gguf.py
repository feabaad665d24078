"""Write a tiny llama-architecture GGUF: a few layers of seeded random weights and a
byte-fallback vocabulary (<unk>, <s>, </s> and the 256 byte tokens), so llama.cpp loads
it, tokenizes any text and generates (nonsense) tokens in milliseconds.

Run with the interpreter that has the ``gguf`` package (the llama venv):
``python make_gguf.py OUT.gguf [--seed N]``. It imports nothing from flipback.
"""

from __future__ import annotations

import argparse

import numpy as np
from gguf import GGUFWriter, TokenType

DIM, LAYERS, HEADS, FF, CTX = 64, 2, 4, 128, 512


def vocabulary() -> tuple[list[bytes], list[float], list[int]]:
    tokens = [b"<unk>", b"<s>", b"</s>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(TokenType.BYTE)
    return tokens, [0.0] * len(tokens), [int(t) for t in types]


def write(path: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)

    def weight(*shape: int) -> np.ndarray:
        # numpy order is (rows, cols) = ggml's dimensions reversed: (out, in)
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    w = GGUFWriter(path, "llama")
    w.add_name(f"flipback-interop-tiny-{seed}")
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(DIM // HEADS)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)

    w.add_tensor("token_embd.weight", weight(n_vocab, DIM))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(DIM, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(DIM, DIM))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(DIM, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(FF, DIM))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(FF, DIM))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(DIM, FF))
    w.add_tensor("output_norm.weight", np.ones(DIM, dtype=np.float32))
    w.add_tensor("output.weight", weight(n_vocab, DIM))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    write(args.out, args.seed)
