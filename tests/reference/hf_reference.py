#!/usr/bin/env python3
"""An independent reference for flexllm's forward pass.

Builds tiny seeded random models in Hugging Face layout (config.json, safetensors
weights with HF tensor names, a minimal byte-level BPE tokenizer.json) and writes
the logits that Hugging Face's LlamaForCausalLM / Qwen2ForCausalLM would give for a
fixed prompt, computed here in float64 with NumPy from the exact stored weights
(F32, F16 or BF16 values converted exactly).

The forward follows transformers' modeling_llama.py / modeling_qwen2.py:
  - RMSNorm: x * rsqrt(mean(x^2) + eps), then * weight
  - q/k/v projections (+ bias for Qwen2, and q/k/v/o bias for LLaMA with attention_bias)
  - rotate-half RoPE, cos/sin of [freqs, freqs] with inv_freq = 1/theta^(arange(0,hd,2)/hd),
    rescaled per modeling_rope_utils._compute_llama3_parameters for rope_type "llama3"
  - repeat_kv for GQA (query head h uses kv head h // (n_heads / n_kv_heads))
  - causal softmax attention with scale 1/sqrt(head_dim), o_proj
  - SwiGLU MLP down(silu(gate(x)) * up(x)), residuals around both blocks
  - final norm, lm_head (or the embedding matrix when tied)

Usage: hf_reference.py OUTDIR   (writes OUTDIR/<case>/{config.json, *.safetensors,
tokenizer.json, expected.json} and OUTDIR/cases.json listing the cases)
"""
import json
import math
import os
import struct
import sys

import numpy as np
from safetensors.numpy import load_file, save_file


# ------------------------------------------------------------------ dtypes

def f32_to_bf16_bits(a):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (no NaNs here)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)


def bf16_bits_to_f64(b):
    return (b.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def store(a, dtype):
    """Returns (array to write, exact float64 value of what is written)."""
    if dtype == "F32":
        w = a.astype(np.float32)
        return w, w.astype(np.float64)
    if dtype == "F16":
        w = a.astype(np.float16)
        return w, w.astype(np.float64)
    if dtype == "BF16":
        w = f32_to_bf16_bits(a)
        return w, bf16_bits_to_f64(w)
    raise ValueError(dtype)


# ------------------------------------------------------- safetensors writing

def write_bf16_safetensors(path, tensors, metadata):
    """tensors: name -> uint16 array of bf16 bits. Per the safetensors format: u64 LE
    header size, JSON header {name: {dtype, shape, data_offsets}, __metadata__},
    padded with spaces to a multiple of 8, then the little-endian data."""
    header = {"__metadata__": metadata}
    blobs, off = [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name]).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape),
                        "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def read_bf16_safetensors(path):
    """Reads back a BF16 file (a check on the writer): name -> uint16 array."""
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "BF16"
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<u2").reshape(info["shape"])
    return out


def write_weights(folder, stored, dtype, shards):
    """stored: name -> array in its stored form. One file, or `shards` files plus
    model.safetensors.index.json."""
    meta = {"format": "pt"}
    names = sorted(stored)
    if shards == 1:
        groups = [("model.safetensors", names)]
    else:
        per = math.ceil(len(names) / shards)
        groups = [("model-%05d-of-%05d.safetensors" % (i + 1, shards), names[i * per:(i + 1) * per])
                  for i in range(shards)]
        assert all(g[1] for g in groups)
    weight_map, total = {}, 0
    for fname, group in groups:
        part = {n: np.ascontiguousarray(stored[n]) for n in group}
        path = os.path.join(folder, fname)
        if dtype == "BF16":
            write_bf16_safetensors(path, part, meta)
            back = read_bf16_safetensors(path)
        else:
            save_file(part, path, metadata=meta)
            back = load_file(path)
        assert set(back) == set(part)
        for n in group:
            assert back[n].dtype == part[n].dtype and np.array_equal(back[n], part[n]), n
            weight_map[n] = fname
            total += part[n].nbytes
    if shards > 1:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---------------------------------------------------------------- tokenizer

