"""`sapf train` / `sapf select` end to end: plan the privacy budget, select, fine-tune, write.

Order matters: the whole privacy plan (noise for the query and for every DP-SGD step) is
fixed and checked before any gradient of private data is computed.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from sapf.config import WEIGHT_SELECTIONS, TrainConfig
from sapf.engine.central_images import warm_up
from sapf.engine.data import ImageDataset, load_dataset, train_holdout_split
from sapf.engine.device import compute_device
from sapf.engine.finetune import dp_finetune, make_trainable, merged_generator
from sapf.engine.model import DiffusionModel, check_data_fits, count_parameters, load_generator, save_generator
from sapf.engine.privacy import PrivacyLedger, PrivacyPlan, calibrate_noise, check_privacy_args
from sapf.engine.saliency import Selection, choose_matrices
from sapf.engine.sparta import row_masks, sparta_selection, trainable_count
from sapf.engine.stages import plan_run, stages_of
from sapf.errors import SapfError
from sapf.model_card import write_model_card
from sapf.outputs import atomic_output_dir, check_output_dir, save_tensors, write_json

# The built-in sensitive set is split once, the same way everywhere (training, evaluation,
# benchmarks), so that the holdout is never trained on.
SPLIT_SEED = 0


def load_private_data(spec: str, gen: DiffusionModel, holdout: float) -> ImageDataset:
    """The training share of a private dataset, checked against the model (the same split everywhere)."""
    ds = load_dataset(spec, gen.image_size, gen.channels)
    check_data_fits(gen, ds.num_classes, ds.channels)
    if holdout > 0:
        ds, _ = train_holdout_split(ds, holdout, SPLIT_SEED)
    return ds


def plan_noise(cfg: TrainConfig, n: int) -> PrivacyPlan:
    """Fix every stage's noise multiplier for a run on n records (refusing a plan that cannot meet the target)."""
    delta = check_privacy_args(cfg.epsilon, cfg.delta, n)
    cfg = cfg.resolved(n)
    return plan_run(stages_of(cfg), epsilon=cfg.epsilon, delta=delta, accountant=cfg.accountant,
                    train_sample_rate=cfg.batch_size / n, train_steps=cfg.training_steps(n))


def select_only(cfg: TrainConfig, out: Path, *, force: bool = False, show_progress: bool = True) -> Selection:
    """`sapf select`: the saliency query alone, spending the whole --epsilon on it."""
    check_output_dir(out, force)
    gen = load_generator(cfg.base_model)
    data = load_private_data(cfg.data, gen, cfg.holdout)
    cfg = cfg.resolved(len(data))
    cfg.validate_for(len(data))
    if cfg.selection != "saliency":
        raise SapfError("sapf select runs the saliency query; other strategies need no selection step")
    delta = check_privacy_args(cfg.epsilon, cfg.delta, len(data))
    private = math.isfinite(cfg.epsilon)
    sigma = (calibrate_noise(cfg.epsilon, delta, cfg.selection_sample_rate, 1, accountant=cfg.accountant) if private
             else 0.0)
    ledger = PrivacyLedger(cfg.epsilon, delta, cfg.accountant)
    sel = choose_matrices("saliency", gen, data, cfg.query(), cfg.top_fraction, sigma, ledger, cfg.seed, show_progress)
    with atomic_output_dir(out, force) as tmp:
        write_json(tmp / "selection.json", sel.to_dict())
        write_json(tmp / "privacy.json", ledger.to_dict())
        write_json(tmp / "config.json", {"command": "select", **asdict(cfg)})
    return sel


