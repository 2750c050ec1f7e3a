"""`count_cat.py LOG FILE`: `cat FILE` that appends "<FILE>\t<bytes written>" to LOG when it ends (also on a closed pipe):
the bytes a `pipe:` reader actually pulled, measured outside the reader (used by data_bytes_bench)."""

import os
import sys


def main() -> int:
    log, path = sys.argv[1], sys.argv[2]   # FILE last: readers name a pipe: shard by its last token
    sent = 0
    try:
        with open(path, "rb") as f:
            out = sys.stdout.buffer
            while True:
                data = f.read(65536)
                if not data:
                    break
                out.write(data)
                out.flush()
                sent += len(data)
    except BrokenPipeError:
        pass
    finally:
        with open(log, "a") as f:
            f.write(f"{path}\t{sent}\n")
        try:
            sys.stdout = open(os.devnull, "w")   # no second BrokenPipeError at interpreter exit
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
