#!/usr/bin/env bash
# Every GPU measurement of "production scale on one GPU" (issue 11) in one go, ~9 minutes on an
# H200, from the repo root, with only python3 + torch (+ triton for train.compile) + numpy/pandas/pyarrow
# (+ mtrank's own deps) and no network:
#
#     bash benchmarks/gpu_scale.sh                     # -> docs/results/scale-h200/*.json, *.log, summary.md
#     bash benchmarks/gpu_scale.sh --cpu-quick DIR     # every path at tiny size on CPU (what the tests run)
#
# 0. the prefetched batches on the GPU == the CPU path's (checksums, order, mid-epoch start); the readers
#    alone: rows/s by reader processes, 16 batches per item, pinned;
# 1. files to the GPU: W2-layout Parquet (6M rows, 1,200 steps) vs the same model from GPU memory, 4/8/12/16
#    reader processes, bf16, batch 4,096, the graphed step: a warm-up round not counted, then 3 rounds in
#    alternating order, medians, over whole runs and from step 200 on (reader start-up, capture excluded);
#    8 readers also with the items copied into pinned memory (before: not page-locked in place); then 3 whole
#    epochs (4,395 steps), 8 readers with the next epoch's readers started before each epoch ends (the default)
#    and without (each epoch's readers start when it does), and one whole epoch of 16M rows (3,907 steps),
#    against memory; every run with its timeline (readers started, first item, steps; each reader's way to its
#    first item): ~5 minutes. The target's verdict is over whole runs of whole epochs (start-up included);
#    the 1,200-step runs (~1 s of training) show what the fixed start-up costs a short run;
# 2. W2 in memory at batch 4,096 and 65,536, input padded to 64 columns, train.compile: samples/s, MFU, profile;
# 3. W3 (DLRM-DCNv2-sized, DCNv2 + MLP experts, 3 tasks) at batch 65,536 as it was (dense Adam, odd input),
#    then at 32,768 / 65,536 with the input padded to 64, the table on row-wise Adagrad (graphed) and
#    train.compile: samples/s, MFU, peak memory, profile by kernel family;
# 4. the AUC price of batch 65,536: W2 (padded, not compiled: compiling changes no number that matters here,
#    and 32 compiles would cost minutes), trained as production rankers are, one pass over a stream of fresh
#    rows: 16M training rows, one epoch (cosine after a 5% warm-up), validation and test on 2M other rows each.
#    (With 4M rows and several epochs both batch sizes overfit after 1-2 epochs, W2's 10,000-row tables
#    memorising the rows: docs/results/scale-h200/auc-explore/README.md.) Same search space for both batch
#    sizes: 3 Adam lrs (centred on each one's optimum of a first one-pass run) x {Adam on the tables, row-wise
#    Adagrad on the tables} = 6 configurations, one run each at seed 0, chosen on validation; the chosen one of
#    each batch size rerun at seeds 1..10 (paired: same init, same row order), test AUC mean / median, the
#    paired shortfall with its 95% bootstrap interval, verdict. train.sparse.lr is row-wise Adagrad's lr; batch
#    65,536's 16x fewer steps want a ~3x larger one (a row's move grows like lr sqrt(its updates)). Its JSON is
#    written after every run: a run cut short keeps the finished pairs and their verdict. ~4 minutes.
#
# STAGES="files w2 w3 auc" (the default: all) runs some of the stages only, e.g. STAGES=auc.
# Then a table of everything with a verdict per target (python3 benchmarks/w3.py --summary DIR).
set -euo pipefail
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--cpu-quick" ]]; then
    DEST=${2:?give a results folder}; DEV=cpu
    DP=(--rows 20000 --steps 4 --batch-size 256 --workers 0 2 --repeats 1 --device cpu --threads 1)
    RD=(--rows 20000 --batch-size 256 --workers 0 2 --groups 16)
    PC=(--rows 20000 --batch-size 256 --workers 2 --device cpu)
    EP=(--rows 20000 --epochs 3 --batch-size 256 --workers 2 --no-overlap-workers 2 --repeats 1 --device cpu
        --threads 1 --timeline)
    EP1=(--rows 30000 --epochs 1 --batch-size 256 --workers 2 --repeats 1 --device cpu --threads 1 --timeline)
    COMMON=(--device cpu --quick --threads 1)
    W2=(--batch-sizes 64 128 --profile-steps 0 --compile aot_eager)
    W2AUC=(--batch-sizes 64 128 --profile-steps 0 --seeds 2 --patience 2
           --grid "64:lr=0.002,0.004;sparse=dense,rowwise_adagrad;sparse_lr=0.05"
                  "128:lr=0.004,0.008;sparse=dense,rowwise_adagrad;sparse_lr=0.1")
    W3PLAIN=(--batch-sizes 128)
    W3=(--batch-sizes 128 --sparse rowwise_adagrad --compile aot_eager)
    DATA=${DEST}/data
