"""Export a generator's UNet to ONNX, with a parity check against PyTorch.

The ONNX graph is the noise predictor alone::

    sample (B,C,H,W) float32, timestep (B,) int64[, class_labels (B,) int64] -> noise (B,C,H,W) float32

(``class_labels`` only for a class-conditional model), batch axis dynamic. The DDIM loop lives
in :mod:`sapf.export.onnx_sampler`, which needs onnxruntime and numpy but not PyTorch.

Beside ``FILE.onnx`` goes ``FILE.onnx.json`` (the file name plus ``.json``): image size,
channels, classes, the scheduler config, the exporter's parity figures, variant and source.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), the default and
supported exporter of torch 2.13. The legacy TorchScript exporter still runs but is deprecated
and bakes data-dependent branches of the diffusers UNet (e.g. on the batch size) into the graph
as constants. The dynamo exporter emits opset 18 natively; a lower ``opset`` is reached through
onnx's version converter.

Variants and their checks (on random inputs at t in {0, 250, 500, 999}, batch 3):

- fp32: max |Δ| against PyTorch ≤ 1e-4.
- fp16 (GPUs; weights and activations float16, float32 inputs/outputs): max |Δ| ≤ 2e-2.
- int8 (CPUs; onnxruntime dynamic quantisation of the MatMul/Gemm weights — attention, time
  and class projections; convolutions stay float32): relative RMSE of the predicted noise
  (RMSE of Δ over the RMS of the PyTorch prediction) ≤ 0.03. Measured 0.54 % on the tiny test
  model and 0.66 % on a default-architecture model, so the bound leaves ~4x headroom. Max |Δ|
  (≈ 0.01) is reported, not enforced. Quantising the convolutions too (ConvInteger) was both
  less accurate (≈ 3 % relative RMSE) and slower than fp32 on CPU, so it is not done.

A failed check raises :class:`SapfError` and leaves nothing at ``FILE``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from sapf.errors import SapfError
from sapf.export.onnx_sampler import metadata_path
from sapf.outputs import write_json

DEFAULT_OPSET = 18
PARITY_TIMESTEPS = (0, 250, 500, 999)
PARITY_BATCH = 3
FP32_BOUND = 1e-4  # max |Δ|
FP16_BOUND = 2e-2  # max |Δ|
INT8_BOUND = 0.03  # relative RMSE of the predicted noise
INT8_OP_TYPES = ["MatMul", "Gemm"]


class _NoisePredictor(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, class_labels):
        return self.unet(sample, timestep, class_labels=class_labels, return_dict=False)[0]


class _UncondNoisePredictor(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep):
        return self.unet(sample, timestep, return_dict=False)[0]


def load_source(src: str | Path):
    """A run dir (merged ``model/``, or ``adapter/`` + its base) or any diffusers model dir."""
    from sapf.engine.model import DiffusionModel, load_generator

    src = Path(src)
    if not src.exists():
        raise SapfError(f"'{src}' does not exist")
    if not src.is_dir():
        raise SapfError(f"'{src}' is not a directory (expected a run dir or a diffusers model dir)")
    if (src / "adapter" / "adapter_config.json").exists() and not (src / "model" / "unet").is_dir():
        try:
            base = json.loads((src / "config.json").read_text()).get("base_model_resolved")
        except (OSError, json.JSONDecodeError):
            base = None
        if not base:
            raise SapfError(f"'{src}' holds adapter/ but no model/, and its config.json names no base_model_resolved")
        gen = load_generator(base)
        from peft import PeftModel

        try:
            unet = PeftModel.from_pretrained(gen.unet, src / "adapter").merge_and_unload()
        except Exception as e:  # peft raises many types for a mismatched adapter
            raise SapfError(f"cannot apply the adapter in '{src / 'adapter'}' to '{base}': "
                            f"{str(e).splitlines()[0]}") from None
        return DiffusionModel(unet.eval(), gen.scheduler, str(src), gen.null_class)
    return load_generator(src)


def _wrapper(gen) -> torch.nn.Module:
    unet = gen.unet.float().eval()
    return (_NoisePredictor(unet) if gen.num_classes else _UncondNoisePredictor(unet)).eval()


def _names(gen) -> list[str]:
    return ["sample", "timestep", "class_labels"] if gen.num_classes else ["sample", "timestep"]


def _parity_inputs(gen, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    n_train = int(gen.scheduler.config.num_train_timesteps)
    feeds = []
    for t in PARITY_TIMESTEPS:
        feed = {
            "sample": rng.standard_normal((PARITY_BATCH, gen.channels, gen.image_size, gen.image_size))
                         .astype(np.float32),
            "timestep": np.full(PARITY_BATCH, min(t, n_train - 1), np.int64),
        }
        if gen.num_classes:
            feed["class_labels"] = rng.integers(0, gen.num_classes, PARITY_BATCH).astype(np.int64)
        feeds.append(feed)
    return feeds


@torch.no_grad()
def torch_predictions(gen, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    model = _wrapper(gen)
    return [model(*(torch.from_numpy(f[k]) for k in _names(gen))).numpy() for f in feeds]


def onnx_predictions(path: str | Path, feeds: list[dict[str, np.ndarray]],
                     providers=("CPUExecutionProvider",)) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=list(providers))
    return [np.asarray(sess.run(None, f)[0], np.float32) for f in feeds]


def prediction_error(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """max |Δ| and relative RMSE (RMSE of Δ over the RMS of the reference)."""
    r = np.concatenate([a.ravel() for a in ref]).astype(np.float64)
    g = np.concatenate([a.ravel() for a in got]).astype(np.float64)
    d = g - r
    return {"max_abs_diff": float(np.abs(d).max()),
            "rel_rmse": float(np.sqrt((d**2).mean() / max((r**2).mean(), 1e-30)))}


def _export_fp32(gen, path: Path, opset: int) -> None:
    """torch.onnx.export (dynamo) into one self-contained file, quietly."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's backend)
    except ImportError:
        raise SapfError("ONNX export needs onnxscript (pip install onnxscript)") from None
    model = _wrapper(gen)
    names = _names(gen)
    b = 2
    example = [torch.zeros(b, gen.channels, gen.image_size, gen.image_size), torch.full((b,), 10, dtype=torch.long)]
    if gen.num_classes:
        example.append(torch.zeros(b, dtype=torch.long))
    batch = torch.export.Dim("batch")
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                model, tuple(example), None, input_names=names, output_names=["noise"], opset_version=opset,
                dynamo=True, dynamic_shapes={n: {0: batch} for n in names}, external_data=False, verbose=False,
            )
            prog.save(str(path), external_data=False)
    except SapfError:
        raise
    except Exception as e:
        raise SapfError("torch.onnx.export failed: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    # The converter casts an initializer shared by several blocked nodes (the two Resize nodes'
    # scales) once per consumer, all with the same node and output name: keep the first.
    seen, keep = set(), []
    for node in model.graph.node:
        key = node.SerializeToString()
        if key not in seen:
            seen.add(key)
            keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)
    onnx.save(model, str(dst))


