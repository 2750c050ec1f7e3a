#!/bin/bash
# usage: run1.sh TAG PYTEST_ARGS...   (runs in the torch 2.11 venv, niced, one file at a time)
tag=$1; shift
cd /work/main
export PATH=/work/venv-t211/bin:$PATH
export VIRTUAL_ENV=/work/venv-t211
start=$(date +%s)
nice -n 10 python -m pytest -p no:cacheprovider -rA -q --junitxml=/work/t211-raw/$tag.xml "$@" > /work/t211-raw/$tag.txt 2>&1
rc=$?
end=$(date +%s)
echo "$tag rc=$rc wall=$((end-start))s args=$*" | tee -a /work/t211-raw/summary.log
tail -1 /work/t211-raw/$tag.txt
