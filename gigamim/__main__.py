"""`python -m gigamim <verb>`: the same program as the `gigamim` console script, so that
`deepspeed --num_gpus N --module gigamim pretrain ...` launches it."""

import sys

from gigamim.cli import main

if __name__ == "__main__":
    sys.exit(main())