def _to_int8(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The exporter's value_info trips the quantiser's own shape inference; it re-infers shapes anyway.
    model = onnx.load(str(src))
    del model.graph.value_info[:]
    bare = dst.with_name(dst.name + ".bare")
    onnx.save(model, str(bare))
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization"
        # reduce_range: 7-bit weights. x86 CPUs without VNNI (many edge CPUs, and AMD EPYCs before Zen 4) saturate in
        # the u8×s8 multiply onnxruntime uses; measured there: relative RMSE 0.11 with 8 bits, over the 0.03 bound.
        quantize_dynamic(str(bare), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OP_TYPES,
                         reduce_range=True)
    finally:
        root.setLevel(level)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bare)


# variant: (converter from the fp32 file, metric checked, its bound, the metric's name in messages)
_VARIANTS = {
    "fp16": (_to_fp16, "max_abs_diff", FP16_BOUND, "max |Δ|"),
    "int8": (_to_int8, "rel_rmse", INT8_BOUND, "relative RMSE"),
}


def _opset_of(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0))


def _publish(final: Path, meta: dict, out_file: Path) -> dict:
    """Move a checked export into place: the model file first, then its metadata (each an atomic rename)."""
    write_json(final.with_name("meta.json"), meta)
    os.replace(final, out_file)
    os.replace(final.with_name("meta.json"), metadata_path(out_file))
    return meta


