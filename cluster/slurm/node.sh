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
exec "${GIGAMIM_CMD[@]}"
