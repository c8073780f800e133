#!/usr/bin/env bash
# Reproduce the H2-Cache paper's table: CUTE80, 100 steps, 1024x1024, guidance 3.5, seed 0, 4-bit FLUX.1-dev
# (nunchaku V1) with the Realism LoRA at 0.8; baseline, Block Cache (0.12), TeaCache (0.8) and H2-Cache
# (0.15 / 0.22); time and CLIP-IQA, plus PSNR/SSIM/LPIPS against the baseline. Resumable: rerun to continue.
# The baseline is the native, unpatched pipeline (nunchaku's fused forward); "h2cache none" (h2cache's own block
# loop, caching nothing) runs beside it, so the cost of owning the forward is visible in the table.
#
#   bash run_exper.sh                      the paper's table (GPU; several GPUs are used through accelerate)
#   bash run_exper.sh --quick              the whole chain on the embedded CPU model, a few prompts and steps
#   bash run_exper.sh --tau-grid           H2-Cache over a tau1 x tau2 grid
#   bash run_exper.sh --steps-sweep        the four methods at 10, 20, 50 and 100 steps
#   bash run_exper.sh --pfs-ablation       H2-Cache with and without Pooled Feature Summarization
#   bash run_exper.sh --with-forecast      also H2-Forecast (this project's method) at its defaults, in every mode
#   (--quick combines with the three ablations: the same chain on the embedded CPU model)
# Options: --out DIR (default results/), --weights-dir DIR (metric weights), --skip-missing, --processes N,
#          --limit N (first N prompts), --lora PATH:SCALE (default: XLabs-AI/flux-RealismLora at 0.8, GPU only)
set -euo pipefail
cd "$(dirname "$0")"

mode=paper quick=0 forecast=0 out=results processes="" limit="" weights=() skip=() lora="" lora_given=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) quick=1 ;;
    --tau-grid) mode=tau-grid ;;
    --steps-sweep) mode=steps-sweep ;;
    --pfs-ablation) mode=pfs-ablation ;;
    --with-forecast) forecast=1 ;;
    --out) out="$2"; shift ;;
    --weights-dir) weights=(--weights-dir "$2"); shift ;;
    --skip-missing) skip=(--skip-missing) ;;
    --processes) processes="$2"; shift ;;
    --limit) limit="$2"; shift ;;
    --lora) lora="$2"; lora_given=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "run_exper.sh: error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

methods=(
  "baseline"
  "none:label=h2cache none"
  "fbcache:threshold=0.12,label=Block Cache"
  "teacache:threshold=0.8,label=TeaCache"
  "h2:tau1=0.15,tau2=0.22,label=H2-Cache"
)
[[ $forecast == 1 ]] && methods+=("h2-forecast:label=H2-Forecast")
setup=(--prompts eval/prompts/cute80.jsonl --model nunchaku --nunchaku-class v1 --steps 100 --height 1024
       --width 1024 --guidance 3.5 --seed 0)
if [[ $quick == 1 ]]; then
  # The embedded model draws its own grammar, so its prompts come from there; no metric weights are needed.
  setup=(--prompts grammar:6 --model tiny --steps 20 --seed 0)
  skip=(--skip-missing)
  processes="${processes:-1}"
elif [[ $lora_given == 0 ]]; then
  lora="$(python -c 'from huggingface_hub import hf_hub_download as d; print(d("XLabs-AI/flux-RealismLora", "lora.safetensors"))')"
  lora="$lora:0.8"
fi
[[ -n $lora ]] && setup+=(--lora "$lora")
[[ -n $limit ]] && setup+=(--limit "$limit")

if [[ -z $processes ]]; then
  processes="$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')"
fi
launch=(python -m eval.runner)
if [[ $processes -gt 1 ]]; then
  # accelerate's torchrun-based launcher: one process per GPU (or per CPU process on a machine without CUDA).
  launch=(accelerate launch --multi_gpu --num_processes "$processes" -m eval.runner)
fi

run() {  # run OUT_SUBDIR EXTRA_ARGS... CONFIGS...
  local folder="$1"; shift
  "${launch[@]}" "${setup[@]}" "${weights[@]}" "${skip[@]}" --out "$out/$folder" "$@"
}
as_configs() { local c; for c in "$@"; do printf -- '--config\n%s\n' "$c"; done; }

case $mode in
  paper)
    mapfile -t configs < <(as_configs "${methods[@]}")
    run "$([[ $quick == 1 ]] && echo quick || echo paper)" "${configs[@]}" ;;
  steps-sweep)
    mapfile -t configs < <(as_configs "${methods[@]}")
    for steps in 10 20 50 100; do run "steps-$steps" "${configs[@]}" --steps "$steps"; done ;;  # last --steps wins
  tau-grid)
    grid=("baseline")
    [[ $forecast == 1 ]] && grid+=("h2-forecast:label=H2-Forecast")
    for tau1 in 0.05 0.10 0.15 0.20 0.25; do
      for tau2 in 0.10 0.15 0.22 0.30; do grid+=("h2:tau1=$tau1,tau2=$tau2"); done
    done
    mapfile -t configs < <(as_configs "${grid[@]}")
    run tau-grid "${configs[@]}" ;;
  pfs-ablation)
    mapfile -t configs < <(as_configs "baseline" "h2:tau1=0.15,tau2=0.22,label=H2 PFS" \
      "h2:tau1=0.15,tau2=0.22,pfs=false,label=H2 no PFS" "dbfcache:tau1=0.15,tau2=0.22,label=Double FB cache" \
      $([[ $forecast == 1 ]] && echo "h2-forecast:label=H2-Forecast"))
    run pfs-ablation "${configs[@]}" ;;
esac
