"""Images/second of DDIM sampling on the default public model: torch eager vs onnxruntime.

Variants: torch eager (the `sapf sample --model` path), ORT fp32 and ORT int8 on CPU (graph
optimisation ALL, intra-op threads = --threads); ORT fp16 and ORT on CUDA only where a GPU is
usable. Each row also gives the quality change against torch: the noise prediction on fixed
inputs (max |Δ|, relative RMSE) and the mean / max absolute uint8 pixel difference of the
samples drawn with the same seed. Writes benchmarks/results/sampling.json and prints a table.

    python benchmarks/sampling.py [--num 64] [--steps 50] [--batch-size 64] [--threads 2]

Without the shipped model (sapf/assets/public-digits-28) a random-weight model of the same
architecture (build_unet()) stands in: speed is the same, the quality figures are less telling.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch
    from common import save, table

    from sapf.engine.model import (
        DiffusionModel,
        build_scheduler,
        build_unet,
        default_model_dir,
        load_generator,
        save_generator,
    )
    from sapf.engine.sampling import sample
    from sapf.errors import SapfError
    from sapf.export.onnx_export import (
        _parity_inputs,
        export_onnx,
        onnx_predictions,
        prediction_error,
        torch_predictions,
    )
    from sapf.export.onnx_sampler import OnnxSampler

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="sapf-bench-"))
    if (default_model_dir() / "unet" / "config.json").exists():
        gen, model_note = load_generator(None), f"default shipped model ({default_model_dir().name})"
        src = default_model_dir()
    else:
        torch.manual_seed(0)
        gen = DiffusionModel(build_unet(), build_scheduler())
        model_note = "random-weight build_unet() (no shipped model yet)"
        src = tmp / "model"
        save_generator(gen, src)
        gen = load_generator(src)
    params = sum(p.numel() for p in gen.unet.parameters())
    print(f"model: {model_note}, {params:,} parameters; {a.num} images, {a.steps} DDIM steps, batch {a.batch_size}, "
          f"{a.threads} threads", file=sys.stderr)

    files = {"fp32": tmp / "m.onnx", "int8": tmp / "m.int8.onnx", "fp16": tmp / "m.fp16.onnx"}
    exports = {}
    for variant, f in files.items():
        if variant == "fp16":
            try:  # fp16 is for GPUs: export it only where CUDA really starts
                OnnxSampler(files["fp32"], device="cuda")
            except SapfError as e:
                print(f"no usable CUDA, so no fp16/CUDA rows: {e}", file=sys.stderr)
                cuda = False
                break
            cuda = True
        (meta, dt) = _timed(lambda f=f, variant=variant: export_onnx(src, f, fp16=variant == "fp16",
                                                                     int8=variant == "int8"))
        exports[variant] = {"export_s": round(dt, 1), "parity": meta["parity"]}
        print(f"exported {variant} in {dt:.0f} s", file=sys.stderr)

    feeds = _parity_inputs(gen)
    ref_pred = torch_predictions(gen, feeds)
    sample(gen, min(a.num, a.batch_size), steps=1, show_progress=False, best_of=1)  # warm-up
    (ref, _), t_torch = _timed(lambda: sample(gen, a.num, None, a.steps, a.seed, a.batch_size, show_progress=False,
                                              best_of=1))
    rows = [{"variant": "torch eager (CPU)", "provider": "torch", "seconds": round(t_torch, 2),
             "images_per_s": a.num / t_torch, "speedup": 1.0, "pred_max_abs": 0.0, "pred_rel_rmse": 0.0,
             "pixel_mean_abs": 0.0, "pixel_max_abs": 0}]
    print(f"torch eager: {t_torch:.1f} s", file=sys.stderr)

    def opts(threads: int | None):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        return so

    variants = [("ORT fp32 (CPU, opt ALL, default threads)", "fp32", "cpu", None),
                (f"ORT fp32 (CPU, opt ALL, {a.threads} threads)", "fp32", "cpu", a.threads),
                (f"ORT int8 (CPU, opt ALL, {a.threads} threads)", "int8", "cpu", a.threads)]
    if cuda:
        variants += [("ORT fp32 (CUDA, IOBinding)", "fp32", "cuda", None),
                     ("ORT fp16 (CUDA, IOBinding)", "fp16", "cuda", None)]
    for name, variant, device, threads in variants:
        try:
            s = OnnxSampler(files[variant], device=device, session_options=opts(threads))
        except SapfError as e:
            print(f"skipped {name}: {e}", file=sys.stderr)
            continue
        s.sample(min(a.num, a.batch_size), steps=1, show_progress=False, best_of=1)  # warm-up (CUDA init, arena)
        (img, _), dt = _timed(lambda s=s: s.sample(a.num, None, a.steps, a.seed, a.batch_size, show_progress=False,
                                                   best_of=1))
        providers = [s.provider] + (["CPUExecutionProvider"] if s.provider != "CPUExecutionProvider" else [])
        err = prediction_error(ref_pred, onnx_predictions(files[variant], feeds, providers))
        d = np.abs(img.astype(int) - ref.astype(int))
        rows.append({"variant": name, "provider": s.provider, "seconds": round(dt, 2), "images_per_s": a.num / dt,
                     "speedup": t_torch / dt, "pred_max_abs": err["max_abs_diff"], "pred_rel_rmse": err["rel_rmse"],
                     "pixel_mean_abs": float(d.mean()), "pixel_max_abs": int(d.max())})
        print(f"{name}: {dt:.1f} s", file=sys.stderr)

    path = save("sampling", rows, {"model": model_note, "parameters": params, "num": a.num, "steps": a.steps,
                                   "batch_size": a.batch_size, "onnxruntime": ort.__version__, "exports": exports,
                                   "load_note": "2-core machine shared with other jobs; timings are single runs"})
    print(table(rows, ["variant", "images_per_s", "speedup", "pred_max_abs", "pred_rel_rmse", "pixel_mean_abs",
                       "pixel_max_abs"]))
    print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
