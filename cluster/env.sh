# Site environment for cluster/slurm/*.sbatch (sourced by the batch script before srun; srun
# passes the environment to every node). Copy and edit, or point GIGAMIM_ENV at your own.
# Everything here must be safe to source on a login node too (the dry run sources it).

# --- software: uncomment what your site needs ---------------------------------------------
# module load cuda/12.4 nccl
# source /shared/venvs/gigamim/bin/activate

# --- NCCL: see cluster/deepspeed_env.template for what each variable does ------------------
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3,mlx5_4,mlx5_5,mlx5_6,mlx5_7

# --- threads and caches ----------------------------------------------------------------------
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export PYTHONUNBUFFERED=1
# JIT builds (DeepSpeed ops, Triton kernels) on node-local disk, not a shared filesystem.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/torch_extensions}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/triton_cache}"
