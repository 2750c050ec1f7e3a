#!/bin/bash
cd /work/main
R=/work/t211-raw/run1.sh
$R F_models_attention_paths tests/test_models_attention_paths.py
PYTHONPATH=/work/np23 $R F_kernels_numpy2.3.5 tests/test_kernels.py
$R F_kernels_numpy2.5.5 tests/test_kernels.py
$R F_cuda_path tests/test_cuda_path.py --timeout 900
$R F_compile_zero3 tests/test_compile_zero3.py --timeout 900
$R F_compile tests/test_compile.py --timeout 900
$R F_models_swinv2 tests/test_models_swinv2.py
$R F_models_simmim tests/test_models_simmim.py
$R F_models_flops_groups tests/test_models_flops_groups.py
$R F_models_partition tests/test_models_partition.py
$R F_flex tests/test_flex.py
$R F_compile_mfu tests/test_compile_mfu.py
$R F_compile_peak tests/test_compile_peak.py
$R F_config tests/test_config.py
$R F_bench tests/test_bench.py
PYTHONPATH=/work/np23 $R F_gpu_smoke_numpy2.3.5 tests/test_gpu_smoke.py --timeout 1500
$R F_trainer tests/test_trainer.py --timeout 900
$R F_plan tests/test_plan.py tests/test_plan_activation.py --timeout 900
$R F_finetune tests/test_finetune.py --timeout 900
$R F_models_vit_swin tests/test_models_vit_swin.py
echo CHAIN_DONE >> /work/t211-raw/summary.log
