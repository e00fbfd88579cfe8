#!/usr/bin/env python3
"""nGPT in PyTorch, computing as NVIDIA/ngpt's model.py does, for `scripts/bench_compare.sh`.

Two ways users run such a model today:
  --mode nvidia   model.py as written: bf16 autocast, no KV cache (each new token recomputes
                  the whole sequence), scaled_dot_product_attention in place of flash-attn.
  --mode static   the strongest PyTorch path a user could build: the same math with a static
                  KV cache, the decode step under torch.compile(mode="reduce-overhead"), as
                  gpt-fast does; weights in bf16.

  python3 scripts/torch_ngpt.py MODEL_DIR --mode nvidia --prompt-len 128 --gen-len 256
  python3 scripts/torch_ngpt.py MODEL_DIR --check ref.npy --tokens 45,64,77   # f32, no autocast

MODEL_DIR holds model.safetensors and config.json (`ngpt init` writes them). The last line of
stdout is one JSON object. Needs torch (and a GPU for useful numbers); reads safetensors
without the safetensors package.
"""

import argparse
import json
import math
import struct
import time

import torch
import torch.nn.functional as F

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        t = torch.frombuffer(bytearray(raw[base + a:base + b]), dtype=DTYPES[info["dtype"]])
        out[name.removeprefix("_orig_mod.").removeprefix("module.")] = t.reshape(info["shape"])
    return out


def position_table(t_len, d, device):
    """E[t, c] = sin(t w_{c/2}) for even c, cos(t w_{c/2}) for odd c; w_k = 10000^(-2k/D)."""
    c = torch.arange(d, device=device, dtype=torch.float64)
    w = torch.exp((2 * torch.div(c, 2, rounding_mode="floor")) * (-math.log(10000.0) / d))
    ang = torch.arange(t_len, device=device, dtype=torch.float64)[:, None] * w[None]
    e = torch.where(c.long() % 2 == 0, torch.sin(ang), torch.cos(ang))
    return e.float()


def justnorm(x):
    return x / x.norm(p=2, dim=-1, keepdim=True)