def train(cfg: TrainConfig, out: Path, *, force: bool = False, show_progress: bool = True,
          sample_grid: bool = True, device: str = "cpu") -> dict:
    """`sapf train`: plan every stage's noise, then run the stages (select → DP fine-tune) and write the run dir.
    `device`: where the networks compute (cpu or cuda); the method and its privacy do not depend on it."""
    check_output_dir(out, force)
    compute_device(device)  # a bad --device fails before any work
    gen = load_generator(cfg.base_model)
    data = load_private_data(cfg.data, gen, cfg.holdout)
    n = len(data)
    if cfg.method == "dp-mepf":
        return train_mean_embedding_generator(cfg, gen, data, out, force=force, show_progress=show_progress,
                                              sample_grid=sample_grid)
    cfg = cfg.resolved(n).for_model(conditional=gen.num_classes > 0)
    cfg.validate_for(n)
    stages = stages_of(cfg)
    pp = plan_noise(cfg, n)  # before any private data is touched
    steps = cfg.training_steps(n)
    ledger = PrivacyLedger(cfg.epsilon, pp.delta, cfg.accountant)
    base, central, samples, semantic = gen, None, None, None
    for stage in stages:
        if stage.name == "pretrain":
            gen, semantic = semantic_pretrain(cfg, gen, data, pp.noise_of(stage.release), ledger, show_progress)
        elif stage.name == "warmup" and cfg.embedding_warmup:
            samples, labels = mean_embedding_samples(cfg, gen, data, pp.noise_of(stage.release), ledger,
                                                     show_progress)
            gen = warm_up(gen, samples, labels=labels, steps=cfg.warmup_steps, lr=cfg.warmup_lr,
                          label_dropout=cfg.label_dropout, seed=cfg.seed, show_progress=show_progress, device=device)
        elif stage.name == "warmup":
            central = noisy_central_images(cfg, gen, data, pp.noise_of(stage.release), ledger)
            gen = warm_up(gen, central, steps=cfg.warmup_steps, lr=cfg.warmup_lr, label_dropout=cfg.label_dropout,
                          seed=cfg.seed, show_progress=show_progress, device=device)
        elif stage.name == "select" and cfg.selection == "sparta":
            sel = sparta_selection(gen, data, cfg.mask_query(), pp.noise_of(stage.release), ledger,
                                   show_progress=show_progress, device=device)
        elif stage.name == "select":
            sel = choose_matrices(cfg.selection, gen, data, cfg.query(), cfg.top_fraction, pp.noise_of(stage.release),
                                  ledger, cfg.seed, show_progress, device=device)
        elif stage.name == "finetune":
            torch.manual_seed(cfg.seed)  # public randomness: the LoRA initialisation
            model = make_trainable(gen, cfg.selection, sel.selected, cfg.rank, cfg.lora_alpha,
                                   rows=sel.extra.get("rows"))
            if cfg.selection == "sparta" and not row_masks(model):
                raise SapfError("SPARTA's row masks are missing: refusing to train every row")
            hist = dp_finetune(gen, model, data, cfg.dpsgd(steps, cfg.batch_size, cfg.ema_decay), pp.train_noise,
                               ledger, show_progress, device=device)
    merged = merged_generator(gen, model, cfg.selection)
    summary = {  # public: the plan, the counts the plan already reveals, ε
        "examples": n,
        "steps": steps,
        "trainable_parameters": (trainable_count(model) if cfg.selection == "sparta"
                                 else count_parameters(model, trainable_only=True)),
        "selected_matrices": len(sel.selected) if cfg.selection not in WEIGHT_SELECTIONS else None,
        "noise_multipliers": {m.name: m.noise_multiplier for m in pp.releases + [pp.train]},
        "epsilon_spent": ledger.epsilon() if ledger.private else math.inf,
    }
    curves = {  # statistics of private data, not noised: for the data curator only (private/)
        "wall_time_s": round(hist.wall_time_s, 2),
        "final_loss": float(np.nanmean(hist.loss[-50:])),
        "loss": hist.loss,
        "step_times_s": [round(t, 4) for t in hist.step_times],
    }
    config = {"command": "train", **asdict(cfg), "lr": cfg.learning_rate(), "base_model_resolved": gen.source,
              "resolved_steps": steps, "resolved_delta": pp.delta, "stages": [s.to_dict() for s in stages],
              "device": str(device)}
    with atomic_output_dir(out, force) as tmp:
        if cfg.selection not in WEIGHT_SELECTIONS and gen is base:  # after a warm-up the adapters fit it only
            model.save_pretrained(tmp / "adapter")
        if samples is not None:
            write_warmup_samples(tmp / "warmup_samples.png", samples, labels)
        if central is not None:
            write_central_images(tmp / "central_images.png", central)
        if semantic is not None:
            write_json(tmp / "semantic_query.json", semantic)
        save_generator(merged, tmp / "model")
        write_json(tmp / "selection.json", sel.to_dict())
        write_json(tmp / "privacy.json", ledger.to_dict())
        write_json(tmp / "config.json", config)
        write_json(tmp / "metrics.json", {**summary, "epsilon": hist.epsilon})
        write_private_curves(tmp, curves, "fine-tuning")
        _write_pictures(tmp, merged, cfg.seed, sample_grid, device)
        write_model_card(tmp, config=config, privacy=[("this run", ledger.to_dict())], stages=stages,
                         examples=f"{n} training records")
    # The caller gets the private statistics apart, named so: they must not go where the public summary goes.
    return {**summary, "private": {k: curves[k] for k in ("wall_time_s", "final_loss")}}


