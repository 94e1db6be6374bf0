"""DDIM sampling from an exported ONNX noise predictor (or one pass of an exported DP-MEPF generator), without
PyTorch.

Only numpy, onnxruntime, rich and the torch-free :mod:`sapf.outputs` / :mod:`sapf.errors` are
imported here (never :mod:`sapf.engine`), so ``sapf sample --onnx`` runs on an edge box that has
onnxruntime but no PyTorch.

The DDIM update is a numpy re-implementation of diffusers' ``DDIMScheduler`` as the torch
sampler builds it (``DDIMScheduler.from_config(<the model's DDPM scheduler config>)``, any eta),
and the labels, initial noise and step noise are made exactly as in :mod:`sapf.engine.sampling`,
so both samplers give the same images for the same seed (up to float rounding).

On CUDA the loop uses IOBinding: the sample and the predicted noise stay on the GPU, and the
DDIM update runs there too, as a tiny ONNX graph built here with the same arithmetic.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import numpy as np

from sapf.errors import SapfError
from sapf.outputs import to_uint8
from sapf.public_classifier import best_of_candidates, candidate_labels, resolve_best_of
from sapf.sampling_inputs import (
    DEFAULT_ETA,
    DEFAULT_STEPS,
    check_eta,
    generator_latents,
    guided,
    initial_noise,
    resolve_batch_size,
    resolve_guidance,
    sample_labels,
    step_noise,
)

# DDIMScheduler.__init__ defaults: what from_config uses for keys a DDPM config lacks.
DDIM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def metadata_path(onnx_file: str | Path) -> Path:
    """``FILE.onnx`` → ``FILE.onnx.json`` (as written by :mod:`sapf.export.onnx_export`)."""
    p = Path(onnx_file)
    return p.with_name(p.name + ".json")


# --- DDIM (diffusers DDIMScheduler) in numpy ---


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def _cumprod(x: np.ndarray) -> np.ndarray:
    """float32 cumulative product accumulated in float64, as torch.cumprod does on CPU."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    alphas_bar_sqrt = np.sqrt(_cumprod(np.float32(1.0) - betas))
    a0, aT = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - aT) * (a0 / (a0 - aT))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


