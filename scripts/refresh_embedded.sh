#!/usr/bin/env bash
# Everything shipped or published that depends on the embedded model's weights, in order, after a
# (re)training run in runs/embedded (scripts/train_embedded.py). Each step writes atomically; rerun a
# step alone by copying its line. Takes about an hour on the 2-core CI-class machine.
set -euo pipefail
PY=${PY:-.venv/bin/python}
TRAIN_ARGS=${TRAIN_ARGS:-"--steps 8500 --cooldown 2500"}

# 1. the EMA weights and config into stepcache/assets (the same arguments as the training run)
$PY scripts/train_embedded.py --work-dir runs/embedded $TRAIN_ARGS --export
# 2. the model card's quality table: 200 samples at CFG 1.5 and 4.0, and the real-digits floor
$PY scripts/eval_embedded.py --num 200 --out benchmarks/results/embedded_quality.json
# 3. MagCache ratios and TeaCache polynomial for this model (separate seeds from every benchmark)
.venv/bin/stepcache calibrate --model embedded --num-samples 40 --num-sampling-steps 50 --sampler ddim \
    --cfg-scale 4.0 --seed 10000 --out runs/calibration_embedded.json
$PY scripts/merge_calibration.py runs/calibration_embedded.json --name embedded-ddim50
# 4. the shipped L2C router
$PY benchmarks/bench_l2c.py --iters 450 --lr 0.3 --lam 1e-5 --batch-size 8 --repeats 3 --ship \
    --out benchmarks/results/l2c_embedded.json
# 5. the frontier (README "Results")
$PY benchmarks/bench_frontier.py --repeats 2
# 6. the tuned policy at 3x measured speedup, against the bench's hand-picked settings
rm -rf benchmarks/results/tune
.venv/bin/stepcache tune --model embedded --sampler ddim --num-sampling-steps 50 --target-speedup 3 \
    --speedup-basis measured --threads 1 --no-progress --compare fora:interval=2 fora:interval=3 \
    fora:interval=4 fora:interval=5 toca:interval=3,fresh_ratio=0.1 toca:interval=4,fresh_ratio=0.1 \
    toca:interval=5,fresh_ratio=0.1 l2c:threshold=0.1 l2c:threshold=0.3 \
    --out benchmarks/results/tune/policy.json --out-dir benchmarks/results/tune
# 7. learned Forecast schedules
$PY scripts/learn_forecast_schedules.py --budgets 12 15 18 24
