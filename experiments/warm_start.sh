#!/usr/bin/env bash
# Issue 18, from nothing: the two supervised warm starts, then every method from them on the
# built-in game and the long-horizon dungeon (5 seeds each), the ablations of AEM, and
# docs/results/summary.json. Every table of docs/results.md "From a supervised warm start" comes
# from this one command:
#
#   bash experiments/warm_start.sh            # RUNS=runs WORKERS=2 by default
#
# It is resumable: finished runs are reused and an interrupted one resumes from its checkpoint, so
# the sweep can be spread over several sessions (about 17 CPU-hours in all on the 2-core machine,
# docs/results.md). Set STAGES to run a part, e.g. STAGES="sft treasure" or STAGES=report (tables
# from the finished runs only, nothing trained).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs}
WORKERS=${WORKERS:-2}
STAGES=${STAGES:-"sft treasure ablations dungeon etpo_q4 report"}
SEEDS="0 1 2 3 4"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

has() { [[ " $STAGES " == *" $1 "* ]]; }

# The warm starts: the exports of the sft stage, or existing ones (TREASURE_WS=DIR DUNGEON_WS=DIR; a
# partly run sweep must resume with the paths it started with, model.source being part of its config).
TREASURE_WS=${TREASURE_WS:-$RUNS/sft_treasure/export/final}
DUNGEON_WS=${DUNGEON_WS:-$RUNS/sft_dungeon/export/final}
# ArCHer has no working recipe on the dungeon yet (docs/results.md): it collapsed within 10 actor
# iterations under four settings (its critic's advantage barely tracks the Monte-Carlo one there,
# experiments/critic_check.py), so the dungeon's sweep leaves it out.
DUNGEON_METHODS="grpo grpo_aem dapo dapo_aem rloo rloo_aem gigpo ppo etpo"
if has sft; then
  # The clean expert: 80 steps on the built-in game (0.29 held-out), 200 on the dungeon (0.23).
  [ -f "$TREASURE_WS/config.json" ] || python -m aem_jax.train --config=configs/sft.py \
      --config.total_steps=80 --workdir="$RUNS/sft_treasure"
  [ -f "$DUNGEON_WS/config.json" ] || python -m aem_jax.train --config=configs/sft.py:longhorizon \
      --config.total_steps=200 --config.eval.num_tasks=64 --workdir="$RUNS/sft_dungeon"
fi

# Equal environment steps for every method (config.env_steps_budget): 61,440 on the built-in game
# (60 steps of 64 tasks x 8 two-turn episodes; DAPO's dynamic sampling spends them in fewer steps),
# 80,000 on the dungeon (about 58 steps of 16 tasks x 8 episodes of 9-12 turns), at most STEPS steps.
declare -A BUDGET=([treasure]=61440 [dungeon]=80000)
declare -A STEPS=([treasure]=60 [dungeon]=100)

# ENV WARM_START METHODS OUT [extra compare.py flags]
sweep() {
  local env=$1 ws=$2 methods=$3 out=$4; shift 4
  python experiments/compare.py --env "$env" --methods $methods --seeds $SEEDS --steps "${STEPS[$env]}" \
      --env-steps "${BUDGET[$env]}" --heldout 128 --warm "$ws" --workers "$WORKERS" --runs-dir "$RUNS/warm_$env" \
      --out "docs/$out" "$@"
}
has treasure && sweep treasure "$TREASURE_WS" all warm_treasure
# The ablations share the runs of grpo and grpo_aem with the comparison (same runs directory).
has ablations && sweep treasure "$TREASURE_WS" ablations warm_ablations_treasure
has dungeon && sweep dungeon "$DUNGEON_WS" "$DUNGEON_METHODS" warm_dungeon
# ETPO on the dungeon with 4 Q steps per minibatch (etpo.q_steps), beside the sweep's ETPO (same runs
# directory: its etpo runs are reused), then both re-evaluated against their warm start on 512 held-out
# tasks with common random numbers (experiments/reeval_sweep.py; docs/results.md, "On the dungeon").
if has etpo_q4; then
  sweep dungeon "$DUNGEON_WS" "etpo etpo_q4" etpo_dungeon
  python experiments/reeval_sweep.py --env dungeon --methods etpo etpo_q4 --seeds $SEEDS --steps "${STEPS[dungeon]}" \
      --env-steps "${BUDGET[dungeon]}" --heldout 128 --warm "$DUNGEON_WS" --runs-dir "$RUNS/warm_dungeon" \
      --tasks 512 --workers "$WORKERS" --pairs etpo_q4-etpo --out docs/etpo_dungeon_reeval
fi

if has report; then
  # The tables from whatever has finished so far.
  args=()
  for spec in "treasure all warm_treasure $TREASURE_WS" "treasure ablations warm_ablations_treasure $TREASURE_WS" \
              "dungeon DUNGEON warm_dungeon $DUNGEON_WS"; do
    read -r env methods out ws <<<"$spec"
    [ "$methods" = DUNGEON ] && methods=$DUNGEON_METHODS
    if sweep "$env" "$ws" "$methods" "$out" --report-only; then
      args+=(--compare "$env=docs/$out.json")
      if [ "$out" = warm_dungeon ] && [ -f docs/etpo_dungeon_reeval.json ]; then
        args+=(--reeval dungeon=docs/etpo_dungeon_reeval.json)
      fi
    fi
  done
  [ ${#args[@]} -gt 0 ] && python experiments/summary.py "${args[@]}" --out docs/results/summary.json \
      --markdown docs/results/summary.md
fi
