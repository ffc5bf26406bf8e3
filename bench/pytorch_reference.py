"""Independent PyTorch reference of the CRATE-MAE encoder and decoder, for benchmarking only.

This is an independent reimplementation written from the model specification (it is NOT the
official Ma-Lab-Berkeley/CRATE code). Its correctness is checked against the golden vectors in
model/tests/golden/set_a, which were produced by the official, unmodified code. Parameter names
match the official state_dict, so official checkpoints load directly (`pos_embed` and
`decoder_embed.*` exist in official checkpoints but are unused by the forward pass and skipped).

Commands (run from /work/main):
  # correctness: no-mask encoder latent + decoder prediction (and the 75%-masked pass) vs golden
  /tmp/torchvenv/bin/python bench/pytorch_reference.py --check-golden model/tests/golden/set_a
  # benchmark: encoder img/s and encoder+decoder with a 75% random mask (completion) img/s
  /tmp/torchvenv/bin/python bench/pytorch_reference.py --bench --sizes tiny,small,base \
      --batches 1,8,32 --threads 2 --seconds 3 --json bench/pytorch_results.json
"""
import argparse
import json
import math
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

SIZES = {"tiny": (384, 12, 6), "small": (576, 12, 12), "base": (768, 12, 12)}  # dim, depth, heads
# Benchmark configurations by name: (img_size, patch, dim, depth, heads); lambda 0.5, eta 0.1.
# `builtin` is the shape of the server's built-in Fashion-MNIST model.
# `served` is that model itself: its trained weights and its default readout (load_served).
CONFIGS = {"builtin": (32, 4, 128, 4, 4), "served": (32, 4, 128, 4, 4),
           **{name: (224, 16, *shape) for name, shape in SIZES.items()}}
SERVED_WEIGHTS = Path(__file__).resolve().parent.parent / "server/assets/default-model/model.safetensors"


class PreNorm(nn.Module):
    def __init__(self, dim, fn, eps):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim, eps=eps), fn  # official names: .norm / .fn


class MSSA(nn.Module):
    """Multi-head subspace self-attention: Q = K = V = LN(x) @ U.T, then to_out."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        w = self.qkv(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)  # [B, H, N, dh]
        out = F.scaled_dot_product_attention(w, w, w)  # softmax(w w^T * dh^-0.5) @ w
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class Dictionary(nn.Module):
    """Bare [d, d] parameter used through F.linear (ISTA dictionary / decoder linear map)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads, eps, lambd, eta):
        super().__init__()
        self.lambd, self.eta = lambd, eta
        self.layers = nn.ModuleList([nn.ModuleList(
            [PreNorm(dim, MSSA(dim, heads), eps), PreNorm(dim, Dictionary(dim), eps)])])

    def forward(self, x):
        attn, ista = self.layers[0]
        z = x + attn.fn(attn.norm(x))
        n, D = ista.norm(z), ista.fn.weight
        grad_1 = F.linear(F.linear(n, D), D.t())  # (n D^T) D
        grad_2 = F.linear(n, D.t())               # n D
        return F.relu(n + self.eta * (grad_2 - grad_1) - self.eta * self.lambd)


class DecoderBlock(nn.Module):
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList(
            [PreNorm(dim, Dictionary(dim), eps), PreNorm(dim, MSSA(dim, heads), eps)])])

    def forward(self, x):
        lin, attn = self.layers[0]
        y = F.linear(lin.norm(x), lin.fn.weight)
        return y - attn.fn(attn.norm(y))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, imgs):
        return self.proj(imgs).flatten(2).transpose(1, 2)  # [B, L, d]