def train_mean_embedding_generator(cfg: TrainConfig, base: DiffusionModel, data: ImageDataset, out: Path, *,
                                   force: bool = False, show_progress: bool = True, sample_grid: bool = True) -> dict:
    """`sapf train --method dp-mepf`: a feature network on public data, the one noisy release of the private data's
    per-class mean embeddings (the whole ε), a generator trained on it. `base` gives only the image size, channels
    and classes (the images are loaded as for the diffusion runs, so evaluations compare alike)."""
    import time

    from sapf.engine.mepf import (
        mean_embeddings,
        public_feature_net,
        release_mean_embeddings,
        sample_generator,
        train_generator,
    )
    from sapf.engine.sampling import GRID_SAMPLES
    from sapf.outputs import class_grid, save_png

    n = len(data)
    cfg = cfg.resolved(n).for_model(conditional=base.num_classes > 0)
    cfg.validate_for(n)
    if not data.num_classes:
        raise SapfError("dp-mepf needs labelled private data (per-class mean embeddings)")
    # The release's size is the public model's number of classes, never the data's: an .npz's classes are its largest
    # label + 1, so one record with the only top label would change the release's shape, and tell itself apart.
    num_classes = base.num_classes
    if not num_classes:
        raise SapfError("dp-mepf needs a class-conditional base model (its classes fix the size of the release)")
    stages = stages_of(cfg)
    pp = plan_noise(cfg, n)  # before any private data is touched
    ledger = PrivacyLedger(cfg.epsilon, pp.delta, cfg.accountant)
    t0 = time.time()
    net = public_feature_net(load_dataset(cfg.public_data, base.image_size, base.channels), seed=cfg.seed)
    sums = release_mean_embeddings(net=net, data=data, num_classes=num_classes,
                                   noise_multiplier=pp.noise_of("mean-embeddings"), ledger=ledger)
    means, counts = mean_embeddings(sums, num_classes)
    gen, losses = train_generator(net, means, image_size=base.image_size, channels=base.channels,
                                  steps=cfg.generator_steps, lr=cfg.generator_lr, seed=cfg.seed,
                                  show_progress=show_progress)
    # Everything in the summary is a function of the release and public data; the time is not (the release's pass
    # over the private data is in it): private/, like a diffusion run's.
    summary = {"examples": n, "trainable_parameters": count_parameters(gen, trainable_only=True),
               "feature_dim": int(means.shape[1]), "noise_multipliers": {"mean-embeddings": pp.noise_of(
                   "mean-embeddings")}, "epsilon_spent": ledger.epsilon() if ledger.private else math.inf,
               "final_loss": float(np.mean(losses[-50:]))}
    timing = {"wall_time_s": round(time.time() - t0, 2)}
    config = {"command": "train", **asdict(cfg), "base_model_resolved": base.source, "resolved_delta": pp.delta,
              "stages": [s.to_dict() for s in stages]}
    with atomic_output_dir(out, force) as tmp:
        gen.save_pretrained(tmp / "model")
        save_tensors(tmp / "feature_net.safetensors", net.state_dict())
        np.savez(tmp / "mean_embeddings.npz", sums=sums, means=means, counts=counts)
        write_json(tmp / "privacy.json", ledger.to_dict())
        write_json(tmp / "config.json", config)
        write_json(tmp / "metrics.json", {**summary, "generator_loss": [round(v, 6) for v in losses]})
        write_private_curves(tmp, timing, "DP-MEPF")
        if sample_grid:
            images, labels = sample_generator(gen, GRID_SAMPLES, seed=cfg.seed)
            save_png(tmp / "grid.png", class_grid(images, labels))
        write_model_card(tmp, config=config, privacy=[("this run", ledger.to_dict())], stages=stages,
                         examples=f"{n} training records")
    return {**summary, "private": {**timing, "final_loss": summary["final_loss"]}}


def semantic_pretrain(cfg, base: DiffusionModel, data: ImageDataset, noise_multiplier: float,
                      ledger: PrivacyLedger | None, show_progress: bool = True) -> tuple[DiffusionModel, dict]:
    """PrivImage's stage: a classifier of the public pool, the noisy semantic histogram of the private data (recorded
    in `ledger`), the classes it picks, and the generator pretrained on them (cached by the choice)."""
    from sapf.engine.semantic import (
        choice_record,
        choose_public_classes,
        pretrained_on_choice,
        release_semantic_histogram,
        train_pool_classifier,
    )

    if not data.num_classes or not base.num_classes:
        raise SapfError("--public-selection semantic needs labelled private data and a class-conditional model")
    pool = load_dataset(cfg.public_pool, base.image_size, base.channels)
    net = train_pool_classifier(pool, seed=cfg.seed, steps=cfg.semantic_classifier_steps)
    q = cfg.semantic_query()
    # One histogram row, and one pretrained class, per class of the base model (as a federated server has them).
    hist = release_semantic_histogram(net=net, data=data, num_public=pool.num_classes, query=q,
                                      noise_multiplier=noise_multiplier, ledger=ledger, num_labels=base.num_classes)
    chosen = choose_public_classes(hist, q.per_label)
    gen = pretrained_on_choice(pool, chosen, base.num_classes, base, steps=cfg.pretrain_steps, seed=cfg.seed,
                               show_progress=show_progress)
    return gen, choice_record(hist, chosen, pool, q, noise_multiplier)


