"""Defaults that the engine, the Flower apps and the CLI share, in one place. Torch-free: the
CLI reads them at start-up without importing the engine."""

# Central DP fine-tuning (`sapf train`): few large Poisson batches rather than many small ones. Measured on mnist5k,
# ε=10, central DP-SAPF (30% of all matrices), the same 12,800 examples seen, 500 samples, eta 1 (session 7):
#   batch  64 × 200 steps: Adam lr 1e-3 → FID 206 / downstream acc 0.676; 3e-3 → 170 / 0.680; 1e-2 → 267 / 0.594
#   batch 128 × 100 steps: lr 5e-3 → 167 / 0.668
#   batch 256 ×  50 steps: lr 3e-3 → 184 / 0.644; 1e-2 → 126 / 0.705
# A larger batch sums more clipped gradients against one draw of noise (whose σ grows far more slowly than the
# batch at a fixed ε and number of epochs), so each step carries more signal per unit of noise; Adam moves every coordinate by about lr per step, signal or noise, so with small batches a large rate
# random-walks the adapters (speckled samples). 75 steps of 256 see about 4.8 epochs of mnist5k's 4,000 examples.
TRAIN_BATCH_SIZE = 256
TRAIN_STEPS = 75
LORA_LR = 1e-2
# Full fine-tuning moves every weight and needs a smaller rate; batch 256 × 50 steps as above: 3e-4 → FID 198 /
# acc 0.668; 1e-3 → 135 / 0.690 (higher rates not tried).
FULL_LR = 1e-3
SGD_LORA_LR = 1.0  # measured: central DP-SAPF, ε=10, 200 steps of 64 (README); 5.0 diverges
# Federated sites (`sapf federate --clients 4`: 6 rounds × 25 local steps per site, adapters averaged each round)
# share LORA_LR. Measured with a fresh optimizer every round, batch 32: 1e-2 → FID 190 / acc 0.647; 3e-3 → 204 / 0.677;
# batch 128 × 6 local steps at 1e-2 → 202 / 0.651. With Adam's state carried across rounds, 1e-2: batch 32 → FID
# 168–220 / acc 0.641–0.678 (four runs); batch 64 → FID 122, 113, 153, 150 / acc 0.671, 0.709, 0.667, 0.675
# (four runs; the default since).