else
    DEST=${1:-docs/results/scale-h200}; DEV=cuda
    DP=(--rows 6000000 --steps 1200 --batch-size 4096 --workers 4 8 12 16 --repeats 3 --precision bf16
        --pin-copy-workers 8 --timeline)
    RD=(--rows 2000000 --batch-size 4096 --workers 1 8 16 --groups 16 --pin)
    PC=(--rows 2000000 --batch-size 4096 --workers 4 --device cuda)
    EP=(--rows 6000000 --epochs 3 --batch-size 4096 --workers 8 --no-overlap-workers 8 --repeats 3 --precision bf16
        --timeline)
    EP1=(--rows 16000000 --epochs 1 --batch-size 4096 --workers 8 --repeats 3 --precision bf16 --timeline)
    COMMON=(--device cuda --threads 16)
    W2=(--batch-sizes 4096 65536 --steps 200 --compile)
    W2AUC=(--batch-sizes 4096 65536 --steps 50 --profile-steps 0 --epochs 1 --patience 0 --seeds 10
           --auc-rows 16000000 --eval-rows 2000000
           --grid "4096:lr=0.001,0.002,0.004;sparse=dense,rowwise_adagrad;sparse_lr=0.06"
                  "65536:lr=0.008,0.016,0.032;sparse=dense,rowwise_adagrad;sparse_lr=0.18")
    W3PLAIN=(--batch-sizes 65536 --steps 30 --profile-steps 3 --pad-to 1)
    W3=(--batch-sizes 32768 65536 --steps 50 --profile-steps 5 --sparse rowwise_adagrad --compile)
    DATA=/tmp/mtrank-w2
fi
mkdir -p "$DEST"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
$PY -c "import torch, mtrank.train; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    || { echo "gpu_scale.sh: cannot import torch and mtrank.train (run from the repo root)"; exit 1; }
if [[ $DEV == cuda ]]; then
    $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: use --cpu-quick DIR'"
fi
STAGES=" ${STAGES:-files w2 w3 auc} "
for stage in $STAGES; do
    [[ " files w2 w3 auc " == *" $stage "* ]] || { echo "gpu_scale.sh: unknown stage $stage in STAGES"; exit 1; }
done
SECONDS=0
if [[ $STAGES == *" files "* ]]; then
$PY benchmarks/data_pipeline.py --data "$DATA" --json "$DEST/prefetch_check.json" prefetch-check "${PC[@]}" 2>&1 \
    | tee "$DEST/prefetch_check.log" || FAILED="the prefetch check (see $DEST/prefetch_check.log)"
$PY benchmarks/data_pipeline.py --data "$DATA" --json "$DEST/read.json" read "${RD[@]}" 2>&1 | tee "$DEST/read.log"
echo "[$SECONDS s] readers alone done"
$PY benchmarks/data_pipeline.py --data "$DATA" --json "$DEST/data_pipeline.json" train "${DP[@]}" 2>&1 \
    | tee "$DEST/data_pipeline.log"
$PY benchmarks/data_pipeline.py --data "$DATA" --json "$DEST/data_pipeline_epochs.json" train "${EP[@]}" 2>&1 \
    | tee "$DEST/data_pipeline_epochs.log"
$PY benchmarks/data_pipeline.py --data "$DATA" --json "$DEST/data_pipeline_epoch.json" train "${EP1[@]}" 2>&1 \
    | tee "$DEST/data_pipeline_epoch.log"
echo "[$SECONDS s] files to GPU done"
fi
if [[ $STAGES == *" w2 "* ]]; then
$PY benchmarks/w3.py --workload W2 "${COMMON[@]}" --pad-to 64 "${W2[@]}" --json "$DEST/w2_batch.json" 2>&1 \
    | tee "$DEST/w2_batch.log"
echo "[$SECONDS s] W2 throughput done"
fi
if [[ $STAGES == *" w3 "* ]]; then
$PY benchmarks/w3.py --workload W3 "${COMMON[@]}" "${W3PLAIN[@]}" --json "$DEST/w3_plain.json" 2>&1 \
    | tee "$DEST/w3_plain.log"
$PY benchmarks/w3.py --workload W3 "${COMMON[@]}" --pad-to 64 "${W3[@]}" --json "$DEST/w3.json" 2>&1 | tee "$DEST/w3.log"
echo "[$SECONDS s] W3 done"
fi
if [[ $STAGES == *" auc "* ]]; then
# last: the longest step (32 trainings); a time limit cuts its last pairs, not the throughput figures
$PY benchmarks/w3.py --workload W2 "${COMMON[@]}" --pad-to 64 "${W2AUC[@]}" --json "$DEST/w2_auc.json" 2>&1 \
    | tee "$DEST/w2_auc.log"
echo "[$SECONDS s] W2 AUC study done"
fi
$PY benchmarks/w3.py --summary "$DEST" | tee "$DEST/summary.md"
if [[ -n ${FAILED:-} ]]; then echo "FAILED: $FAILED"; exit 1; fi