def export_onnx(src: str | Path, out_file: str | Path, opset: int = DEFAULT_OPSET, fp16: bool = False,
                int8: bool = False) -> dict:
    """Export `src`'s UNet to `out_file` (+ ``out_file.json``); return the metadata written.

    Raises SapfError when the export fails or the variant misses its parity bound; then no
    file is left at `out_file`.
    """
    import onnx

    from sapf.engine.mepf import is_generator_dir

    if fp16 and int8:
        raise SapfError("--fp16 and --int8 are exclusive: fp16 is for GPUs, int8 for CPUs")
    if not 7 <= opset <= 23:
        raise SapfError(f"--opset must be between 7 and 23, not {opset}")
    out_file = Path(out_file)
    if out_file.is_dir():
        raise SapfError(f"--out {out_file} is a directory; give a file name such as model.onnx")
    if is_generator_dir(src):
        if fp16 or int8:
            raise SapfError("a DP-MEPF generator exports as fp32 only (it is small: one pass of a few convolutions)")
        return export_generator_onnx(src, out_file, opset)
    gen = load_source(src)
    variant = "fp16" if fp16 else "int8" if int8 else "fp32"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out_file.name}.tmp-", dir=out_file.parent))
    try:
        fp32_file = tmpdir / "model.onnx"
        _export_fp32(gen, fp32_file, opset)
        try:
            onnx.checker.check_model(str(fp32_file), full_check=True)
        except Exception as e:
            raise SapfError(f"the exported ONNX model does not pass onnx.checker: {str(e).splitlines()[0]}") from None
        feeds = _parity_inputs(gen)
        ref = torch_predictions(gen, feeds)
        fp32_err = prediction_error(ref, onnx_predictions(fp32_file, feeds))
        if not fp32_err["max_abs_diff"] <= FP32_BOUND:
            raise SapfError(f"ONNX/PyTorch parity failed: max |Δ| {fp32_err['max_abs_diff']:.3g} > {FP32_BOUND:g}")
        final, parity = fp32_file, {**fp32_err, "metric": "max_abs_diff", "bound": FP32_BOUND}
        if variant != "fp32":
            convert, metric, bound, label = _VARIANTS[variant]
            final = tmpdir / f"model.{variant}.onnx"
            convert(fp32_file, final)
            err = prediction_error(ref, onnx_predictions(final, feeds))
            parity = {**err, "metric": metric, "bound": bound, "fp32_max_abs_diff": fp32_err["max_abs_diff"]}
            if not err[metric] <= bound:
                raise SapfError(f"{variant} ONNX/PyTorch parity failed: {label} {err[metric]:.3g} > {bound:g}")
        meta = {
            "format": "sapf-onnx-1",
            "image_size": gen.image_size,
            "channels": gen.channels,
            "num_classes": gen.num_classes,
            "null_class": gen.null_class,  # the unconditional label for classifier-free guidance (None: no guidance)
            "inputs": _names(gen),
            "output": "noise",
            "scheduler": dict(gen.scheduler.config),
            "scheduler_class": type(gen.scheduler).__name__,
            "sampler": "DDIM (DDIMScheduler.from_config(scheduler)); "
                       "eta is the sampler's choice (sapf sample --eta, default 1)",
            "variant": variant,
            "opset": _opset_of(final),
            "opset_requested": opset,
            "parity": {**parity, "timesteps": list(PARITY_TIMESTEPS), "batch": PARITY_BATCH},
            "parity_max_abs_diff": parity["max_abs_diff"],
            "source": str(src),
            "torch": torch.__version__,
        }
        return _publish(final, meta, out_file)
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)


def export_generator_onnx(src: str | Path, out_file: Path, opset: int = DEFAULT_OPSET) -> dict:
    """A DP-MEPF generator (one pass: ``noise (B, latent) float32, class_labels (B,) int64 -> images (B,C,H,W)`` in
    [-1, 1]) to `out_file` + metadata, checked against PyTorch (max |Δ| ≤ FP32_BOUND)."""
    import onnx

    from sapf.engine.mepf import load_mean_embedding_generator

    gen = load_mean_embedding_generator(src)
    c = gen.config
    rng = np.random.default_rng(0)
    feeds = [{"noise": rng.standard_normal((PARITY_BATCH, c.latent_dim)).astype(np.float32),
              "class_labels": rng.integers(0, c.num_classes, PARITY_BATCH).astype(np.int64)} for _ in range(4)]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out_file.name}.tmp-", dir=out_file.parent))
    try:
        final = tmpdir / "model.onnx"
        batch = torch.export.Dim("batch")
        example = (torch.zeros(2, c.latent_dim), torch.zeros(2, dtype=torch.long))
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                prog = torch.onnx.export(gen, example, None, input_names=["noise", "class_labels"],
                                         output_names=["images"], opset_version=opset, dynamo=True,
                                         dynamic_shapes={"noise": {0: batch}, "class_labels": {0: batch}},
                                         external_data=False, verbose=False)
                prog.save(str(final), external_data=False)
            onnx.checker.check_model(str(final), full_check=True)
        except Exception as e:
            raise SapfError(f"torch.onnx.export of the generator failed: {str(e).strip().splitlines()[0]}") from None
        with torch.no_grad():
            ref = [gen(torch.from_numpy(f["noise"]), torch.from_numpy(f["class_labels"])).numpy() for f in feeds]
        err = prediction_error(ref, onnx_predictions(final, feeds))
        if not err["max_abs_diff"] <= FP32_BOUND:
            raise SapfError(f"ONNX/PyTorch parity failed: max |Δ| {err['max_abs_diff']:.3g} > {FP32_BOUND:g}")
        meta = {"format": "sapf-onnx-1", "kind": "generator", "image_size": c.image_size, "channels": c.channels,
                "num_classes": c.num_classes, "null_class": None, "latent_dim": c.latent_dim,
                "inputs": ["noise", "class_labels"], "output": "images",
                "sampler": "one pass: latents from sapf.sampling_inputs.generator_latents", "variant": "fp32",
                "opset": _opset_of(final), "opset_requested": opset,
                "parity": {**err, "metric": "max_abs_diff", "bound": FP32_BOUND, "batch": PARITY_BATCH},
                "parity_max_abs_diff": err["max_abs_diff"], "source": str(src), "torch": torch.__version__}
        return _publish(final, meta, out_file)
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
