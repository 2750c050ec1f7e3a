"""`DataError`: bad data that stops a run, as a type (not a message prefix).

Most bad data never stops a run: a sample that cannot be used is counted under its reason
and replaced (loader.py). What is left is data the run cannot go on with: labels asked for
and missing or not integers, labels a task cannot take, shards with no readable image in a
rank's epoch, shards changed under a saved position. Those raise `DataError` with one line
saying what and where; a verb prints it and exits 2 (`train.verb`).

Crossing processes: a DataLoader worker does not let it propagate, because torch re-raises a
worker's exception in the main process as `type(exc)(message)` with the worker's whole
traceback in the message (`torch._utils.ExceptionWrapper.reraise`): the type survives, the
one line does not. The worker sends the exception object itself as an item of its stream
instead (pickled: a ValueError with a single message argument pickles as it is), and the
main process raises it (`loader._ShardLoader._ordered`). Across ranks nothing is sent: the
rank that meets the data says its line, the others see a lost peer.

A ValueError, so that callers which refuse bad input as a ValueError (`finetune.*_shards`
checks, `gigamim probe`) keep doing so.
"""


class DataError(ValueError):
    """Data a run cannot go on with; the message is one line naming the sample or shards."""
