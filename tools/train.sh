#!/usr/bin/env bash
# Train (and then test) a PPT experiment.
#
#   tools/train.sh                       # no arguments: the synthetic demo end to end
#   tools/train.sh train.threads=1       # the demo with config overrides
#   tools/train.sh --config configs/ppt_joint.yaml --name ppt --gpus 8
#   tools/train.sh --config configs/ppt_joint.yaml --datasets scannet:2,s3dis:1 --gpus 4 optim.lr=0.02
#   tools/train.sh --config configs/scannet_spunet.yaml --name ft --weights exp/ppt/model/model_best.pth
#   tools/train.sh --peft dapt --weights exp/ppt/model/model_best.pth --datasets s3dis --name s3dis_dapt
#   tools/train.sh --config configs/ppt_joint.yaml --name ppt --gpus 8 --machines 2 --rank 0 --master 10.0.0.1:29500
#   tools/train.sh --config configs/ppt_joint.yaml --gpus 8 --plan   # steps, epochs, eval cost; no run
#   tools/train.sh --name ppt --resume                               # continue (config from exp/ppt)
#
# Flags: --config FILE, --name NAME (default: config file name), --datasets name:ratio,...
# (the first dataset defines the epoch: one pass over it; the others cycle, reshuffled),
# --data-root DIR, --gpus N (processes per machine), --machines M, --rank R (this machine),
# --master ADDR:PORT, --weights FILE (initialise, fine-tune), --peft STAGE (parameter-efficient
# fine-tuning of --weights: full|linear|decoder|bitfit|lora|dapt|pointpeft, config configs/peft_STAGE.yaml
# unless --config is given), --resume (without --config: exp/NAME/config.yaml), --plan (print
# datasets, sizes, steps per epoch, total steps and evaluation volume, then exit), --no-test; anything
# of the form key=value is a config override. More than one process -> torchrun.
# With no arguments (or only key=value overrides): make data/synthetic if missing, train
# configs/demo.yaml into exp/demo (resumed if it already exists), then run tools/test.py on it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
# spconv's torch.cuda.amp deprecation warnings drown the log; set PYTHONWARNINGS to see them
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::FutureWarning}"
die() { echo "error: $*" >&2; exit 2; }

CONFIG="" NAME="" DATASETS="" DATA_ROOT="" GPUS=1 MACHINES=1 RANK_ID=0 MASTER="" WEIGHTS=""
RESUME=0 TEST=1 OVERRIDES=() PEFT="" PLAN=0
DEMO=0

need() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need "$@"; CONFIG="$2"; shift 2 ;;
    --name) need "$@"; NAME="$2"; shift 2 ;;
    --datasets) need "$@"; DATASETS="$2"; shift 2 ;;
    --data-root) need "$@"; DATA_ROOT="$2"; shift 2 ;;
    --gpus) need "$@"; GPUS="$2"; shift 2 ;;
    --machines) need "$@"; MACHINES="$2"; shift 2 ;;
    --rank) need "$@"; RANK_ID="$2"; shift 2 ;;
    --master) need "$@"; MASTER="$2"; shift 2 ;;
    --weights) need "$@"; WEIGHTS="$2"; shift 2 ;;
    --peft) need "$@"; PEFT="$2"; shift 2 ;;
    --resume) RESUME=1; shift ;;
    --no-test) TEST=0; shift ;;
    --plan) PLAN=1; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) die "unknown argument '$1' (flags: --config --name --datasets --data-root --gpus --machines --rank --master --weights --peft --resume --plan --no-test, or key=value)" ;;
  esac
done

# No --config / --name / --peft / --weights / --datasets / --resume: the demo (key=value overrides
# apply to it, e.g. `tools/train.sh train.threads=1`).
[[ -z "$CONFIG$NAME$PEFT$WEIGHTS$DATASETS$DATA_ROOT" && $RESUME -eq 0 ]] && DEMO=1
if [[ $DEMO -eq 1 ]]; then
  CONFIG=configs/demo.yaml NAME=demo
  # overrides checked before anything is generated (a plan from stand-in sizes needs no data)
  "$PY" tools/train.py --config "$CONFIG" --plan --sizes structured3d:999/9,scannet:999/9,s3dis:999/9 \
      "${OVERRIDES[@]+"${OVERRIDES[@]}"}" > /dev/null || exit 2
  if [[ ! -d data/synthetic ]]; then
    echo "demo: generating synthetic data in data/synthetic"
    "$PY" tools/make_synthetic.py --out data/synthetic --scenes 30 --seed 0
  fi
  [[ -f exp/demo/model/model_last.pth ]] && RESUME=1  # a rerun finishes (or just re-tests) it
