#!/usr/bin/env bash
# The toy world's comparison runs (bench/README.md): share and base over seeds 0-2, and
# share under --tune lora and --tune qlora, two runs at a time with one thread each (the
# machine has 2 cores; the lone 2-thread wall time is bench/default_run.sh's). Then the
# tables. Usage: bash bench/toy_world.sh [OUT_DIR]      (~35 min on 2 cores)
set -euo pipefail
out=${1:-runs/toy-world}
mkdir -p "$out"
run() {  # name, then train arguments
  local name=$1; shift
  rm -rf "$out/$name"
  OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 /usr/bin/time -f "$name wall %e s, peak RSS %M KB" \
    tinylmm train -o "$out/$name" "$@" > "$out/$name.log" 2>&1
  tail -n 1 "$out/$name.log"
}
run share-s0 --recipe share train.seed=0 & run share-s1 --recipe share train.seed=1 & wait
run share-s2 --recipe share train.seed=2 & run base-s0 --recipe base train.seed=0 & wait
run base-s1 --recipe base train.seed=1 & run base-s2 --recipe base train.seed=2 & wait
run share-lora --recipe share --tune lora & run share-qlora --recipe share --tune qlora & wait
# after the pretrain stage alone: the connector aligned, LLM and tower as pretrained
HF_HUB_OFFLINE=1 tinylmm eval "$out/share-s0/pretrain/final" --bench shapes --out "$out/share-s0-pretrain.json"
python bench/toy_table.py "$out"/share-s{0,1,2} "$out"/base-s{0,1,2}
python bench/toy_table.py "$out"/share-s0 "$out"/share-lora "$out"/share-qlora
