#!/usr/bin/env bash
# One srun task per node runs this: it writes the node-local hostfile and starts DeepSpeed's
# per-node launcher, which forks one rank per GPU. Arguments: `gigamim pretrain` arguments.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$here/common.sh"
gigamim_require SLURM_NODEID
gigamim_allocation
gigamim_node_cmd "$SLURM_NODEID" "$@"
gigamim_hostfile_text >"$GIGAMIM_HOSTFILE"
echo "[gigamim node $SLURM_NODEID $(hostname)] ${GIGAMIM_CMD[*]}" >&2
# SLURM delivers SIGTERM (time limit, preemption, scancel) to every process of the step. The
# `deepspeed` runner has no SIGTERM handler in the --no_ssh path and would die at once; when
# a task's main process exits SLURM kills what is left of it — the ranks, mid-save. An ignored
# signal stays ignored across exec, so the runner outlives the signal and waits for its
# per-node launcher (which installs its own handler: it passes SIGTERM on to the ranks and
# SIGKILLs them 30 s later), and the ranks (default disposition again after their exec)
# catch it in the trainer and checkpoint.
trap '' TERM
exec "${GIGAMIM_CMD[@]}"