class DDIM:
    """The DDIM update of diffusers' DDIMScheduler (eta = 0: deterministic), float32 like the torch one."""

    def __init__(self, config: dict):
        c = {**DDIM_DEFAULTS, **{k: v for k, v in dict(config).items() if k in DDIM_DEFAULTS}}
        self.config = c
        if c["thresholding"]:
            raise SapfError("the model's scheduler uses dynamic thresholding, which the ONNX sampler does not support")
        if c["prediction_type"] not in ("epsilon", "sample", "v_prediction"):
            raise SapfError(f"unknown scheduler prediction_type '{c['prediction_type']}'")
        if c["timestep_spacing"] not in ("linspace", "leading", "trailing"):
            raise SapfError(f"unknown scheduler timestep_spacing '{c['timestep_spacing']}'")
        n = self.num_train_timesteps = int(c["num_train_timesteps"])
        if c["trained_betas"] is not None:
            betas = np.asarray(c["trained_betas"], np.float32)
        elif c["beta_schedule"] == "linear":
            betas = np.linspace(c["beta_start"], c["beta_end"], n, dtype=np.float64).astype(np.float32)
        elif c["beta_schedule"] == "scaled_linear":
            betas = (np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, n, dtype=np.float64)
                     .astype(np.float32) ** 2)
        elif c["beta_schedule"] == "squaredcos_cap_v2":
            betas = _betas_for_alpha_bar(n)
        else:
            raise SapfError(f"scheduler beta_schedule '{c['beta_schedule']}' is not supported by the ONNX sampler")
        if c["rescale_betas_zero_snr"]:
            betas = _rescale_zero_terminal_snr(betas)
        self.alphas_cumprod = _cumprod(np.float32(1.0) - betas)
        self.final_alpha_cumprod = np.float32(1.0) if c["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.clip = float(c["clip_sample_range"]) if c["clip_sample"] else None
        self.prediction_type = c["prediction_type"]
        self.timesteps = np.zeros(0, np.int64)
        self.num_inference_steps = 0

    def set_timesteps(self, steps: int) -> np.ndarray:
        n, c = self.num_train_timesteps, self.config
        if steps < 1:
            raise SapfError("--steps must be at least 1")
        if steps > n:
            raise SapfError(f"--steps {steps} is more than the scheduler's {n} training timesteps")
        if c["timestep_spacing"] == "linspace":
            ts = np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        elif c["timestep_spacing"] == "leading":
            ratio = n // steps
            ts = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.int64) + int(c["steps_offset"])
        else:  # trailing
            ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
        self.timesteps, self.num_inference_steps = ts, steps
        return ts

    def coefficients(self, t: int, eta: float = 0.0) -> np.ndarray:
        """[√ᾱ_t, √(1-ᾱ_t), √ᾱ_prev, √(1-ᾱ_prev-σ_t²), σ_t] as float32,
        σ_t = eta·√((1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev))."""
        prev = int(t) - self.num_train_timesteps // self.num_inference_steps  # diffusers' rule, any spacing
        a_t = self.alphas_cumprod[int(t)]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        one = np.float32(1.0)
        variance = ((one - a_prev) / (one - a_t)) * (one - a_t / a_prev)
        sigma = np.float32(eta) * variance**0.5
        # max(0, ·): with eta = 1 on a zero-SNR schedule 1-ᾱ_prev-σ² is 0 up to rounding (diffusers gives NaN there).
        direction = max(one - a_prev - sigma**2, np.float32(0.0)) ** 0.5
        return np.array([a_t**0.5, (one - a_t) ** 0.5, a_prev**0.5, direction, sigma], np.float32)

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray, eta: float = 0.0,
             noise: np.ndarray | None = None) -> np.ndarray:
        """One update; eta > 0 needs `noise` (standard normal, the sample's shape)."""
        sa, sb, sp, sq, sigma = (np.float32(v) for v in self.coefficients(t, eta))
        with np.errstate(divide="ignore", invalid="ignore"):  # ᾱ_t = 0 (zero-SNR): ±inf, clipped, as in diffusers
            prev = self._step(model_output, sample, sa, sb, sp, sq)
        return prev if eta == 0 else (prev + sigma * noise).astype(np.float32, copy=False)

    def _step(self, model_output, sample, sa, sb, sp, sq) -> np.ndarray:
        if self.prediction_type == "epsilon":
            x0 = (sample - sb * model_output) / sa
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - sa * x0) / sb
        else:  # v_prediction
            x0 = sa * sample - sb * model_output
            eps = sa * model_output + sb * sample
        if self.clip is not None:
            x0 = np.clip(x0, np.float32(-self.clip), np.float32(self.clip))
        return (sp * x0 + sq * eps).astype(np.float32, copy=False)

    def step_graph(self) -> bytes:
        """The same update as an ONNX graph (x, m, z, sa, sb, sp, sq, sg) -> prev, for IOBinding on GPUs."""
        import onnx
        from onnx import TensorProto, helper

        nodes, inits = [], []

        def op(kind, *inputs, out):
            nodes.append(helper.make_node(kind, list(inputs), [out]))
            return out

        if self.prediction_type == "epsilon":
            x0 = op("Div", op("Sub", "x", op("Mul", "sb", "m", out="sb_m"), out="x_sbm"), "sa", out="x0")
            eps = "m"
        elif self.prediction_type == "sample":
            x0 = "m"
            eps = op("Div", op("Sub", "x", op("Mul", "sa", "m", out="sa_m"), out="x_sam"), "sb", out="eps")
        else:
            x0 = op("Sub", op("Mul", "sa", "x", out="sa_x"), op("Mul", "sb", "m", out="sb_m"), out="x0")
            eps = op("Add", op("Mul", "sa", "m", out="sa_m"), op("Mul", "sb", "x", out="sb_x"), out="eps")
        if self.clip is not None:
            inits += [helper.make_tensor("lo", TensorProto.FLOAT, [], [-self.clip]),
                      helper.make_tensor("hi", TensorProto.FLOAT, [], [self.clip])]
            x0 = op("Clip", x0, "lo", "hi", out="x0_clipped")
        det = op("Add", op("Mul", "sp", x0, out="sp_x0"), op("Mul", "sq", eps, out="sq_eps"), out="det")
        op("Add", det, op("Mul", "sg", "z", out="sg_z"), out="prev")
        dims = ["batch", "channels", "height", "width"]
        tensor = [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("x", "m", "z")]
        scalars = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("sa", "sb", "sp", "sq", "sg")]
        graph = helper.make_graph(nodes, "ddim_step", tensor + scalars,
                                  [helper.make_tensor_value_info("prev", TensorProto.FLOAT, dims)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(model)
        return model.SerializeToString()


# --- the sampler ---


@contextlib.contextmanager
def _quiet_ort(ort):
    """onnxruntime logs provider-loading failures straight to stderr; keep them out of the CLI."""
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class OnnxSampler:
    """DDIM sampling from ``FILE.onnx`` + ``FILE.onnx.json`` with onnxruntime.

    ``device="cuda"`` needs a usable CUDAExecutionProvider (onnxruntime-gpu with CUDA/cuDNN);
    otherwise it raises SapfError, or with ``allow_cpu_fallback`` warns and runs on CPU.
    ``provider`` names the execution provider actually used.
    """

    def __init__(self, path: str | Path, device: str = "cpu", allow_cpu_fallback: bool = False,
                 session_options=None):
        import onnxruntime as ort

        self._ort = ort
        path = Path(path)
        if device not in ("cpu", "cuda"):
            raise SapfError(f"--device must be cpu or cuda, not '{device}'")
        if not path.is_file():
            raise SapfError(f"ONNX file '{path}' does not exist" if not path.exists() else f"'{path}' is not a file")
        self.path = path
        opts = session_options or ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self._opts = opts
        self.session, self.provider = self._session(device, allow_cpu_fallback)
        self.meta = self._metadata()
        self.kind = self.meta.get("kind", "diffusion")  # a DP-MEPF generator samples in one pass
        self._check_io()
        self.ddim = DDIM(self.meta["scheduler"]) if self.kind == "diffusion" else None
        self.iobinding = self.provider == CUDA and self._sample_dtype == np.float32
        self._step_session = None

    def _session(self, device: str, allow_cpu_fallback: bool):
        ort = self._ort

        def make(providers):
            try:
                with _quiet_ort(ort):
                    return ort.InferenceSession(str(self.path), self._opts, providers=providers)
            except Exception as e:
                raise SapfError(f"'{self.path}' is not a valid ONNX model: {_first_line(e)}") from None

        if device == "cpu":
            return make([CPU]), CPU
        why = None
        if CUDA not in ort.get_available_providers():
            why = "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
        else:
            sess = make([CUDA, CPU])
            if CUDA in sess.get_providers():
                return sess, CUDA
            why = "onnxruntime's CUDAExecutionProvider could not start (no GPU, or CUDA/cuDNN libraries missing)"
        if not allow_cpu_fallback:
            raise SapfError(f"--device cuda: {why}; pass --allow-cpu-fallback to sample on CPU")
        print(f"sapf: warning: --device cuda: {why}; sampling on CPU", file=sys.stderr)
        return make([CPU]), CPU

    def _metadata(self) -> dict:
        mp = metadata_path(self.path)
        if not mp.is_file():
            raise SapfError(f"no metadata for '{self.path}': expected '{mp}' (written by sapf export)")
        try:
            meta = json.loads(mp.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SapfError(f"metadata '{mp}' is not readable JSON: {_first_line(e)}") from None
        if not isinstance(meta, dict):
            raise SapfError(f"metadata '{mp}' is not a JSON object; re-run sapf export")
        need = ("latent_dim",) if meta.get("kind") == "generator" else ("scheduler",)
        missing = [k for k in ("image_size", "channels", "num_classes", *need) if k not in meta]
        if missing:
            raise SapfError(f"metadata '{mp}' lacks {', '.join(missing) or 'its fields'}; re-run sapf export")
        return meta

    def _check_io(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        if self.kind == "generator":
            want = ["noise", "class_labels"]
        else:
            want = ["sample", "timestep"] + (["class_labels"] if int(self.meta["num_classes"]) else [])
        if set(inputs) != set(want):
            raise SapfError(f"'{self.path}' has inputs {sorted(inputs)}, but its metadata implies {want}")
        first = inputs[want[0]]
        self._sample_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
        self._output = self.session.get_outputs()[0].name

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def null_class(self) -> int | None:
        null = self.meta.get("null_class")
        return int(null) if null is not None else None

    def predict(self, x: np.ndarray, t: int, y: np.ndarray | None) -> np.ndarray:
        feed = {"sample": x.astype(self._sample_dtype, copy=False),
                "timestep": np.full((x.shape[0],), int(t), np.int64)}
        if self.num_classes:
            feed["class_labels"] = y
        return np.asarray(self.session.run([self._output], feed)[0], np.float32)

    def sample(self, num: int, class_label: int | None = None, steps: int = DEFAULT_STEPS, seed: int = 0,
               batch_size: int | None = None, show_progress: bool = True, eta: float = DEFAULT_ETA,
               guidance: float | None = None, best_of: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (uint8 images (N,H,W[,C]), int64 labels (N,)), like the torch sampler (best_of too)."""
        batch_size = resolve_batch_size(batch_size)
        check_eta(eta)
        guidance = self._guidance = resolve_guidance(guidance, self.null_class)
        wanted = sample_labels(num, self.num_classes, class_label)
        best_of = resolve_best_of(best_of, self.num_classes, int(self.meta["channels"]), int(self.meta["image_size"]))
        images = self._draw(candidate_labels(wanted, best_of), steps, seed, batch_size, eta, show_progress)
        return best_of_candidates(images, wanted, best_of), wanted

    def _draw(self, labels: np.ndarray, steps: int, seed: int, batch_size: int, eta: float,
              show_progress: bool) -> np.ndarray:
        """uint8 images of `labels`, image i from the seed's noise i."""
        num = len(labels)
        if self.kind == "generator":  # one pass, no steps: the same latents as the torch generator
            z = generator_latents(num, int(self.meta["latent_dim"]), seed)
            out = [self.session.run([self._output], {"noise": z[b : b + batch_size],
                                                     "class_labels": labels[b : b + batch_size]})[0]
                   for b in range(0, num, batch_size)]
            return to_uint8(np.concatenate(out))
        timesteps = self.ddim.set_timesteps(steps)
        c, size = int(self.meta["channels"]), int(self.meta["image_size"])
        noise = initial_noise(num, c, size, seed)
        # Guidance runs each step's two passes as one batch through the numpy loop (on the GPU too).
        run = self._batch_iobinding if self.iobinding and self._guidance == 1.0 else self._batch_numpy
        out = []
        n_batches = (num + batch_size - 1) // batch_size
        with _progress("sample", n_batches * len(timesteps), show_progress) as advance:
            for b in range(0, num, batch_size):
                x = noise[b : b + batch_size]
                z = step_noise(b, len(x), len(timesteps), c, size, seed) if eta > 0 else None  # eta 0 draws none
                out.append(run(x, labels[b : b + batch_size], timesteps, z, eta, advance))
        return to_uint8(np.concatenate(out))

    def _batch_numpy(self, x, y, timesteps, z, eta, advance) -> np.ndarray:
        w = getattr(self, "_guidance", 1.0)
        null = np.full_like(y, self.null_class) if w != 1.0 else None
        for k, t in enumerate(timesteps):
            if null is None:
                eps = self.predict(x, t, y)
            else:
                cond, uncond = np.split(self.predict(np.concatenate([x, x]), t, np.concatenate([y, null])), 2)
                eps = guided(cond, uncond, w)
            x = self.ddim.step(eps, int(t), x, eta, None if z is None else z[k])
            advance()
        return x

    def _device(self) -> str:
        return "cuda" if self.provider == CUDA else "cpu"

    def _batch_iobinding(self, x, y, timesteps, z, eta, advance) -> np.ndarray:
        """The loop with the sample and the noise kept on the device (GPU) between steps."""
        ort = self._ort
        dev = self._device()
        if self._step_session is None:
            providers = [CUDA, CPU] if dev == "cuda" else [CPU]
            self._step_session = ort.InferenceSession(self.ddim.step_graph(), providers=providers)
        xv = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x, self._sample_dtype), dev, 0)
        yv = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(y), dev, 0) if self.num_classes else None
        # The graph always adds σ·z; with eta 0 one zero tensor, uploaded once, serves every step.
        zero = ort.OrtValue.ortvalue_from_numpy(np.zeros(x.shape, np.float32), dev, 0) if z is None else None
        for k, t in enumerate(timesteps):
            ub = self.session.io_binding()
            ub.bind_ortvalue_input("sample", xv)
            ub.bind_cpu_input("timestep", np.full((x.shape[0],), int(t), np.int64))
            if yv is not None:
                ub.bind_ortvalue_input("class_labels", yv)
            ub.bind_output(self._output, dev)
            self.session.run_with_iobinding(ub)
            m = ub.get_outputs()[0]
            sb = self._step_session.io_binding()
            sb.bind_ortvalue_input("x", xv)
            sb.bind_ortvalue_input("m", m)
            sb.bind_ortvalue_input("z", zero if z is None
                                   else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(z[k]), dev, 0))
            for name, v in zip(("sa", "sb", "sp", "sq", "sg"), self.ddim.coefficients(int(t), eta), strict=True):
                sb.bind_cpu_input(name, np.array([v], np.float32))
            sb.bind_output("prev", dev)
            self._step_session.run_with_iobinding(sb)
            xv = sb.get_outputs()[0]
            advance()
        return np.asarray(xv.numpy(), np.float32)


@contextlib.contextmanager
def _progress(description: str, total: int, enabled: bool):
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=not sys.stderr.isatty())
    with prog:
        task = prog.add_task(description, total=total)
        yield lambda: prog.update(task, advance=1)
