"""Defaults that the engine, the Flower apps and the CLI share, in one place. Torch-free: the
CLI reads them at start-up without importing the engine."""

# Central DP fine-tuning (`sapf train`): few large Poisson batches beat many small ones at the same number of
# examples seen; chosen by measurement, see docs/experiments.md#learning-rates.
TRAIN_BATCH_SIZE = 256  # expected Poisson batch of `sapf train` (a quarter of the records for a smaller set)
TRAIN_STEPS = 75  # DP-SGD steps of `sapf train`: about 4.8 epochs of mnist5k's 4,000 training examples
# Adam learning rate of LoRA, shared by `sapf train` and the federated sites; chosen by measurement, see
# docs/experiments.md#learning-rates and docs/experiments.md#federated-defaults.
LORA_LR = 1e-2
FULL_LR = 1e-3  # Adam learning rate of full DP fine-tuning (every weight moves, so smaller); see the same section
# `--warmup auto` (the default): DP-FETA's central-image warm-up from this target ε up, none below. Measured on central
# DP-SAPF (docs/experiments.md#what-keeps-class-identity): class fidelity 0.70 -> 0.81 at ε = 10, 0.66 -> 0.60 at ε = 1.
WARMUP_MIN_EPSILON = 5.0
SGD_LORA_LR = 1.0  # SGD (momentum 0.9) learning rate of LoRA; 5.0 diverges (docs/experiments.md#learning-rates)