class NGPT:
    def __init__(self, weights, cfg, device, dtype):
        self.cfg = cfg
        self.w = {k: v.to(device=device, dtype=dtype if v.dim() == 2 else torch.float32)
                  for k, v in weights.items()}
        self.device = device
        self.c, self.h = cfg["n_embd"], cfg["n_head"]
        self.d = self.c // self.h
        self.bs = cfg["base_scale"]

    def layer_w(self, i, n):
        return self.w[f"transformer.h.{i}.{n}"]

    def pos_step(self, q, table):
        # q: [B, T, H, D] as pairs; NVIDIA's E.chunk(2, -1) split of the interleaved table.
        p = self.d // 2
        sin = table[..., :p][:, :, None, :]
        cos = table[..., p:][:, :, None, :]
        even, odd = q[..., 0::2], q[..., 1::2]
        return torch.stack((-odd * cos, even * sin), dim=-1).flatten(-2)

    def residual(self, h, branch, alpha):
        lr = (alpha * (0.05 / self.bs)).abs()
        a, b = justnorm(h), justnorm(branch)
        return justnorm(a + lr * (b - a))

    def block(self, i, x, table, attend):
        B, T, _ = x.shape
        q = (x @ self.layer_w(i, "query.weight").T).view(B, T, self.h, self.d)
        k = (x @ self.layer_w(i, "key.weight").T).view(B, T, self.h, self.d)
        v = (x @ self.layer_w(i, "value.weight").T).view(B, T, self.h, self.d)
        s = (self.layer_w(i, "sqk") / self.bs).view(1, 1, self.h, self.d)
        q = justnorm(self.pos_step(q.float(), table)) * s
        k = justnorm(self.pos_step(k.float(), table)) * s
        y = attend(i, q.to(x.dtype), k.to(x.dtype), v)
        h_att = y.reshape(B, T, self.c) @ self.layer_w(i, "att_c_proj.weight").T
        x = self.residual(x.float(), h_att.float(), self.layer_w(i, "attn_alpha")).to(x.dtype)
        uv = x @ self.layer_w(i, "c_fc.weight").T
        uv = uv.float() * (self.layer_w(i, "suv") * math.sqrt(self.c))
        u, g = uv.chunk(2, dim=-1)
        h_mlp = (u * F.silu(g)).to(x.dtype) @ self.layer_w(i, "mlp_c_proj.weight").T
        return self.residual(x.float(), h_mlp.float(), self.layer_w(i, "mlp_alpha")).to(x.dtype)

    def forward(self, idx, positions, attend):
        x = self.w["transformer.wte.weight"][idx]
        table = self.table[positions]
        for i in range(self.cfg["n_layer"]):
            x = self.block(i, x, table, attend)
        sz = self.w["sz"] / self.bs
        return (x @ self.w["lm_head.weight"].T).float() * sz

    def prepare(self, max_len):
        self.table = position_table(max_len, self.d, self.device)

    def full(self, idx):
        """Logits of every position, recomputing everything (model.py's path)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=self.device)[None].expand(idx.shape[0], T)

        def attend(_i, q, k, v):
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                is_causal=True, scale=math.sqrt(self.d))
            return y.transpose(1, 2)
        return self.forward(idx, pos, attend)


class StaticCache:
    """gpt-fast style: preallocated K/V, a decode step compiled once."""

    def __init__(self, model, batch, max_len, dtype):
        m = model
        shape = (m.cfg["n_layer"], batch, m.h, max_len, m.d)
        self.k = torch.zeros(shape, device=m.device, dtype=dtype)
        self.v = torch.zeros(shape, device=m.device, dtype=dtype)
        # The caches keep their addresses, as gpt-fast's module buffers and Hugging Face's
        # StaticCache do: without this, CUDA graphs are skipped ("mutated inputs").
        torch._dynamo.mark_static_address(self.k)
        torch._dynamo.mark_static_address(self.v)
        self.m, self.max_len = m, max_len
        self.step = torch.compile(self._step, mode="reduce-overhead", fullgraph=True)

    def _attend_at(self, pos):
        def attend(i, q, k, v):
            # q, k, v: [B, T, H, D]; write k, v at pos, attend over slots <= each query's pos.
            self.k[i].index_copy_(2, pos[0], k.transpose(1, 2))
            self.v[i].index_copy_(2, pos[0], v.transpose(1, 2))
            slots = torch.arange(self.max_len, device=q.device)
            mask = slots[None, :] <= pos[0][:, None]  # [T, max_len]
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), self.k[i], self.v[i], attn_mask=mask,
                scale=math.sqrt(self.m.d))
            return y.transpose(1, 2)
        return attend

    def prefill(self, idx):
        T = idx.shape[1]
        pos = torch.arange(T, device=self.m.device)[None].expand(idx.shape[0], T)
        return self.m.forward(idx, pos, self._attend_at(pos))

    def _step(self, idx, pos):
        return self.m.forward(idx, pos, self._attend_at(pos))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--mode", choices=["nvidia", "static"], default="nvidia")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--check", help="compare f32 logits with this .npy (ngpt logits)")
    ap.add_argument("--tokens", help="token ids for --check")
    a = ap.parse_args()

    cfg = json.load(open(f"{a.model_dir}/config.json"))
    cfg = cfg.get("model_args", cfg)
    weights = load_safetensors(f"{a.model_dir}/model.safetensors")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    if a.check:
        import numpy as np
        m = NGPT(weights, cfg, device, torch.float32)
        ids = torch.tensor([[int(t) for t in a.tokens.split(",")]], device=device)
        m.prepare(ids.shape[1])
        with torch.no_grad():
            got = m.full(ids)[0].double().cpu().numpy()
        ref = np.load(a.check).astype(np.float64)
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
        print(json.dumps({"rel_err": rel, "top1": top1}))
        raise SystemExit(0 if rel < 1e-4 and top1 == 1.0 else 1)

    m = NGPT(weights, cfg, device, torch.bfloat16)
    total = a.prompt_len + a.gen_len
    m.prepare(total)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg["vocab_size"], (a.batch, a.prompt_len), generator=g).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run_nvidia(gen):
        seq = prompt
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            logits = m.full(seq)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            sync()
            prefill = time.perf_counter() - t0
            t1 = time.perf_counter()
            for _ in range(gen):
                seq = torch.cat([seq, nxt], dim=1)
                nxt = m.full(seq)[:, -1].argmax(-1, keepdim=True)
            sync()
        return prefill, time.perf_counter() - t1

    cache = StaticCache(m, a.batch, total, torch.bfloat16) if a.mode == "static" else None

    def run_static(gen):
        t0 = time.perf_counter()
        with torch.no_grad():
            nxt = cache.prefill(prompt)[:, -1].argmax(-1, keepdim=True)
            sync()
            prefill = time.perf_counter() - t0
            t1 = time.perf_counter()
            for i in range(gen):
                pos = torch.full((a.batch, 1), a.prompt_len + i, device=device)
                nxt = cache.step(nxt, pos)[:, -1].argmax(-1, keepdim=True).clone()
            sync()
        return prefill, time.perf_counter() - t1

    run = run_nvidia if a.mode == "nvidia" else run_static
    run(4)  # warm-up (and torch.compile's captures)
    prefill, decode = run(a.gen_len)
    result = {
        "engine": f"torch-{a.mode}",
        "torch": torch.__version__,
        "device": device,
        "prefill_tokens_per_s": a.batch * a.prompt_len / prefill,
        "decode_tokens_per_s": a.batch * a.gen_len / decode,
        "ttft_ms": prefill * 1e3,
        "gen_s": decode,
    }
    print(f"torch {torch.__version__} {a.mode} on {device}: prefill "
          f"{result['prefill_tokens_per_s']:.1f} tokens/s, decode "
          f"{result['decode_tokens_per_s']:.1f} tokens/s ({a.gen_len} tokens in {decode:.2f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