fi

[[ -z "$CONFIG" && -n "$PEFT" ]] && CONFIG="configs/peft_$PEFT.yaml"
if [[ -z "$CONFIG" && $RESUME -eq 1 && -n "$NAME" ]]; then
  CONFIG="exp/$NAME/config.yaml"
  [[ -f "$CONFIG" ]] || die "--resume: no $CONFIG (is --name right? train without --resume first)"
fi
[[ -n "$CONFIG" ]] || die "--config is required (e.g. --config configs/demo.yaml), or run without arguments for the demo"
[[ -f "$CONFIG" ]] || die "config file $CONFIG does not exist"
for n in "$GPUS" "$MACHINES"; do [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "--gpus/--machines must be positive integers, got '$n'"; done
[[ "$RANK_ID" =~ ^[0-9]+$ && "$RANK_ID" -lt "$MACHINES" ]] || die "--rank must be in 0..$((MACHINES - 1)), got '$RANK_ID'"
if [[ "$MACHINES" -gt 1 && -z "$MASTER" ]]; then die "--machines $MACHINES needs --master ADDR:PORT (address of the rank-0 machine)"; fi
[[ -z "$MASTER" || "$MASTER" =~ ^[^:]+:[0-9]+$ ]] || die "--master must look like ADDR:PORT, got '$MASTER'"
[[ -n "$NAME" ]] || NAME="$(basename "$CONFIG" .yaml)"

ARGS=(--config "$CONFIG" --name "$NAME")
[[ -n "$DATASETS" ]] && ARGS+=(--datasets "$DATASETS")
[[ -n "$DATA_ROOT" ]] && ARGS+=(--data-root "$DATA_ROOT")
[[ -n "$WEIGHTS" ]] && ARGS+=(--weights "$WEIGHTS")
[[ -n "$PEFT" ]] && ARGS+=(--peft "$PEFT")
[[ $RESUME -eq 1 ]] && ARGS+=(--resume)
ARGS+=("${OVERRIDES[@]+"${OVERRIDES[@]}"}")

if [[ $PLAN -eq 1 ]]; then
  exec "$PY" tools/train.py --plan --world-size $((GPUS * MACHINES)) "${ARGS[@]}"
fi

if [[ "$GPUS" -gt 1 || "$MACHINES" -gt 1 ]]; then
  if [[ -x .venv/bin/torchrun ]]; then RUN=(.venv/bin/torchrun); else RUN=("$PY" -m torch.distributed.run); fi
  if [[ "$MACHINES" -gt 1 ]]; then
    RUN+=(--nnodes "$MACHINES" --node_rank "$RANK_ID" --master_addr "${MASTER%:*}" --master_port "${MASTER##*:}")
  else
    RUN+=(--standalone)
  fi
  RUN+=(--nproc_per_node "$GPUS" tools/train.py)
else
  RUN=("$PY" tools/train.py)
fi

start=$(date +%s)
"${RUN[@]}" "${ARGS[@]}"
echo "training took $(( $(date +%s) - start )) s"

if [[ $TEST -eq 1 && "$RANK_ID" -eq 0 ]]; then
  TEST_ARGS=(--exp "exp/$NAME")
  [[ -n "$DATA_ROOT" ]] && TEST_ARGS+=(--data-root "$DATA_ROOT")
  [[ -f "exp/$NAME/model/model_best.pth" ]] || TEST_ARGS+=(--weights "exp/$NAME/model/model_last.pth")
  "$PY" tools/test.py "${TEST_ARGS[@]}"
fi
if [[ -x .venv/bin/tensorboard ]]; then BOARD=.venv/bin/tensorboard; else BOARD=tensorboard; fi
echo "total $(( $(date +%s) - start )) s; experiment in exp/$NAME (watch it: $BOARD --logdir exp/$NAME)"
