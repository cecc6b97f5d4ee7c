#!/usr/bin/env bash
# Every benchmark at its accelerator size, one after another, then one table of their results.
#
#   experiments/benchmarks/accelerator.sh            # one GPU/TPU host: < 8 min (target)
#   experiments/benchmarks/accelerator.sh --smoke    # tiny sizes: checks that everything runs
#
# Run from the repository root. PYTHON (default: python) runs the scripts; DATA_DIR (default:
# /tmp/bench_accelerator, or /tmp/bench_accelerator_smoke) holds the simulated datasets that
# the input-pipeline and training benchmarks build once and share; LOGS (default: a new
# temporary folder) keeps every benchmark's full output. What each benchmark measures: its
# docstring and experiments/benchmarks/README.md. A benchmark that fails is reported in the
# table and the script exits non-zero after the others have run.
set -uo pipefail

smoke=0
case "${1:-}" in
  --smoke) smoke=1 ;;
  "") ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac
python=${PYTHON:-python}
if [[ $smoke == 1 ]]; then
  data_dir=${DATA_DIR:-/tmp/bench_accelerator_smoke}
else
  data_dir=${DATA_DIR:-/tmp/bench_accelerator}
fi
logs=${LOGS:-$(mktemp -d /tmp/bench_accelerator_logs.XXXXXX)}
mkdir -p "$logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

names=() commands=() patterns=()
add() {  # add NAME PATTERN (grep -E of its result lines) ARGS...
  names+=("$1"); patterns+=("$2"); shift 2; commands+=("$*")
}

if [[ $smoke == 1 ]]; then
  add train "RESULT" experiments/benchmarks/train.py --models=smoke --dtypes=float32,bfloat16 \
    --steps=1 --repeats=1 --threads=2 "--data_dir=$data_dir"
  add augment "ms per batch" experiments/benchmarks/augment.py --batch=2 --height=32 --width=40 \
    --repeats=1 --matmul-size=256
  add projections "pairs/s|speed-up|kidney set" experiments/benchmarks/projections.py --sources=2 \
    --targets=4 --pixels=1000 --pixel-pairs=1
  add simulate "calls.*cubes/s|fraction of the target" experiments/benchmarks/simulate.py \
    --parts=throughput --repeats=1 --batch=1
  add input_pipeline "^  path |^  pipeline  |pipeline / raw bytes, parallel" \
    experiments/benchmarks/input_pipeline.py --images_per_set=1 --batch_size=2 --threads=2 \
    --waves=1 --repeats=1 "--data_dir=$data_dir"
else
  # The input pipeline first: it builds the full-size dataset the training benchmark reads.
  add input_pipeline "^  path |^  pipeline  |pipeline / raw bytes, parallel" \
    experiments/benchmarks/input_pipeline.py --images_per_set=5 --batch_size=8 --threads=8 \
    --waves=2 --repeats=2 "--data_dir=$data_dir"
  add train "RESULT" experiments/benchmarks/train.py --models=default --dtypes=float32,bfloat16 \
    --steps=5 --repeats=2 --threads=8 "--data_dir=$data_dir"
  add augment "ms per batch" experiments/benchmarks/augment.py --batch=8 --repeats=10
  add projections "pairs/s|speed-up|kidney set" experiments/benchmarks/projections.py --kidney
  add simulate "calls.*cubes/s|fraction of the target" experiments/benchmarks/simulate.py \
    --parts=throughput --repeats=3 --batch=8
fi

status=0
seconds=() results=()
for i in "${!names[@]}"; do
  log="$logs/${names[$i]}.log"
  echo "== ${names[$i]}: $python ${commands[$i]} (log: $log)" >&2
  start=$SECONDS
  # shellcheck disable=SC2086  # the command is a list of words
  if $python ${commands[$i]} >"$log" 2>&1; then
    results+=("$(grep -E "${patterns[$i]}" "$log" | sed -e 's/^ *//' -e 's/  */ /g' \
                 -e 's/|/\\|/g' | awk 'NR > 1 { printf "<br>" } { printf "%s", $0 }')")
  else
    status=1
    results+=("FAILED: $(tail -n 1 "$log" | sed 's/|/\\|/g')")
  fi
  seconds+=($((SECONDS - start)))
done

device=$($python -c 'import jax; d = jax.devices()[0]; print(f"{len(jax.devices())} x {d.device_kind} ({d.platform})")' 2>/dev/null)
echo
echo "Benchmarks on $device$([[ $smoke == 1 ]] && echo ', smoke sizes'); logs in $logs"
echo
echo "| benchmark | seconds | results |"
echo "|---|---|---|"
for i in "${!names[@]}"; do
  echo "| ${names[$i]} | ${seconds[$i]} | ${results[$i]} |"
done
exit $status
