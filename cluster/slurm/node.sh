#!/usr/bin/env bash
# One srun task per node runs this: it starts `gigamim launch`, which forks one rank per GPU.
# Arguments: `gigamim pretrain` arguments.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"
gigamim_require SLURM_NODEID
gigamim_allocation
gigamim_node_cmd "$SLURM_NODEID" "$@"
echo "[gigamim node $SLURM_NODEID $(hostname)] ${GIGAMIM_CMD[*]}" >&2
# SLURM delivers SIGTERM (time limit, preemption, scancel) to every process of the step.
# `gigamim launch` catches it, passes it on to its ranks once and waits for their checkpoint
# before it exits; when a task's main process exits SLURM kills what is left of it, so the
# launcher must be that main process (exec), and must outlive the save.
exec "${GIGAMIM_CMD[@]}"
