# Shared by pretrain.sbatch (the batch script, and its dry run) and node.sh (one srun task
# per node): the one place that turns SLURM_* variables into the per-node deepspeed command.
# Sourced, not executed. Needs: python with gigamim importable (for the hostlist expander).

gigamim_die() { echo "gigamim slurm: error: $*" >&2; exit 2; }

# gigamim_require VAR... : fail with a message naming every missing variable.
gigamim_require() {
    local missing=() v
    for v in "$@"; do [[ -n "${!v:-}" ]] || missing+=("$v"); done
    if ((${#missing[@]})); then
        gigamim_die "${missing[*]} not set. Under sbatch SLURM sets them; for a dry run set them yourself, e.g.
  GIGAMIM_DRY_RUN=1 SLURM_JOB_ID=1234 SLURM_NNODES=3 SLURM_JOB_NODELIST='gpu[01-03]' GIGAMIM_GPUS_PER_NODE=8 \\
      bash cluster/slurm/pretrain.sbatch --config gigamim/configs/demo.yaml"
    fi
}

# GPUs (ranks) per node: explicit GIGAMIM_GPUS_PER_NODE, else what SLURM granted
# (SLURM_GPUS_ON_NODE inside a job; SLURM_GPUS_PER_NODE may read "h100:8").
gigamim_gpus_per_node() {
    local g="${GIGAMIM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}"
    g="${g##*:}"
    [[ "$g" =~ ^[0-9]+$ && "$g" -gt 0 ]] ||
        gigamim_die "cannot tell GPUs per node (GIGAMIM_GPUS_PER_NODE, SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE are '${GIGAMIM_GPUS_PER_NODE:-}', '${SLURM_GPUS_ON_NODE:-}', '${SLURM_GPUS_PER_NODE:-}'); request GPUs with --gpus-per-node=N or set GIGAMIM_GPUS_PER_NODE"
    echo "$g"
}

# Sets GIGAMIM_HOSTS (array), GIGAMIM_MASTER, GIGAMIM_PORT, GIGAMIM_GPN from the
# allocation, after checking that it is self-consistent. Node i of the launch is SLURM's
# node i (SLURM_NODEID indexes SLURM_JOB_NODELIST); node 0 hosts the rendezvous.
gigamim_allocation() {
    gigamim_require SLURM_JOB_ID SLURM_NNODES SLURM_JOB_NODELIST
    [[ "$SLURM_NNODES" =~ ^[0-9]+$ ]] || gigamim_die "SLURM_NNODES='$SLURM_NNODES' is not a number"
    local listing
    listing="$("${GIGAMIM_PYTHON:-python}" -m gigamim.runtime.hostlist "$SLURM_JOB_NODELIST")" ||
        gigamim_die "cannot expand SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST'"
    mapfile -t GIGAMIM_HOSTS <<<"$listing"
    ((${#GIGAMIM_HOSTS[@]} == SLURM_NNODES)) ||
        gigamim_die "SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' names ${#GIGAMIM_HOSTS[@]} hosts but SLURM_NNODES=$SLURM_NNODES"
    GIGAMIM_MASTER="${MASTER_ADDR:-${GIGAMIM_HOSTS[0]}}"
    # Same rule as gigamim.runtime.hostlist.slurm_master_port: unique per job, stable across requeues.
    GIGAMIM_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    GIGAMIM_GPN="$(gigamim_gpus_per_node)" || exit 2
}

# The gigamim verb every node runs: pretrain, or e.g. GIGAMIM_VERB=doctor to check a fresh
# allocation through exactly the launch path the training run will take.
GIGAMIM_VERB="${GIGAMIM_VERB:-pretrain}"

# gigamim_node_cmd NODE_ID ARGS... : sets GIGAMIM_CMD (array), the command node NODE_ID runs.
# ARGS are `gigamim $GIGAMIM_VERB` arguments; for pretrain `--resume auto` is added unless
# --resume is given, so a requeued job continues from <checkpoint.dir>/latest.
# `gigamim launch` starts the node's ranks (torch's elastic agent, static rendezvous on the
# first node), forwards SLURM's SIGTERM to them once and waits for their checkpoint
# (--stop-timeout, default 900 s: DeepSpeed's launcher would SIGKILL them after 30 s, too
# short for a SwinV2-G save), and stops the node's ranks when one dies.
gigamim_node_cmd() {
    local node_id="$1"; shift
    [[ "$node_id" =~ ^[0-9]+$ && "$node_id" -lt "$SLURM_NNODES" ]] ||
        gigamim_die "node id '$node_id' is not in 0..$((SLURM_NNODES - 1))"
    local resume=() a
    [[ "$GIGAMIM_VERB" == pretrain ]] && resume=(--resume auto)
    for a in "$@"; do [[ "$a" == --resume || "$a" == --resume=* ]] && resume=(); done
    GIGAMIM_CMD=("${GIGAMIM_PYTHON:-python}" -m gigamim launch
        --nproc-per-node "$GIGAMIM_GPN" --nnodes "$SLURM_NNODES" --node-rank "$node_id"
        --master-addr "$GIGAMIM_MASTER" --master-port "$GIGAMIM_PORT"
        --stop-timeout "${GIGAMIM_STOP_TIMEOUT:-900}"
        "$GIGAMIM_VERB" "$@" "${resume[@]}")
}

# gigamim_checkpoint_dir ARGS... : prints checkpoint.dir of the pretrain run ARGS describe
# (the resolved config: YAML + --set), so the batch shell can tell whether `latest` advanced.
gigamim_checkpoint_dir() {
    "${GIGAMIM_PYTHON:-python}" -m gigamim pretrain "$@" --print-config |
        "${GIGAMIM_PYTHON:-python}" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["checkpoint"]["dir"])'
}

# gigamim_latest DIR : the tag DIR/latest names ("" when absent).
gigamim_latest() { cat "$1/latest" 2>/dev/null | head -c 200 | tr -cd 'A-Za-z0-9_.-' || true; }

# The pretrain arguments must name a config (the single source of truth for the run).
gigamim_check_args() {
    [[ "$GIGAMIM_VERB" == pretrain ]] || return 0
    local a
    for a in "$@"; do [[ "$a" == --config || "$a" == --config=* ]] && return 0; done
    gigamim_die "no --config given. Usage: sbatch cluster/slurm/pretrain.sbatch --config FILE.yaml [--set key=value ...]"
}

# Before spending an allocation: the config named by --config must exist (relative to $PWD).
gigamim_check_config_exists() {
    local prev="" a path
    for a in "$@"; do
        path=""
        [[ "$prev" == --config ]] && path="$a"
        [[ "$a" == --config=* ]] && path="${a#--config=}"
        # A bare name ("demo") is one of the packaged configs (gigamim/configs/NAME.yaml).
        [[ -z "$path" || -f "$path" || ( "$path" != */* && -f "${GIGAMIM_ROOT:-.}/gigamim/configs/${path%.yaml}.yaml" ) ]] ||
            gigamim_die "config file '$path' not found (relative to $PWD), and it is not a packaged config name"
        prev="$a"
    done
}