def bytes_to_unicode():
    """GPT-2's byte -> printable unicode symbol table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tokenizer_json(bos, eos):
    sym = bytes_to_unicode()
    vocab = {sym[b]: b for b in range(256)}

    def added(i, content):
        return {"id": i, "content": content, "single_word": False, "lstrip": False,
                "rstrip": False, "normalized": False, "special": True}

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added(bos, "<|bos|>"), added(eos, "<|eos|>")],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


# ---------------------------------------------------------------- the model

def head_dim_of(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def has_qkv_bias(cfg):
    return cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)


def has_o_bias(cfg):
    # LlamaAttention: o_proj bias = config.attention_bias; Qwen2Attention: o_proj has no bias.
    return cfg["model_type"] == "llama" and cfg.get("attention_bias", False)


def inv_freq_of(cfg):
    """float64 inverse frequencies, per _compute_default_rope_parameters and
    _compute_llama3_parameters. Returns (inv_freq, band per frequency or None)."""
    hd = head_dim_of(cfg)
    inv = 1.0 / (cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = cfg.get("rope_scaling")
    if not rs:
        return inv, None
    assert rs["rope_type"] == "llama3"
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wl, high_wl = old / lo, old / hi
    wl = 2 * math.pi / inv
    scaled = np.where(wl > low_wl, inv / factor, inv)
    smooth = (old / wl - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wl < high_wl) & ~(wl > low_wl)
    out = np.where(medium, smoothed, scaled)
    band = np.where(wl < high_wl, "high", np.where(wl > low_wl, "low", "medium"))
    # No frequency may sit near a band edge, where float32 and float64 could disagree.
    for edge in (low_wl, high_wl):
        assert np.all(np.abs(wl / edge - 1) > 0.02), ("wavelength too near a band edge", wl, edge)
    return out, band


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def forward(cfg, W, ids):
    """Logits (T, vocab) in float64 for one sequence at positions 0..T-1."""
    T = len(ids)
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = head_dim_of(cfg), cfg["rms_norm_eps"]
    inv, _ = inv_freq_of(cfg)
    freqs = np.outer(np.arange(T, dtype=np.float64), inv)
    emb = np.concatenate([freqs, freqs], axis=-1)           # (T, hd)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    mask = np.triu(np.full((T, T), -np.inf), k=1)            # causal
    x = W["model.embed_tokens.weight"][ids]                  # (T, H)
    for l in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % l
        h = rms_norm(x, W[p + "input_layernorm.weight"], eps)

        def proj(name, n):
            y = h @ W[p + "self_attn.%s_proj.weight" % name].T
            if has_qkv_bias(cfg):
                y = y + W[p + "self_attn.%s_proj.bias" % name]
            return y.reshape(T, n, hd)

        q, k, v = proj("q", nh), proj("k", nkv), proj("v", nkv)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = nh // nkv
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)   # repeat_kv
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        a = s / s.sum(axis=-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, v).reshape(T, nh * hd)
        o = o @ W[p + "self_attn.o_proj.weight"].T
        if has_o_bias(cfg):
            o = o + W[p + "self_attn.o_proj.bias"]
        x = x + o
        h = rms_norm(x, W[p + "post_attention_layernorm.weight"], eps)
        g = h @ W[p + "mlp.gate_proj.weight"].T
        u = h @ W[p + "mlp.up_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ W[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, W["model.norm.weight"], eps)
    head = W["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else W["lm_head.weight"]
    return x @ head.T


def random_weights(cfg, rng):
    """float32 weights with HF names and shapes."""
    H, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim_of(cfg)

    def mat(rows, cols, std):
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    def norm_w(n):
        return (1 + rng.uniform(-0.2, 0.2, n)).astype(np.float32)

    def vec(n, std):
        return (rng.standard_normal(n) * std).astype(np.float32)

    W = {"model.embed_tokens.weight": mat(V, H, 0.3)}
    for l in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % l
        W[p + "input_layernorm.weight"] = norm_w(H)
        W[p + "self_attn.q_proj.weight"] = mat(nh * hd, H, 0.25)
        W[p + "self_attn.k_proj.weight"] = mat(nkv * hd, H, 0.25)
        W[p + "self_attn.v_proj.weight"] = mat(nkv * hd, H, 0.2)
        W[p + "self_attn.o_proj.weight"] = mat(H, nh * hd, 0.15)
        if has_qkv_bias(cfg):
            W[p + "self_attn.q_proj.bias"] = vec(nh * hd, 0.3)
            W[p + "self_attn.k_proj.bias"] = vec(nkv * hd, 0.3)
            W[p + "self_attn.v_proj.bias"] = vec(nkv * hd, 0.2)
        if has_o_bias(cfg):
            W[p + "self_attn.o_proj.bias"] = vec(H, 0.2)
        W[p + "post_attention_layernorm.weight"] = norm_w(H)
        W[p + "mlp.gate_proj.weight"] = mat(I, H, 0.2)
        W[p + "mlp.up_proj.weight"] = mat(I, H, 0.2)
        W[p + "mlp.down_proj.weight"] = mat(H, I, 0.15)
    W["model.norm.weight"] = norm_w(H)
    if not cfg["tie_word_embeddings"]:
        W["lm_head.weight"] = mat(V, H, 0.3)
    return W


def make_config(arch, **kw):
    cfg = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "hidden_act": "silu",
        "num_hidden_layers": 2,
        "vocab_size": 300,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5 if arch == "llama" else 1e-6,
        "rope_theta": 10000.0 if arch == "llama" else 1000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "bos_token_id": 256,
        "eos_token_id": 257,
    }
    if arch == "llama":
        cfg.update({"attention_bias": False, "mlp_bias": False})
    else:
        cfg.update({"use_sliding_window": False, "sliding_window": None})
    cfg.update(kw)
    return cfg


# Each case: name, config, stored dtype, number of shards, prompt length, seed.
CASES = [
    ("llama_f32_gqa",
     make_config("llama", hidden_size=64, intermediate_size=160, num_attention_heads=8,
                 num_key_value_heads=2),  # group size 4, head_dim 8 implied
     "F32", 1, 24, 1),
    ("llama31_rope_scaling",
     make_config("llama", hidden_size=96, intermediate_size=192, num_attention_heads=3,
                 num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                 rope_theta=500000.0,
                 # original_max_position_embeddings 64 (not 16): with high_freq_factor 4 the
                 # high-frequency band needs wavelengths < 64/4 = 16, and the shortest RoPE
                 # wavelength is 2*pi, so 16 would leave that band empty.
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     "F32", 1, 40, 2),
    ("qwen2_bias_tied_bf16",
     make_config("qwen2", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),  # group size 2
     "BF16", 1, 32, 3),
    ("qwen2_f16_sharded_headdim",
     make_config("qwen2", hidden_size=64, intermediate_size=144, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=24),  # 64 % 6 != 0; group size 3
     "F16", 2, 28, 4),
    ("llama_bf16_mha_sharded3_tied",
     make_config("llama", hidden_size=80, intermediate_size=176, num_hidden_layers=3,
                 num_attention_heads=5, num_key_value_heads=5, tie_word_embeddings=True),
     "BF16", 3, 30, 5),
    ("llama_attention_bias",
     make_config("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, attention_bias=True),  # q/k/v and o_proj biases
     "F32", 1, 20, 7),
]

# Configs an engine may refuse outright (with a message naming this field) instead of
# running them; what it must never do is load them and give other logits.
def build_case(outdir, name, cfg, dtype, shards, n_prompt, seed):
    folder = os.path.join(outdir, name)
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        os.remove(os.path.join(folder, f))
    rng = np.random.default_rng(seed)
    raw = random_weights(cfg, rng)
    stored, exact = {}, {}
    for n, a in raw.items():
        stored[n], exact[n] = store(a, dtype)
    if dtype != "F32":  # the stored values really are rounded
        assert not np.array_equal(exact["model.embed_tokens.weight"],
                                  raw["model.embed_tokens.weight"].astype(np.float64))
    cfg = dict(cfg, torch_dtype={"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype])
    _, band = inv_freq_of(cfg)
    if band is not None:
        present = set(band.tolist())
        assert present == {"high", "medium", "low"}, ("llama3 bands present", band)
    prompt = rng.integers(0, cfg["vocab_size"], n_prompt).tolist()
    logits = forward(cfg, exact, np.array(prompt))
    assert np.all(np.isfinite(logits))
    # A clear winner at every position, so the greedy ids are well defined in float32.
    top2 = np.sort(logits, axis=-1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    assert np.all(gap > 3e-4 * max(1.0, np.abs(logits).max())), ("near-tie", name, gap.min())
    write_weights(folder, stored, dtype, shards)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(cfg["bos_token_id"], cfg["eos_token_id"]), f, indent=1)
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump({"prompt": prompt, "logits": logits.tolist()}, f)
    info = {"name": name, "dtype": dtype, "shards": shards, "positions": n_prompt,
            "max_abs_logit": float(np.abs(logits).max()),
            "bands": None if band is None else band.tolist()}
    print("%-30s %-4s shards=%d T=%d max|logit|=%.3f%s" % (
        name, dtype, shards, n_prompt, info["max_abs_logit"],
        "" if band is None else " bands=" + ",".join(band.tolist())))
    return info


def self_check():
    """Checks of the reference's own pieces against independent formulations."""
    # bf16 rounding: exact values pass through, ties go to even, halfway rounds up to even.
    x = np.array([1.0, -2.5, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -9], dtype=np.float32)
    got = bf16_bits_to_f64(f32_to_bf16_bits(x))
    assert got.tolist() == [1.0, -2.5, 1.0, 1 + 4 * 2 ** -8, 1.0], got
    # rotate-half RoPE == rotating the pairs (i, i + hd/2) by pos * inv_freq[i].
    rng = np.random.default_rng(0)
    hd, pos = 8, 5.0
    inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2) / hd))
    v = rng.standard_normal(hd)
    emb = np.concatenate([pos * inv, pos * inv])
    a = v * np.cos(emb) + rotate_half(v) * np.sin(emb)
    z = (v[:hd // 2] + 1j * v[hd // 2:]) * np.exp(1j * pos * inv)
    assert np.allclose(a, np.concatenate([z.real, z.imag]), atol=1e-14)


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: hf_reference.py OUTDIR")
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    self_check()
    cases = [build_case(outdir, *c) for c in CASES]
    with open(os.path.join(outdir, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)


if __name__ == "__main__":
    main()