class CrateMAE(nn.Module):
    def __init__(self, img_size=224, patch=16, dim=384, depth=12, heads=6, lambd=0.5, eta=0.1,
                 prenorm_eps=1e-5, final_eps=1e-6):
        super().__init__()
        num_patches = (img_size // patch) ** 2
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + num_patches, dim))
        self.blocks = nn.ModuleList(
            [EncoderBlock(dim, heads, prenorm_eps, lambd, eta) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=final_eps)
        self.decoder_blocks = nn.ModuleList(
            [DecoderBlock(dim, heads, prenorm_eps) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(dim, eps=final_eps)
        self.decoder_pred = nn.Linear(dim, patch * patch * 3)

    def encoder_input(self, imgs, mask=None):
        """imgs [B,3,S,S]; mask bool [B,L] (True = masked) or None -> tokens [B, 1+L, d]."""
        x = self.patch_embed(imgs)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.decoder_pos_embed

    def forward_encoder(self, imgs, mask=None):
        """imgs [B,3,S,S]; mask bool [B,L] (True = masked) or None -> latent [B, 1+L, d]."""
        x = self.encoder_input(imgs, mask)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def block_outputs(self, imgs, last):
        """imgs -> [outputs of blocks 0..=last] (before the final norm), no mask."""
        x, outs = self.encoder_input(imgs), []
        for blk in self.blocks[:last + 1]:
            x = blk(x)
            outs.append(x)
        return outs

    def forward_decoder(self, latent):
        """latent [B, 1+L, d] -> pred [B, L, p*p*3] (cls row dropped)."""
        x = latent
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def build_model(config, seed=0):
    """A CrateMAE of a named configuration (CONFIGS) with seeded random weights, in eval mode."""
    if config == "served":
        raise ValueError("served is the built-in model's own weights: use load_served()")
    img_size, patch, dim, depth, heads = CONFIGS[config]
    torch.manual_seed(seed)
    return CrateMAE(img_size, patch, dim, depth, heads).eval()


class DefaultEmbedding(nn.Module):
    """The served model's default embedding (model/src/readout.rs): the patch tokens of blocks
    first..=last, each averaged over a grid x grid of regions (row-major regions, d values
    each), side by side, centred and projected: [B, k]."""

    def __init__(self, model, first, last, grid, mean, projection):
        super().__init__()
        self.model, self.first, self.last, self.grid = model, first, last, grid
        self.register_buffer("mean", mean)
        self.register_buffer("projection", projection)

    def forward(self, imgs):
        grids = []
        for tokens in self.model.block_outputs(imgs, self.last)[self.first:]:
            b, n, d = tokens.shape
            side, g = math.isqrt(n - 1), self.grid
            cells = tokens[:, 1:].reshape(b, g, side // g, g, side // g, d).mean(dim=(2, 4))
            grids.append(cells.reshape(b, g * g * d))
        return (torch.cat(grids, dim=1) - self.mean) @ self.projection


def load_served(path=SERVED_WEIGHTS):
    """The built-in model as the server loads it: a CrateMAE with its weights, wrapped in its
    default readout (the whitened grid its metadata names)."""
    tensors, meta = read_safetensors(path, with_metadata=True)
    cfg = json.loads(meta["crate_mae.config"])
    spec = json.loads(meta["crate_mae.whitened_grid"])
    model = CrateMAE(cfg["img_size"], cfg["patch_size"], cfg["dim"], cfg["depth"], cfg["heads"],
                     cfg["lambd"], cfg["ista_step_size"], cfg["prenorm_ln_eps"], cfg["final_ln_eps"])
    state = {k: v for k, v in tensors.items() if k != "pos_embed"
             and not k.startswith(("decoder_embed.", "whitened_grid."))}
    model.load_state_dict(state, strict=True)
    readout = DefaultEmbedding(model.eval(), spec.get("first_layer", spec["layer"]), spec["layer"],
                               spec["grid"], tensors["whitened_grid.mean"],
                               tensors["whitened_grid.projection"])
    return readout.eval()


def check_image(img_size):
    """The fixed image model/examples/bench.rs embeds too, built the same way: [1, 3, S, S]."""
    i = np.arange(3 * img_size * img_size)
    x = ((i * 37) % 101).astype(np.float32) / np.float32(101) - np.float32(0.5)
    return torch.from_numpy(x.reshape(1, 3, img_size, img_size))


def read_safetensors(path, with_metadata=False):
    dtypes = {"F32": "f4", "F64": "f8", "F16": "f2", "I64": "i8", "I32": "i4", "U8": "u1", "BOOL": "?"}
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, buf = json.loads(raw[8:8 + n]), memoryview(raw)[8 + n:]
    out = {}
    metadata = header.pop("__metadata__", None) or {}
    for name, meta in header.items():
        start, end = meta["data_offsets"]
        arr = np.frombuffer(buf[start:end], dtype="<" + dtypes[meta["dtype"]]).reshape(meta["shape"])
        out[name] = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    return (out, metadata) if with_metadata else out


def check_golden(d):
    d = Path(d)
    cfg = json.loads((d / "config.json").read_text())
    sd = torch.load(d / "checkpoint_module_prefix.pth", weights_only=True)["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k != "pos_embed" and not k.startswith("decoder_embed.")}
    model = CrateMAE(cfg["img_size"], cfg["patch_size"], cfg["dim"], cfg["depth"], cfg["heads"],
                     cfg["lambd"], cfg["ista_step_size"], cfg["prenorm_ln_eps"], cfg["final_ln_eps"])
    model.load_state_dict(sd, strict=True)
    model.eval()
    inputs, gold = read_safetensors(d / "inputs.safetensors"), read_safetensors(d / "outputs.safetensors")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, golden {d}")
    with torch.inference_mode():
        latent = model.forward_encoder(inputs["imgs"])
        pred = model.forward_decoder(latent)
        mask = inputs["mask"] > 0.5
        mlatent = model.forward_encoder(inputs["imgs"], mask)
        mpred = model.forward_decoder(mlatent)
    worst = 0.0
    for name, got in [("full.latent", latent), ("full.pred", pred),
                      ("mae.latent", mlatent), ("mae.pred", mpred)]:
        ref = gold[name]
        assert got.shape == ref.shape, (name, got.shape, ref.shape)
        diff = (got - ref).abs().max().item()
        worst = max(worst, diff)
        print(f"{name:12s} shape {list(got.shape)}  max abs diff {diff:.3e}")
    print(f"{'PASS' if worst <= 1e-4 else 'FAIL'}: max abs diff {worst:.3e} (tolerance 1e-4)")
    return 0 if worst <= 1e-4 else 1


def random_mask(batch, num_patches, ratio, gen):
    """bool [B, L], True = masked; exactly L - int(L*(1-ratio)) masked patches per image."""
    keep = int(num_patches * (1 - ratio))
    ids = torch.rand(batch, num_patches, generator=gen).argsort(dim=1)
    mask = torch.ones(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, ids[:, :keep], False)
    return mask


def median_call(fn, seconds, sync):
    """Seconds per call: the median of at least 3 calls and `seconds` of calls, the device
    synchronised after each."""
    fn()  # warm-up
    sync()
    times, t0 = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], len(times)


def bench(args):
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for size in args.sizes.split(","):
        img, patch = CONFIGS[size][:2]
        model = build_model(size).to(device)
        for dtype in args.dtypes.split(","):
            # bf16 as PyTorch users run it: autocast (matmuls in bf16, norms and softmax in f32).
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
            for batch in [int(b) for b in args.batches.split(",")]:
                imgs = torch.randn(batch, 3, img, img, generator=gen).to(device)
                mask = random_mask(batch, (img // patch) ** 2, 0.75, gen).to(device)
                with torch.inference_mode(), autocast:
                    enc, enc_it = median_call(lambda: model.forward_encoder(imgs), args.seconds, sync)
                    comp = None
                    if not args.encoder_only:
                        comp, _ = median_call(
                            lambda: model.forward_decoder(model.forward_encoder(imgs, mask)), args.seconds, sync)
                row = dict(engine=f"torch-{dtype}", config=size, size=size, dtype=dtype, device=device.type,
                           batch=batch, threads=torch.get_num_threads(), images_per_s=batch / enc,
                           ms_per_batch=enc * 1e3, encoder_img_s=batch / enc, encoder_iters=enc_it,
                           completion_img_s=batch / comp if comp else None)
                rows.append(row)
                print(f"  {size} {dtype} b{batch}: encoder {batch / enc:.2f} img/s ({enc * 1e3:.2f} ms)"
                      + (f", completion {batch / comp:.2f} img/s" if comp else ""), flush=True)
    print("\n| size | dtype | batch | encoder img/s | ms per batch | completion img/s |\n|---|---|---|---|---|---|")
    for r in rows:
        comp = f"{r['completion_img_s']:.2f}" if r["completion_img_s"] else "-"
        print(f"| {r['size']} | {r['dtype']} | {r['batch']} | {r['encoder_img_s']:.2f} | {r['ms_per_batch']:.2f} | {comp} |")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"torch_version": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
             "seconds": args.seconds, "results": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check-golden", metavar="DIR")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--sizes", default="tiny,small,base")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtypes", default="fp32", help="fp32 and/or bf16 (autocast)")
    p.add_argument("--encoder-only", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_golden:
        return check_golden(args.check_golden)
    if args.bench:
        print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}")
        bench(args)
        return 0
    p.error("pass --check-golden DIR or --bench")


if __name__ == "__main__":
    sys.exit(main())
