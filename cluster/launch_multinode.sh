#!/usr/bin/env bash
# Multi-node gigamim launch with the deepspeed launcher over ssh (pdsh) or mpirun (openmpi).
#
#   cluster/launch_multinode.sh --hostfile cluster/hostfile [--launcher pdsh|openmpi] \
#       [--env-file cluster/deepspeed_env.template] [--master-addr HOST] [--master-port 29500] \
#       [--verb pretrain|doctor] [--launcher-args "..."] [--dry-run] -- --config gigamim/configs/X.yaml [--set k=v ...]
#
# Run it from a directory that exists on every node (pdsh does `cd $PWD` there), with the same
# python environment on every node. What it adds to a bare `deepspeed --hostfile` call:
#  * the env file is stripped of comments into a copy DeepSpeed can parse (DeepSpeed splits
#    every line of .deepspeed_env on '=' and crashes on comments) and passed via DS_ENV_FILE;
#  * --master_addr defaults to the hostfile's first host (otherwise DeepSpeed sshes there and
#    takes the first address of `hostname -I`, which is often the wrong NIC);
#  * with openmpi the ranks get MASTER_ADDR/MASTER_PORT through the env file: mpirun starts
#    the ranks directly (no per-node launcher sets them) and gigamim does not need mpi4py;
#  * --no_local_rank (LOCAL_RANK is in the environment; the flag would land before the verb);
#  * pretrain gets --resume auto unless --resume is given.
set -euo pipefail

die() { echo "launch_multinode: error: $*" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

hostfile="" launcher="pdsh" env_file="$here/deepspeed_env.template" master_addr="" master_port=29500
verb="pretrain" dry_run="${GIGAMIM_DRY_RUN:-0}" launcher_args=""
while (($#)); do
    case "$1" in
        --hostfile) hostfile="${2:?--hostfile needs a file}"; shift 2 ;;
        --launcher) launcher="${2:?--launcher needs pdsh or openmpi}"; shift 2 ;;
        --env-file) env_file="${2:?--env-file needs a file (or 'none')}"; shift 2 ;;
        --master-addr) master_addr="${2:?}"; shift 2 ;;
        --master-port) master_port="${2:?}"; shift 2 ;;
        --verb) verb="${2:?}"; shift 2 ;;
        # e.g. openmpi: "--mca btl_tcp_if_include ib0" (DeepSpeed defaults to eth0)
        --launcher-args) launcher_args="${2?}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (gigamim arguments go after --)" ;;
    esac
done

[[ -n "$hostfile" ]] || die "--hostfile FILE is required (see cluster/hostfile.example)"
[[ -f "$hostfile" ]] || die "hostfile '$hostfile' not found"
[[ "$launcher" == pdsh || "$launcher" == openmpi ]] || die "--launcher must be pdsh or openmpi, not '$launcher'"
[[ "$master_port" =~ ^[0-9]+$ ]] || die "--master-port '$master_port' is not a number"

# Hosts in hostfile order; every line must read "<host> slots=<n>".
hosts=()
lineno=0
while IFS= read -r line || [[ -n "$line" ]]; do
    lineno=$((lineno + 1))
    line="${line%%#*}"
    [[ "$line" =~ ^[[:space:]]*$ ]] && continue
    [[ "$line" =~ ^[[:space:]]*([^[:space:]]+)[[:space:]]+slots=([0-9]+)[[:space:]]*$ ]] ||
        die "$hostfile line $lineno: expected '<hostname> slots=<gpus>', got '$line'"
    hosts+=("${BASH_REMATCH[1]}")
done <"$hostfile"
((${#hosts[@]})) || die "hostfile '$hostfile' lists no hosts"
master_addr="${master_addr:-${hosts[0]}}"

if [[ "$verb" == pretrain ]]; then
    has_config=0 has_resume=0
    for a in "$@"; do
        [[ "$a" == --config || "$a" == --config=* ]] && has_config=1
        [[ "$a" == --resume || "$a" == --resume=* ]] && has_resume=1
    done
    ((has_config)) || die "no --config given after -- (gigamim pretrain needs one)"
    ((has_resume)) || set -- "$@" --resume auto
fi

# The env file DeepSpeed will read: KEY=VALUE lines only.
ds_env="$(mktemp "${TMPDIR:-/tmp}/gigamim-deepspeed_env.XXXXXX")"
if [[ "$env_file" != none ]]; then
    [[ -f "$env_file" ]] || die "env file '$env_file' not found"
    lineno=0
    while IFS= read -r line || [[ -n "$line" ]]; do
        lineno=$((lineno + 1))
        [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
        [[ "$line" =~ ^[[:space:]]*([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] ||
            die "$env_file line $lineno: expected KEY=VALUE, got '$line'"
        echo "${BASH_REMATCH[1]}=${BASH_REMATCH[2]}"
    done <"$env_file" >"$ds_env"
fi
if [[ "$launcher" == openmpi ]]; then
    { echo "MASTER_ADDR=$master_addr"; echo "MASTER_PORT=$master_port"; } >>"$ds_env"
fi

cmd=(deepspeed --hostfile "$hostfile" --launcher "$launcher")
[[ -n "$launcher_args" ]] && cmd+=(--launcher_args "$launcher_args")
cmd+=(--master_addr "$master_addr" --master_port "$master_port" --no_local_rank --module gigamim "$verb" "$@")

if [[ "$dry_run" == 1 ]]; then
    echo "# ${#hosts[@]} nodes: ${hosts[*]}; master $master_addr:$master_port; launcher $launcher"
    echo "# DS_ENV_FILE=$ds_env:"
    sed 's/^/#   /' "$ds_env"
    printf 'DS_ENV_FILE=%q' "$ds_env"
    printf ' %q' "${cmd[@]}"
    printf '\n'
    rm -f "$ds_env"  # a dry run leaves nothing behind
    exit 0
fi
export DS_ENV_FILE="$ds_env"
exec "${cmd[@]}"