def noisy_central_images(cfg, gen: DiffusionModel, data: ImageDataset, noise_multiplier: float,
                         ledger: PrivacyLedger | None) -> np.ndarray:
    """DP-FETA's release (recorded in `ledger`) and its post-processing: (K, C, H, W) central images."""
    from sapf.engine.central_images import central_images, image_bound, release_central_images

    if not gen.num_classes:
        raise SapfError("--warmup central-images needs a class-conditional model")
    bound = image_bound(load_dataset(cfg.public_data, gen.image_size, gen.channels))
    sums = release_central_images(data=data, num_classes=gen.num_classes, bound=bound,
                                  noise_multiplier=noise_multiplier, sample_rate=cfg.central_sample_rate,
                                  queries=cfg.central_queries, ledger=ledger)
    return central_images(sums, gen.num_classes, gen.channels, gen.image_size)


def mean_embedding_samples(cfg, gen: DiffusionModel, data: ImageDataset, noise_multiplier: float,
                           ledger: PrivacyLedger | None, show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """DP-MEPF's release (recorded in `ledger`) and its post-processing: a generator matched to the noisy per-class
    mean embeddings, and `cfg.warmup_samples` of its images with their labels, to warm the diffusion model up on."""
    from sapf.engine.mepf import mean_embeddings, public_feature_net, release_mean_embeddings

    if not gen.num_classes or not data.num_classes:
        raise SapfError("--warmup mean-embeddings needs labelled private data and a class-conditional model")
    net = public_feature_net(load_dataset(cfg.public_data, gen.image_size, gen.channels), seed=cfg.seed)
    sums = release_mean_embeddings(net=net, data=data, num_classes=gen.num_classes,
                                   noise_multiplier=noise_multiplier, ledger=ledger)
    means, _ = mean_embeddings(sums, gen.num_classes)
    return warmup_generator_samples(cfg, net, means, gen, show_progress)


def warmup_generator_samples(cfg, net, means: np.ndarray, gen: DiffusionModel, show_progress: bool = True
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Post-processing of mean embeddings (one site's, or a server's combination of the sites'): a generator matched
    to them and `cfg.warmup_samples` of its labelled images, for the warm-up."""
    from sapf.engine.mepf import generator_images, train_generator

    generator, _ = train_generator(net, means, image_size=gen.image_size, channels=gen.channels,
                                   steps=cfg.warmup_generator_steps, lr=cfg.generator_lr, seed=cfg.seed,
                                   show_progress=show_progress)
    return generator_images(generator, cfg.warmup_samples, seed=cfg.seed)


def write_warmup_samples(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from sapf.outputs import class_grid, save_png, to_uint8

    save_png(path, class_grid(to_uint8(images), labels))


def write_central_images(path: Path, central: np.ndarray) -> None:
    from sapf.outputs import image_grid, save_png, to_uint8

    save_png(path, image_grid(to_uint8(central), ncol=len(central), scale=4))  # one image a class, 0 to K-1


PRIVATE_DIR = "private"
PRIVATE_NOTE = """This folder holds statistics of the private training data that carry no DP noise (training
loss, timings). They are outside the (epsilon, delta) guarantee in privacy.json: keep them with the
data curator and do not share them with the rest of this run directory.
"""


def write_private_curves(run_dir: Path, curves: dict, title: str) -> None:
    """`RUN/private/`: the un-noised curves of private data, kept apart from what may be shared."""
    from sapf.outputs import write_text
    from sapf.plots import plot_curve

    d = run_dir / PRIVATE_DIR
    write_json(d / "training.json", curves)
    write_text(d / "README.txt", PRIVATE_NOTE)
    if curves.get("loss"):
        plot_curve(d / "loss.png", {"loss": curves["loss"]}, "step", "noise-prediction MSE", title, smooth=20)


def _write_pictures(out: Path, gen: DiffusionModel, seed: int, sample_grid: bool, device: str = "cpu") -> None:
    from sapf.engine.sampling import GRID_SAMPLES, sample
    from sapf.outputs import class_grid, save_png

    if sample_grid:
        images, labels = sample(gen, GRID_SAMPLES, seed=seed, show_progress=False, device=device)
        save_png(out / "grid.png", class_grid(images, labels))
