"""What every run needs from its process, below `train/`, `checkpoint/` and `launch/`: the
process group (`dist.init_distributed`), this rank's place in it, and how a lost peer shows.
Nothing here knows about an engine or a model."""
